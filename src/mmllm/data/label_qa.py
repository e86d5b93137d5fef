"""Text-only training data for a model that reads images as words (the labels bridge).

Each sample is a made-up classifier verdict (the bridge's own sentence for drawn class probabilities)
with a question and the answer that verdict supports: what it shows, in the bridge's words ("Some kind of
flower, perhaps a daisy."); "Yes." for the kinds and synonyms it is sure of, "Possibly." for its guess,
"No." for what it rules out (when sure of nothing, only the everyday kinds it names as ruled out, word
for word); and "I can't tell from the image." where the verdict cannot say — the classifier is not
sure, or the question asks what no class label tells (colours, counts, text, places, names, ...). No
image is needed: the LM learns to answer from the words it will read in an image's place.
A data recipe asks for it as `{format: label-qa, limit: 6000}`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cache

import numpy as np
import torch

from mmllm.models.labels import EVERYDAY, LabelBridge, Verdict, article

DECLINE = "I can't tell from the image."
POSSIBLY = "Possibly."
WHAT = (
    "What is this?", "What is in the picture?", "What does this photo show?", "What is shown here?",
    "What can you see in the image?", "What is the main object in this photo?", "What is it?",
    "Describe what you see.", "What is in this image?", "What is pictured?",
)  # fmt: skip
WHAT_KIND = ("What {kind} is this?", "What kind of {kind} is this?", "What {kind} is in the photo?")
PRESENCE = (
    "Is there {a} {x}?", "Is there {a} {x} in the picture?", "Is this {a} {x}?",
    "Does the photo show {a} {x}?", "Can you see {a} {x}?", "Is there {a} {x} in this image?",
    "Is it {a} {x}?", "Do you see {a} {x} here?", "Are there any {xs}?", "Does this image contain {a} {x}?",
)  # fmt: skip
UNANSWERABLE = (
    "What colour is the {x}?", "What color is it?", "What colour is the background?",
    "What color is the {x}?",
    "How many {x}s are there?", "How many objects are in the picture?", "How many people are there?",
    "What does the text say?", "What is written here?", "What is written on the {x}?", "Read the sign.",
    "Where was this photo taken?", "What country is this?", "Where is the {x}?",
    "What time is it?", "When was this picture taken?", "What year is it?", "What season is it?",
    "Who is this?", "What is the person's name?", "What is this person's job?", "How old is the {x}?",
    "What is the {x} made of?", "Is the {x} happy?", "What is the weather like?", "How big is the {x}?",
    "What brand is the {x}?", "Is it day or night?", "What is the {x} doing?", "How much does the {x} cost?",
)  # fmt: skip
UNANSWERABLE_YES_NO = (
    "Is the {x} {a}?", "Is it {a}?", "Is the {x} {s}?", "Is it {w} outside?", "Are there {n} {x}s?",
    "Is the picture taken at {t}?", "Is the background {a}?",
)  # fmt: skip
COLOURS = ("red", "blue", "green", "black", "white", "brown", "yellow", "grey", "orange", "pink")
STATES = ("running", "sleeping", "happy", "wet", "moving", "old", "young", "big", "small", "broken", "new")
WEATHER = ("raining", "sunny", "snowing", "cold", "warm")
PEOPLE = ("person", "man", "woman", "child", "people")
KINDS_ASKED = (
    "animal", "vehicle", "dog", "bird", "fish", "food", "cat", "drink", "fruit", "building", "flower",
)  # fmt: skip


@cache
def _families(bridge: LabelBridge) -> tuple[list[int], list[int]]:
    """Nodes with a few classes under them (what a classifier is often sure of as a whole), and the named
    kinds with a few to a hundred."""
    sizes = bridge.sizes.tolist()
    return (
        [n for n, size in enumerate(sizes) if 2 <= size <= 40],
        [n for n in bridge.kinds if 2 <= sizes[n] <= 100],
    )


def _draw_probabilities(bridge: LabelBridge, rng: random.Random) -> torch.Tensor:
    """Class probabilities like a classifier's: sure of one class, of a family or kind (often with one
    member standing out), or of nothing; over a thin background on every class, as a softmax leaves."""
    classes = len(bridge.class_names)
    background = torch.empty(classes).exponential_(
        generator=torch.Generator().manual_seed(rng.getrandbits(32))
    )
    probabilities = background**3 / (background**3).sum() * rng.uniform(0.02, 0.3)
    scenario = rng.random()
    if scenario < 0.4:  # one class
        probabilities[rng.randrange(classes)] = rng.uniform(0.45, 0.98)
    elif scenario < 0.85:  # a family or kind: classes under one node share the mass
        node = rng.choice(_families(bridge)[scenario >= 0.6])
        family = np.flatnonzero(bridge.membership[node]).tolist()
        rng.shuffle(family)
        total = rng.uniform(0.45, 0.97)
        shares = torch.tensor([rng.random() ** 2 + 0.05 for _ in family[: rng.randint(2, 5)]])
        for member, share in zip(family, shares / shares.sum(), strict=False):
            probabilities[member] += total * float(share)
    for _ in range(rng.randint(2, 6)):  # the rest spread thinly (all of it when sure of nothing)
        probabilities[rng.randrange(classes)] += rng.uniform(0.01, 0.3 if scenario >= 0.85 else 0.06)
    return probabilities / max(1.0, float(probabilities.sum()))


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def _presence(word: str, rng: random.Random) -> str:
    return rng.choice(PRESENCE).format(a=article(word), x=word, xs=_plural(word))


@cache
def _lemmas_above(bridge: LabelBridge, node: int) -> frozenset[str]:
    """Every lemma of the node and of all it is a kind of, in lower case, with their head words: none of
    them may be asked about as a thing the photo does not show."""
    above = np.flatnonzero((bridge.membership >= bridge.membership[node]).all(1)).tolist()
    lemmas = {w.lower() for n in above for w in bridge.words[n]}
    return frozenset(lemmas | {w.split()[-1] for w in lemmas})


@cache
def _kinds_under(bridge: LabelBridge, node: int) -> list[str]:
    """The vocabulary words of the named nodes under `node`."""
    below = (bridge.membership <= bridge.membership[node]).all(1)
    return sorted({word for n, word in bridge.kinds.items() if below[n] and n != node})


def _unanswerable(subject: str, rng: random.Random) -> str:
    """A question no class label answers, open or yes/no."""
    if rng.random() < 0.6:
        return rng.choice(UNANSWERABLE).format(x=subject)
    return rng.choice(UNANSWERABLE_YES_NO).format(
        x=subject,
        a=rng.choice(COLOURS),
        s=rng.choice(STATES),
        w=rng.choice(WEATHER),
        n=rng.randint(2, 9),
        t=rng.choice(("night", "noon", "dawn")),
    )


def _ruled_out(verdict: Verdict, bridge: LabelBridge, rng: random.Random) -> str:
    """Something the verdict rules out: often a near miss (a class under the same ancestor, as a car
    is to a moped), else an everyday thing, a vocabulary word or any class."""
    supported = _lemmas_above(bridge, verdict.node) | set(verdict.may_show)
    near = bridge.path_up(verdict.node)[1:4]
    while True:
        roll = rng.random()
        if near and roll < 0.3:
            relatives = np.flatnonzero(bridge.membership[rng.choice(near)] - bridge.membership[verdict.node])
            other = bridge.class_names[int(rng.choice(relatives.tolist() or [0]))]
        elif near and roll < 0.45:  # a sibling kind: a car, when the verdict is a moped
            other = rng.choice(_kinds_under(bridge, rng.choice(near)) or [rng.choice(EVERYDAY)])
        elif roll < 0.6:
            other = rng.choice(EVERYDAY)
        elif roll < 0.8:
            other = rng.choice(sorted(bridge.kinds.values()))
        else:
            other = rng.choice(bridge.class_names)
        if not ({other.lower(), other.split()[-1].lower()} & supported):
            return other


def _not_ruled_out(verdict: Verdict, bridge: LabelBridge, rng: random.Random) -> str:
    """Something an unsure verdict does not name as ruled out, which it must not answer "no" about: most
    often what a weak guess is a kind of ("motorcycle" for a moped at 30%, when "car" is ruled out), else a
    person, an everyday thing or vocabulary word it does not name (a member of a kind it names too: "pug"
    is not "dog" word for word), a weak guess itself, or any class. Never a name holding a listed word
    ("fire truck" when "truck" is ruled out): those are left out of training either way."""
    while True:
        roll = rng.random()
        if roll < 0.35:
            name = rng.choice(verdict.guesses)[0]
            # ImageNet names a few classes alike ("crane": a bird and a machine): either may be the guess.
            columns = [c for c, other in enumerate(bridge.class_names) if other == name]
            above = np.flatnonzero(bridge.membership[:, columns].any(1)).tolist()
            word = rng.choice([bridge.kinds[n] for n in above if n in bridge.kinds] or [name])
        elif roll < 0.45:
            word = rng.choice(PEOPLE)
        elif roll < 0.7:
            word = rng.choice(EVERYDAY)
        elif roll < 0.85:
            word = rng.choice(sorted(bridge.vocabulary))
        else:
            word = rng.choice([name for name, _ in verdict.guesses] + [rng.choice(bridge.class_names)])
        if not set(word.lower().replace("-", " ").split()) & set(verdict.ruled_out):
            return word


def _question(verdict: Verdict, bridge: LabelBridge, rng: random.Random) -> tuple[str, str]:
    """One question about the verdict and the answer it supports."""
    subject = verdict.kind or rng.choice(
        [s for s in ("object", "thing", "animal", "car") if s not in verdict.ruled_out]
    )
    roll = rng.random()
    if roll < 0.22:  # unanswerable from labels, whatever the classifier says
        return _unanswerable(subject, rng), DECLINE
    if verdict.answer is None:  # nothing it is sure of: only what it rules out can be answered
        if roll < 0.5:
            return rng.choice(WHAT), DECLINE
        if verdict.ruled_out and roll < 0.68:
            return _presence(rng.choice(verdict.ruled_out), rng), "No."
        return _presence(_not_ruled_out(verdict, bridge, rng), rng), DECLINE
    if roll < 0.45:
        kinds = [k for k in KINDS_ASKED if k in verdict.shows]
        if kinds and rng.random() < 0.5:
            return rng.choice(WHAT_KIND).format(kind=rng.choice(kinds)), verdict.answer
        return rng.choice(WHAT), verdict.answer
    if roll < 0.5:
        answer = "Yes." if {"clothing", "person"} & set(verdict.shows) else DECLINE
        return _presence(rng.choice(PEOPLE), rng), answer
    if roll < 0.65 and verdict.may_show:
        return _presence(rng.choice(verdict.may_show), rng), POSSIBLY
    if rng.random() < 0.5:  # yes: what it shows, or something that is a kind of
        return _presence(rng.choice(verdict.shows), rng), "Yes."
    return _presence(_ruled_out(verdict, bridge, rng), rng), "No."


def label_qa_pairs(count: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """`count` (prompt, answer) pairs: the bridge's sentence and a question, and the answer it supports."""
    bridge = LabelBridge()
    rng = random.Random(seed)
    for _ in range(count):
        verdict = bridge.verdict(_draw_probabilities(bridge, rng))
        question, answer = _question(verdict, bridge, rng)
        yield f"{bridge.sentence(verdict)}\n{question}", answer
