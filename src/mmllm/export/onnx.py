"""`mmllm export onnx`: the graphs that `--backend onnx` (`mmllm.engine.onnx`) runs.

Two graphs, exported with torch.onnx (TorchScript tracing, opset 17), because onnxruntime-genai's
builder and optimum only take a text LM, not one that reads `inputs_embeds` with images in them:

- `vision.onnx`: pixels (I, 3, S, S) -> projected image features (I, N, D), vision tower + projector
  (for a model that reads images as words: the class probabilities (I, 1, C) the labels bridge reads);
- `decoder.onnx`: inputs_embeds (B, T, D), attention_mask (B, P+T), position_ids (B, T) and the KV cache
  (`past.L.key/value`, (B, H_kv, P, d)) -> next-token logits (B, V) and the grown cache (`present.*`).

The token embedding table is stored beside them (`embeddings.safetensors`): looking a token up is a
row copy, and image features replace the placeholder rows before the decoder runs, as in PyTorch.

`--weights int8` rewrites the decoder's MatMuls as onnxruntime's `MatMulNBits` with 8-bit weights
(symmetric, one scale per 32 inputs, like llama.cpp's Q8_0) and `accuracy_level=4`: activations are
quantised per block at run time and multiplied in int8 by MLAS's CPU kernels. Decoding reads a
quarter of the fp32 bytes; the vision graph stays fp32 (it runs once per image).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

from mmllm.engine.onnx import ONNX_CONFIG, ONNX_FORMAT, cache_names
from mmllm.models.language import cache_keyword

log = logging.getLogger("mmllm")

OPSET = 17


class _VisionGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.get_image_features(pixel_values)
        if self.model.config.reads_images_as_words:
            return features  # (I, 1, C), turned into words by the backend
        return self.model.project_images(features)  # (I, N, D)


class _DecoderGraph(torch.nn.Module):
    """The LM with its KV cache as flat tensors in and out, returning only the last position's logits."""

    def __init__(self, language_model):
        super().__init__()
        self.language_model = language_model

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.language_model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword(self.language_model): cache},
        )
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (output.logits[:, -1], *present)


def quantize_decoder_int8(path: Path) -> None:
    """Rewrite `path` (an ONNX decoder) in place with 8-bit `MatMulNBits` weights."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), algo_config=config)
    quantizer.process()
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)


def export_vision(model, processor, out: Path) -> dict:
    """Write `vision.onnx` and the processor into `out`; returns the settings every backend that reads
    this graph needs (the export's settings file adds its own)."""
    size = processor.image_processor.size
    with torch.no_grad():
        torch.onnx.export(
            _VisionGraph(model),
            (torch.zeros(2, 3, size, size),),
            out / "vision.onnx",
            input_names=["pixel_values"],
            output_names=["image_features"],
            dynamic_axes={"pixel_values": {0: "images"}, "image_features": {0: "images"}},
            opset_version=OPSET,
            dynamo=False,
        )
    processor.save_pretrained(out)
    return {
        "context_length": model.language_model.config.max_position_embeddings,
        "trained_parts": list(model.config.trained_parts or ()),
        "image_token_id": model.config.image_token_id,
        "labels_bridge": model.config.labels_bridge if model.config.reads_images_as_words else None,
    }


def export_onnx(model_name: str, out: str | Path, weights: Literal["fp32", "int8"] = "fp32") -> Path:
    from safetensors.numpy import save_file

    from mmllm.models.build import load_model

    model, processor = load_model(model_name, dtype=torch.float32)
    model.merge_lora()
    model.eval()
    text = model.language_model.config
    layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared = export_vision(model, processor, out)
    with torch.no_grad():
        # Trace with a non-empty cache and several new tokens so neither dimension is baked in.
        batch, new, cached = 2, 3, 2
        past = [torch.zeros(batch, kv_heads, cached, head_dim) for _ in range(2 * layers)]
        past_names, present_names = cache_names(layers, "past"), cache_names(layers, "present")
        axes = {
            "inputs_embeds": {0: "batch", 1: "new"},
            "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "new"},
            "logits": {0: "batch"},
        }
        axes |= {name: {0: "batch", 2: "cached"} for name in past_names}
        axes |= {name: {0: "batch", 2: "total"} for name in present_names}
        torch.onnx.export(
            _DecoderGraph(model.language_model),
            (
                torch.zeros(batch, new, text.hidden_size),
                torch.ones(batch, cached + new, dtype=torch.long),
                torch.arange(cached, cached + new).repeat(batch, 1),
                *past,
            ),
            out / "decoder.onnx",
            input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    if weights == "int8":
        quantize_decoder_int8(out / "decoder.onnx")
    embeddings = model.get_input_embeddings().weight.detach().float().numpy()
    save_file({"embeddings": embeddings}, str(out / "embeddings.safetensors"))
    settings = {
        "format": ONNX_FORMAT,
        **shared,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "weights": weights,
    }
    (out / ONNX_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    log.info("wrote %s (vision.onnx, decoder.onnx with %s weights)", out, weights)
    return out
