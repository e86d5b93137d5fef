"""`Sample`: the one record every reader produces — images, a conversation, and metadata for eval."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmllm.conversation import Message

# An image as a reader knows it: a file path, or the encoded bytes (webdataset members).
ImageRef = str | bytes

CAPTION_INSTRUCTIONS = (
    "Describe this image briefly.",
    "What is in this image?",
    "Give a short caption for this image.",
    "Summarize the visual content of the image.",
    "Write a one-sentence description of the picture.",
)


@dataclass
class Sample:
    images: list[ImageRef]
    conversation: list[Message]
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    """Kept for evaluation: `references` (captions), `answers` (all VQA answers), answer/question types."""


def image_key(ref: ImageRef) -> str:
    """Content hash of an image's encoded bytes: the feature cache's key, stable across paths and copies."""
    data = ref if isinstance(ref, bytes) else Path(ref).read_bytes()
    return hashlib.sha256(data).hexdigest()


def caption_sample(
    image: ImageRef,
    captions: list[str],
    instructions: tuple[str, ...],
    rng: random.Random,
    sample_id: str,
    train_caption: str | None = None,
) -> Sample:
    """A caption becomes an instruction (drawn from `instructions`) answered by the caption."""
    caption = train_caption if train_caption is not None else captions[0]
    conversation = [
        {"role": "user", "content": "<image>\n" + rng.choice(instructions)},
        {"role": "assistant", "content": caption.strip()},
    ]
    return Sample([image], conversation, sample_id, {"references": [c.strip() for c in captions]})


def vqa_conversation(questions: list[str], answers: list[str]) -> list[Message]:
    """Questions about one image as turns of one conversation; the image comes with the first."""
    conversation: list[Message] = []
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        prefix = "<image>\n" if i == 0 else ""
        conversation += [
            {"role": "user", "content": prefix + question.strip()},
            {"role": "assistant", "content": answer.strip()},
        ]
    return conversation
