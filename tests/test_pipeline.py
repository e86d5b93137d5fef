"""Pipeline.complete: per-row limits and stop strings, streamed deltas, the image-feature LRU cache."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline

QUESTIONS = [
    [{"role": "user", "content": "What is in this image?"}],
    [{"role": "user", "content": "Colour?"}],
]


@pytest.fixture
def pipeline():
    return Pipeline(*make_tiny("qwen2", lm_init_std=0.3))


def test_rows_keep_their_own_token_limits_and_deltas_add_up(pipeline, images):
    deltas = {0: "", 1: ""}

    def collect(row: int, text: str) -> None:
        deltas[row] += text

    settings = [GenerationSettings(max_new_tokens=3), GenerationSettings(max_new_tokens=7)]
    out = pipeline.complete(QUESTIONS, [[images[0]], [images[1]]], settings, on_delta=collect)
    assert [c.completion_tokens <= limit for c, limit in zip(out, [3, 7], strict=True)] == [True, True]
    assert all(c.finish_reason in ("stop", "length") for c in out)
    assert [deltas[0], deltas[1]] == [c.text for c in out]  # streamed: the answer, as generated
    alone = pipeline.complete(QUESTIONS[1:], [[images[1]]], settings[1:])[0]
    assert alone.text == out[1].text and alone.prompt_tokens == out[1].prompt_tokens


def test_stop_strings_cut_the_answer(pipeline, images):
    full = pipeline.complete(QUESTIONS[:1], [[images[0]]], GenerationSettings(max_new_tokens=12))[0]
    assert len(full.text) > 2
    stop = full.text[2:4]
    cut = pipeline.complete(
        QUESTIONS[:1], [[images[0]]], GenerationSettings(max_new_tokens=12), stop=[[stop]]
    )[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"


def test_follow_up_questions_reuse_cached_image_features(pipeline, images):
    calls = []
    original = pipeline.model.get_image_features
    pipeline.model.get_image_features = lambda pixels: calls.append(len(pixels)) or original(pixels)
    pipeline.generate(QUESTIONS[:1], [[images[0]]], GenerationSettings(max_new_tokens=2))
    pipeline.generate(QUESTIONS[1:], [[images[0]]], GenerationSettings(max_new_tokens=2))
    pipeline.generate(QUESTIONS, [[images[0]], [images[1]]], GenerationSettings(max_new_tokens=2))
    assert calls == [1, 1]  # the first image once, the second image once


def test_a_batch_with_more_images_than_the_feature_cache_holds(images):
    small = Pipeline(*make_tiny("qwen2", lm_init_std=0.3), feature_cache_size=1)
    features = small.image_features([images[0], images[1], images[0]])  # (3, N, D_v)
    assert torch.equal(features[0], features[2]) and not torch.equal(features[0], features[1])
    assert len(small.features.entries) == 1


def test_ignore_eos_generates_exactly_max_new_tokens(pipeline, images):
    settings = GenerationSettings(max_new_tokens=9, ignore_eos=True)
    out = pipeline.complete(QUESTIONS, [[images[0]], [images[1]]], settings)
    assert [c.completion_tokens for c in out] == [9, 9] and {c.finish_reason for c in out} == {"length"}
