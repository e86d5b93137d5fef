"""lmms-eval against `mmllm serve`, beside `mmllm eval` on the same questions.

Writes the questions as local data for the task folder `lmms_eval_tasks/`, answers them with
`mmllm eval`, starts `mmllm serve` with the same model, then runs lmms-eval (its own virtual
environment: `make install-lmms-eval`) three ways through its `openai` model:
- stock, text first: lmms-eval's post-prompt and `--force_simple` (the text part before the image);
- stock, image first: the post-prompt, the `openai` model's default chat class (the image first);
- own: the question alone, the image first: the prompt `mmllm eval` asks.
Each run's score is lmms-eval's own (its VQAv2 scoring); the same predictions are scored again by
`mmllm eval`'s scorer and compared answer by answer with `mmllm eval`'s, so each difference shows its
cause: the prompt, the order, or the scoring. Any failed request (lmms-eval retries, then scores an
empty answer) fails the run.

    python scripts/lmms_eval_compare.py --model mmllm-easyvqa --task easy-vqa --data easy-vqa:test \\
        --limit 500 --out models/mmllm-easyvqa/eval/lmms-eval
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from mmllm.data.config import data_config_from_arg
from mmllm.eval.lmms import export_lmms_data
from mmllm.eval.runner import metrics_from_predictions
from mmllm.serve.launch import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "lmms_eval_tasks"
# lmms-eval's task name per `mmllm eval` task, and the template holding its decoding settings.
LMMS_TASK = {"easy-vqa": "easyvqa", "photo-qa": "photoqa"}
FAILED = "LMMS_EVAL_REQUEST_FAILED"
HEADLINE = "accuracy"  # `mmllm eval`'s share of right answers, on both tasks
RUNS = (  # name, lmms-eval task suffix, --force_simple, what differs from `mmllm eval`'s request
    ("stock, text first", "", True, "lmms-eval's post-prompt; the text before the image"),
    ("stock, image first", "", False, "lmms-eval's post-prompt"),
    ("own prompt, image first", "_own", False, "nothing: the request `mmllm eval` makes"),
)


def serve(model: str, log: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mmllm.cli", "serve", "--model", model, "--port", str(port)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until_up(process, f"{url}/health", timeout=300)
    except RuntimeError as err:
        raise SystemExit(f"mmllm serve: {err}; see {log}") from None
    return url, process


def run_lmms(python: str, url: str, model: str, tasks: list[str], simple: bool, out: Path) -> Path:
    """One lmms-eval run over `tasks`; returns its output folder. Raises on any failed request."""
    command = [
        python, "-m", "lmms_eval", "--model", "openai",
        "--model_args", f"model={model},base_url={url}/v1,api_key=unused,timeout=120,num_concurrent=4",
        "--tasks", ",".join(tasks), "--include_path", str(TASKS), "--output_path", str(out), "--log_samples",
    ] + (["--force_simple"] if simple else [])  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = out / "lmms-eval.log"
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's results would be read as this one's
    out.mkdir(parents=True)
    with log.open("w") as sink:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    text = log.read_text()
    attempts = text.count("failed with error")
    if done.returncode or attempts or FAILED in text:
        raise SystemExit(f"lmms-eval: exit {done.returncode}, {attempts} failed request attempts; see {log}")
    return out


def lmms_predictions(out: Path, task: str) -> tuple[float, dict[int, str]]:
    """lmms-eval's score for `task` and its answer per document."""
    (results,) = out.rglob("*_results.json")
    score = json.loads(results.read_text())["results"][task]["vqa_accuracy,none"]
    (samples,) = out.rglob(f"*_samples_{task}.jsonl")
    answers = {}
    for line in samples.read_text().splitlines():
        doc = json.loads(line)
        if FAILED in doc["filtered_resps"]:
            raise SystemExit(f"{samples}: document {doc['doc_id']} was scored as a failed request")
        answers[doc["doc_id"]] = doc["filtered_resps"]
    return score, answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True, choices=sorted(LMMS_TASK))
    parser.add_argument("--data", required=True, help="as `mmllm eval --data`")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lmms-python", default=str(ROOT / ".venv-lmms/bin/python"))
    args = parser.parse_args()

    name = LMMS_TASK[args.task]
    decoding = yaml.safe_load((TASKS / f"_{name}_yaml").read_text())["generation_kwargs"]
    overrides = [f"datasets.0.limit={args.limit}"] if args.limit else []
    data = data_config_from_arg(args.data, overrides)
    documents = export_lmms_data(args.task, data, TASKS / "data")
    questions = [json.loads(line) for line in documents.read_text().splitlines()]

    # `mmllm eval` as a user runs it, with lmms-eval's decoding settings.
    ours = args.out / "mmllm-eval"
    subprocess.run(
        [sys.executable, "-m", "mmllm.cli", "eval", "--task", args.task, "--model", args.model,
         "--data", args.data, *overrides, "--out", str(ours), "--overwrite",
         "--max-new-tokens", str(decoding["max_new_tokens"]), "--temperature", "0"],
        check=True,
    )  # fmt: skip
    our_score = json.loads((ours / "report.json").read_text())["metrics"][HEADLINE]
    our_answers = [
        json.loads(line)["prediction"] for line in (ours / "predictions.jsonl").read_text().splitlines()
    ]

    args.out.mkdir(parents=True, exist_ok=True)
    url, server = serve(args.model, args.out / "serve.log")
    try:
        chat = run_lmms(
            args.lmms_python,
            url,
            args.model,
            [f"mmllm_{name}", f"mmllm_{name}_own"],
            False,
            args.out / "chat",
        )
        simple = run_lmms(args.lmms_python, url, args.model, [f"mmllm_{name}"], True, args.out / "simple")
    finally:
        server.terminate()
        server.wait()

    rows = []
    for run, suffix, force_simple, differs in RUNS:
        score, answers = lmms_predictions(simple if force_simple else chat, f"mmllm_{name}{suffix}")
        predicted = [{**q, "prediction": answers[i].strip()} for i, q in enumerate(questions)]
        rescored = metrics_from_predictions(args.task, predicted)[HEADLINE]
        same = sum(p["prediction"] == a for p, a in zip(predicted, our_answers, strict=True))
        rows.append({"run": run, "differs": differs, "lmms_eval_score": score, "mmllm_score": rescored,
                     "same_answers_as_mmllm_eval": same,
                     "empty_answers": sum(not p["prediction"] for p in predicted)})  # fmt: skip
    report = {
        "model": args.model,
        "task": args.task,
        "questions": len(questions),
        "decoding": decoding,
        "mmllm_eval": our_score,
        "runs": rows,
        "failed_requests": 0,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# lmms-eval against `mmllm serve`: {args.model}, {args.task}, {len(questions)} questions",
        "",
        f"`mmllm eval` {HEADLINE}: **{report['mmllm_eval']:.4f}**. Failed requests in the lmms-eval runs: 0.",
        "",
        "| lmms-eval run | differs from `mmllm eval`'s request | lmms-eval score (its VQAv2 scoring) "
        f"| the same answers, `mmllm eval`'s {HEADLINE} | answers equal to `mmllm eval`'s | empty answers |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['differs']} | {r['lmms_eval_score']:.4f} | {r['mmllm_score']:.4f} "
        f"| {r['same_answers_as_mmllm_eval']} / {len(questions)} | {r['empty_answers']} |"
        for r in rows
    ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
