"""Write data/photo-qa/heldout/*.jpg: transformed copies of the offline sample photos, for the held-out
photo-qa questions (data/photo-qa/heldout/questions.jsonl).

The photo model never saw these pixels: crops, mirror images, greyscale and rescaled copies test that its
answers follow what is in the photo, not one file's exact classifier output.

    python scripts/make_heldout_photos.py
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from mmllm.samples import sample

OUT = Path(__file__).resolve().parents[1] / "data/photo-qa/heldout"


def crop(fraction: float, box: str = "centre") -> Callable[[Image.Image], Image.Image]:
    """Cut `fraction` of each side off (centre), or keep the left / top (1 - 2 * fraction)."""

    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        dx, dy = round(w * fraction), round(h * fraction)
        if box == "left":
            return image.crop((0, dy, w - 2 * dx, h - dy))
        return image.crop((dx, dy, w - dx, h - dy))

    return apply


def rescale(factor: float) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        return image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)

    return apply


def flip(image: Image.Image) -> Image.Image:
    return ImageOps.mirror(image)


def grey(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


# file -> (sample photo, transforms applied in order)
PHOTOS: dict[str, tuple[str, list[Callable[[Image.Image], Image.Image]]]] = {
    "lion-crop": ("lion", [crop(1 / 8)]),
    "chelsea-flip-grey": ("chelsea", [flip, grey]),
    "coffee-small": ("coffee", [rescale(0.3)]),
    "rocket-crop": ("rocket", [crop(1 / 8)]),
    "motorcycle-flip": ("motorcycle", [flip]),
    "grace_hopper-grey-crop": ("grace_hopper", [grey, crop(1 / 10)]),
    "cheetah-flip-small": ("cheetah", [flip, rescale(0.5)]),
    "bus-flip-large": ("bus", [flip, rescale(3.0)]),
    "tower-grey": ("tower", [grey]),
    "china-crop-left": ("china", [crop(1 / 8, "left")]),
    "flower-grey": ("flower", [grey]),
    "flower-flip-crop": ("flower", [flip, crop(1 / 10)]),
    "clock-flip": ("clock", [flip]),
    "camera-crop": ("camera", [crop(1 / 8)]),
    "astronaut-flip": ("astronaut", [flip]),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (photo, transforms) in PHOTOS.items():
        image = Image.open(sample(photo)).convert("RGB")
        for transform in transforms:
            image = transform(image)
        image.thumbnail((512, 512))
        image.save(OUT / f"{name}.jpg", quality=90)
        print(f"{name}.jpg  {image.size[0]}x{image.size[1]}  from sample:{photo}")


if __name__ == "__main__":
    main()
