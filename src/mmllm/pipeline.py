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
MAX_TEMPERATURE = 100.0
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


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

    def __post_init__(self) -> None:
        """Every setting is checked when the settings are made: before a model loads or a request queues."""
        problems = [
            message
            for bad, message in (
                (self.max_new_tokens < 1, "max_new_tokens must be at least 1"),
                (
                    not 0 <= self.temperature <= MAX_TEMPERATURE,
                    f"temperature must be in [0, {MAX_TEMPERATURE}]",
                ),
                (not 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                (self.top_k < 0, "top_k must be 0 (no limit) or more"),
                (self.num_beams < 1, "num_beams must be at least 1"),
                (not 0 < self.repetition_penalty <= 100, "repetition_penalty must be in (0, 100]"),
                (
                    self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                    f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
                ),
            )
            if bad  # NaN fails every range check above, so it is refused too
        ]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def sampling(self) -> bool:
        # Below this, dividing logits by the temperature overflows to inf: the limit of sampling is
        # greedy decoding, so that is what a near-zero temperature gets (vLLM does the same).
        return self.temperature >= GREEDY_BELOW

    def generation_config(self, processor: MultimodalProcessor) -> GenerationConfig:
        sampling = self.sampling
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
    finish_reason: str  # "stop" (end of turn or a stop string), "length", or "cancelled" (client left)


@dataclass
class Prompt:
    """One conversation, checked and encoded on its own: what a batch is made of."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (I, 3, S, S), or None without images


class _RowStreamer(BaseStreamer, StoppingCriteria):
    """Decodes each row of a batched generate as it grows; enforces per-row token limits and stop strings.

    Its `done` flags double as a stopping criterion, so a finished row stops costing compute once all
    rows are done, and rows never run past their own `max_tokens`.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        limits: list[int],
        stops: list[list[str]],
        on_delta,
        ignore_eos: bool,
        cancelled: list[threading.Event] | None = None,
    ):
        self.tokenizer = pipeline.processor.tokenizer
        self.stop_ids = set() if ignore_eos else set(pipeline.processor.stop_token_ids)
        self.limits, self.stops, self.on_delta = limits, stops, on_delta
        self.cancelled = cancelled or [threading.Event() for _ in limits]
        self.ids: list[list[int]] = [[] for _ in limits]
        self.text = [""] * len(limits)
        self.finish = [""] * len(limits)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.cancelled[row].is_set() and not self.finish[row]:
                self.finish[row] = "cancelled"  # the client went away: its row stops costing compute
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

    @property
    def context_length(self) -> int:
        """The most tokens the language model reads: prompt (image placeholders included) + answer."""
        return self.model.config.text_config.max_position_embeddings

    def prepare(self, conversation: list[Message], images: list[ImageInput] | None = None) -> Prompt:
        """Check and encode one conversation on its own (images loaded once, resized, tokens counted).

        What fails here fails this request alone, before it joins a batch with anyone else's.
        """
        encoded = self.processor.encode(conversation, [load_image(image) for image in images or ()])
        if len(encoded["input_ids"]) > self.context_length:
            raise ValueError(
                f"the prompt is {len(encoded['input_ids']):,} tokens; the model's context holds "
                f"{self.context_length:,}"
            )
        return Prompt(encoded["input_ids"], encoded["pixel_values"])

    @torch.inference_mode()
    def image_features(self, images: list[ImageInput] | torch.Tensor) -> torch.Tensor:
        """(I, N, D_v) features of images or (I, 3, S, S) pixels, from the LRU cache when seen before."""
        pixels = images if isinstance(images, torch.Tensor) else self.processor.image_processor(images)
        keys = [hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in pixels]  # what the tower sees
        found = {key: self.features.get(key) for key in keys}
        missing = [i for i, key in enumerate(keys) if found[key] is None]
        if missing:
            batch = pixels[missing].to(self.model.device)
            for i, features in zip(missing, self.model.get_image_features(batch), strict=True):
                found[keys[i]] = features
                self.features.put(keys[i], features)  # a batch larger than the cache still gets all
        return torch.stack([found[key] for key in keys])

    def _inputs(self, prompts: list[Prompt]) -> dict:
        padded = self.processor.pad([{"input_ids": prompt.input_ids} for prompt in prompts])
        batch = {k: v.to(self.model.device) for k, v in padded.items()}
        pixels = [prompt.pixel_values for prompt in prompts if prompt.pixel_values is not None]
        if pixels:
            batch["image_features"] = self.image_features(torch.cat(pixels))
        return batch

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
        images = images or [[] for _ in conversations]
        prompts = [self.prepare(c, i) for c, i in zip(conversations, images, strict=True)]
        return self.complete_prompts(prompts, settings, max_tokens, stop, on_delta)

    @torch.inference_mode()
    def complete_prompts(
        self,
        prompts: list[Prompt],
        settings: GenerationSettings | None = None,
        max_tokens: list[int] | None = None,
        stop: list[list[str]] | None = None,
        on_delta=None,
        cancelled: list[threading.Event] | None = None,
    ) -> list[Completion]:
        """`complete` for prepared prompts; a row whose `cancelled` event is set stops at its next token."""
        settings = settings or GenerationSettings()
        limits = max_tokens or [settings.max_new_tokens] * len(prompts)
        stops = stop or [[] for _ in prompts]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        inputs = self._inputs(prompts)
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
            streamer = _RowStreamer(self, limits, stops, on_delta, settings.ignore_eos, cancelled)
            self.model.generate(
                **inputs, generation_config=config, streamer=streamer, stopping_criteria=[streamer]
            )
        streamer.end()
        return [
            Completion(
                streamer.text[row].strip(), prompt_tokens[row], len(streamer.ids[row]), streamer.finish[row]
            )
            for row in range(len(prompts))
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
