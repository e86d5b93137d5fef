"""The ONNX Runtime backend: a `mmllm export onnx` folder answered with onnxruntime and numpy, no torch
model in memory (what `--backend onnx` runs). Greedy or sampled decoding; no beams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmllm.errors import MmllmError
from mmllm.generation import Backend, GenerationSettings, Prompt, RowTracker
from mmllm.models.labels import describe_images
from mmllm.processor import MultimodalProcessor

ONNX_CONFIG = "mmllm_onnx.json"
ONNX_FORMAT = 2  # 2: the vision graph is `project_images` (snap included); the model's facts are recorded


def cache_names(layers: int, prefix: str) -> list[str]:
    """The decoder graph's KV-cache inputs (`past.L.key`, …) or outputs (`present.L.value`, …)."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(
        self, vision, decoder, embeddings: np.ndarray, processor: MultimodalProcessor, settings: dict
    ):
        super().__init__(processor)
        self.vision, self.decoder = vision, decoder
        self.embeddings = embeddings  # (V, D)
        self.settings = settings
        self.context_length = settings["context_length"]
        self.trained_parts = settings["trained_parts"]
        self.reads_images_as_words = settings.get("labels_bridge") is not None

    @classmethod
    def load(cls, path: str | Path, threads: int = 0) -> OnnxBackend:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MmllmError("the onnx backend needs onnxruntime: pip install 'mmllm[export]'") from None
        from safetensors.numpy import load_file

        path = Path(path)
        if not (path / ONNX_CONFIG).is_file():
            raise MmllmError(f"{path} is not an ONNX export (no {ONNX_CONFIG}); run `mmllm export onnx`")
        settings = json.loads((path / ONNX_CONFIG).read_text())
        if settings.get("format") != ONNX_FORMAT:
            raise MmllmError(
                f"{path} was exported by an older mmllm; export it again with `mmllm export onnx`"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        vision, decoder = (
            ort.InferenceSession(str(path / name), options, providers=["CPUExecutionProvider"])
            for name in ("vision.onnx", "decoder.onnx")
        )
        embeddings = load_file(str(path / "embeddings.safetensors"))["embeddings"]
        return cls(vision, decoder, embeddings, MultimodalProcessor.from_pretrained(path), settings)

    def check(self, settings: GenerationSettings) -> None:
        if settings.num_beams > 1:
            raise ValueError("the onnx backend decodes greedily or by sampling (num_beams must be 1)")
        if settings.repetition_penalty != 1.0:
            raise ValueError("the onnx backend has no repetition penalty (repetition_penalty must be 1.0)")

    def image_rows(self, pixels: np.ndarray) -> np.ndarray:
        """(I, 3, S, S) pixels -> (I, N, D) LM rows (or (I, 1, C) class probabilities for a model that
        reads images as words), from the LRU cache when seen before."""
        return np.stack(self.features.through(pixels, lambda rows: self._vision(pixels[rows])))

    def image_words(self, pixels) -> list[str]:
        return describe_images(self.image_rows(pixels.numpy()), self.settings["labels_bridge"])

    def _vision(self, pixels: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"pixel_values": pixels})[0]

    def prompt_embeddings(self, prompts: list[Prompt]) -> tuple[np.ndarray, np.ndarray]:
        """(B, T, D) left-padded embeddings with image rows in the placeholder rows, and the (B, T) mask."""
        batch = self.processor.pad([{"input_ids": prompt.input_ids} for prompt in prompts])
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        placeholders = ids == self.settings["image_token_id"]
        embeds = self.embeddings[np.where(placeholders, 0, ids)]  # (B, T, D)
        pixels = [p.pixel_values.numpy() for p in prompts if p.pixel_values is not None]
        if pixels:
            rows = self.image_rows(np.concatenate(pixels))  # (I, N, D)
            embeds[placeholders] = rows.reshape(-1, rows.shape[-1])
        return embeds, mask

    def decode(self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker) -> list[int]:
        rng = np.random.default_rng(settings.seed)
        embeds, mask = self.prompt_embeddings(prompts)
        prompt_tokens = mask.sum(1).tolist()
        batch = embeds.shape[0]
        positions = np.maximum(mask.cumsum(1) - 1, 0)
        shape = (batch, self.settings["kv_heads"], 0, self.settings["head_dim"])
        names = cache_names(self.settings["layers"], "past")
        cache = {name: np.zeros(shape, np.float32) for name in names}
        for _ in range(max(rows.limits)):
            logits, *present = self.decoder.run(
                None, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **cache}
            )
            chosen = choose(logits, settings, rng)  # (B,)
            rows.step(chosen.tolist())
            if rows.done:
                break
            cache = dict(zip(names, present, strict=True))
            embeds = self.embeddings[chosen][:, None]  # (B, 1, D)
            mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)
            positions = positions[:, -1:] + 1
        return prompt_tokens


def choose(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> np.ndarray:
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
