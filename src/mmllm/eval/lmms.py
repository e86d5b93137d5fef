"""An evaluation's questions as local data for lmms-eval's task folder (`lmms_eval_tasks/`).

lmms-eval reads a task's documents through `datasets` (`dataset_path: json`) and each image from the
path its document names. Writing them from the same `task_samples` that `mmllm eval` answers makes
both harnesses score the same questions on the same pixels: every image is saved as PNG (lossless),
and lmms-eval sends PNG too.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmllm.data.config import DataConfig
from mmllm.data.records import image_key
from mmllm.errors import MmllmError
from mmllm.eval.runner import check_task_data, question_record, task_samples
from mmllm.images import load_image

# The tasks lmms_eval_tasks/ has a task for: one image, one question, short reference answers.
LMMS_TASKS = ("easy-vqa", "photo-qa")


def export_lmms_data(task: str, data: DataConfig, out: str | Path) -> Path:
    """Write OUT/TASK.jsonl (one document per question) and OUT/images/TASK/*.png; returns the JSONL path.

    A document holds the question's `id`, `question`, `answers`, its types where the data has them, and
    `image`: the absolute path of its PNG (lmms-eval runs from wherever the user starts it).
    """
    if task not in LMMS_TASKS:
        raise MmllmError(f"lmms-eval data is written for {', '.join(LMMS_TASKS)}, not {task!r}")
    samples = task_samples(task, data)
    check_task_data(task, samples)
    out = Path(out).resolve()
    (out / "images" / task).mkdir(parents=True, exist_ok=True)
    names: dict[str, Path] = {}  # an image shared by several questions is written once
    path = out / f"{task}.jsonl"
    with path.open("w") as sink:
        for sample in samples:
            if len(sample.images) != 1:
                raise MmllmError(f"{sample.id}: lmms-eval's VQA tasks take one image a question")
            ref = sample.images[0]
            key = ref if isinstance(ref, str) else image_key(ref)
            if key not in names:
                names[key] = out / "images" / task / f"{len(names):05d}.png"
                load_image(ref).save(names[key])
            sink.write(json.dumps({**question_record(sample), "image": str(names[key])}) + "\n")
    return path
