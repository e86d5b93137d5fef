"""Images by name for `sample:NAME`: scikit-image's photos (`chelsea`, `astronaut`, …) and easy-VQA's
images (`easy-vqa-test-17`, what the shipped model was trained on), both from offline packages."""

from __future__ import annotations

import re
from types import ModuleType

import numpy as np

from mmllm.errors import MmllmError

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "hubble_deep_field")


def easy_vqa_package() -> ModuleType:
    try:
        import easy_vqa
    except ImportError:
        raise MmllmError("easy-VQA needs its package: pip install easy-vqa==1.0") from None
    return easy_vqa


def easy_vqa_image_path(name: str) -> str | None:
    """The file of `easy-vqa-SPLIT-N`, or None for any other name."""
    if not (match := re.fullmatch(r"easy-vqa-(train|test)-(\d+)", name)):
        return None
    paths = getattr(easy_vqa_package(), f"get_{match[1]}_image_paths")()
    if int(match[2]) not in paths:
        raise MmllmError(f"easy-VQA {match[1]} has images 0..{len(paths) - 1}, not {match[2]}")
    return paths[int(match[2])]


def sample(name: str) -> str | np.ndarray:
    """A dataset image's path, or a photo's pixels."""
    if path := easy_vqa_image_path(name):
        return path
    if name not in PHOTOS:
        raise MmllmError(
            f"unknown sample image '{name}'; choose {', '.join(PHOTOS)}, easy-vqa-test-N or easy-vqa-train-N"
        )
    try:
        from skimage import data
    except ImportError:
        raise MmllmError("sample images need scikit-image: pip install 'mmllm[samples]'") from None
    return getattr(data, name)()
