"""Images by name for `sample:NAME`: the photos that offline packages ship (scikit-image's `chelsea`,
`astronaut`, …; matplotlib's `grace_hopper`; gradio's `lion`, `cheetah`, …; scikit-learn's `china` and
`flower`) and easy-VQA's images
(`easy-vqa-test-17`, what the easy-VQA model was trained on)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from mmllm.errors import MmllmError

# The photos, as the files other packages ship: name -> (package, file inside it). Read as files, the
# same pixels scikit-image's `skimage.data.NAME()` returns, without importing skimage.io (0.4 s).
SKIMAGE_FILES = {
    "astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png", "cat": "chelsea.png",
    "chelsea": "chelsea.png", "clock": "clock_motion.png", "coffee": "coffee.png", "coins": "coins.png",
    "grass": "grass.png", "gravel": "gravel.png", "hubble_deep_field": "hubble_deep_field.jpg",
    "moon": "moon.png", "page": "page.png", "rocket": "rocket.jpg", "text": "text.png",
    "motorcycle": "motorcycle_left.png", "horse": "horse.png",
}  # fmt: skip
PACKAGE_PHOTOS = {
    **{name: ("skimage", f"data/{file}") for name, file in SKIMAGE_FILES.items()},
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "lion": ("gradio", "media_assets/images/lion.jpg"),
    "cheetah": ("gradio", "media_assets/images/cheetah.jpg"),
    "cheetah_portrait": ("gradio", "media_assets/images/cheetah1.jpg"),
    "bus": ("gradio", "media_assets/images/bus.png"),
    "tower": ("gradio", "media_assets/images/tower.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
PHOTOS = tuple(PACKAGE_PHOTOS)


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


def sample(name: str) -> str:
    """A sample image's file: a dataset image or a photo another package ships."""
    if path := easy_vqa_image_path(name):
        return path
    if name not in PACKAGE_PHOTOS:
        raise MmllmError(
            f"unknown sample image '{name}'; choose {', '.join(PHOTOS)}, easy-vqa-test-N or easy-vqa-train-N"
        )
    return _package_file(*PACKAGE_PHOTOS[name])


def _package_file(package: str, relative: str) -> str:
    # find_spec locates the package without importing it (gradio takes seconds to import).
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations))) / relative if spec else None
    if path is None or not path.is_file():
        hint = (
            "pip install -e '.[samples]' in mmllm's checkout"
            if package in ("skimage", "sklearn")
            else f"pip install {package}"
        )
        raise MmllmError(f"this sample photo comes with the {package} package: {hint}")
    return str(path)
