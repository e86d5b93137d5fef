"""Vision tower: a HF CLIP vision model or a timm model, and the features the projector reads from it."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, PreTrainedConfig

from mmllm.errors import MmllmError
from mmllm.models.configuration import MultimodalConfig, is_mmllm_model
from mmllm.models.timm_vision import (
    TIMM_PREFIX,
    TimmVisionConfig,
    TimmVisionTower,
    describe_architecture,
    is_timm_folder,
    load_timm_folder,
    timm_folder_config,
    tower_from_state_dict,
)

log = logging.getLogger("mmllm")

VisionTower = CLIPVisionModel | CLIPVisionModelWithProjection | TimmVisionTower
UNTRAINED_SEED = 0  # the seed every untrained tower is drawn from
TIMM_HUB_OWNER = "timm/"  # timm's models on the hub: timm/convnext_tiny.fb_in1k, ...


def vision_tower_class(feature_mode: str) -> type[VisionTower]:
    """`pooled` needs CLIP's projection head; `patch` reads hidden states, so it carries none."""
    return CLIPVisionModelWithProjection if feature_mode == "pooled" else CLIPVisionModel


def tower_from_config(config: PreTrainedConfig, feature_mode: str) -> VisionTower:
    """A tower of this architecture with fresh weights (to be loaded, or drawn at random)."""
    if isinstance(config, TimmVisionConfig):
        return TimmVisionTower(config)
    if feature_mode == "classes":
        raise ValueError("classes features need a timm classifier tower; CLIP has no classifier")
    return vision_tower_class(feature_mode)._from_config(config)


def image_features(tower: VisionTower, pixel_values: torch.Tensor, config: MultimodalConfig) -> torch.Tensor:
    """(I, 3, H, W) pixels -> (I, N, D_v) features, N = `config.num_image_tokens`."""
    if isinstance(tower, TimmVisionTower):
        features = tower.features(pixel_values, config.vision_feature_mode, config.vision_feature_layer)
        if config.vision_pixel_shuffle > 1:
            return pixel_shuffle(features, config.vision_pixel_shuffle)
        return features
    if config.vision_feature_mode == "pooled":
        return tower(pixel_values=pixel_values).image_embeds.unsqueeze(1)  # (I, 1, projection_dim)
    hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    features = hidden[config.vision_feature_layer]  # (I, 1 + P, hidden_size), CLS first
    if config.vision_pixel_shuffle > 1:
        return pixel_shuffle(features[:, 1:], config.vision_pixel_shuffle)
    return features if config.vision_use_cls else features[:, 1:]


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """(I, G*G, D) patch tokens in raster order -> (I, (G/f)^2, f*f*D): each f x f block becomes one token.

    Small patches let a tower trained from scratch see small shapes; merging them afterwards keeps the
    language model's image tokens (its cost) as few as with large patches.
    """
    dim, grid = features.shape[-1], math.isqrt(features.shape[1])
    blocks = features.reshape(-1, grid // factor, factor, grid // factor, factor, dim)  # (I, g, f, g, f, D)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(-1, (grid // factor) ** 2, factor * factor * dim)


def _has_weights(directory: str) -> bool:
    path = Path(directory)
    return not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def _mmllm_model_config(path: str) -> MultimodalConfig | None:
    """The config of a saved mmllm model at `path`, if that is what it is."""
    return MultimodalConfig.from_pretrained(Path(path).expanduser()) if is_mmllm_model(path) else None


def _timm_spec(name: str) -> tuple[str, Path | None]:
    """`timm:ARCH` or `timm:ARCH@FILE` -> (architecture, weights file or None)."""
    architecture, _, file = name.removeprefix(TIMM_PREFIX).partition("@")
    if file and not Path(file).expanduser().is_file():
        raise MmllmError(f"{name}: no such weights file {file}")
    return architecture, Path(file).expanduser() if file else None


def load_vision_config(name_or_path: str) -> tuple[PreTrainedConfig, str, bool]:
    """The vision config a name points to: (config, where its weights are, whether it has weights)."""
    from transformers import AutoConfig

    from mmllm.models.configuration import CLIP_VIT_B32
    from mmllm.weights import from_hub, resolve

    trained = _mmllm_model_config(name_or_path)
    if trained is not None:
        log.info("vision tower: the trained tower of %s", name_or_path)
        return trained.vision_config, name_or_path, True
    if name_or_path.startswith(TIMM_PREFIX):
        architecture, file = _timm_spec(name_or_path)
        if file is None:
            log.warning("vision tower: %s -> UNTRAINED (random init of the architecture)", name_or_path)
        return describe_architecture(architecture), str(file or ""), file is not None
    if name_or_path.startswith(TIMM_HUB_OWNER) and not Path(name_or_path).exists():
        snapshot = from_hub(name_or_path)
        if snapshot is None:
            raise MmllmError(
                f"{name_or_path}: timm's hub weights need the Hugging Face hub, which is unreachable; "
                "offline, use efficientnet-lite0-imagenet or timm:ARCH@FILE"
            )
        log.info("vision tower: %s from the Hugging Face hub", name_or_path)
        return timm_folder_config(Path(snapshot)), snapshot, True
    resolved = resolve(name_or_path, kind="vision")
    if resolved.pretrained and is_timm_folder(Path(resolved.path)):
        log.info("vision tower: %s", resolved.source)
        return timm_folder_config(Path(resolved.path)), resolved.path, True
    if not resolved.pretrained:
        log.warning("vision tower: %s -> UNTRAINED (random init of the architecture)", resolved.source)
        return CLIPVisionConfig(**CLIP_VIT_B32), resolved.path, False
    config = AutoConfig.from_pretrained(resolved.path)
    config = getattr(config, "vision_config", config)  # a full CLIPConfig holds the vision part
    if not _has_weights(resolved.path):
        log.warning("vision tower: %s has no weights -> UNTRAINED (random init)", resolved.source)
        return config, resolved.path, False
    log.info("vision tower: %s", resolved.source)
    return config, resolved.path, True


def load_vision_tower(name_or_path: str, feature_mode: str) -> tuple[VisionTower, bool]:
    """Load a CLIP vision tower; returns (tower, pretrained).

    Accepts a registry name, hub id or local directory: a CLIP model, or a saved mmllm model whose
    trained tower a new model reuses (with a new projector, token layout or LM). A directory holding
    only a config, or a registry name whose weights cannot be had offline, gives a randomly
    initialised tower of that exact architecture, and says so.
    """
    saved = _mmllm_model_config(name_or_path)
    if saved is not None:
        return _trained_tower(name_or_path, saved, feature_mode), True
    config, path, pretrained = load_vision_config(name_or_path)
    if isinstance(config, TimmVisionConfig) and pretrained:
        if name_or_path.startswith(TIMM_PREFIX):
            return tower_from_state_dict(config, Path(path)), True
        return load_timm_folder(Path(path)), True
    if feature_mode == "classes" and not isinstance(config, TimmVisionConfig):
        raise MmllmError(
            f"{name_or_path}: classes features need a timm classifier tower (timm:ARCH, or "
            "efficientnet-lite0-imagenet); CLIP has no classifier"
        )
    if pretrained:
        return vision_tower_class(feature_mode).from_pretrained(path), True
    return untrained_tower(config, feature_mode), False


def untrained_tower(config: CLIPVisionConfig, feature_mode: str) -> VisionTower:
    """A random tower of this architecture, drawn from its own fixed seed, so every build of it is the
    same tower: a feature cache made by `mmllm features` matches the training run that uses it, and a
    checkpoint of a frozen untrained tower need not store it (see `weights_digest`)."""
    with torch.random.fork_rng():
        torch.manual_seed(UNTRAINED_SEED)
        return tower_from_config(config, feature_mode)


def weights_digest(module: torch.nn.Module) -> str:
    """A short fingerprint of a module's weights (the first values of every tensor): tells whether a
    rebuilt untrained tower is the one a checkpoint was trained with (another torch may draw another)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _trained_tower(path: str, saved: MultimodalConfig, feature_mode: str) -> VisionTower:
    """The vision tower of a saved mmllm model (its `vision_tower.*` weights), without loading its LM."""
    clip = not isinstance(saved.vision_config, TimmVisionConfig)  # a timm tower gives every feature mode
    if clip and vision_tower_class(saved.vision_feature_mode) is not vision_tower_class(feature_mode):
        raise MmllmError(
            f"{path}: its tower was saved for feature mode {saved.vision_feature_mode!r}; use that mode"
        )
    file = Path(path).expanduser() / "model.safetensors"
    if "vision_tower" not in (saved.trained_parts or ()) or not file.is_file():
        raise MmllmError(
            f"{path}: this model holds no trained vision tower in one model.safetensors (its trained "
            f"parts: {', '.join(saved.trained_parts or ()) or 'none'}). model.vision takes a saved model "
            "whose tower was trained, a CLIP model (hub id or local folder), or a registry name such as "
            "clip-vit-base-patch32"
        )
    tower = tower_from_config(saved.vision_config, saved.vision_feature_mode)
    prefix = "vision_tower."
    with safe_open(str(file), "pt") as weights:
        state = {k[len(prefix) :]: weights.get_tensor(k) for k in weights.keys() if k.startswith(prefix)}  # noqa: SIM118
    tower.load_state_dict(state, strict=True)
    return tower
