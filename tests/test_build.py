"""build_model / load_model from local parts: what a user does with their own checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModelWithProjection

from conftest import TINY_CLIP, make_tokenizer, tiny_text_config
from mmllm import ModelConfig, build_model, load_model
from mmllm.errors import MmllmError
from mmllm.models.build import untrained_parts

QUESTION = [{"role": "user", "content": "What is in this image?"}]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny Llama LM (with tokenizer), a tiny CLIP with weights, and a CLIP config alone."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    tokenizer = make_tokenizer("llama")
    AutoModelForCausalLM.from_config(tiny_text_config("llama", tokenizer)).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    vision_config = CLIPVisionConfig(**TINY_CLIP)
    CLIPVisionModelWithProjection(vision_config).save_pretrained(root / "clip")
    vision_config.save_pretrained(root / "clip-config-only")
    return root


def test_build_from_local_parts_keeps_their_weights(parts):
    model, processor = build_model(ModelConfig(lm=str(parts / "lm"), vision=str(parts / "clip")))
    saved = CLIPVisionModelWithProjection.from_pretrained(parts / "clip")
    for key, value in saved.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[key], value), key
    assert untrained_parts(model) == ["projector"]
    assert processor.image_processor.size == 32 and processor.end_of_turn == "<|eot_id|>"
    assert model.config.text_model_name_or_path == str(parts / "lm")


def test_config_only_vision_is_random_and_says_so(parts, caplog):
    with caplog.at_level(logging.WARNING, logger="mmllm"):
        model, _ = build_model(ModelConfig(lm=str(parts / "lm"), vision=str(parts / "clip-config-only")))
    assert "UNTRAINED" in caplog.text
    assert untrained_parts(model) == ["vision_tower", "projector"]


def test_fresh_projector_speaks_at_the_scale_of_token_embeddings(parts):
    model, _ = build_model(ModelConfig(lm=str(parts / "lm"), vision=str(parts / "clip")))
    features = torch.randn(64, 1, model.config.vision_feature_dim)
    with torch.no_grad():
        out_rms = model.projector(features).pow(2).mean().sqrt()
        embed_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt()
    assert 0.5 < float(out_rms / embed_rms) < 2.0


def test_a_frozen_untrained_tower_is_rebuilt_not_stored(parts, tmp_path, images):
    """Checkpoints of a run on an untrained tower (CLIP offline) hold the projector, not the tower:
    the tower is drawn again from its seed and checked against the digest the config keeps."""
    model, processor = build_model(ModelConfig(lm=str(parts / "lm"), vision=str(parts / "clip-config-only")))
    assert model.parts_without_base() == ["projector"]
    model.save_pretrained(tmp_path / "m", parts=model.parts_without_base())
    processor.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"))
    batch = processor([QUESTION], [[images[0]]])
    torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits, rtol=0, atol=0)
    # Another draw than the one trained with is refused, not silently used.
    config = tmp_path / "m" / "config.json"
    config.write_text(config.read_text().replace(model.config.vision_untrained_digest, "0" * 16))
    with pytest.raises(ValueError, match="draws a different one"):
        load_model(str(tmp_path / "m"))
    # Once the tower trains, it is one of the parts a checkpoint stores.
    model.config.trained_parts = [*model.config.trained_parts, "vision_tower"]
    assert model.parts_without_base() == ["projector", "vision_tower"]


def test_yaml_recipe_as_model(parts, tmp_path):
    recipe = tmp_path / "model.yaml"
    recipe.write_text(
        f"lm: {parts / 'lm'}\nvision: {parts / 'clip'}\n"
        "vision_feature_mode: patch\nprojector_type: mlp_gelu\n"
    )
    model, processor = load_model(str(recipe))
    assert model.config.num_image_tokens == processor.num_image_tokens == 16
    assert model.config.projector_type == "mlp_gelu"


def test_saved_parts_only_model_loads_by_directory(parts, tmp_path, images):
    model, processor = build_model(ModelConfig(lm=str(parts / "lm"), vision=str(parts / "clip")))
    model.save_pretrained(tmp_path / "m", parts=["projector"])
    processor.save_pretrained(tmp_path / "m")
    loaded, loaded_processor = load_model(str(tmp_path / "m"))
    batch = processor([QUESTION], [[images[0]]])
    assert torch.equal(batch["input_ids"], loaded_processor([QUESTION], [[images[0]]])["input_ids"])
    torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits, rtol=0, atol=1e-6)


def test_hub_only_language_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MmllmError, match="need the Hugging Face hub"):
        build_model(ModelConfig(lm="phi-3.5-mini-instruct"))


def test_shipped_models_resolve_by_name_and_are_never_replaced_by_random_weights(
    parts, tmp_path, monkeypatch
):
    from mmllm.models import build

    model, processor = build_model(ModelConfig(lm=str(parts / "lm"), vision=str(parts / "clip")))
    for name in build.SHIPPED_MODELS:
        model.save_pretrained(tmp_path / "mine" / name, parts=["projector"])
        processor.save_pretrained(tmp_path / "mine" / name)
    monkeypatch.setenv("MMLLM_MODELS", str(tmp_path / "mine"))
    found = str(tmp_path / "mine" / "mmllm-easyvqa")
    assert build.resolve_model_name("mmllm-easyvqa") == found  # $MMLLM_MODELS comes first
    assert build.resolve_model_name("default") == str(tmp_path / "mine" / "mmllm-photo")
    assert build.resolve_model_name(str(parts / "lm")) == str(parts / "lm")  # anything else: as given
    loaded, _ = load_model("mmllm-easyvqa")
    torch.testing.assert_close(loaded.projector.state_dict(), model.projector.state_dict())
    # Nowhere to be found: the name, and `default`, are errors that say how to install them.
    monkeypatch.setattr(build, "shipped_model_roots", lambda: [tmp_path / "empty"])
    for name in ("mmllm-easyvqa", "default"):
        with pytest.raises(MmllmError, match=r"pip install .*MMLLM_MODELS"):
            build.resolve_model_name(name)


def test_the_shipped_models_are_found_from_any_directory(tmp_path, monkeypatch):
    """Installed with the package, not looked up under the working directory."""
    from mmllm.models import build

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMLLM_MODELS", raising=False)
    monkeypatch.setenv("MMLLM_HOME", str(tmp_path / "home"))
    for name in build.SHIPPED_MODELS:
        folder = Path(build.resolve_model_name(name))
        assert folder.name == name and (folder / "config.json").is_file()
        assert not folder.is_relative_to(tmp_path)
    assert Path(build.resolve_model_name("default")).name == "mmllm-photo"


def test_an_untrained_tower_is_the_same_every_build(tmp_path):
    """So a feature cache of an untrained tower (`mmllm features`) matches the run that trains on it."""
    from transformers import CLIPVisionConfig

    from conftest import TINY_CLIP
    from mmllm.models.vision import load_vision_tower

    CLIPVisionConfig(**TINY_CLIP).save_pretrained(tmp_path)  # a config and no weights: random init
    towers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.rand(1)
        torch.manual_seed(seed)
        tower, pretrained = load_vision_tower(str(tmp_path), "patch")
        assert not pretrained
        towers.append(tower.state_dict())
        assert torch.equal(torch.rand(1), expected)  # the caller's random stream is left untouched
    assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0])
