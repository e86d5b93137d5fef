"""QLoRA's 4-bit base: the language model's linear layers in NF4 (bitsandbytes) while LoRA trains, and,
when a QLoRA-trained model loads, the same weights rounded through NF4 once, as plain tensors.

A LoRA adapter learns to correct the weights it trains against. Under QLoRA those are the NF4 weights
(each block of 64 stored as 4-bit codes times the block's scale), not the LM's own: folding the adapter
into the original weights gives a model nobody trained (the seed design's held-out loss went from 16.06
to 21.15 on merging). So a QLoRA model records how its base was quantised (`config.base_quantization`),
and loading it rounds the base the same way, quantise then dequantise, bit for bit what training's
layers computed with. Inference, merging and every export then run plain matmuls on those weights: no
4-bit kernels, and `mmllm merge` folds the adapter into the base it was trained against.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mmllm.errors import MmllmError

log = logging.getLogger("mmllm")

# The first bitsandbytes whose CPU backend trains 4-bit layers (forward and backward); tested with 0.50.2.
MINIMUM_BITSANDBYTES = "0.50"
INSTALL = "pip install 'bitsandbytes==0.50.*' (or pip install -e '.[qlora]' in mmllm's checkout)"


def require_bitsandbytes() -> None:
    """PyPI's bitsandbytes, new enough to run 4-bit layers on a CPU, or a message saying what to do."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    from packaging.version import Version

    # `bitsandbytes-cpu-fork` and the like install a module of the same name with another API.
    others = [name for name in packages_distributions().get("bitsandbytes", []) if name != "bitsandbytes"]
    if others:
        raise MmllmError(
            f"QLoRA needs bitsandbytes from PyPI, but the `bitsandbytes` module here comes from {others[0]}, "
            f"an unrelated package of the same import name: pip uninstall {others[0]}, then {INSTALL}"
        )
    try:
        found = version("bitsandbytes")
    except PackageNotFoundError:
        raise MmllmError(f"QLoRA needs bitsandbytes: {INSTALL}") from None
    if Version(found) < Version(MINIMUM_BITSANDBYTES):
        raise MmllmError(
            f"QLoRA needs bitsandbytes {MINIMUM_BITSANDBYTES} or newer, found {found}: {INSTALL}"
        )


def quantization_config(compute_dtype: torch.dtype) -> Any:
    """How transformers loads QLoRA's base: NF4 codes whose block scales are quantised again (double
    quantisation), matmuls in `compute_dtype`. transformers keeps the output head in full precision;
    Qwen's and SmolLM2's head is their input embedding (tied), which stays unquantised with it."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _unwrapped(language_model: torch.nn.Module) -> torch.nn.Module:
    """The LM itself, under PEFT's wrapping once adapters are on."""
    return language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model


def _plain_linears(language_model: torch.nn.Module) -> list[str]:
    """Names of the LM's full-precision linear layers, LoRA's own left out."""
    return [
        name
        for name, module in _unwrapped(language_model).named_modules()
        if type(module) is torch.nn.Linear and "lora_" not in name
    ]


def nf4_layers(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LM's 4-bit layers; raises unless every linear layer but the output head is NF4 with double
    quantisation. QLoRA runs check it as they start (from scratch, `init_from` or a resume) and at each
    checkpoint."""
    import bitsandbytes as bnb

    lm = _unwrapped(language_model)
    head = lm.get_output_embeddings()
    plain = [name for name in _plain_linears(lm) if lm.get_submodule(name) is not head]
    layers = [module for module in lm.modules() if isinstance(module, bnb.nn.Linear4bit)]
    if plain or not layers:
        raise MmllmError(
            f"QLoRA: the language model's linear layers are not 4-bit ({len(plain)} in full precision, "
            f"e.g. {plain[:3]}). QLoRA quantises an LM as it loads its weights by name (`model.lm`, or the "
            "base a saved model refers to); a model that stores its LM (trained in full, or merged) or an LM "
            "folder without weights cannot be: train it with parts.language_model=lora"
        )
    wrong = [
        layer
        for layer in layers
        if (layer.weight.quant_type, layer.weight.bnb_quantized, layer.weight.quant_state.nested)
        != ("nf4", True, True)
    ]
    if wrong:
        raise MmllmError(f"QLoRA: {len(wrong)} of the LM's 4-bit layers are not NF4 with double quantisation")
    return layers


def prepare_for_training(language_model: torch.nn.Module) -> dict[str, Any]:
    """Check the LM is QLoRA's 4-bit base and keep it so for the run; returns what the saved model records
    (`config.base_quantization`) for loading to round its base the same way."""
    import bitsandbytes

    layers = nf4_layers(language_model)
    for layer in layers:
        # bitsandbytes repacks a 4-bit layer for its AVX512-BF16 CPU kernel the first time it runs without
        # gradients in eval mode (a held-out evaluation): the block scales become bf16 (other weights
        # from then on), and training's backward pass has no way through that kernel (no input gradient).
        layer.support_avx512bf16_for_cpu = False
    state = layers[0].weight.quant_state
    return {
        "method": "bitsandbytes",
        "quant_type": "nf4",
        "double_quant": True,
        "blocksize": state.blocksize,
        "dtype": str(state.dtype).removeprefix("torch."),  # what the weights were quantised from
        "device": state.absmax.device.type,  # where: CUDA's kernels need not round as the CPU's do
        "full_precision": _plain_linears(language_model),  # the linear layers left unquantised: the head
        "bitsandbytes": bitsandbytes.__version__,
    }


def round_through_nf4_(language_model: torch.nn.Module, record: dict[str, Any]) -> None:
    """Put the NF4-dequantised weights in place of each linear layer's own, as `record` (from
    `prepare_for_training`) says training quantised them: the base a QLoRA adapter was trained against."""
    require_bitsandbytes()
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    dtype, kept = getattr(torch, record["dtype"]), set(record["full_precision"])
    device = record["device"]
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("the adapter was trained on a 4-bit base quantised on CUDA; rounding it on the CPU here")
        device = "cpu"
    for name, module in language_model.named_modules():
        if type(module) is torch.nn.Linear and name not in kept:
            weight = module.weight.data
            codes, state = quantize_4bit(
                weight.to(device, dtype),
                blocksize=record["blocksize"],
                compress_statistics=record["double_quant"],
                quant_type=record["quant_type"],
            )
            module.weight.data = dequantize_4bit(codes, state).to(weight.device, weight.dtype)
