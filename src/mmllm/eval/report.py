"""Evaluation reports: report.json, report.md and PNG plots (matplotlib)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mmllm")


def _score(row: dict[str, Any]) -> float:
    """The metric of a {metric: value, "count": n} group, whatever the metric is called."""
    return next(v for k, v in row.items() if k != "count")


def _markdown(report: dict[str, Any]) -> str:
    metrics = report["metrics"]
    lines = [
        f"# {report['task']} — {report['model']}",
        "",
        f"{report['samples']} samples.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in metrics.items():
        if not isinstance(value, dict | list):
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    for kind, row in metrics.get("vqa_formula", {}).items():
        lines.append(f"| vqa_accuracy formula: {kind} | {row['questions']} questions: {row['formula']} |")
    if "per_true_answer" in metrics:  # photo-qa: right / declined / wrong
        lines += _verdict_tables(metrics)
    for grouping in ("answer_type", "question_type"):
        if f"per_{grouping}" in metrics and "per_true_answer" not in metrics:
            lines += ["", f"| {grouping.replace('_', ' ')} | score | count |", "|---|---|---|"]
            for kind, row in metrics[f"per_{grouping}"].items():
                lines.append(f"| {kind} | {_score(row):.4f} | {row['count']} |")
    if "per_question_type_yes_no" in metrics:
        lines += [
            "",
            "Yes/no questions by their true answer (a model that ignores the image scores 0 on one side):",
            "",
            "| question type | when yes | count | when no | count |",
            "|---|---|---|---|---|",
        ]
        for kind, sides in metrics["per_question_type_yes_no"].items():
            cells = []
            for truth in ("yes", "no"):
                row = sides.get(truth)
                cells += [f"{_score(row):.4f}", str(row["count"])] if row else ["–", "0"]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if "confusion" in metrics:
        labels = sorted(metrics["confusion"])
        lines += [
            "",
            "Confusion (rows: truth, columns: prediction):",
            "",
            "| | " + " | ".join(labels) + " | other |",
            "|---" * (len(labels) + 2) + "|",
        ]
        for truth in labels:
            row = metrics["confusion"][truth]
            other = sum(v for k, v in row.items() if k not in labels)
            lines.append(
                f"| **{truth}** | " + " | ".join(str(row.get(p, 0)) for p in labels) + f" | {other} |"
            )
    lines += [
        "",
        f"Decoding: `{json.dumps(report['decoding'])}`",
        f"Timings: `{json.dumps(report['timings'])}`",
    ]
    return "\n".join(lines) + "\n"


def _verdict_tables(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for grouping in ("question_type", "true_answer"):
        lines += [
            "",
            f"| {grouping.replace('_', ' ')} | right | declined | wrong | count |",
            "|---|---|---|---|---|",
        ]
        for kind, row in metrics[f"per_{grouping}"].items():
            shares = " | ".join(f"{row[verdict]:.2f}" for verdict in ("right", "declined", "wrong"))
            lines.append(f"| {kind} | {shares} | {row['count']} |")
    lines += ["", "| question | accepted | answer | verdict |", "|---|---|---|---|"]
    for row in metrics["per_question"]:
        cells = (row["question"], ", ".join(row["answers"]), row["prediction"], row["verdict"])
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return lines


def write_report(report: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("plots skipped: matplotlib is missing (pip install -e '.[eval]' in mmllm's checkout)")
        return
    metrics = report["metrics"]
    if "per_answer_type" in metrics:
        kinds = list(metrics["per_answer_type"])
        values = [_score(metrics["per_answer_type"][t]) for t in kinds]
        figure, axes = plt.subplots(figsize=(6, 3.5))
        axes.bar(kinds, values)
        axes.set_ylim(0, 1)
        axes.set_ylabel("accuracy")
        axes.set_title("accuracy per answer type")
        figure.tight_layout()
        figure.savefig(out / "accuracy_per_type.png", dpi=100)
        plt.close(figure)
    if "confusion" in metrics:
        labels = sorted(metrics["confusion"])
        grid = [[metrics["confusion"][t].get(p, 0) for p in labels] for t in labels]
        figure, axes = plt.subplots(figsize=(7, 6))
        image = axes.imshow(grid, cmap="Blues")
        axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
        axes.set_yticks(range(len(labels)), labels)
        axes.set_xlabel("prediction")
        axes.set_ylabel("truth")
        figure.colorbar(image)
        figure.tight_layout()
        figure.savefig(out / "confusion.png", dpi=100)
        plt.close(figure)
    if rows and "prediction" in rows[0]:
        predicted = [len(r["prediction"].split()) for r in rows]
        references = [len(x.split()) for r in rows for x in r.get("references", r.get("answers", []))]
        figure, axes = plt.subplots(figsize=(6, 3.5))
        axes.hist([predicted, references], bins=20, label=["predictions", "references"])
        axes.set_xlabel("words")
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / "lengths.png", dpi=100)
        plt.close(figure)
