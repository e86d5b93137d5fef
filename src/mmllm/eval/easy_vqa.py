"""easy-VQA's metrics: exact-match accuracy, and a confusion table of true against predicted answers
(its answers are a closed set: yes, no, eight colours, three shapes)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from mmllm.eval.vqa import exact_match_metrics, normalize_answer


def easy_vqa_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    metrics = exact_match_metrics(rows)
    confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        confusion[normalize_answer(row["answers"][0])][normalize_answer(row["prediction"])] += 1
    metrics["confusion"] = {k: dict(v) for k, v in sorted(confusion.items())}
    return metrics
