"""INT8 for CPU inference with torchao: weight-only (int8 weights, float activations) or dynamic
(activations quantised per token at run time too, int8 x int8 matmuls).

`mmllm export int8` writes a whole model whose Linear weights are int8 (about a quarter of fp32 on
disk) and that `from_pretrained` loads as int8; `--dtype int8` quantises in memory at load time.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Literal

from mmllm.errors import MmllmError

log = logging.getLogger("mmllm")

Int8Scheme = Literal["weight-only", "dynamic"]


def torchao_config(scheme: Int8Scheme):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    except ImportError:
        raise MmllmError("int8 needs torchao: pip install 'mmllm[export]'") from None
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


def export_int8(model_name: str, out: str | Path, scheme: Int8Scheme = "weight-only") -> Path:
    """A whole-model INT8 checkpoint (vision tower, projector and LM Linear layers) with torchao's
    serialisation, loaded as INT8 by `MultimodalLM.from_pretrained` / `mmllm ask --model OUT`."""
    from transformers import TorchAoConfig

    from mmllm.models.build import load_model
    from mmllm.models.multimodal import MultimodalLM

    config = torchao_config(scheme)
    model, processor = load_model(model_name)
    model.merge_lora()
    out = Path(out)
    # transformers' torchao quantizer is what serialises int8 tensors: quantise on loading a plain copy.
    with tempfile.TemporaryDirectory() as plain:
        model.save_pretrained(plain)
        quantized = MultimodalLM.from_pretrained(plain, quantization_config=TorchAoConfig(config))
    quantized.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("wrote %s (int8 %s)", out, scheme)
    return out
