"""`mmllm data stats`: what a dataset holds, how long its samples are, what its images are worth."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmllm.data.features import unique_images
from mmllm.data.records import Sample
from mmllm.errors import MmllmError
from mmllm.images import load_image
from mmllm.processor import MultimodalProcessor

HISTOGRAM_BINS = 12


def dataset_stats(samples: Iterable[Sample], processor: MultimodalProcessor) -> dict[str, Any]:
    samples = list(samples)
    lengths = [
        len(processor.encode_text(s.conversation, len(s.images), train=True)["input_ids"]) for s in samples
    ]
    answers = Counter(m["content"] for s in samples for m in s.conversation if m["role"] == "assistant")
    bad: Counter = Counter()
    bad_files: list[str] = []  # which files, so they can be fixed (a count alone names nothing)
    images = list(unique_images(samples))
    for ref in images:
        try:
            load_image(ref)
        except MmllmError as err:
            bad[str(err).rsplit(": ", 1)[-1].split(" (")[0]] += 1
            bad_files.append(str(err))
    return {
        "samples": len(samples),
        "images": len(images),
        "turns": sum(m["role"] == "user" for s in samples for m in s.conversation),
        "tokens": {
            "min": min(lengths, default=0),
            "mean": round(sum(lengths) / max(len(lengths), 1), 1),
            "max": max(lengths, default=0),
            "histogram": histogram(lengths),
        },
        "distinct answers": len(answers),
        "top answers": answers.most_common(15),
        "bad images": dict(bad),
        "bad image files": bad_files,
        "_lengths": lengths,
    }


def histogram(values: list[int], bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """(low, high, count) bins of equal width."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((v - low) // width for v in values)
    return [
        (low + b * width, low + (b + 1) * width - 1, counts[b]) for b in range(-(-(high - low + 1) // width))
    ]


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"samples: {stats['samples']}   images: {stats['images']}   user turns: {stats['turns']}",
        f"tokens per sample: min {stats['tokens']['min']}, mean {stats['tokens']['mean']}, "
        f"max {stats['tokens']['max']}",
    ]
    peak = max((c for _, _, c in stats["tokens"]["histogram"]), default=1)
    for low, high, count in stats["tokens"]["histogram"]:
        lines.append(f"  {low:>6}-{high:<6} {'#' * round(40 * count / peak):<40} {count}")
    lines.append(f"distinct answers: {stats['distinct answers']}")
    for answer, count in stats["top answers"]:
        lines.append(f"  {count:>7}  {answer[:70]}")
    bad = stats["bad images"]
    lines.append("bad images: " + (", ".join(f"{n} {why}" for why, n in bad.items()) if bad else "none"))
    lines += [f"  {problem}" for problem in stats["bad image files"]]
    return "\n".join(lines)


def write_stats(stats: dict[str, Any], out: Path) -> list[Path]:
    """stats.json, stats.txt and (with matplotlib) token_lengths.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "stats.json", out / "stats.txt"]
    lengths = stats.pop("_lengths")
    written[0].write_text(json.dumps(stats, indent=2) + "\n")
    written[1].write_text(format_stats(stats) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        (out / "token_lengths.png.txt").write_text(
            "the PNG needs matplotlib: pip install -e '.[data]' in mmllm's checkout\n"
        )
        return written
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.hist(lengths, bins=40)
    axes.set_xlabel("tokens per sample")
    axes.set_ylabel("samples")
    figure.tight_layout()
    figure.savefig(out / "token_lengths.png", dpi=100)
    plt.close(figure)
    return [*written, out / "token_lengths.png"]
