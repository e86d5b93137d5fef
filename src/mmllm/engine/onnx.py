"""The ONNX Runtime backend: a `mmllm export onnx` folder answered with onnxruntime and numpy, no torch
model in memory (what `--backend onnx` runs). Greedy or sampled decoding; no beams."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmllm.engine.backend import Prompt
from mmllm.engine.exported import ExportedBackend, onnx_session, read_export_settings
from mmllm.engine.rows import RowTracker
from mmllm.engine.sampler import choose_tokens, sampling_rng
from mmllm.engine.settings import GenerationSettings
from mmllm.processor import MultimodalProcessor

ONNX_CONFIG = "mmllm_onnx.json"
ONNX_FORMAT = 2  # 2: the vision graph is `project_images` (snap included); the model's facts are recorded


def cache_names(layers: int, prefix: str) -> list[str]:
    """The decoder graph's KV-cache inputs (`past.L.key`, …) or outputs (`present.L.value`, …)."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


class OnnxBackend(ExportedBackend):
    name = "onnx"

    def __init__(
        self, vision, decoder, embeddings: np.ndarray, processor: MultimodalProcessor, settings: dict
    ):
        super().__init__(processor, vision, settings)
        self.decoder = decoder
        self.embeddings = embeddings  # (V, D)

    @classmethod
    def load(cls, path: str | Path, threads: int = 0) -> OnnxBackend:
        from safetensors.numpy import load_file

        path = Path(path)
        settings = read_export_settings(path, ONNX_CONFIG, ONNX_FORMAT, "export onnx")
        vision, decoder = (onnx_session(path / name, threads) for name in ("vision.onnx", "decoder.onnx"))
        embeddings = load_file(str(path / "embeddings.safetensors"))["embeddings"]
        processor = MultimodalProcessor.from_pretrained(path, without_torch=True)
        return cls(vision, decoder, embeddings, processor, settings)

    def prompt_embeddings(self, prompts: list[Prompt]) -> tuple[np.ndarray, np.ndarray]:
        """(B, T, D) left-padded embeddings with image rows in the placeholder rows, and the (B, T) mask."""
        batch = self.processor.pad_arrays([{"input_ids": prompt.input_ids} for prompt in prompts])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        placeholders = ids == self.settings["image_token_id"]
        embeds = self.embeddings[np.where(placeholders, 0, ids)]  # (B, T, D)
        pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
        if pixels:
            rows = self.image_rows(np.concatenate(pixels))  # (I, N, D)
            embeds[placeholders] = rows.reshape(-1, rows.shape[-1])
        return embeds, mask

    @property
    def logits_width(self) -> int:
        return self.embeddings.shape[0]

    def check(self, settings: GenerationSettings) -> None:
        """Its batch decodes in one loop, without a running batch's per-row logit shaping."""
        super().check(settings)
        if settings.shapes_logits or settings.stop_token_ids:
            asked = [
                name
                for name, value in (
                    ("logprobs", settings.logprobs is not None),
                    ("grammar", settings.grammar is not None),
                    ("logit_bias", any((settings.logit_bias or {}).values())),
                    ("presence_penalty", settings.presence_penalty),
                    ("frequency_penalty", settings.frequency_penalty),
                    ("min_tokens", settings.min_tokens),
                    ("stop_token_ids", settings.stop_token_ids),
                )
                if value
            ]
            raise ValueError(
                f"{asked[0]} is not supported by the onnx backend (the torch and llama.cpp ones have it)"
            )

    def decode(self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker) -> list[int]:
        rng = sampling_rng(settings.seed)
        embeds, mask = self.prompt_embeddings(prompts)
        prompt_tokens = mask.sum(1).tolist()
        batch = embeds.shape[0]
        positions = np.maximum(mask.cumsum(1) - 1, 0)
        shape = (batch, self.settings["kv_heads"], 0, self.settings["head_dim"])
        names = cache_names(self.settings["layers"], "past")
        cache = {name: np.zeros(shape, np.float32) for name in names}
        for _ in range(rows.longest):
            logits, *present = self.decoder.run(
                None, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **cache}
            )
            chosen = choose_tokens(logits, settings, rng, self.processor.stop_token_ids)  # (B,)
            rows.step(chosen.tolist())
            if rows.done:
                break
            cache = dict(zip(names, present, strict=True))
            embeds = self.embeddings[chosen][:, None]  # (B, 1, D)
            mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)
            positions = positions[:, -1:] + 1
        return prompt_tokens
