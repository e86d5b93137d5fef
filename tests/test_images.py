"""Image loading: every mode becomes RGB, EXIF is honoured, bad files give clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmllm.errors import MmllmError
from mmllm.images import MAX_IMAGE_PIXELS, ImageProcessor, load_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("P", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("L", "JPEG"),
        ("1", "PNG"),
    ],
)
def test_every_mode_becomes_rgb(mode, fmt):
    image = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode)
    loaded = load_image(encode(image, fmt))
    assert loaded.mode == "RGB" and loaded.size == (20, 10)


def test_transparency_composites_on_white():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(encode(transparent)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_contrast():
    array = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    loaded = load_image(encode(Image.fromarray(array)))
    assert loaded.getpixel((0, 0)) == (0, 0, 0) and loaded.getpixel((1, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    assert load_image(encode(image, "JPEG", exif=exif)).size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    red, _, blue = load_image(buffer.getvalue()).getpixel((0, 0))
    assert red > 200 and blue < 50


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(MmllmError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MmllmError, match="not an image"):
        load_image(b"definitely not an image")
    truncated = encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:200]
    with pytest.raises(MmllmError, match="corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(MmllmError, match="is a directory"):
        load_image(tmp_path)


def test_sample_references_name_scikit_image_photos_and_easy_vqa_images():
    import easy_vqa

    assert load_image("sample:coffee").size == (600, 400)
    image = load_image("sample:easy-vqa-test-17")
    assert image.size == (64, 64)
    assert image.tobytes() == load_image(easy_vqa.get_test_image_paths()[17]).tobytes()
    with pytest.raises(MmllmError, match=r"images 0\.\.999, not 5000"):
        load_image("sample:easy-vqa-test-5000")
    with pytest.raises(MmllmError, match="easy-vqa-test-N"):
        load_image("sample:nonsense")


def test_decompression_bomb_is_refused():
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    bomb = encode(Image.new("1", (side, side)))  # ~64 Mpx that compress to a few kB
    assert len(bomb) < 200_000
    with pytest.raises(MmllmError, match="too large"):
        load_image(bomb)


def test_preprocessing_matches_transformers_clip_image_processor():
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (180, 260, 3), dtype=np.uint8))
    ours = ImageProcessor(size=224)([image])
    reference = CLIPImageProcessor()(images=image, return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    # Both resize with PIL's bicubic filter; only rounding of intermediate values may differ.
    assert (ours - reference).abs().mean() < 0.01


def test_a_request_image_is_decoded_and_converted_once(monkeypatch, tmp_path):
    """The CLI, the backend and the processor each pass a request's image through load_image: only the
    first decodes it, and an upright RGB image is never copied again."""
    from conftest import make_tiny
    from mmllm.engine.torch_backend import Pipeline

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (48, 40), "teal").save(path)
    opened, converted = [], []
    real_open, real_convert = Image.open, Image.Image.convert
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    monkeypatch.setattr(
        Image.Image, "convert", lambda self, *a, **k: converted.append(1) or real_convert(self, *a, **k)
    )
    image = load_image(path)  # what `mmllm ask` does first, to fail before loading the model
    assert load_image(image) is image
    Pipeline(*make_tiny("qwen2")).prepare([{"role": "user", "content": "<image>\nWhat is it?"}], [image])
    assert len(opened) == 1 and len(converted) <= 1
