"""Where the photo model answers, declines and errs: the labels bridge's operating points.

The bridge names a thing once the classifier's summed probability reaches `projector_labels_sure`; sure
of nothing, it lists the everyday kinds under `projector_labels_rule_out` as ruled out, and the LM
answers "no" about those. Lower lines answer more and err more. For each pair on the grid the model (its
trained weights unchanged, the two fields set in a copy of its config.json) answers every question of
each photo-qa set, greedy; per set: right / declined / wrong, and right on the answerable (naming and
presence) questions. The shipped settings are chosen on `selection`; the held-out sets only report them.
`targets` says whether a point meets #36's on both held-out sets: >= 60% right, <= 10% wrong, >= 70% of
the answerable right.

    python benchmarks/photo_operating_points.py [--model mmllm-photo] [--sure 0.4 0.5] [--rule-out 0.05]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from itertools import product
from pathlib import Path

from common import report

from mmllm.data.config import data_config_from_arg
from mmllm.engine.settings import GenerationSettings
from mmllm.eval.runner import evaluate
from mmllm.models.build import resolve_model_name
from mmllm.models.design import ModelDesign

DATA = Path(__file__).resolve().parents[1] / "data/photo-qa"
SETS = {
    "selection": DATA / "selection",
    "heldout": DATA / "heldout",
    "heldout2": DATA / "heldout2",
    "photo-qa": DATA,
}
HELD_OUT = ("heldout", "heldout2")


def retuned(model: Path, out: Path, sure: float, rule_out: float) -> Path:
    """A copy of the model folder (its files linked) whose config.json holds the two settings."""
    out.mkdir(parents=True)
    for file in model.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file.resolve())
    config = json.loads((model / "config.json").read_text())
    config |= {"projector_labels_sure": sure, "projector_labels_rule_out": rule_out}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def meets_targets(metrics: dict[str, dict]) -> bool:
    return all(
        metrics[s]["accuracy"] >= 0.6
        and metrics[s]["confidently_wrong"] <= 0.1
        and metrics[s]["answerable_accuracy"] >= 0.7
        for s in HELD_OUT
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mmllm-photo", help="a labels-bridge model: name or folder")
    parser.add_argument("--sure", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--rule-out", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--name", default="photo_operating_points", help="results file name")
    args = parser.parse_args()
    model = Path(resolve_model_name(args.model))
    shipped = json.loads((model / "config.json").read_text())
    shipped_point = (
        shipped.get("projector_labels_sure", ModelDesign.projector_labels_sure),
        shipped.get("projector_labels_rule_out", ModelDesign.projector_labels_rule_out),
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for sure, rule_out in product(args.sure, args.rule_out):
            point = retuned(model, Path(scratch) / f"{sure}-{rule_out}", sure, rule_out)
            metrics = {}
            for name in args.sets:
                data = data_config_from_arg(f"jsonl:{SETS[name] / 'questions.jsonl'}", [], "")
                out = Path(scratch) / f"{sure}-{rule_out}-{name}"
                metrics[name] = evaluate("photo-qa", str(point), data, out, GenerationSettings())["metrics"]
            row = {"sure": sure, "rule_out": rule_out, "shipped": (sure, rule_out) == shipped_point}
            for name, m in metrics.items():
                row[f"{name} right/declined/wrong"] = (
                    f"{m['accuracy']:.1%} / {m['declined']:.1%} / {m['confidently_wrong']:.1%}"
                )
                row[f"{name} answerable"] = f"{m['answerable_accuracy']:.1%}"
            if set(HELD_OUT) <= metrics.keys():
                row["targets"] = meets_targets(metrics)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report(
        args.name,
        rows,
        {"model": args.model, "questions": {n: str(SETS[n].relative_to(DATA.parents[1])) for n in args.sets}},
    )


if __name__ == "__main__":
    main()
