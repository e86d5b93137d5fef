"""The labels bridge: an image reaches the LM as words — what an ImageNet classifier is sure it shows.

A LENS-style bridge (Berrios et al. 2023): no projector to train, the LM reads the classifier's verdict
as text. Class probabilities are summed up WordNet's hypernym tree, so the bridge names the most
specific thing it is sure of ("tiger cat 36%, Egyptian cat 32%, tabby 21%" -> "a domestic cat, 89%")
and says when it is sure of nothing, so the LM can decline instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

HIERARCHY_FILE = Path(__file__).with_name("imagenet_hierarchy.json")
MAX_KINDS = 8  # hypernyms named after the concept ("a kind of cat, feline, carnivore, ...")
# WordNet nodes too abstract to tell anyone what a photo shows: being sure of one is being sure of nothing.
ABSTRACT = frozenset(
    [
        "artifact",
        "instrumentality",
        "attribute",
        "device",
        "container",
        "structure",
        "covering",
        "commodity",
        "equipment",
        "implement",
        "substance",
        "food",
        "matter",
        "part",
        "relation",
        "organism",
        "conveyance",
        "object",
        "whole",
    ]
) | {"living thing", "causal agent", "physical object", "psychological feature"}


@dataclass(frozen=True)
class Verdict:
    """What the bridge makes of one image's class probabilities."""

    concept: str | None  # the most specific thing it is sure of, or None
    node: int | None  # that concept's node in the tree
    confidence: float  # the concept's summed probability
    kinds: list[str]  # what the concept is a kind of, nearest first
    guesses: list[tuple[str, float]]  # the top classes with their probabilities


class LabelBridge:
    """ImageNet-1k class probabilities -> a sentence the LM reads in place of the image."""

    def __init__(self, top_k: int = 3, min_probability: float = 0.05, sure: float = 0.6):
        self.top_k, self.min_probability, self.sure = top_k, min_probability, sure
        self.names, self.parents, self.membership, self.class_names = _tree()
        self.sizes = self.membership.sum(1)  # (nodes,) classes under each node
        self.depths = [len(self.path_up(n)) for n in range(len(self.names))]

    def verdict(self, probabilities: np.ndarray) -> Verdict:
        """(classes,) probabilities (an array, or a CPU tensor) -> the concept it is sure of (if any) and
        its top guesses."""
        probabilities = np.asarray(probabilities, np.float32)
        top = np.argsort(-probabilities, kind="stable")[: self.top_k]
        guesses = [
            (self.class_names[i], float(probabilities[i]))
            for i in top.tolist()
            if probabilities[i] >= self.min_probability
        ] or [(self.class_names[int(top[0])], float(probabilities[top[0]]))]
        scores = self.membership @ probabilities  # (nodes,) summed over the classes under each node
        sure = [n for n in np.flatnonzero(scores >= self.sure).tolist() if self.names[n] not in ABSTRACT]
        if not sure:
            return Verdict(None, None, 0.0, [], guesses)
        # The most specific sure node: the fewest classes under it, then the deepest (a class before
        # its one-class parent: "moped", not "minibike").
        best = min(sure, key=lambda n: (float(self.sizes[n]), -self.depths[n]))
        return Verdict(self.names[best], best, float(scores[best]), self._kinds(best), guesses)

    def path_up(self, node: int) -> list[int]:
        """The node's first-parent chain to the root, nearest first."""
        chain = []
        while self.parents[node]:
            node = self.parents[node][0]
            chain.append(node)
        return chain

    def _kinds(self, node: int) -> list[str]:
        return [self.names[n] for n in self.path_up(node) if self.names[n] not in ABSTRACT][:MAX_KINDS]

    def describe(self, probabilities: np.ndarray) -> str:
        """The sentence for one image."""
        return self.sentence(self.verdict(probabilities))

    def sentence(self, verdict: Verdict) -> str:
        """The words a verdict reaches the LM as."""
        guesses = ", ".join(f"{name} {round(100 * p)}%" for name, p in verdict.guesses)
        if verdict.concept is None:
            return f"[Photo. An ImageNet classifier is not sure what it shows; weak guesses: {guesses}.]"
        kinds = f" (a kind of {', '.join(verdict.kinds)})" if verdict.kinds else ""
        return (
            f"[Photo. An ImageNet classifier sees: {verdict.concept}{kinds}, "
            f"{round(100 * verdict.confidence)}% sure; its top guesses: {guesses}.]"
        )


@cache
def _bridge(top_k: int, sure: float) -> LabelBridge:
    return LabelBridge(top_k=top_k, sure=sure)


def describe_images(features: np.ndarray, settings: dict[str, Any]) -> list[str]:
    """(I, 1, classes) probabilities (an array, or a CPU tensor) -> one sentence per image (`settings`:
    `LabelBridge`'s)."""
    bridge = _bridge(**settings)
    return [bridge.describe(row[0]) for row in np.asarray(features)]


@cache
def _tree() -> tuple[list[str], list[list[int]], np.ndarray, list[str]]:
    """Node names, parents (as indices), the (nodes, classes) 0/1 membership matrix, class names (a
    class is also a node: its own WordNet synset)."""
    document = json.loads(HIERARCHY_FILE.read_text())
    nodes = list(document["nodes"])
    index = {offset: i for i, offset in enumerate(nodes)}
    names = [document["nodes"][n]["name"] for n in nodes]
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
    return names, parents, membership, [names[index[offset]] for offset in document["classes"]]
