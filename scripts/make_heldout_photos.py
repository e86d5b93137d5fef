"""Write the held-out photo-qa sets: transformed copies of the offline sample photos, for the held-out
photo-qa questions (data/photo-qa/SET/questions.jsonl).

The photo model never saw these pixels: crops, mirror images, rotations, greyscale, rescaled, blurred,
recompressed, padded, squashed and re-lit copies test that its answers follow what is in the photo, not
one file's exact classifier output. Each set was written, with its questions, before the model work it
measures: `heldout` before the vocabulary work of 0.2, `heldout2` (other transforms, and two photos no
earlier set used) before the work of 0.3.

`selection` is the other kind of set: the one the bridge's settings are chosen on (and so no measure of
them). Five copies of each covered photo, one to three transforms drawn at random with random strengths,
three questions each (what it is, is its subject there, is an unrelated everyday thing there).

    python scripts/make_heldout_photos.py
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from mmllm.models.labels import article
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


# The selection set's photos: (the names a "what" question accepts, the word its presence question asks).
SUBJECTS = {
    "chelsea": (["cat", "kitten", "tabby"], "cat"),
    "coffee": (["coffee", "espresso", "cappuccino", "cup"], "cup"),
    "rocket": (["rocket", "missile", "spacecraft", "launch vehicle"], "rocket"),
    "motorcycle": (["motorcycle", "motorbike", "moped", "bike", "scooter"], "motorcycle"),
    "lion": (["lion", "big cat"], "lion"),
    "cheetah": (["cheetah", "big cat"], "cheetah"),
    "cheetah_portrait": (["cheetah", "big cat"], "cat"),
    "bus": (["bus", "minibus", "school bus", "trolleybus"], "bus"),
    "china": (["temple", "pagoda", "palace", "tower", "stupa", "monastery", "building"], "building"),
    "flower": (["flower", "dahlia", "daisy"], "flower"),
    "clock": (["clock", "wall clock", "analog clock"], "clock"),
    "camera": (["camera", "tripod"], "camera"),
    "horse": (["horse"], "horse"),
    "grace_hopper": (["uniform", "military uniform", "suit", "jacket", "tie"], "tie"),
}
# Everyday things to ask about where the photo does not show them; and what a photo shows besides its
# subject (China's has boats on the lake).
ABSENT = ["dog", "car", "bird", "horse", "fish", "airplane", "train", "chair", "bottle", "elephant", "boat"]
ABSENT += ["truck", "pizza", "banana", "snake", "sheep"]
ALSO_SHOWN = {"china": {"boat"}}
SELECTION_COPIES, SELECTION_SEED = 5, 2026


def random_transforms(rng: random.Random) -> list[Transform]:
    """One to three of the held-out sets' transforms, with strengths drawn at random."""
    border = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
    choices = [
        lambda: crop(rng.uniform(0.05, 0.2), rng.choice(["centre", "left", "right", "top", "bottom"])),
        lambda: rotate(rng.uniform(-20, 20)),
        lambda: grey,
        lambda: flip,
        lambda: rescale(rng.uniform(0.2, 0.6)),
        lambda: blur(rng.uniform(1.0, 3.0)),
        lambda: jpeg(rng.randint(10, 30)),
        lambda: brightness(rng.uniform(0.5, 1.5)),
        lambda: contrast(rng.uniform(0.4, 1.6)),
        lambda: squash(rng.uniform(0.6, 1.5)),
        lambda: pad(rng.uniform(0.05, 0.2), border),
    ]
    return [make() for make in rng.sample(choices, rng.randint(1, 3))]


def selection_set(rng: random.Random) -> tuple[dict[str, tuple[str, list[Transform]]], list[dict]]:
    """The selection set's copies and their questions."""
    photos, questions = {}, []
    for photo, (names, word) in SUBJECTS.items():
        for copy in range(SELECTION_COPIES):
            file = f"{photo}-{copy}"
            photos[file] = (photo, random_transforms(rng))
            candidates = [w for w in ABSENT if w != word and w not in names]
            absent = rng.choice(candidates)
            while absent in ALSO_SHOWN.get(photo, ()):  # drawn again: the set stays as first written
                absent = rng.choice(candidates)
            asked = [
                ("What is this?", names, "what"),
                (f"Is there {article(word)} {word}?", ["yes"], "yes-no"),
                (f"Is there {article(absent)} {absent}?", ["no"], "yes-no"),
            ]
            for question, answers, kind in asked:
                row = {"id": f"{file}-{len(questions)}", "image": f"{file}.jpg", "question": question}
                questions.append(row | {"answers": answers, "question_type": kind})
    return photos, questions


def write(name: str, photos: dict[str, tuple[str, list[Transform]]]) -> None:
    out = DATA / name
    out.mkdir(parents=True, exist_ok=True)
    for file, (photo, transforms) in photos.items():
        image = Image.open(sample(photo)).convert("RGB")
        for transform in transforms:
            image = transform(image)
        image.thumbnail((512, 512))
        image.save(out / f"{file}.jpg", quality=90)
        print(f"{name}/{file}.jpg  {image.size[0]}x{image.size[1]}  from sample:{photo}")


def main() -> None:
    for name, photos in SETS.items():
        write(name, photos)
    photos, questions = selection_set(random.Random(SELECTION_SEED))
    write("selection", photos)
    lines = "".join(json.dumps(row) + "\n" for row in questions)
    (DATA / "selection" / "questions.jsonl").write_text(lines)


if __name__ == "__main__":
    main()
