"""`mmllm export int8`: a whole model whose Linear weights are int8 (about a quarter of fp32 on disk)
and that `from_pretrained` loads as int8 (the schemes: `mmllm.models.int8`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mmllm.models.int8 import Int8Scheme, torchao_config

log = logging.getLogger("mmllm")


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
