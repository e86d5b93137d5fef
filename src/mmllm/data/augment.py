"""Train-time augmentation (off by default): of PIL images before CLIP preprocessing, and of the
case of questions."""

from __future__ import annotations

import random
import re

from PIL import Image, ImageEnhance

from mmllm.conversation import Message
from mmllm.data.config import AugmentConfig

QUARTER_TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def augment(image: Image.Image, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    if not cfg.enabled:
        return image
    if cfg.crop_scale < 1.0:
        area = rng.uniform(cfg.crop_scale, 1.0)
        aspect = rng.uniform(3 / 4, 4 / 3)
        width = min(image.width, round(image.width * (area * aspect) ** 0.5))
        height = min(image.height, round(image.height * (area / aspect) ** 0.5))
        left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
        image = image.crop((left, top, left + width, top + height))
    if cfg.hflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.vflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if cfg.rot90 and (turns := rng.randrange(4)):
        image = image.transpose(QUARTER_TURNS[turns])
    if cfg.jitter > 0:
        image = ImageEnhance.Brightness(image).enhance(1 + rng.uniform(-cfg.jitter, cfg.jitter))
        image = ImageEnhance.Contrast(image).enhance(1 + rng.uniform(-cfg.jitter, cfg.jitter))
    return image


def augment_questions(conversation: list[Message], cfg: AugmentConfig, rng: random.Random) -> list[Message]:
    """Upper-case the first letter of user turns (after any image markers) with chance `cfg.capitalize`."""
    if not (cfg.enabled and cfg.capitalize):
        return conversation
    return [
        {**turn, "content": _FIRST_LETTER.sub(lambda m: m[1] + m[2].upper(), turn["content"], count=1)}
        if turn["role"] == "user" and rng.random() < cfg.capitalize
        else turn
        for turn in conversation
    ]


_FIRST_LETTER = re.compile(r"^((?:\s|<image>)*)([a-z])")
