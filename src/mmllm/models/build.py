"""Assemble a multimodal model from named parts, or load a saved one: the two ways models come to be."""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mmllm.config import load_config
from mmllm.errors import MmllmError
from mmllm.images import ImageProcessor
from mmllm.models.configuration import PARTS, MultimodalConfig, is_mmllm_model, num_image_tokens
from mmllm.models.design import ModelConfig, design_of
from mmllm.models.language import load_language_model, load_tokenizer
from mmllm.models.multimodal import MultimodalLM
from mmllm.models.timm_vision import TimmVisionConfig
from mmllm.models.vision import load_vision_config, load_vision_tower, weights_digest
from mmllm.processor import PROCESSOR_FILE, MultimodalProcessor
from mmllm.weights import mmllm_home

log = logging.getLogger("mmllm")

# `--model default` is the shipped photo model. The shipped models are the repository's models/ folder,
# installed with the package (src/mmllm/shipped links to it): found from any directory, whether mmllm
# was installed from its checkout or from a wheel built there.
DEFAULT_MODEL = "default"
SHIPPED_MODELS = ("mmllm-photo", "mmllm-easyvqa")


def shipped_model_roots() -> list[Path]:
    """Folders searched for shipped models: `$MMLLM_MODELS` (its folders in order), the models installed
    with mmllm, `$MMLLM_HOME/models`."""
    roots = [Path(p) for p in os.environ.get("MMLLM_MODELS", "").split(os.pathsep) if p]
    return [*roots, Path(str(resources.files("mmllm") / "shipped")), mmllm_home() / "models"]


def resolve_model_name(name_or_path: str) -> str:
    """`default` and shipped model names -> their folder; anything else is returned unchanged."""
    name = SHIPPED_MODELS[0] if name_or_path == DEFAULT_MODEL else name_or_path
    if name not in SHIPPED_MODELS or Path(name_or_path).exists():
        return name_or_path
    for root in shipped_model_roots():
        if (root / name / "config.json").is_file():
            return str(root / name)
    default = " (`default` is mmllm-photo)" if name_or_path == DEFAULT_MODEL else ""
    raise MmllmError(
        f"the shipped model {name}{default} is not in {', '.join(map(str, shipped_model_roots()))}: "
        "reinstall mmllm from its checkout (`pip install .`, which installs the models with it), or set "
        f"MMLLM_MODELS to a folder holding {name}/"
    )


def build_model(
    cfg: ModelConfig, dtype: torch.dtype | None = None, quantization_config: Any = None
) -> tuple[MultimodalLM, MultimodalProcessor]:
    """A new model: pretrained LM (and vision tower when available) plus a fresh projector."""
    language_model = load_language_model(cfg.lm, dtype, quantization_config)
    tower, tower_pretrained = load_vision_tower(cfg.vision, cfg.vision_feature_mode)
    config = MultimodalConfig(
        vision_config=tower.config,
        text_config=language_model.config,
        **design_of(cfg),
        text_model_name_or_path=cfg.lm,
        vision_model_name_or_path=cfg.vision if tower_pretrained else None,
        vision_untrained_digest=None if tower_pretrained else weights_digest(tower),
        trained_parts=["language_model", *(["vision_tower"] if tower_pretrained else [])],
    )
    processor = MultimodalProcessor(
        load_tokenizer(cfg.lm), config.num_image_tokens, image_processor_for(tower.config)
    )
    config.image_token_id = processor.image_token_id
    model = MultimodalLM(config, language_model=language_model, vision_tower=tower)
    model.projector.match_embedding_scale(language_model.get_input_embeddings().weight)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), processor


def _source(name_or_path: str) -> Path | ModelConfig:
    """What a model name means: a saved mmllm model's folder (shipped ones and `default` by name), or the
    recipe of a new model (a ModelConfig YAML, or a bare LM with the default vision tower)."""
    name_or_path = resolve_model_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return load_config(ModelConfig, path)
    if path.is_dir() and is_mmllm_model(path):
        if not (path / PROCESSOR_FILE).is_file():
            raise MmllmError(f"{path} holds a model but no processor ({PROCESSOR_FILE})")
        return path
    return ModelConfig(lm=name_or_path)


def load_model(
    name_or_path: str, dtype: torch.dtype | None = None, quantization_config: Any = None
) -> tuple[MultimodalLM, MultimodalProcessor]:
    """Load what a user names: a saved mmllm model, a ModelConfig YAML, `default`, or a bare LM.

    A YAML recipe or a bare LM builds a new model, whose projector (and vision tower, offline) is untrained.
    `quantization_config` loads the language model 4-bit (QLoRA training: `models/nf4.py`).
    """
    source = _source(name_or_path)
    if isinstance(source, ModelConfig):
        return build_model(source, dtype, quantization_config)
    model = MultimodalLM.from_pretrained(source, dtype=dtype, lm_quantization=quantization_config)
    return model.eval(), MultimodalProcessor.from_pretrained(source)


def load_processor(name_or_path: str) -> MultimodalProcessor:
    """The processor of what `load_model` would load, without loading any weights."""
    source = _source(name_or_path)
    if not isinstance(source, ModelConfig):
        return MultimodalProcessor.from_pretrained(source)
    vision_config, _, _ = load_vision_config(source.vision)
    tokens = num_image_tokens(
        vision_config,
        source.vision_feature_mode,
        source.vision_use_cls,
        source.vision_pixel_shuffle,
        source.vision_feature_layer,
    )
    return MultimodalProcessor(load_tokenizer(source.lm), tokens, image_processor_for(vision_config))


def image_processor_for(vision_config: Any) -> ImageProcessor:
    """The preprocessing a tower's weights were trained with (a timm tower's own mean and std)."""
    if isinstance(vision_config, TimmVisionConfig):
        return ImageProcessor(
            size=vision_config.image_size,
            mean=tuple(vision_config.image_mean),
            std=tuple(vision_config.image_std),
        )
    return ImageProcessor(size=vision_config.image_size)


def untrained_parts(model: MultimodalLM) -> list[str]:
    """Parts holding random weights: a model with any of these cannot really see."""
    trained = set(model.config.trained_parts or ())
    # A part with nothing to learn (the labels projector) is never untrained.
    return [p for p in PARTS if p not in trained and any(True for _ in getattr(model, p).parameters())]


def describe_model(model: MultimodalLM, processor: MultimodalProcessor) -> list[str]:
    """`mmllm info`: the design, the LM, and each part's class, parameter count, dtype and state."""
    config, trained = model.config, set(model.config.trained_parts or ())
    reading = (
        "read as words (the labels bridge)"
        if config.reads_images_as_words
        else f"{config.num_image_tokens} tokens/image"
    )
    lines = [
        f"vision features: {config.vision_feature_mode} ({reading}, "
        f"{config.vision_feature_dim}-d), projector: {config.projector_type}"
        f"{' (tokens snapped to words)' if config.projector_snap_to_vocab else ''}, "
        f"image size: {processor.image_processor.size}",
        f"language model: {config.text_config.model_type} ({config.text_model_name_or_path or 'stored'}), "
        f"end of turn: {processor.end_of_turn}",
        f"{'part':<16}{'class':<34}{'parameters':>14}  {'dtype':<10}state",
    ]
    total = 0
    for name in PARTS:
        part = getattr(model, name)
        count = sum(p.numel() for p in part.parameters())
        total += count
        dtype = next((str(p.dtype).removeprefix("torch.") for p in part.parameters()), "-")
        state = "trained" if name in trained or not count else "UNTRAINED (random)"
        lines.append(f"{name:<16}{type(part).__name__:<34}{count:>14,}  {dtype:<10}{state}")
    return [*lines, f"{'total':<50}{total:>14,}"]


def merge_lora_model(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Fold a saved model's (or a checkpoint's) LoRA adapter into its LM and save a plain model."""
    source = Path(source)
    source = source / "model" if (source / "state.pt").is_file() else source  # a training checkpoint
    model, processor = load_model(str(source))
    if not model.has_lora:
        raise MmllmError(f"{source} has no LoRA adapter to merge")
    model.merge_lora()
    model.config.text_model_name_or_path = None  # merged weights are no longer the base model's
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)
