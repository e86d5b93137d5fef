"""lmms-eval (its own virtual environment) scores `mmllm serve` on local data: no failed request, and
with the model's own prompt and order it gives `mmllm eval`'s answers and score."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import engine_python

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.lmms_eval]


@pytest.mark.parametrize(
    ("model", "task", "data", "limit"),
    [
        ("mmllm-easyvqa", "easy-vqa", "easy-vqa:test", 24),
        ("mmllm-photo", "photo-qa", "jsonl:data/photo-qa/questions.jsonl", 12),
    ],
)
def test_lmms_eval_scores_the_server_as_mmllm_eval_does(tmp_path, model, task, data, limit):
    python = engine_python(".venv-lmms", "install-lmms-eval")
    script = "scripts/lmms_eval_compare.py"
    options = ["--model", model, "--task", task, "--data", data, "--limit", str(limit)]
    command = [sys.executable, script, *options, "--out", str(tmp_path), "--lmms-python", python]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["questions"] == limit
    for run in ("chat", "simple"):  # every request answered: no retry, no answer scored as failed
        log = (tmp_path / run / "lmms-eval.log").read_text()
        assert "failed with error" not in log and "LMMS_EVAL_REQUEST_FAILED" not in log
    runs = {row["run"]: row for row in report["runs"]}
    own = runs["own prompt, image first"]
    assert own["same_answers_as_mmllm_eval"] == limit
    assert own["mmllm_score"] == pytest.approx(report["mmllm_eval"])
    if task == "easy-vqa":  # one-word answers: lmms-eval's VQAv2 scoring agrees with mmllm's exact match
        assert own["lmms_eval_score"] == pytest.approx(report["mmllm_eval"])
