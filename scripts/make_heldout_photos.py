"""Write the held-out photo-qa sets: transformed copies of the offline sample photos, for the held-out
photo-qa questions (data/photo-qa/SET/questions.jsonl).

The photo model never saw these pixels: crops, mirror images, rotations, greyscale, rescaled, blurred,
recompressed, padded, squashed and re-lit copies test that its answers follow what is in the photo, not
one file's exact classifier output. Each set was written, with its questions, before the model work it
measures: `heldout` before the vocabulary work of 0.2, `heldout2` (other transforms, and two photos no
earlier set used) before the work of 0.3.

    python scripts/make_heldout_photos.py
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from mmllm.samples import sample

DATA = Path(__file__).resolve().parents[1] / "data/photo-qa"
Transform = Callable[[Image.Image], Image.Image]


def crop(fraction: float, box: str = "centre") -> Transform:
    """Cut `fraction` off each side (centre), or keep the left / right / top / bottom (1 - 2 * fraction)."""

    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        dx, dy = round(w * fraction), round(h * fraction)
        boxes = {
            "centre": (dx, dy, w - dx, h - dy),
            "left": (0, dy, w - 2 * dx, h - dy),
            "right": (2 * dx, dy, w, h - dy),
            "top": (dx, 0, w - dx, h - 2 * dy),
            "bottom": (dx, 2 * dy, w - dx, h),
        }
        return image.crop(boxes[box])

    return apply


def rescale(factor: float) -> Transform:
    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        return image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)

    return apply


def squash(x_factor: float) -> Transform:
    """Stretch (> 1) or squeeze (< 1) the width alone."""

    def apply(image: Image.Image) -> Image.Image:
        return image.resize((max(1, round(image.width * x_factor)), image.height), Image.Resampling.BICUBIC)

    return apply


def rotate(degrees: float) -> Transform:
    def apply(image: Image.Image) -> Image.Image:
        return image.rotate(degrees, Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))

    return apply


def pad(fraction: float, colour: tuple[int, int, int] = (255, 255, 255)) -> Transform:
    """A border of `fraction` of the width and height on every side."""

    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        return ImageOps.expand(image, (round(w * fraction), round(h * fraction)), fill=colour)

    return apply


def blur(radius: float) -> Transform:
    return lambda image: image.filter(ImageFilter.GaussianBlur(radius))


def brightness(factor: float) -> Transform:
    return lambda image: ImageEnhance.Brightness(image).enhance(factor)


def contrast(factor: float) -> Transform:
    return lambda image: ImageEnhance.Contrast(image).enhance(factor)


def jpeg(quality: int) -> Transform:
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer).convert("RGB")

    return apply


def flip(image: Image.Image) -> Image.Image:
    return ImageOps.mirror(image)


def grey(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


# set -> file -> (sample photo, transforms applied in order)
SETS: dict[str, dict[str, tuple[str, list[Transform]]]] = {
    "heldout": {
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
    },
    "heldout2": {
        "cheetah_portrait-rotate": ("cheetah_portrait", [rotate(15)]),
        "chelsea-jpeg-small": ("chelsea", [rescale(0.4), jpeg(15)]),
        "coffee-rotate-dark": ("coffee", [rotate(-12), brightness(0.6)]),
        "rocket-pad-squash": ("rocket", [pad(0.15), squash(1.4)]),
        "motorcycle-contrast-right": ("motorcycle", [contrast(0.5), crop(0.1, "right")]),
        "lion-blur": ("lion", [blur(2.0)]),
        "cheetah-grey-squash": ("cheetah", [grey, squash(0.7)]),
        "bus-rotate-jpeg": ("bus", [rotate(10), jpeg(25)]),
        "tower-bright-top": ("tower", [brightness(1.3), crop(0.1, "top")]),
        "china-rotate": ("china", [rotate(-8)]),
        "flower-contrast-rotate": ("flower", [contrast(1.5), rotate(20)]),
        "clock-bright-small": ("clock", [brightness(1.4), rescale(0.5)]),
        "camera-pad-rotate": ("camera", [pad(0.1, (0, 0, 0)), rotate(-10)]),
        "grace_hopper-jpeg-right": ("grace_hopper", [crop(0.1, "right"), jpeg(20)]),
        "horse-pad": ("horse", [pad(0.1)]),
        "astronaut-rotate-grey": ("astronaut", [rotate(12), grey]),
    },
}


def main() -> None:
    for name, photos in SETS.items():
        out = DATA / name
        out.mkdir(parents=True, exist_ok=True)
        for file, (photo, transforms) in photos.items():
            image = Image.open(sample(photo)).convert("RGB")
            for transform in transforms:
                image = transform(image)
            image.thumbnail((512, 512))
            image.save(out / f"{file}.jpg", quality=90)
            print(f"{name}/{file}.jpg  {image.size[0]}x{image.size[1]}  from sample:{photo}")


if __name__ == "__main__":
    main()
