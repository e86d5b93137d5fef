"""The PyTorch backend: a `MultimodalLM` answering through transformers' `generate`, batched or
streamed (`Pipeline`, what `--backend torch` runs)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from mmllm.errors import MmllmError
from mmllm.generation import Backend, GenerationSettings, Prompt, RowTracker
from mmllm.images import ImageInput
from mmllm.models.build import load_model, untrained_parts
from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import MultimodalProcessor

log = logging.getLogger("mmllm")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _GenerateTracker(RowTracker, BaseStreamer, StoppingCriteria):
    """A `RowTracker` fed by `generate`'s streamer calls; its finished rows double as a stopping
    criterion, so generation ends once every row is done and no row runs past its own `max_tokens`."""

    prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        self.step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([bool(f) for f in self.finish], device=input_ids.device)


class Pipeline(Backend):
    name = "torch"
    tracker = _GenerateTracker

    def __init__(self, model: MultimodalLM, processor: MultimodalProcessor, feature_cache_size: int = 64):
        super().__init__(processor, feature_cache_size)
        self.model = model.eval()

    @classmethod
    def load(cls, name_or_path: str, device: str | None = None, dtype: str = "auto") -> Pipeline:
        """`dtype`: auto (bf16 on CUDA, else fp32), fp32, bf16, fp16, or int8 (torchao, for CPUs)."""
        device = torch.device(device) if device else default_device()
        if dtype not in (*DTYPES, "auto", "int8"):
            raise MmllmError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)} or int8")
        torch_dtype = DTYPES.get(
            dtype, torch.bfloat16 if device.type == "cuda" and dtype == "auto" else torch.float32
        )
        model, processor = load_model(name_or_path, dtype=torch_dtype)
        if missing := untrained_parts(model):
            log.warning(
                "%s: %s untrained (random weights): answers do not reflect the image",
                name_or_path,
                " and ".join(missing),
            )
        # Unmerged adapters add two small matmuls per adapted layer to every decode step (H100, 32-token
        # answer: Qwen 0.5B with unmerged attention LoRA 1.43 s, the same LM without adapters 0.79 s).
        model.merge_lora()
        if dtype == "int8":
            from mmllm.models.int8 import quantize_int8

            quantize_int8(model)
        return cls(model.to(device), processor)

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @property
    def trained_parts(self) -> list[str]:
        return list(self.model.config.trained_parts or ())

    @property
    def reads_images_as_words(self) -> bool:
        return self.model.config.reads_images_as_words

    def image_words(self, pixels: np.ndarray) -> list[str]:
        return self.model.image_words(self.image_features(torch.from_numpy(pixels)))

    @torch.inference_mode()
    def image_features(self, images: list[ImageInput] | torch.Tensor) -> torch.Tensor:
        """(I, N, D_v) features of images or (I, 3, S, S) pixels, from the LRU cache when seen before."""
        pixels = images if isinstance(images, torch.Tensor) else self.processor.image_processor(images)

        def compute(rows: list[int]) -> torch.Tensor:
            return self.model.get_image_features(pixels[rows].to(self.model.device))

        return torch.stack(self.features.through(pixels.numpy(), compute))  # keyed by what the tower sees

    def _inputs(self, prompts: list[Prompt]) -> dict:
        padded = self.processor.pad([{"input_ids": prompt.input_ids} for prompt in prompts])
        batch = {k: v.to(self.model.device) for k, v in padded.items()}
        pixels = [prompt.pixel_values for prompt in prompts if prompt.pixel_values is not None]
        if pixels:
            batch["image_features"] = self.image_features(torch.from_numpy(np.concatenate(pixels)))
        return batch

    @torch.inference_mode()
    def decode(self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker) -> list[int]:
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        inputs = self._inputs(prompts)
        config = settings.generation_config(self.processor)
        config.max_new_tokens = max(rows.limits)
        if settings.ignore_eos:
            config.min_new_tokens = config.max_new_tokens
        if settings.num_beams > 1:  # beams cannot stream: limits and stops are applied afterwards
            output = self.model.generate(**inputs, generation_config=config)
            for column in output[:, inputs["input_ids"].shape[1] :].T:
                rows.step(column.tolist())
        else:
            self.model.generate(**inputs, generation_config=config, streamer=rows, stopping_criteria=[rows])
        return inputs["attention_mask"].sum(1).tolist()
