"""Images by name for `sample:NAME`: the photos that offline packages ship (scikit-image's `chelsea`,
`astronaut`, …; matplotlib's `grace_hopper`; gradio's `lion`, `cheetah`, …) and easy-VQA's images
(`easy-vqa-test-17`, what the easy-VQA model was trained on)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import numpy as np

from mmllm.errors import MmllmError

SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "moon", "page", "rocket", "text",
)  # fmt: skip
# Photos shipped as files inside other packages: name -> (package, file inside it).
PACKAGE_PHOTOS = {
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "lion": ("gradio", "media_assets/images/lion.jpg"),
    "cheetah": ("gradio", "media_assets/images/cheetah.jpg"),
    "bus": ("gradio", "media_assets/images/bus.png"),
    "tower": ("gradio", "media_assets/images/tower.jpg"),
}
PHOTOS = (*SKIMAGE_PHOTOS, *PACKAGE_PHOTOS)


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
    if name in PACKAGE_PHOTOS:
        return _package_file(*PACKAGE_PHOTOS[name])
    if name not in PHOTOS:
        raise MmllmError(
            f"unknown sample image '{name}'; choose {', '.join(PHOTOS)}, easy-vqa-test-N or easy-vqa-train-N"
        )
    try:
        from skimage import data
    except ImportError:
        raise MmllmError("sample images need scikit-image: pip install 'mmllm[samples]'") from None
    return getattr(data, name)()


def _package_file(package: str, relative: str) -> str:
    # find_spec locates the package without importing it (gradio takes seconds to import).
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations))) / relative if spec else None
    if path is None or not path.is_file():
        raise MmllmError(f"this sample photo comes with the {package} package: pip install {package}")
    return str(path)
