"""VQA records to samples, whatever the dataset: one sample per question or one conversation per image,
filtered by answer type, with yes and no balanced per question type."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator

from mmllm.data.config import DatasetSpec
from mmllm.data.records import Sample, vqa_conversation
from mmllm.errors import MmllmError

YES_NO = {"yes", "no"}
Record = tuple[int, str, dict]  # (image id, question, metadata with `answer`, `answer_type`, ...)


def balance_yes_no(records: list[Record]) -> list[Record]:
    """The records, plus repeats of each question type's rarer yes/no answer (in turn) up to the commoner's
    count."""
    by_type: dict[str, dict[str, list]] = defaultdict(lambda: {"yes": [], "no": []})
    for record in records:
        if record[2].get("answer") in YES_NO:
            by_type[record[2].get("question_type", "")][record[2]["answer"]].append(record)
    repeats = []
    for answers in by_type.values():
        rarer, commoner = sorted(answers.values(), key=len)
        if rarer:
            repeats += [rarer[n % len(rarer)] for n in range(len(commoner) - len(rarer))]
    return records + repeats


def vqa_samples(
    records: list[Record], image_path: Callable[[int], str], spec: DatasetSpec, name: str, seed: int = 0
) -> Iterator[Sample]:
    """One sample per question, or (per_image) one conversation per image with all its questions."""
    if spec.answer_types:
        records = [r for r in records if r[2].get("answer_type") in spec.answer_types]
    if spec.balance_yes_no:
        records = balance_yes_no(records)
    if not spec.per_image:
        for image_id, question, meta in records:
            answer = [meta["answer"]] if "answer" in meta else []
            conversation = (
                vqa_conversation([question], answer)
                if answer
                else [{"role": "user", "content": "<image>\n" + question}]
            )
            yield Sample(
                [image_path(image_id)], conversation, f"{name}-{meta.get('question_id', image_id)}", meta
            )
        return
    by_image: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    for image_id, question, meta in records:
        by_image[image_id].append((question, meta))
    rng = random.Random(seed)
    for image_id, items in by_image.items():
        if not all("answer" in meta for _, meta in items):
            raise MmllmError(f"{name}: per_image conversations need answers for every question")
        if spec.shuffle_turns:
            rng.shuffle(items)
        conversation = vqa_conversation([q for q, _ in items], [m["answer"] for _, m in items])
        yield Sample(
            [image_path(image_id)], conversation, f"{name}-image-{image_id}", {"turns": [m for _, m in items]}
        )
