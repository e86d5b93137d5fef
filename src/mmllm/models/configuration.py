"""`MultimodalConfig`: one config.json composing a vision config (CLIP or timm) and any causal-LM config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from mmllm.models.design import ModelDesign
from mmllm.models.timm_vision import TimmVisionConfig

# The exact openai/clip-vit-base-patch32 vision architecture, so the default stack can be built
# (untrained) where the hub is unreachable.
CLIP_VIT_B32 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

PARTS = ("vision_tower", "projector", "language_model")


def _patch_grid(vision_config: PreTrainedConfig, layer: int) -> tuple[int, int]:
    """(width, grid side) of one patch token: a timm stage's, or CLIP's (every layer alike)."""
    if isinstance(vision_config, TimmVisionConfig):
        return vision_config.stage(layer)
    return vision_config.hidden_size, vision_config.image_size // vision_config.patch_size


def num_image_tokens(
    vision_config: PreTrainedConfig, feature_mode: str, use_cls: bool, pixel_shuffle: int = 1, layer: int = -2
) -> int:
    """Placeholder tokens per image: 1 pooled embedding or class vector, or one per patch (plus CLS),
    or one per `pixel_shuffle` x `pixel_shuffle` block of patches."""
    if feature_mode in ("pooled", "classes"):
        return 1
    if use_cls and isinstance(vision_config, TimmVisionConfig):
        raise ValueError(f"{vision_config.architecture} has no CLS token: set vision_use_cls=false")
    _, grid = _patch_grid(vision_config, layer)
    if pixel_shuffle > 1:
        if use_cls or grid % pixel_shuffle:
            raise ValueError(
                f"vision_pixel_shuffle={pixel_shuffle} needs patch features without CLS on a patch grid it "
                f"divides; this tower has a {grid}x{grid} grid{' and CLS' if use_cls else ''}"
            )
        return (grid // pixel_shuffle) ** 2
    return grid**2 + int(use_cls)


@strict
class MultimodalConfig(PreTrainedConfig, ModelDesign):
    r"""
    The design fields (the vision_* and projector_* ones) are `ModelDesign`'s (models/design.py).
    mmllm_version: the mmllm version that saved the model.
    image_token / image_token_id: the placeholder the processor expands to `num_image_tokens` per image.
    text_model_name_or_path / vision_model_name_or_path: where the base weights came from; used to
        rebuild a checkpoint that stores only its trained parts.
    vision_untrained_digest: for a tower drawn at random (no base weights), the `weights_digest` of that
        draw: a checkpoint that leaves the frozen untrained tower out rebuilds it and checks it is the same.
    saved_parts: the parts whose weights the checkpoint's safetensors hold (all when None).
    adapter: subfolder holding a PEFT LoRA adapter for the language model, applied on load.
    base_quantization: how QLoRA quantised the language model's linear layers while the adapter trained
        (`models/nf4.py`); loading rounds the base weights through the same NF4 before the adapter goes on.
    trained_parts: the parts carrying learned weights (loaded pretrained or trained by us); a part
        not listed is randomly initialised, and the CLI says so.
    """

    model_type = "mmllm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_B32
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token: str = "<image>"
    image_token_id: int = 0
    text_model_name_or_path: str | None = None
    vision_model_name_or_path: str | None = None
    vision_untrained_digest: str | None = None
    saved_parts: list[str] | None = None
    adapter: str | None = None
    base_quantization: dict | None = None
    trained_parts: list[str] | None = None
    tie_word_embeddings: bool = False
    mmllm_version: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_design()
        for field in ("saved_parts", "trained_parts"):
            unknown = set(getattr(self, field) or ()) - set(PARTS)
            if unknown:
                raise ValueError(f"{field} has unknown parts {sorted(unknown)}; known: {list(PARTS)}")

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        from mmllm import __version__

        self.mmllm_version = __version__  # which mmllm wrote these files, for whoever loads them later
        super().save_pretrained(save_directory, **kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image; the processor and the model both read it from here."""
        return num_image_tokens(
            self.vision_config,
            self.vision_feature_mode,
            self.vision_use_cls,
            self.vision_pixel_shuffle,
            self.vision_feature_layer,
        )

    @property
    def vision_feature_dim(self) -> int:
        """Width of one vision feature token, i.e. the projector's input."""
        timm = isinstance(self.vision_config, TimmVisionConfig)
        if self.vision_feature_mode == "classes":
            return self.vision_config.num_classes
        if self.vision_feature_mode == "pooled":
            return self.vision_config.num_features if timm else self.vision_config.projection_dim
        width, _ = _patch_grid(self.vision_config, self.vision_feature_layer)
        return width * self.vision_pixel_shuffle**2

    @property
    def labels_bridge(self) -> dict[str, Any]:
        """The `LabelBridge` settings of a labels-projector model."""
        return {
            "top_k": self.projector_labels_top_k,
            "sure": self.projector_labels_sure,
            "rule_out": self.projector_labels_rule_out,
        }

    @property
    def reads_images_as_words(self) -> bool:
        """Whether images reach the LM as the words of the labels bridge instead of projected rows."""
        return self.projector_type == "labels"


def is_mmllm_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a saved mmllm model (its config.json names our model type)."""
    config = Path(path).expanduser() / "config.json"
    return (
        config.is_file() and json.loads(config.read_text()).get("model_type") == MultimodalConfig.model_type
    )


__all__ = [
    "CLIP_VIT_B32",
    "PARTS",
    "MultimodalConfig",
    "is_mmllm_model",
    "num_image_tokens",
]
