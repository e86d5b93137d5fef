"""easy-VQA (`pip install easy-vqa==1.0`, MIT): 64x64 images of one coloured shape, 13 one-word
answers. Its reader, its vocabulary (colours, shapes, question templates) and the descriptions its
questions imply (its images by name: `mmllm.samples`)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

from mmllm.data.config import DataConfig, DatasetSpec
from mmllm.data.records import Sample
from mmllm.data.vqa import YES_NO, vqa_samples
from mmllm.errors import MmllmError
from mmllm.samples import easy_vqa_package

EASY_VQA_COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
EASY_VQA_SHAPES = {"circle", "rectangle", "triangle"}
_EASY_VQA_SLOTS = {color: "COLOR" for color in EASY_VQA_COLORS} | {
    shape: "SHAPE" for shape in EASY_VQA_SHAPES
}


def examples(count: int) -> list[tuple[str, str]]:
    """(image path, question) of the first `count` test images, a question each (the chat page's)."""
    easy_vqa = easy_vqa_package()
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    first = {}
    for question, image_id in zip(questions, image_ids, strict=True):
        first.setdefault(image_id, question)
    return [(paths[image_id], question) for image_id, question in list(first.items())[:count]]


def easy_vqa_answer_type(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    return "color" if answer in EASY_VQA_COLORS else "shape"


def easy_vqa_question_type(question: str) -> str:
    """The question's template, its colour and shape words replaced: "is there not a COLOR shape?"."""
    return re.sub(r"[a-z]+", lambda m: _EASY_VQA_SLOTS.get(m.group(), m.group()), question)


def read_easy_vqa(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """easy-VQA from its PyPI package (`pip install easy-vqa`): 64x64 shapes, 13 one-word answers."""
    easy_vqa = easy_vqa_package()
    if spec.split not in ("train", "test"):
        raise MmllmError(f"easy-vqa has splits train and test, not {spec.split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{spec.split}_questions")()
    paths = getattr(easy_vqa, f"get_{spec.split}_image_paths")()
    if spec.describe:
        for image_id, caption in easy_vqa_descriptions(questions, answers, image_ids).items():
            # A leading space: the words as questions name them inside a sentence (" red", one token,
            # where a line's first "red" is another token and "teal" two).
            conversation = [
                {"role": "user", "content": "<image>\nDescribe the shape."},
                {"role": "assistant", "content": " " + caption},
            ]
            meta = {"references": [caption]}
            yield Sample([paths[image_id]], conversation, f"easy-vqa-{spec.split}-image-{image_id}", meta)
        return
    records = [
        (
            image_id,
            question,
            {
                "question_id": f"{spec.split}-{n}",
                "answer": answer,
                "answers": [answer],
                "answer_type": easy_vqa_answer_type(answer),
                "question_type": easy_vqa_question_type(question),
            },
        )
        for n, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]
    yield from vqa_samples(records, paths.__getitem__, spec, f"easy-vqa-{spec.split}", cfg.seed)


def easy_vqa_descriptions(questions: list[str], answers: list[str], image_ids: list[int]) -> dict[int, str]:
    """ "COLOR SHAPE" of every image whose questions tell both: from open answers, the words of open
    questions ("what color is the circle?"), and yes/no answers, negated wordings included; a colour
    or shape that all but one yes/no answer rule out is the one left."""
    present: dict[int, set[str]] = defaultdict(set)
    absent: dict[int, set[str]] = defaultdict(set)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        words = question.rstrip("?").split()
        named = {w for w in words if w in _EASY_VQA_SLOTS}
        if answer not in YES_NO:
            present[image_id] |= named | {answer}
        elif (answer == "yes") != bool({"not", "no"} & set(words)):
            present[image_id] |= named
        else:
            absent[image_id] |= named

    def known(image_id: int, kinds: set[str]) -> str | None:
        seen = present[image_id] & kinds
        left = kinds - absent[image_id]
        return next(iter(seen)) if len(seen) == 1 else next(iter(left)) if len(left) == 1 else None

    descriptions = {}
    for image_id in dict.fromkeys(image_ids):
        color, shape = known(image_id, EASY_VQA_COLORS), known(image_id, EASY_VQA_SHAPES)
        if color and shape:
            descriptions[image_id] = f"{color} {shape}"
    return descriptions
