"""What a model is made of and how its parts are joined, as plain dataclasses: the recipe side of a
model, importable without torch or transformers (the CLI builds its `--help` from these)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

FEATURE_MODES = ("pooled", "patch", "classes")
PROJECTOR_TYPES = ("mlp_ln", "mlp_gelu", "labels")


@dataclass(kw_only=True)
class ModelDesign:
    """How the parts are joined: which vision features the projector reads, and how it maps them.

    One description for the recipe (`ModelConfig`, which adds where the parts come from) and the
    saved model (`MultimodalConfig`, which adds what was loaded and trained): both inherit these
    fields, so a recipe's design reaches config.json without a hand-written mapping.
    """

    vision_feature_mode: Literal["pooled", "patch", "classes"] = "pooled"
    """`pooled`: the image embedding (CLIP's 512-d projection, a timm tower's pooled features), 1 token per
    image; `patch`: one token per patch or grid cell (LLaVA); `classes`: a timm classifier's class
    probabilities, 1 token per image."""
    vision_feature_layer: int = -2
    """Layer read in `patch` mode: CLIP's hidden state (-2: penultimate, as LLaVA), or a timm tower's
    feature stage (-1: the head's features, -2: the last stage, ...)."""
    vision_use_cls: bool = False
    """In `patch` mode, also pass the CLS token."""
    vision_pixel_shuffle: int = 1
    """In `patch` mode, merge each f x f block of patch tokens into one (f^2 fewer LM tokens per image)."""
    projector_type: Literal["mlp_ln", "mlp_gelu", "labels"] = "mlp_ln"
    """`mlp_ln`: Linear-ReLU-LayerNorm-Linear (seed design); `mlp_gelu`: LLaVA-1.5's Linear-GELU-Linear;
    `labels`: nothing learned, the LM reads the classifier's verdict as words (needs `classes` features of
    an ImageNet classifier)."""
    projector_snap_to_vocab: bool = False
    """Give the LM each image token as its nearest word's embedding (straight-through gradients): an LM
    learns to compare words it knows far faster than new vectors. Train the projector toward words first
    (`token_target_vocab_weight`)."""
    projector_labels_top_k: int = 3
    """Labels projector: how many of the classifier's top classes the LM reads."""
    projector_labels_sure: float = 0.5
    """Labels projector: the summed probability at which the bridge names a class or a kind of thing
    (below it, the LM reads that the classifier is not sure)."""
    projector_labels_rule_out: float = 0.05
    """Labels projector: sure of nothing, the bridge lists an everyday kind (covered by at least four
    classes) as ruled out when its classes sum to less than this, so the LM can answer "no" about it."""

    def check_design(self) -> None:
        if self.vision_feature_mode not in FEATURE_MODES:
            raise ValueError(
                f"vision_feature_mode must be one of {FEATURE_MODES}, got {self.vision_feature_mode!r}"
            )
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.projector_type == "labels" and self.vision_feature_mode != "classes":
            raise ValueError(
                "the labels projector reads class probabilities: use vision_feature_mode=classes with "
                f"projector_type=labels (got {self.vision_feature_mode} features)"
            )
        shuffle = self.vision_pixel_shuffle
        if shuffle < 1 or (shuffle > 1 and self.vision_feature_mode != "patch"):
            raise ValueError(
                f"vision_pixel_shuffle must be 1, or > 1 with patch features; got {shuffle} "
                f"with {self.vision_feature_mode} features"
            )


def design_of(source: ModelDesign) -> dict[str, Any]:
    """The design fields of a recipe or a saved model's config, to build the other from."""
    return {field.name: getattr(source, field.name) for field in fields(ModelDesign)}


@dataclass
class ModelConfig(ModelDesign):
    """Parts of a multimodal model: which language model, which vision tower, how they are joined."""

    lm: str = "qwen2.5-0.5b-instruct"
    """Language model: registry name (`mmllm weights list`), hub id, local directory or .gguf file."""
    vision: str = "clip-vit-base-patch32"
    """Vision tower: registry name, hub id, local directory (a CLIP checkpoint or its config alone, a timm
    tower), `timm:ARCH` (a timm architecture, untrained) or `timm:ARCH@FILE` (with a local state dict;
    preprocessing from timm's pretrained config for ARCH)."""

    def __post_init__(self) -> None:
        self.check_design()
