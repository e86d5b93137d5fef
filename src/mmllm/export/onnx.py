"""`mmllm export onnx` and the onnxruntime backend of `mmllm ask --backend onnx`.

Two graphs, exported with torch.onnx (TorchScript tracing, opset 17), because onnxruntime-genai's
builder and optimum only take a text LM, not one that reads `inputs_embeds` with images in them:

- `vision.onnx`: pixels (I, 3, S, S) -> projected image features (I, N, D), vision tower + projector;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mmllm.errors import MmllmError
from mmllm.models.language import cache_keyword
from mmllm.pipeline import GenerationSettings
from mmllm.processor import Message, MultimodalProcessor

log = logging.getLogger("mmllm")

ONNX_CONFIG = "mmllm_onnx.json"
OPSET = 17


class _VisionGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.project_images(self.model.get_image_features(pixel_values))  # (I, N, D)


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


def _cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


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
        # Trace with a non-empty cache and several new tokens so neither dimension is baked in.
        batch, new, cached = 2, 3, 2
        past = [torch.zeros(batch, kv_heads, cached, head_dim) for _ in range(2 * layers)]
        past_names, present_names = _cache_names(layers, "past"), _cache_names(layers, "present")
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
    processor.save_pretrained(out)
    settings = {
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "image_token_id": model.config.image_token_id,
        "weights": weights,
    }
    (out / ONNX_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    log.info("wrote %s (vision.onnx, decoder.onnx with %s weights)", out, weights)
    return out


@dataclass
class OnnxPipeline:
    """Greedy or sampled generation with onnxruntime only (no torch model in memory)."""

    vision: object
    decoder: object
    embeddings: np.ndarray  # (V, D)
    processor: MultimodalProcessor
    settings: dict

    @classmethod
    def load(cls, path: str | Path, threads: int = 0) -> OnnxPipeline:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MmllmError("the onnx backend needs onnxruntime: pip install 'mmllm[export]'") from None
        from safetensors.numpy import load_file

        path = Path(path)
        if not (path / ONNX_CONFIG).is_file():
            raise MmllmError(f"{path} is not an ONNX export (no {ONNX_CONFIG}); run `mmllm export onnx`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = [
            ort.InferenceSession(str(path / name), options, providers=["CPUExecutionProvider"])
            for name in ("vision.onnx", "decoder.onnx")
        ]
        return cls(
            *sessions,
            load_file(str(path / "embeddings.safetensors"))["embeddings"],
            MultimodalProcessor.from_pretrained(path),
            json.loads((path / ONNX_CONFIG).read_text()),
        )

    def prompt_embeddings(
        self, conversations: list[list[Message]], images: list[list]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, T, D) embeddings with image features in the placeholder rows, and the (B, T) mask."""
        encoded = [self.processor.encode_text(c, len(i)) for c, i in zip(conversations, images, strict=True)]
        batch = self.processor.pad(encoded)  # left padding
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        placeholders = ids == self.settings["image_token_id"]
        embeds = self.embeddings[np.where(placeholders, 0, ids)]  # (B, T, D)
        flat = [image for row in images for image in row]
        if flat:
            pixels = self.processor.image_processor(flat).numpy()
            features = self.vision.run(None, {"pixel_values": pixels})[0]  # (I, N, D)
            embeds[placeholders] = features.reshape(-1, features.shape[-1])
        return embeds, mask

    def generate(
        self,
        conversations: list[list[Message]],
        images: list[list] | None = None,
        settings: GenerationSettings | None = None,
        on_token=None,
    ) -> list[str]:
        """`on_token()` is called after each decoding step (for timing)."""
        settings = settings or GenerationSettings()
        if settings.num_beams > 1:
            raise MmllmError("the onnx backend decodes greedily or by sampling (num_beams=1)")
        images = images or [[] for _ in conversations]
        rng = np.random.default_rng(settings.seed)
        embeds, mask = self.prompt_embeddings(conversations, images)
        batch = embeds.shape[0]
        positions = np.maximum(mask.cumsum(1) - 1, 0)
        shape = (batch, self.settings["kv_heads"], 0, self.settings["head_dim"])
        names = _cache_names(self.settings["layers"], "past")
        cache = {name: np.zeros(shape, np.float32) for name in names}
        stop = set(self.processor.stop_token_ids)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        for _ in range(settings.max_new_tokens):
            logits, *present = self.decoder.run(
                None, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **cache}
            )
            chosen = _choose(logits, settings, rng)  # (B,)
            if on_token:
                on_token()
            for row, token in enumerate(chosen):
                if not done[row]:
                    done[row] = token in stop and not settings.ignore_eos
                    if not done[row]:
                        tokens[row].append(int(token))
            if done.all():
                break
            cache = dict(zip(names, present, strict=True))
            embeds = self.embeddings[chosen][:, None]  # (B, 1, D)
            mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)
            positions = positions[:, -1:] + 1
        return [self.processor.decode(row).strip() for row in tokens]

    def ask(self, image, question: str, settings: GenerationSettings | None = None) -> str:
        if not question.strip():
            raise MmllmError("the question is empty")
        return self.generate([[{"role": "user", "content": question}]], [[image] if image else []], settings)[
            0
        ]


def _choose(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax, or a sample from the temperature/top-k/top-p distribution."""
    if not settings.sampling:
        return logits.argmax(-1)
    scaled = logits / settings.temperature
    if settings.top_k:
        kth = np.sort(scaled, axis=-1)[:, -settings.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if settings.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep = sorted_probs.cumsum(-1) - sorted_probs < settings.top_p
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, np.where(keep, sorted_probs, 0), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
