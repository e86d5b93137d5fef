"""Write src/mmllm/models/photo_vocabulary.json: the words people use for what is in a photo, mapped onto
the photo model's WordNet tree.

The photo model's bridge names things only by these words (see `mmllm.models.labels`). The vocabulary is the
class names of three object-detection datasets, chosen by their makers as the things people point at in
photos: COCO (80), LVIS v1 (1,203, with synonyms; its categories are WordNet synsets) and Open Images V7
(the 600 boxable classes, a hierarchy with kinds such as "animal", "vehicle", "flower", "building"). A
WordNet node of the tree takes the first of its lemmas that is a vocabulary word, compared in lower case
with qualifiers such as "(animal)" removed; a node with none is not named (its classes are named by a
nearer or broader node). The lists are read from the files `ultralytics` ships:

    pip download --no-deps ultralytics==8.4.190 -d /tmp/ul && unzip -q /tmp/ul/*.whl -d /tmp/ul
    python scripts/build_photo_vocabulary.py /tmp/ul/ultralytics/cfg/datasets
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

MODELS = Path(__file__).resolve().parents[1] / "src/mmllm/models"
SOURCES = {"COCO": "coco.yaml", "LVIS v1": "lvis.yaml", "Open Images V7": "open-images-v7.yaml"}
# Checked by hand over every named node: where the first matching lemma is another sense than the
# datasets' (or a node too broad to tell anyone what a photo shows), the node's word or None (unnamed).
SENSES: dict[str, str | None] = {
    "01694709": None,  # monitor lizard, not a computer monitor
    "01940736": None,  # mollusk ("shellfish": slugs and snails are not)
    "01984695": None,  # spiny lobster ("crawfish")
    "02085374": None,  # toy dog ("toy")
    "02113186": None,  # Cardigan, a corgi, not the jumper
    "02728440": None,  # apparel ("dress": the node is all clothing, which is named below it)
    "02756098": None,  # attire ("dress")
    "02814533": None,  # beach wagon, a car
    "02860847": None,  # bobsled ("bob", a fishing float in LVIS)
    "02959942": None,  # railway car, not a car
    "03094503": None,  # container: wheeled vehicles are containers in WordNet
    "03096960": None,  # control, controller: too broad
    "03100346": "sofa bed",  # not the car ("convertible")
    "03540267": None,  # hosiery ("hose")
    "03574816": None,  # instrument, any device: too broad
    "03748162": None,  # retail store ("outlet")
    "03840681": None,  # ocarina ("sweet potato")
    "03956922": None,  # industrial plant
    "03959701": None,  # armour plate
    "03977966": None,  # police van ("wagon")
    "04116512": None,  # rubber eraser ("rubber"), named "eraser" above it
    "04120093": None,  # a sled's runner
    "04151940": None,  # screen, covert ("cover")
    "04417809": None,  # theatre ("house")
    "04453910": None,  # top, cover
    "07615774": None,  # ice lolly ("lollipop")
    "09443453": None,  # a spring ("fountain")
    "13899404": None,  # globe, orb ("ball")
}


def normalise(name: str) -> str:
    return re.sub(r"\s*\(.*?\)", "", name).replace("_", " ").strip().lower()


def read_vocabulary(datasets: Path) -> dict[str, list[str]]:
    """word -> the datasets that name it (LVIS's synonyms count as its names)."""
    words: dict[str, list[str]] = {}
    for source, file in SOURCES.items():
        for name in yaml.safe_load((datasets / file).read_text())["names"].values():
            for word in {normalise(n) for n in name.split("/")}:
                words.setdefault(word, []).append(source)
    return dict(sorted(words.items()))


def main(datasets: str) -> None:
    vocabulary = read_vocabulary(Path(datasets))
    hierarchy = json.loads((MODELS / "imagenet_hierarchy.json").read_text())
    named = {}
    for offset, node in hierarchy["nodes"].items():
        word = next((w.lower() for w in node["words"] if w.lower() in vocabulary), None)
        word = SENSES.get(offset, word)
        if word:
            named[offset] = word
    document = {
        "source": "class names of COCO (CC BY 4.0), LVIS v1 (CC BY 4.0) and Open Images V7 (CC BY 4.0)",
        "rule": "a WordNet node is named by its first lemma that is a vocabulary word, but for the senses "
        "checked by hand in scripts/build_photo_vocabulary.py",
        "words": vocabulary,
        "nodes": named,
    }
    out = MODELS / "photo_vocabulary.json"
    out.write_text(json.dumps(document, indent=0, sort_keys=False) + "\n")
    print(f"{out}: {len(vocabulary)} words, {len(named)} of {len(hierarchy['nodes'])} nodes named")


if __name__ == "__main__":
    main(sys.argv[1])
