"""The labels bridge: an image reaches the LM as words — what an ImageNet classifier is sure it shows.

A LENS-style bridge (Berrios et al. 2023): no projector to train, the LM reads the classifier's verdict
as text. Class probabilities are summed up WordNet's hypernym tree ("tiger cat 36%, Egyptian cat 32%,
tabby 21%" -> domestic cat 89%), and the verdict names the most specific thing it is sure of **in the
words people use**: the vocabulary of `photo_vocabulary.json` (the class names of COCO, LVIS and Open
Images mapped onto the tree), so a lion photo is "Some kind of cat, perhaps a lion.", never
"Placental.". One class standing out under that kind is offered as a guess. Below the sure level, the
top two classes agreeing on a kind still name it (missile 26% and projectile 19%: a weapon, 46%). Sure
of nothing, the verdict says so, and names the everyday kinds the classifier rules out (summed under
`rule_out`, 5% by default: "Rules out: bird, car, cat, ..."), so the LM can answer "no" about those and
decline the rest.

Every backend (torch, ONNX, llama.cpp) turns class probabilities into the LM's words here and only here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mmllm.models.design import ModelDesign

HIERARCHY_FILE = Path(__file__).with_name("imagenet_hierarchy.json")
VOCABULARY_FILE = Path(__file__).with_name("photo_vocabulary.json")
# A class stands out, and is offered as a guess, at this share and this many times the runner-up's.
GUESS_SHARE, GUESS_LEAD = 0.25, 1.5
# Below the sure level, a kind holding both top classes (each a weak guess or more) is named at this share.
AGREED = 0.3
# Things people ask about in photos (basic-level words). The bridge rules out (under `rule_out`) only
# those that name at least RULED_OUT_MIN_CLASSES ImageNet classes (all their senses together): a kind
# covered by a few classes ("horse", "flower"; "bus": school bus, minibus, trolleybus) can be in a photo
# the classifier puts nothing on (a drawn bus: pencil sharpener 8%, the bus classes together under 1%).
EVERYDAY = (
    "car", "dog", "cat", "bird", "tree", "house", "table", "chair", "horse", "boat", "airplane", "bicycle",
    "bus", "truck", "phone", "book", "computer", "flower", "fish", "ball", "cup", "bottle", "shoe", "clock",
    "train", "cow", "sheep", "elephant", "pizza", "banana", "apple", "umbrella", "laptop", "television",
    "animal", "vehicle", "food", "fruit", "vegetable", "building", "insect", "snake", "spider", "monkey",
    "bear", "hat", "drink",
)  # fmt: skip
RULED_OUT_MIN_CLASSES = 4
MAX_SYNONYMS = 2  # WordNet synonyms listed per kind ("car, auto, automobile")


@dataclass(frozen=True)
class Verdict:
    """What the bridge makes of one image's class probabilities."""

    answer: str | None  # what it shows, said to a person ("Some kind of flower, perhaps a daisy."), or None
    kind: str | None  # the vocabulary word the answer names ("flower"), or None when sure of nothing
    node: int | None  # the most specific node it is sure of (named or not)
    confidence: float  # the named kind's summed probability
    shows: list[str]  # what a presence question is answered "yes" for: the kinds it is sure of, synonyms
    may_show: list[str]  # the guess and its kinds below the sure one: "possibly"
    guesses: list[tuple[str, float]]  # the top classes with their probabilities
    ruled_out: list[str] = field(default_factory=list)  # everyday kinds it rules out (when sure of nothing)


class LabelBridge:
    """ImageNet-1k class probabilities -> a sentence the LM reads in place of the image."""

    def __init__(
        self,
        top_k: int = ModelDesign.projector_labels_top_k,
        min_probability: float = 0.05,
        sure: float = ModelDesign.projector_labels_sure,
        rule_out: float = ModelDesign.projector_labels_rule_out,
    ):
        self.top_k, self.min_probability, self.sure, self.rule_out = top_k, min_probability, sure, rule_out
        self.words, self.parents, self.membership, self.classes = _tree()
        self.vocabulary, self.kinds = _vocabulary()
        self.sizes = self.membership.sum(1)  # (nodes,) classes under each node
        self.depths = [len(self.path_up(n)) for n in range(len(self.words))]
        self.class_names = [self.name(c) for c in self.classes]
        self.everyday = self._everyday_classes()

    @property
    def settings(self) -> dict[str, Any]:
        """The settings a model's config sets (`MultimodalConfig.labels_bridge`)."""
        return {"top_k": self.top_k, "sure": self.sure, "rule_out": self.rule_out}

    def name(self, node: int) -> str:
        """A node's word: its vocabulary word if it has one, else WordNet's first lemma."""
        return self.kinds.get(node, self.words[node][0])

    def verdict(self, probabilities: np.ndarray) -> Verdict:
        """(classes,) probabilities (an array, or a CPU tensor) -> what it is sure the image shows."""
        probabilities = np.asarray(probabilities, np.float32)
        order = np.argsort(-probabilities, kind="stable")
        top = order[: self.top_k]
        guesses = [
            (self.class_names[i], float(probabilities[i]))
            for i in top.tolist()
            if probabilities[i] >= self.min_probability
        ] or [(self.class_names[int(top[0])], float(probabilities[top[0]]))]
        scores = self.membership @ probabilities  # (nodes,) summed over the classes under each node
        sure = np.flatnonzero(scores >= self.sure).tolist()
        named = [n for n in sure if n in self.kinds]
        if not named and min(probabilities[order[:2]]) >= self.min_probability:
            # The top two classes agree on a kind: sure of it at a lower level.
            both = self.membership[:, order[0]] * self.membership[:, order[1]]
            sure = np.flatnonzero((scores >= min(AGREED, self.sure)) & (both > 0)).tolist()
            named = [n for n in sure if n in self.kinds]
        if not named:
            ruled_out = [word for word, row in self.everyday.items() if row @ probabilities < self.rule_out]
            return Verdict(None, None, None, 0.0, [], [], guesses, ruled_out)
        kind = self._most_specific(named)
        node = self._most_specific(sure)
        first, second = float(probabilities[order[0]]), float(probabilities[order[1]])
        best = self.classes[int(order[0])]
        under_kind = bool(self.membership[kind, order[0]])
        word, best_name = self.kinds[kind], self.class_names[int(order[0])]
        # Every sure node holds the most specific one (two sets with over half the mass each overlap): it,
        # the nodes up to the named kind ("house cat" above "Egyptian cat"), then the kinds above.
        below_kind = [n for n in sure if self.sizes[n] < self.sizes[kind] and n not in named]
        chain = [node, *sorted(below_kind + named, key=self.sizes.__getitem__)]
        shows = [w for n in chain for w in self._words(n)]
        may_show: list[str] = []
        if node == best and best == kind:  # sure of one class, and it has a word of its own
            answer = f"{word.capitalize()}."
        elif node == best:  # sure of one class, named by its kind
            answer = f"{best_name.capitalize()}, a kind of {word}."
        elif under_kind and best_name != word and first >= max(GUESS_SHARE, GUESS_LEAD * second):
            answer = f"Some kind of {word}, perhaps {article(best_name)} {best_name}."
            # The guess and what it is a kind of, short of what is sure ("missile" may be a rocket).
            maybe = [
                n for n in self.kinds if self.membership[n, order[0]] and scores[n] < self.sure and n != best
            ]
            may_show = self._words(best) + [self.name(n) for n in sorted(maybe, key=self.sizes.__getitem__)]
        else:
            answer = f"Some kind of {word}."
        shows = list(dict.fromkeys(shows))
        may_show = [w for w in dict.fromkeys(may_show) if w not in shows]
        return Verdict(answer, word, node, float(scores[kind]), shows, may_show, guesses)

    def _everyday_classes(self) -> dict[str, np.ndarray]:
        """Each everyday word the bridge may rule out -> the (classes,) 0/1 row of every class it names, in
        any of its senses ("cat": the house cats and the big cats; "food": fruit and dishes), for the words
        covered by enough classes."""
        rows: dict[str, np.ndarray] = {}
        for node, word in self.kinds.items():
            if word in EVERYDAY:
                rows[word] = np.maximum(rows.get(word, 0), self.membership[node])
        return {w: row for w, row in sorted(rows.items()) if row.sum() >= RULED_OUT_MIN_CLASSES}

    def _most_specific(self, nodes: list[int]) -> int:
        # The fewest classes under it, then the deepest (a class before its one-class parent).
        return min(nodes, key=lambda n: (float(self.sizes[n]), -self.depths[n]))

    def path_up(self, node: int) -> list[int]:
        """The node's first-parent chain to the root, nearest first."""
        chain = []
        while self.parents[node]:
            node = self.parents[node][0]
            chain.append(node)
        return chain

    def _words(self, node: int) -> list[str]:
        """A node's word and a few synonyms a person might ask with: WordNet's lemmas in lower case (no
        Latin names) of at most two words."""
        first = self.name(node)
        synonyms = [w for w in self.words[node] if w.islower() and len(w.split()) <= 2 and w != first]
        return [first, *synonyms[:MAX_SYNONYMS]]

    def describe(self, probabilities: np.ndarray) -> str:
        """The sentence for one image."""
        return self.sentence(self.verdict(probabilities))

    def sentence(self, verdict: Verdict) -> str:
        """The words a verdict reaches the LM as."""
        guesses = ", ".join(f"{name} {round(100 * p)}%" for name, p in verdict.guesses)
        if verdict.answer is None:
            unsure = f"[Photo. An ImageNet classifier is not sure what it shows; weak guesses: {guesses}."
            return unsure + (f" Rules out: {', '.join(verdict.ruled_out)}.]" if verdict.ruled_out else "]")
        may = f" May show: {', '.join(verdict.may_show)}." if verdict.may_show else ""
        return (
            f"[Photo. An ImageNet classifier, {round(100 * verdict.confidence)}% sure: {verdict.answer} "
            f"Shows: {', '.join(verdict.shows)}.{may} Top guesses: {guesses}.]"
        )


def article(noun: str) -> str:
    """'a' or 'an', by the noun's first letter."""
    return "an" if noun[:1].lower() in "aeiou" else "a"


@cache  # rule_out's default: the settings of exports written before it was a setting
def _bridge(top_k: int, sure: float, rule_out: float = ModelDesign.projector_labels_rule_out) -> LabelBridge:
    return LabelBridge(top_k=top_k, sure=sure, rule_out=rule_out)


def describe_images(features: np.ndarray, settings: dict[str, Any]) -> list[str]:
    """(I, 1, classes) probabilities (an array, or a CPU tensor) -> one sentence per image (`settings`:
    `LabelBridge`'s)."""
    bridge = _bridge(**settings)
    return [bridge.describe(row[0]) for row in np.asarray(features)]


@cache
def _tree() -> tuple[list[list[str]], list[list[int]], np.ndarray, list[int]]:
    """Each node's WordNet lemmas (most common first), its parents (as indices), the (nodes, classes) 0/1
    membership matrix, and each class's node (a class is also a node: its own WordNet synset)."""
    document = json.loads(HIERARCHY_FILE.read_text())
    nodes = list(document["nodes"])
    index = {offset: i for i, offset in enumerate(nodes)}
    words = [document["nodes"][n]["words"] for n in nodes]
    parents = [[index[p] for p in document["nodes"][n]["parents"]] for n in nodes]
    membership = np.zeros((len(nodes), len(document["classes"])), np.float32)
    for column, offset in enumerate(document["classes"]):
        pending, seen = [index[offset]], set()
        while pending:
            node = pending.pop()
            if node not in seen:
                seen.add(node)
                pending.extend(parents[node])
        membership[list(seen), column] = 1.0
    return words, parents, membership, [index[offset] for offset in document["classes"]]


@cache
def _vocabulary() -> tuple[frozenset[str], dict[int, str]]:
    """The vocabulary's words, and the word of each node it names."""
    document = json.loads(VOCABULARY_FILE.read_text())
    index = {offset: i for i, offset in enumerate(json.loads(HIERARCHY_FILE.read_text())["nodes"])}
    return frozenset(document["words"]), {index[offset]: word for offset, word in document["nodes"].items()}
