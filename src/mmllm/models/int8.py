"""INT8 weights with torchao: weight-only (int8 weights, float activations) or dynamic (activations
quantised per token at run time too, int8 x int8 matmuls). `--dtype int8` quantises a loaded model in
memory; `mmllm export int8` writes a checkpoint that loads as int8."""

from __future__ import annotations

from typing import Literal

from mmllm.errors import MmllmError

Int8Scheme = Literal["weight-only", "dynamic"]


def torchao_config(scheme: Int8Scheme):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    except ImportError:
        raise MmllmError("int8 needs torchao: pip install -e '.[export]' in mmllm's checkout") from None
    if scheme == "weight-only":
        return Int8WeightOnlyConfig()
    if scheme == "dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    raise MmllmError(f"unknown int8 scheme {scheme!r}; choose weight-only or dynamic")


def quantize_int8(model, scheme: Int8Scheme = "dynamic"):
    """Quantise the language model's Linear layers in place (LoRA merged first); returns the model."""
    from torchao.quantization import quantize_

    config = torchao_config(scheme)
    model.merge_lora()
    quantize_(model.language_model, config)
    return model
