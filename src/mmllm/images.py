"""Image loading and CLIP preprocessing: any file or mode -> RGB -> (I, 3, S, S) normalised pixels."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmllm.errors import MmllmError
from mmllm.samples import sample

if TYPE_CHECKING:
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Decompression-bomb guard: a few kB of PNG can claim billions of pixels.
MAX_IMAGE_PIXELS = 64_000_000
SAMPLE_PREFIX = "sample:"
ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads

ImageInput = str | Path | bytes | Image.Image


def load_image(
    source: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS, shortest_side: int | None = None
) -> Image.Image:
    """Open a path, `sample:NAME` (scikit-image photos), raw bytes or PIL image as an upright RGB image.

    The declared size is checked against `max_pixels` before any pixel is decoded. With
    `shortest_side` (what preprocessing will resize to), a JPEG decodes at the smallest power-of-two
    scale that keeps its shortest side at least that long, so memory follows what the model sees,
    not the file's size.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, str) and source.startswith(SAMPLE_PREFIX):
        return sample_image(source.removeprefix(SAMPLE_PREFIX))
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if image.width * image.height > max_pixels:
                raise MmllmError(
                    f"{name}: {image.width}x{image.height} pixels is too large (limit {max_pixels:,} pixels)"
                )
            if shortest_side and image.format == "JPEG":
                scale = shortest_side / min(image.size)
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            image.load()
    except FileNotFoundError:
        raise MmllmError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise MmllmError(f"{name}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise MmllmError(f"{name}: not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MmllmError(f"{name}: too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise MmllmError(f"{name}: corrupt or truncated image ({err})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF-upright, first frame, 8-bit RGB; transparency is composited on white, not on black.

    An image that already is all of that is returned as it is, not copied: a request's image passes
    through here at each layer (CLI, backend, processor) but is decoded and copied only once.
    """
    if getattr(image, "is_animated", False):
        image.seek(0)
    if image.mode == "RGB" and image.getexif().get(ORIENTATION, 1) == 1:
        return image
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255).round().astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def sample_image(name: str) -> Image.Image:
    """`sample:NAME` (see `mmllm.samples`) as an upright RGB image."""
    return load_image(sample(name))


@dataclass
class ImageProcessor:
    """CLIP preprocessing: shortest side to `size` (bicubic), centre crop, scale to [0, 1], normalise."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> (3, size, size) float32."""
        scale = self.size / min(image.size)
        width, height = (max(self.size, int(d * scale)) for d in image.size)  # int(): as transformers
        left, top = (width - self.size) // 2, (height - self.size) // 2
        # Resize only the centre crop's source box: the same pixels as resizing the whole image and
        # then cropping, without ever holding the resized whole (a 1x100000 strip would be 224x22M).
        x, y = width / image.width, height / image.height  # the whole resize's own scale per axis
        box = (left / x, top / y, (left + self.size) / x, (top + self.size) / y)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        pixels = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.transpose(2, 0, 1)

    def arrays(self, images: list[ImageInput]) -> np.ndarray:
        """Images -> (I, 3, size, size) float32, without torch (what backends over an export read)."""
        return np.stack([self.preprocess(load_image(i)) for i in images])

    def __call__(self, images: list[ImageInput]) -> torch.Tensor:
        """Images -> (I, 3, size, size)."""
        import torch

        return torch.from_numpy(self.arrays(images))
