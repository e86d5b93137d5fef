"""Assemble a multimodal model from named parts, or load a saved one: the two ways models come to be."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mmllm.config import load_config
from mmllm.errors import MmllmError
from mmllm.images import ImageProcessor
from mmllm.models.configuration import MultimodalConfig, is_mmllm_model, num_image_tokens
from mmllm.models.language import load_language_model, load_tokenizer
from mmllm.models.multimodal import MultimodalLM
from mmllm.models.vision import load_vision_config, load_vision_tower, weights_digest
from mmllm.processor import PROCESSOR_FILE, MultimodalProcessor

log = logging.getLogger("mmllm")

# `--model default`: the shipped easy-VQA model when its folder is found, else the untrained default stack
# (ModelConfig's defaults). Shipped models are committed under the repository's models/ folder.
DEFAULT_MODEL = "default"
SHIPPED_MODELS = ("mmllm-easyvqa",)
REPO_MODELS = Path(__file__).resolve().parents[3] / "models"


def shipped_model_roots() -> list[Path]:
    """Folders searched for shipped models: `$MMLLM_MODELS`, ./models, the source checkout's models/."""
    roots = [Path(p) for p in os.environ.get("MMLLM_MODELS", "").split(os.pathsep) if p]
    return [*roots, Path("models"), REPO_MODELS]


def resolve_model_name(name_or_path: str) -> str:
    """`default` and shipped model names -> their folder; anything else is returned unchanged."""
    name = SHIPPED_MODELS[0] if name_or_path == DEFAULT_MODEL else name_or_path
    if name not in SHIPPED_MODELS or Path(name_or_path).exists():
        return name_or_path
    for root in shipped_model_roots():
        if (root / name / "config.json").is_file():
            return str(root / name)
    if name_or_path == DEFAULT_MODEL:
        log.warning("the shipped model %s was not found: `default` is the untrained default stack", name)
        return name_or_path
    raise MmllmError(
        f"shipped model {name} not found in {', '.join(map(str, shipped_model_roots()))}; "
        "set MMLLM_MODELS to the folder that holds it"
    )


@dataclass
class ModelConfig:
    """Parts of a multimodal model: which language model, which vision tower, how they are joined."""

    lm: str = "qwen2.5-0.5b-instruct"
    """Language model: registry name (`mmllm weights list`), hub id, local directory or .gguf file."""
    vision: str = "clip-vit-base-patch32"
    """Vision tower: registry name, hub id, or local directory of a CLIP checkpoint or of its config alone."""
    vision_feature_mode: Literal["pooled", "patch"] = "pooled"
    """`pooled`: CLIP's 512-d image embedding, 1 token per image; `patch`: one token per patch (LLaVA)."""
    vision_feature_layer: int = -2
    """Vision layer read in `patch` mode (-2: penultimate, as LLaVA)."""
    vision_use_cls: bool = False
    """In `patch` mode, also pass the CLS token."""
    vision_pixel_shuffle: int = 1
    """In `patch` mode, merge each f x f block of patch tokens into one (f^2 fewer LM tokens per image)."""
    projector: Literal["mlp_ln", "mlp_gelu"] = "mlp_ln"
    """`mlp_ln`: Linear-ReLU-LayerNorm-Linear (seed design); `mlp_gelu`: LLaVA-1.5's Linear-GELU-Linear."""
    projector_snap_to_vocab: bool = False
    """Give the LM each image token as its nearest word's embedding (straight-through gradients): an LM
    learns to compare words it knows far faster than new vectors. Train the projector toward words first
    (`token_target_vocab_weight`)."""


def build_model(
    cfg: ModelConfig, dtype: torch.dtype | None = None, quantization_config: Any = None
) -> tuple[MultimodalLM, MultimodalProcessor]:
    """A new model: pretrained LM (and vision tower when available) plus a fresh projector."""
    language_model = load_language_model(cfg.lm, dtype, quantization_config)
    tower, tower_pretrained = load_vision_tower(cfg.vision, cfg.vision_feature_mode)
    config = MultimodalConfig(
        vision_config=tower.config,
        text_config=language_model.config,
        vision_feature_mode=cfg.vision_feature_mode,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_use_cls=cfg.vision_use_cls,
        vision_pixel_shuffle=cfg.vision_pixel_shuffle,
        projector_type=cfg.projector,
        projector_snap_to_vocab=cfg.projector_snap_to_vocab,
        text_model_name_or_path=cfg.lm,
        vision_model_name_or_path=cfg.vision if tower_pretrained else None,
        vision_untrained_digest=None if tower_pretrained else weights_digest(tower),
        trained_parts=["language_model", *(["vision_tower"] if tower_pretrained else [])],
    )
    processor = MultimodalProcessor(
        load_tokenizer(cfg.lm), config.num_image_tokens, ImageProcessor(size=tower.config.image_size)
    )
    config.image_token_id = processor.image_token_id
    model = MultimodalLM(config, language_model=language_model, vision_tower=tower)
    model.projector.match_embedding_scale(language_model.get_input_embeddings().weight)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), processor


def load_model(
    name_or_path: str, dtype: torch.dtype | None = None
) -> tuple[MultimodalLM, MultimodalProcessor]:
    """Load what a user names: a saved mmllm model, a ModelConfig YAML, `default`, or a bare LM.

    A YAML recipe or a bare LM builds a new model, whose projector (and vision tower, offline) is untrained.
    """
    name_or_path = resolve_model_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return build_model(load_config(ModelConfig, path), dtype)
    if path.is_dir() and is_mmllm_model(path):
        if not (path / PROCESSOR_FILE).is_file():
            raise MmllmError(f"{path} holds a model but no processor ({PROCESSOR_FILE})")
        model = MultimodalLM.from_pretrained(path, dtype=dtype)
        return model.eval(), MultimodalProcessor.from_pretrained(path)
    cfg = ModelConfig() if name_or_path == DEFAULT_MODEL else ModelConfig(lm=name_or_path)
    return build_model(cfg, dtype)


def load_processor(name_or_path: str) -> MultimodalProcessor:
    """The processor of what `load_model` would load, without loading any weights."""
    name_or_path = resolve_model_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_mmllm_model(path):
        return MultimodalProcessor.from_pretrained(path)
    if path.suffix in (".yaml", ".yml"):
        cfg = load_config(ModelConfig, path)
    else:
        cfg = ModelConfig() if name_or_path == DEFAULT_MODEL else ModelConfig(lm=name_or_path)
    vision_config, _, _ = load_vision_config(cfg.vision)
    tokens = num_image_tokens(
        vision_config, cfg.vision_feature_mode, cfg.vision_use_cls, cfg.vision_pixel_shuffle
    )
    return MultimodalProcessor(load_tokenizer(cfg.lm), tokens, ImageProcessor(size=vision_config.image_size))


def untrained_parts(model: MultimodalLM) -> list[str]:
    """Parts holding random weights: a model with any of these cannot really see."""
    trained = set(model.config.trained_parts or ())
    return [p for p in ("vision_tower", "projector", "language_model") if p not in trained]
