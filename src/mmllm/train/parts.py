"""Which parameters train, with which learning rate, and a table that shows it."""

from __future__ import annotations

import torch

from mmllm.engine.torch_backend import DTYPES
from mmllm.errors import MmllmError
from mmllm.models import nf4
from mmllm.models.configuration import PARTS
from mmllm.models.multimodal import MultimodalLM
from mmllm.train.config import LoraSettings, OptimConfig, PartsConfig

NO_DECAY = ("bias", "norm", "ln_", "layernorm", "embeddings.position")


def qlora_quantization_config(precision: str):
    """QLoRA's 4-bit NF4 base (`models/nf4.py`), its matmuls in the recipe's precision."""
    if precision == "fp16" and not torch.cuda.is_available():
        raise MmllmError(
            "QLoRA with precision fp16 needs a CUDA GPU: on a CPU, accelerate runs an fp16 recipe with no "
            "autocast or loss scaler, so the 4-bit layers would compute in unscaled fp16; use precision=bf16"
        )
    return nf4.quantization_config(DTYPES[precision])


def lora_targets(language_model: torch.nn.Module, wanted: list[str]) -> list[str]:
    """The wanted module names this LM has (Phi-3 fuses q/k/v and gate/up where Llama splits them)."""
    names = {name.rsplit(".", 1)[-1] for name, module in language_model.named_modules()}
    found = [name for name in wanted if name in names]
    if not found:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in language_model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise MmllmError(
            f"lora.target_modules {list(wanted)} match no module of this LM; its linear layers: {linear}"
        )
    return found


def setup_parts(model: MultimodalLM, parts: PartsConfig, lora: LoraSettings) -> None:
    """Freeze everything, then unfreeze (or give adapters to) exactly the parts the recipe trains."""
    model.requires_grad_(False)
    if parts.language_model == "qlora":  # before adapters go on: what a QLoRA adapter trains against
        model.config.base_quantization = nf4.prepare_for_training(model.language_model)
    # A part that trains no longer equals its base weights: drop the reference so it gets saved.
    if parts.vision_tower == "full":
        model.vision_tower.requires_grad_(True)
        model.config.vision_model_name_or_path = None
    if parts.projector == "full":
        model.projector.requires_grad_(True)
    if parts.language_model == "full":
        model.language_model.requires_grad_(True)
        # Saved as trained, so no rounding of a QLoRA base on loading either.
        model.config.text_model_name_or_path = model.config.base_quantization = None
    elif parts.language_model in ("lora", "qlora") and not model.has_lora:
        # Not peft's prepare_model_for_kbit_training: it freezes what is frozen already, upcasts half
        # precision weights (ours load in fp32) and turns gradient checkpointing on whatever the recipe says.
        from peft import LoraConfig

        model.add_lora(
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora_targets(model.language_model, lora.target_modules),
                task_type="CAUSAL_LM",
            )
        )
    elif parts.language_model in ("lora", "qlora"):  # adapters already there: resumed or init_from
        for name, parameter in model.language_model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    trained = [p for p in ("vision_tower", "projector") if getattr(parts, p) == "full"]
    if parts.language_model != "frozen":
        trained.append("language_model")
    if not trained:
        raise MmllmError(
            "the recipe trains nothing: set parts.projector, parts.language_model or parts.vision_tower"
        )
    model.config.trained_parts = sorted(set(model.config.trained_parts or ()) | set(trained))


def parameter_groups(model: MultimodalLM, optim: OptimConfig) -> list[dict]:
    """AdamW groups: a learning rate per part, and no weight decay on norms and biases."""
    rates = {
        "vision_tower": optim.lr_vision,
        "projector": optim.lr_projector,
        "language_model": optim.lr_language,
    }
    groups: dict[tuple[str, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "lora" if "lora_" in name else name.split(".", 1)[0]
        decay = 0.0 if parameter.ndim < 2 or any(k in name.lower() for k in NO_DECAY) else optim.weight_decay
        groups.setdefault((part, decay), []).append(parameter)
    # `name` travels with the group, so the loop can report each part's own learning rate.
    return [
        {
            "params": params,
            "lr": optim.lr_lora if part == "lora" else rates[part],
            "weight_decay": decay,
            "name": part,
        }
        for (part, decay), params in groups.items()
    ]


def _weights(parameter: torch.nn.Parameter) -> int:
    """How many weights a parameter holds: a 4-bit one packs two a byte (its quant_state has the shape)."""
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


def parameter_table(model: MultimodalLM) -> str:
    """Trainable vs total parameters per part, printed at the start of a run."""
    lines = [f"{'part':<16}{'trainable':>14}{'total':>16}"]
    for part in PARTS:
        params = list(getattr(model, part).parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        lines.append(f"{part:<16}{trainable:>14,}{sum(_weights(p) for p in params):>16,}")
    return "\n".join(lines)
