"""Free-form questions about photos, scored right / declined / wrong.

A record's `answers` are accepted answers or keywords (`yes`/`no` for presence questions); `decline` marks
a question the model cannot honestly answer (colours, counts, text, ...), where declining is right. An
answer is matched after VQA normalisation, as whole words anywhere in the prediction; a yes/no question
answered "possibly" (or "perhaps", "maybe") is declined, neither right nor wrong. `question_type` `what`
and `yes-no` mark naming and presence questions a classifier's labels can answer (`answerable_accuracy`);
`decline` and others (`outside-imagenet`: a subject ImageNet-1k has no class for) are reported apart.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from mmllm.eval.vqa import normalize_answer

DECLINE = "decline"
# How a model says it cannot tell.
HEDGES = ("possibly", "perhaps", "maybe")
ANSWERABLE = ("what", "yes-no")
DECLINED = re.compile(
    r"\b(can ?not|can't|cant|unable to|not able to|do not know|don't know|dont know|not sure|no way to)\b.*"
    r"|\bunknown\b|\bunclear\b"
)


def declined(prediction: str) -> bool:
    return bool(DECLINED.search(prediction.lower()))


def verdict(prediction: str, answers: list[str]) -> str:
    """`right`, `declined` or `wrong` for one prediction."""
    said_no_idea = declined(prediction)
    if answers == [DECLINE]:
        return "right" if said_no_idea else "wrong"
    if said_no_idea:
        return "declined"
    words = f" {normalize_answer(prediction)} "
    if answers[0] in ("yes", "no"):
        first = words.split()[:1]
        if first and first[0] in HEDGES:
            return "declined"
        return "right" if first == [answers[0]] else "wrong"
    return "right" if any(f" {normalize_answer(a)} " in words for a in answers) else "wrong"


def _shares(verdicts: list[str]) -> dict[str, Any]:
    return {k: verdicts.count(k) / len(verdicts) for k in ("right", "declined", "wrong")} | {
        "count": len(verdicts)
    }


def photo_qa_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares of right / declined / wrong answers, overall, per question kind and per true answer."""
    verdicts = [verdict(r["prediction"], r["answers"]) for r in rows]
    per_kind, per_truth = defaultdict(list), defaultdict(list)
    for row, result in zip(rows, verdicts, strict=True):
        per_kind[row.get("question_type") or "other"].append(result)
        truth = row["answers"][0] if row["answers"][0] in ("yes", "no", DECLINE) else "named thing"
        per_truth[truth].append(result)
    overall = _shares(verdicts)
    answerable = [v for kind in ANSWERABLE for v in per_kind.get(kind, [])]
    return {
        "accuracy": overall["right"],
        "declined": overall["declined"],
        "confidently_wrong": overall["wrong"],
        "answerable_accuracy": _shares(answerable)["right"] if answerable else 0.0,
        "per_question_type": {k: _shares(v) for k, v in sorted(per_kind.items())},
        "per_true_answer": {k: _shares(v) for k, v in sorted(per_truth.items())},
        "per_question": [
            {
                "id": r["id"],
                "question": r["question"],
                "answers": r["answers"],
                "prediction": r["prediction"],
                "verdict": v,
            }
            for r, v in zip(rows, verdicts, strict=True)
        ],
    }
