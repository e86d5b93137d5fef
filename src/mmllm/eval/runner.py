"""`mmllm eval`: predictions streamed to JSONL (resumable), metrics computed from that file alone.

OUT/predictions.jsonl   one line per sample: id, prediction (or nll/tokens), question, references
OUT/run.json            the task, model, data and decoding that made them (a resume must match)
OUT/report.json         metrics, per-type breakdowns, model/data identity, decoding, timings
OUT/report.md, *.png    the same for people
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from mmllm.conversation import Message
from mmllm.data.config import DataConfig, DatasetSpec
from mmllm.data.readers import read
from mmllm.data.records import Sample
from mmllm.engine import load_backend
from mmllm.engine.backend import Backend
from mmllm.engine.llama_cpp import LLAMA_CPP_CONFIG
from mmllm.engine.onnx import ONNX_CONFIG
from mmllm.engine.scheduler import Scheduler
from mmllm.engine.settings import GenerationSettings
from mmllm.errors import MmllmError
from mmllm.eval import TASKS
from mmllm.eval.captions import caption_row_metrics
from mmllm.eval.easy_vqa import easy_vqa_metrics
from mmllm.eval.photo_qa import photo_qa_metrics
from mmllm.eval.report import write_report
from mmllm.eval.vqa import exact_match_metrics, vqav2_metrics
from mmllm.models.build import resolve_model_name

if TYPE_CHECKING:
    from mmllm.engine.torch_backend import Pipeline

log = logging.getLogger("mmllm")

PREDICTIONS = "predictions.jsonl"
RUN = "run.json"  # the model, data and decoding that made the predictions
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx")
SETTINGS_FILES = ("config.json", ONNX_CONFIG, LLAMA_CPP_CONFIG)  # in the model folder itself


def task_samples(task: str, cfg: DataConfig) -> list[Sample]:
    """Samples shaped for the task: captions per image (all references), VQA per question."""
    specs = [
        DatasetSpec(**{**vars(spec), "per_image": task == "coco-captions"}) if task != "perplexity" else spec
        for spec in cfg.datasets
    ]
    return [sample for spec in specs for sample in read(spec, cfg)]


def question_record(sample: Sample) -> dict[str, Any]:
    """What a prediction line keeps of its sample: id, the question as text, what it is scored against."""
    meta = sample.meta
    prompt = next(m["content"] for m in sample.conversation if m["role"] == "user")
    record = {"id": sample.id, "question": prompt.replace("<image>", "").strip()}
    for key in ("references", "answers", "answer_type", "question_type"):
        if key in meta:
            record[key] = meta[key]
    if "answers" not in record and "references" not in record:
        answer = next((m["content"] for m in sample.conversation if m["role"] == "assistant"), None)
        if answer is not None:
            record["answers"] = [answer]
    return record


def _done_ids(path: Path) -> set[str]:
    """Ids already predicted; a torn last line (an interrupted run) is cut off so it is redone."""
    if not path.is_file():
        return set()
    done, keep = set(), 0
    with path.open("rb") as file:
        for line in file:
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                break
            keep += len(line)
    with path.open("r+b") as file:
        file.truncate(keep)
    return done


def _question(sample: Sample) -> list[Message]:
    """The conversation up to its first question: what the model answers."""
    return sample.conversation[
        : next(i for i, m in enumerate(sample.conversation) if m["role"] == "user") + 1
    ]


def _answers(
    backend: Backend, todo: list[Sample], settings: GenerationSettings, batch_size: int
) -> Iterator[str]:
    """Each sample's answer, in order: through the continuous scheduler (a sample's row leaves the
    batch when its answer ends, and the next takes its place), or in batches of `batch_size` where the
    backend keeps no running batch or beams are asked for."""
    if backend.session is None or settings.num_beams > 1:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            yield from backend.generate([_question(s) for s in chunk], [s.images for s in chunk], settings)
        return
    requests = Scheduler(backend, max_rows=batch_size)
    try:
        prompts = (backend.prepare(_question(s), s.images) for s in todo)
        for completion in requests.answer(prompts, settings, window=4 * batch_size):
            yield completion.text
    finally:
        requests.close()


def generate_predictions(
    backend: Backend, samples: list[Sample], path: Path, settings: GenerationSettings, batch_size: int
) -> int:
    """Answer every sample not yet in `path`, appending as it goes; returns how many were generated."""
    todo = [s for s in samples if s.id not in _done_ids(path)]
    torch.manual_seed(settings.seed or 0)
    with path.open("a") as sink, tqdm(total=len(todo), desc="eval", unit="sample") as bar:
        for sample, answer in zip(todo, _answers(backend, todo, settings, batch_size), strict=True):
            # Answers come as generated; a prediction is trimmed (scored, and compared across runs, so).
            sink.write(json.dumps({**question_record(sample), "prediction": answer.strip()}) + "\n")
            sink.flush()
            bar.update(1)
    return len(todo)


@torch.no_grad()
def perplexity_predictions(pipeline: Pipeline, samples: list[Sample], path: Path, cfg: DataConfig) -> int:
    """Summed negative log-likelihood of each sample's trained (assistant) tokens (the torch backend:
    it needs the logits of whole answers)."""
    from mmllm.data.loading import Collator

    todo = [s for s in samples if s.id not in _done_ids(path)]
    collator = Collator(pipeline.processor, cfg, train=False)
    model = pipeline.model
    with path.open("a") as sink:
        for sample in tqdm(todo, desc="perplexity", unit="sample"):
            batch = collator([sample])
            if "input_ids" not in batch:
                continue  # unreadable image: counted by the collator, skipped here
            labels = batch["labels"][:, 1:].to(model.device)
            inputs = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="sum")
            sink.write(
                json.dumps({"id": sample.id, "nll": float(nll), "tokens": int((labels != -100).sum())}) + "\n"
            )
    return len(todo)


def perplexity_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    nll, tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
    return {"perplexity": float(torch.tensor(nll / max(tokens, 1)).exp()), "tokens": tokens}


def custom_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Caption metrics for data with references, else exact-match accuracy against the answers."""
    return caption_row_metrics(rows) if "references" in rows[0] else exact_match_metrics(rows)


# How each task scores a predictions file.
METRICS: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
    "coco-captions": caption_row_metrics,
    "vqav2": vqav2_metrics,
    "easy-vqa": easy_vqa_metrics,
    "photo-qa": photo_qa_metrics,
    "perplexity": perplexity_metrics,
    "custom": custom_metrics,
}


def metrics_from_predictions(task: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every number in the report, from the predictions file alone."""
    if not rows:
        raise MmllmError("no predictions to score")
    return METRICS[task](rows)


# What each task scores against: generating every prediction first and failing at scoring wastes the run.
NEEDS = {
    "coco-captions": ("references",),
    "vqav2": ("answers",),
    "easy-vqa": ("answers",),
    "photo-qa": ("answers",),
    "custom": ("answers", "references"),
}


def check_task_data(task: str, samples: list[Sample]) -> None:
    """Refuse data that lacks what the task scores against, before any model is loaded."""
    if not samples:
        raise MmllmError("the evaluation data holds no samples")
    if task == "perplexity":
        missing = [s.id for s in samples if not any(m["role"] == "assistant" for m in s.conversation)]
        what = "an assistant answer to score"
    else:
        missing = [s.id for s in samples if not any(key in question_record(s) for key in NEEDS[task])]
        what = " or ".join(NEEDS[task])
    if missing:
        hint = {
            "coco-captions": "caption data (coco, karpathy, or jsonl with `captions`), or --task custom",
        }.get(task, "data whose samples carry them, or another --task")
        raise MmllmError(
            f"--task {task} needs {what} for every sample; {len(missing)} of {len(samples)} have none "
            f"(first: {missing[0]}). Use {hint}."
        )


def run_identity(
    task: str, model: str, data: DataConfig, settings: GenerationSettings, dtype: str, backend: str = "torch"
) -> dict:
    """What made a predictions file: a resumed evaluation must match it, or it would mix two runs."""
    identity = {
        "task": task,
        "model": model,
        "weights": weight_files_digest(model),
        "settings": settings_files_digest(model),
        "backend": backend,
        "dtype": dtype,
        "data": [vars(spec) for spec in data.datasets],
        "decoding": vars(settings),
    }
    return json.loads(json.dumps(identity, default=str))  # as it reads back from run.json


def files_digest(model: str, pick: Callable[[Path], Iterable[Path]]) -> str | None:
    """A digest of the files `pick` finds in a local model folder, names and bytes (None for a hub id)."""
    try:
        folder = Path(resolve_model_name(model))
    except MmllmError:
        return None
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(pick(folder)):
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def weight_files_digest(model: str) -> str | None:
    """A model retrained under the same name or path must not resume the old weights' predictions."""
    return files_digest(
        model, lambda folder: (f for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    )


def settings_files_digest(model: str) -> str | None:
    """Nor one retuned: its config.json, or an export's settings, hold what the weights do not (the
    labels bridge's `projector_labels_*` lines)."""
    return files_digest(model, lambda folder: (folder / n for n in SETTINGS_FILES if (folder / n).is_file()))


def _check_resume(out: Path, identity: dict, overwrite: bool) -> None:
    predictions, run = out / PREDICTIONS, out / RUN
    if predictions.is_file() and predictions.stat().st_size:
        if overwrite:
            predictions.unlink()
        else:
            made = json.loads(run.read_text()) if run.is_file() else {}
            made.setdefault("backend", "torch")  # run.json from before backends were recorded
            changed = [key for key in identity if made.get(key) != identity[key]]
            if changed:
                differences = "; ".join(f"{key}: {made.get(key, '?')} -> {identity[key]}" for key in changed)
                raise MmllmError(
                    f"{out} holds predictions of another run ({differences}). Resuming would mix the two: "
                    "give another --out, or --overwrite to discard them and start fresh"
                )
    run.write_text(json.dumps(identity, indent=2) + "\n")


def evaluate(
    task: str,
    model: str,
    data: DataConfig,
    out: str | Path,
    settings: GenerationSettings,
    batch_size: int = 16,
    from_predictions: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    backend: str = "torch",
    compile: str = "auto",
) -> dict[str, Any]:
    """Predict (resuming only a run with the same model, data and decoding), then score the file.

    `from_predictions` scores OUT's predictions again, under the identity of the run that made them.
    """
    if task not in TASKS:
        raise MmllmError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if task == "perplexity" and backend != "torch":
        raise MmllmError("perplexity needs the model's logits over whole answers: use --backend torch")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PREDICTIONS
    timings: dict[str, float] = {}
    generated = 0
    if from_predictions:
        if not path.is_file():
            raise MmllmError(f"{path} does not exist: run the evaluation once without --from-predictions")
        made = out / RUN
        identity = (
            json.loads(made.read_text())
            if made.is_file()
            else run_identity(task, model, data, settings, dtype, backend)
        )
    else:
        identity = run_identity(task, model, data, settings, dtype, backend)
        samples = task_samples(task, data)
        check_task_data(task, samples)
        _check_resume(out, identity, overwrite)
        start = time.perf_counter()
        engine = load_backend(backend, model, device, dtype, compile)
        engine.check(settings)
        timings["load_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        if task == "perplexity":
            generated = perplexity_predictions(engine, samples, path, data)
        else:
            generated = generate_predictions(engine, samples, path, settings, batch_size)
        seconds = time.perf_counter() - start
        timings.update(generate_s=round(seconds, 2), samples_per_s=round(generated / max(seconds, 1e-9), 2))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    report = {
        "task": identity["task"],
        "model": identity["model"],
        "data": identity["data"],
        "decoding": identity["decoding"],
        "samples": len(rows),
        "generated_this_run": generated,
        "timings": timings,
        "metrics": metrics_from_predictions(task, rows),
    }
    write_report(report, rows, out)
    return report
