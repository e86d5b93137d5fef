"""Inference pipeline: ask / caption / chat, batched or streamed; the CLI, server and app all call it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, TextIteratorStreamer

from mmllm.images import ImageInput
from mmllm.models.build import load_model, untrained_parts
from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import Message, MultimodalProcessor

log = logging.getLogger("mmllm")

CAPTION_PROMPT = "Describe this image briefly."


@dataclass
class GenerationSettings:
    """How answers are decoded."""

    max_new_tokens: int = 128
    """Most tokens to generate per answer."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily (or with beams)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest token set holding this much probability."""
    top_k: int = 0
    """Sample from the k most likely tokens only (0: no limit)."""
    num_beams: int = 1
    """Beam search width; 1 means no beam search."""
    repetition_penalty: float = 1.0
    """Penalise tokens already generated (1.0: off)."""
    seed: int | None = None
    """Random seed for sampling, for reproducible answers."""

    def generation_config(self, processor: MultimodalProcessor) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.num_beams < 1:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and num_beams >= 1")
        sampling = self.temperature > 0
        options = (
            {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k} if sampling else {}
        )
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=processor.tokenizer.pad_token_id,
            **options,
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    def __init__(self, model: MultimodalLM, processor: MultimodalProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def load(cls, name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        device = torch.device(device) if device else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model, processor = load_model(name_or_path, dtype=dtype)
        if missing := untrained_parts(model):
            log.warning(
                "%s: %s untrained (random weights): answers do not reflect the image",
                name_or_path,
                " and ".join(missing),
            )
        return cls(model.to(device), processor)

    def _inputs(self, conversations: list[list[Message]], images: list[list[ImageInput]] | None) -> dict:
        batch = self.processor(conversations, images)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[list[Message]],
        images: list[list[ImageInput]] | None = None,
        settings: GenerationSettings | None = None,
    ) -> list[str]:
        """Answer a batch of conversations (left-padded, one generate call)."""
        settings = settings or GenerationSettings()
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        inputs = self._inputs(conversations, images)
        output = self.model.generate(**inputs, generation_config=settings.generation_config(self.processor))
        prompt_length = inputs["input_ids"].shape[1]
        return [self.processor.decode(row[prompt_length:]).strip() for row in output]

    def stream(
        self,
        messages: list[Message],
        images: list[ImageInput] | None = None,
        settings: GenerationSettings | None = None,
    ) -> Iterator[str]:
        """Yield the answer to one conversation piece by piece as it is generated."""
        settings = settings or GenerationSettings()
        if settings.num_beams > 1:
            raise ValueError("streaming needs num_beams=1")
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        inputs = self._inputs([messages], [images or []])
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **inputs,
                        generation_config=settings.generation_config(self.processor),
                        streamer=streamer,
                    )
            except BaseException as err:  # re-raised in the caller's thread below
                failure.append(err)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]

    def ask(self, image: ImageInput | None, question: str, settings: GenerationSettings | None = None) -> str:
        if not question.strip():
            raise ValueError("the question is empty")
        return self.generate([[{"role": "user", "content": question}]], [[image] if image else []], settings)[
            0
        ]

    def caption(
        self,
        images: list[ImageInput],
        settings: GenerationSettings | None = None,
        prompt: str = CAPTION_PROMPT,
    ) -> list[str]:
        conversations = [[{"role": "user", "content": prompt}] for _ in images]
        return self.generate(conversations, [[image] for image in images], settings)
