"""Text-only training data for a model that reads images as words (the labels bridge).

Each sample is a made-up classifier verdict (the bridge's own sentence for drawn class probabilities)
with a question and the answer that verdict supports: the thing it is sure of, yes or no about what it
is and is not, and "I can't tell from the image." where the verdict cannot say — the classifier is not
sure, or the question asks what no class label tells (colours, counts, text, places, names, ...). No
image is needed: the LM learns to answer from the words it will read in an image's place. A data recipe
asks for it as `{format: label-qa, limit: 6000}`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cache

import numpy as np
import torch

from mmllm.models.labels import LabelBridge, Verdict

DECLINE = "I can't tell from the image."
WHAT = (
    "What is this?", "What is in the picture?", "What does this photo show?", "What is shown here?",
    "What can you see in the image?", "What is the main object in this photo?", "What is it?",
    "Describe what you see.", "What is in this image?", "What is pictured?",
)  # fmt: skip
WHAT_KIND = ("What {kind} is this?", "What kind of {kind} is this?", "What {kind} is in the photo?")
PRESENCE = (
    "Is there a {x}?", "Is there a {x} in the picture?", "Is this a {x}?", "Does the photo show a {x}?",
    "Can you see a {x}?", "Is there a {x} in this image?", "Is it a {x}?", "Do you see a {x} here?",
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
# Everyday things people ask about, most of which ImageNet has no class for.
COMMON = (
    "car", "dog", "cat", "bird", "tree", "house", "table", "chair", "horse", "boat", "airplane", "bicycle",
    "bus", "truck", "phone", "book", "computer", "flower", "fish", "ball", "cup", "bottle", "shoe", "clock",
    "train", "cow", "sheep", "elephant", "pizza", "banana", "apple", "umbrella", "laptop", "television",
)  # fmt: skip
KINDS_ASKED = ("animal", "vehicle", "dog", "bird", "fish", "food", "instrument", "cat", "drink", "fruit")


@cache
def _families(bridge: LabelBridge) -> list[int]:
    """Nodes with a few classes under them: what a classifier is often sure of as a whole."""
    return [n for n, size in enumerate(bridge.sizes.tolist()) if 2 <= size <= 40]


def _draw_probabilities(bridge: LabelBridge, rng: random.Random) -> torch.Tensor:
    """Class probabilities like a classifier's: sure of one class, of a family, or of nothing."""
    classes = len(bridge.class_names)
    probabilities = torch.zeros(classes)
    scenario = rng.random()
    if scenario < 0.5:  # one class
        probabilities[rng.randrange(classes)] = rng.uniform(0.5, 0.98)
    elif scenario < 0.8:  # a family: classes under one parent share the mass
        node = rng.choice(_families(bridge))
        family = np.flatnonzero(bridge.membership[node]).tolist()
        total = rng.uniform(0.55, 0.97)
        shares = torch.tensor([rng.random() + 0.1 for _ in family[: rng.randint(2, 4)]])
        for member, share in zip(family, shares / shares.sum(), strict=False):
            probabilities[member] += total * float(share)
    for _ in range(rng.randint(2, 6)):  # the rest spread thinly (all of it when sure of nothing)
        probabilities[rng.randrange(classes)] += rng.uniform(0.01, 0.3 if scenario >= 0.8 else 0.06)
    return probabilities / max(1.0, float(probabilities.sum()))


def _words_of(verdict: Verdict) -> set[str]:
    """Every name the verdict supports, and the head word of each ("big cat" supports "cat"; "instrument
    of execution" supports nothing more)."""
    names = [n.lower() for n in (verdict.concept, *verdict.kinds) if n]
    return set(names) | {n.split()[-1] for n in names if " of " not in n}


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
    is to a moped), else an everyday thing or any class."""
    supported = _words_of(verdict)
    near = bridge.path_up(verdict.node)[1:4]
    while True:
        if near and rng.random() < 0.5:
            relatives = np.flatnonzero(bridge.membership[rng.choice(near)] - bridge.membership[verdict.node])
            other = bridge.class_names[int(rng.choice(relatives.tolist() or [0]))]
        else:
            other = rng.choice(COMMON) if rng.random() < 0.5 else rng.choice(bridge.class_names)
        if not ({other.lower(), other.split()[-1].lower()} & supported):
            return other


def _question(verdict: Verdict, bridge: LabelBridge, rng: random.Random) -> tuple[str, str]:
    """One question about the verdict and the answer it supports."""
    subject = verdict.concept or rng.choice(["object", "thing", "animal", "car"])
    roll = rng.random()
    if roll < 0.22:  # unanswerable from labels, whatever the classifier says
        return _unanswerable(subject, rng), DECLINE
    if verdict.concept is None:  # nothing it is sure of: nothing to answer
        if roll < 0.65:
            return rng.choice(WHAT), DECLINE
        return rng.choice(PRESENCE).format(x=rng.choice(bridge.class_names)), DECLINE
    supported = _words_of(verdict)
    if roll < 0.45:
        kinds = [k for k in KINDS_ASKED if k in supported]
        if kinds and rng.random() < 0.5:
            return rng.choice(WHAT_KIND).format(kind=rng.choice(kinds)), f"{verdict.concept.capitalize()}."
        return rng.choice(WHAT), f"{verdict.concept.capitalize()}."
    if roll < 0.5:
        if {"clothing", "garment", "person"} & supported:
            return rng.choice(PRESENCE).format(x=rng.choice(PEOPLE)), "Yes."
        return rng.choice(PRESENCE).format(x=rng.choice(PEOPLE)), DECLINE
    if rng.random() < 0.5:  # yes: the concept or something it is a kind of
        return rng.choice(PRESENCE).format(x=rng.choice(sorted(supported))), "Yes."
    return rng.choice(PRESENCE).format(x=_ruled_out(verdict, bridge, rng)), "No."


def label_qa_pairs(count: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """`count` (prompt, answer) pairs: the bridge's sentence and a question, and the answer it supports."""
    bridge = LabelBridge()
    rng = random.Random(seed)
    for _ in range(count):
        verdict = bridge.verdict(_draw_probabilities(bridge, rng))
        question, answer = _question(verdict, bridge, rng)
        yield f"{bridge.sentence(verdict)}\n{question}", answer
