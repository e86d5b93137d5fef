"""Inference pipeline: ask / caption / chat, batched or streamed; the CLI, server and app all call it."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from mmllm.errors import MmllmError
from mmllm.images import ImageInput, load_image
from mmllm.models.build import load_model, untrained_parts
from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import Message, MultimodalProcessor

log = logging.getLogger("mmllm")

CAPTION_PROMPT = "Describe this image briefly."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    ignore_eos: bool = False
    """Keep generating past the end of the answer, up to max_new_tokens (for benchmarks)."""

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
            # Ignoring EOS = never producing it before the limit (the model config would still stop on it).
            min_new_tokens=self.max_new_tokens if self.ignore_eos else None,
            pad_token_id=processor.tokenizer.pad_token_id,
            **options,
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Completion:
    """One answer with the counts an API reports."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


class _RowStreamer(BaseStreamer, StoppingCriteria):
    """Decodes each row of a batched generate as it grows; enforces per-row token limits and stop strings.

    Its `done` flags double as a stopping criterion, so a finished row stops costing compute once all
    rows are done, and rows never run past their own `max_tokens`.
    """

    def __init__(
        self, pipeline: Pipeline, limits: list[int], stops: list[list[str]], on_delta, ignore_eos: bool
    ):
        self.tokenizer = pipeline.processor.tokenizer
        self.stop_ids = set() if ignore_eos else set(pipeline.processor.stop_token_ids)
        self.limits, self.stops, self.on_delta = limits, stops, on_delta
        self.ids: list[list[int]] = [[] for _ in limits]
        self.text = [""] * len(limits)
        self.finish = [""] * len(limits)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finish[row]:
                continue
            if token in self.stop_ids:
                self.finish[row] = "stop"
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            cut = min((text.find(s) for s in self.stops[row] if s in text), default=-1)
            if cut >= 0:
                text, self.finish[row] = text[:cut], "stop"
            elif len(self.ids[row]) >= self.limits[row]:
                self.finish[row] = "length"
            if text.endswith("\ufffd") and not self.finish[row]:
                continue  # half of a multi-byte character: wait for the rest
            if len(text) > len(self.text[row]) and self.on_delta:
                self.on_delta(row, text[len(self.text[row]) :])
            self.text[row] = text

    def end(self) -> None:
        self.finish = [f or "stop" for f in self.finish]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([bool(f) for f in self.finish], device=input_ids.device)


class FeatureLRU:
    """Vision features of recently seen images, keyed by pixel content: a follow-up question is free."""

    def __init__(self, capacity: int):
        self.capacity, self.entries = capacity, OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.entries:
            self.entries.move_to_end(key)
        return self.entries.get(key)

    def put(self, key: str, features: torch.Tensor) -> None:
        self.entries[key] = features
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class Pipeline:
    def __init__(self, model: MultimodalLM, processor: MultimodalProcessor, feature_cache_size: int = 64):
        self.model = model.eval()
        self.processor = processor
        self.features = FeatureLRU(feature_cache_size)

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
            from mmllm.export.int8 import quantize_int8

            quantize_int8(model)
        return cls(model.to(device), processor)

    @torch.inference_mode()
    def image_features(self, images: list[ImageInput]) -> torch.Tensor:
        """(I, N, D_v) vision features, served from the LRU cache when an image was seen before."""
        loaded = [load_image(image) for image in images]
        keys = [hashlib.sha256(image.tobytes() + str(image.size).encode()).hexdigest() for image in loaded]
        found = {key: self.features.get(key) for key in keys}
        missing = [i for i, key in enumerate(keys) if found[key] is None]
        if missing:
            pixels = self.processor.image_processor([loaded[i] for i in missing]).to(self.model.device)
            for i, features in zip(missing, self.model.get_image_features(pixels), strict=True):
                found[keys[i]] = features
                self.features.put(keys[i], features)  # a batch larger than the cache still gets all
        return torch.stack([found[key] for key in keys])

    def _inputs(self, conversations: list[list[Message]], images: list[list[ImageInput]] | None) -> dict:
        images = images or [[] for _ in conversations]
        encoded = [self.processor.encode_text(c, len(i)) for c, i in zip(conversations, images, strict=True)]
        batch = {k: v.to(self.model.device) for k, v in self.processor.pad(encoded).items()}
        flat = [image for row in images for image in row]
        if flat:
            batch["image_features"] = self.image_features(flat)
        return batch

    @torch.inference_mode()
    def complete(
        self,
        conversations: list[list[Message]],
        images: list[list[ImageInput]] | None = None,
        settings: GenerationSettings | None = None,
        max_tokens: list[int] | None = None,
        stop: list[list[str]] | None = None,
        on_delta=None,
    ) -> list[Completion]:
        """Answer a batch in one generate call; each row may have its own token limit and stop strings.

        `on_delta(row, text)` receives each row's new text as it is generated (greedy/sampling).
        """
        settings = settings or GenerationSettings()
        limits = max_tokens or [settings.max_new_tokens] * len(conversations)
        stops = stop or [[] for _ in conversations]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        inputs = self._inputs(conversations, images)
        config = settings.generation_config(self.processor)
        config.max_new_tokens = max(limits)
        if settings.ignore_eos:
            config.min_new_tokens = config.max_new_tokens
        prompt_tokens = inputs["attention_mask"].sum(1).tolist()
        if settings.num_beams > 1:  # beams cannot stream: limits and stops are applied afterwards
            output = self.model.generate(**inputs, generation_config=config)
            streamer = _RowStreamer(self, limits, stops, None, settings.ignore_eos)
            streamer.put(inputs["input_ids"])
            for column in output[:, inputs["input_ids"].shape[1] :].T:
                streamer.put(column)
        else:
            streamer = _RowStreamer(self, limits, stops, on_delta, settings.ignore_eos)
            self.model.generate(
                **inputs, generation_config=config, streamer=streamer, stopping_criteria=[streamer]
            )
        streamer.end()
        return [
            Completion(
                streamer.text[row].strip(), prompt_tokens[row], len(streamer.ids[row]), streamer.finish[row]
            )
            for row in range(len(conversations))
        ]

    def generate(
        self,
        conversations: list[list[Message]],
        images: list[list[ImageInput]] | None = None,
        settings: GenerationSettings | None = None,
    ) -> list[str]:
        """Answer a batch of conversations (left-padded, one generate call)."""
        return [c.text for c in self.complete(conversations, images, settings)]

    def stream(
        self,
        messages: list[Message],
        images: list[ImageInput] | None = None,
        settings: GenerationSettings | None = None,
    ) -> Iterator[str]:
        """Yield the answer to one conversation piece by piece as `complete` generates it."""
        settings = settings or GenerationSettings()
        if settings.num_beams > 1:
            raise ValueError("streaming needs num_beams=1")
        pieces: queue.Queue = queue.Queue()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.complete(
                    [messages], [images or []], settings, on_delta=lambda row, text: pieces.put(text)
                )
            except BaseException as err:  # re-raised in the caller's thread below
                failure.append(err)
            finally:
                pieces.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        first = True
        while (piece := pieces.get()) is not None:
            piece = piece.lstrip() if first else piece  # as `complete` strips the final text
            first = first and not piece
            if piece:
                yield piece
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
