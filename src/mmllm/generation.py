"""What every inference backend shares: decoding settings, prepared prompts, per-row stopping, and the
`Backend` base class whose `decode` each backend (PyTorch, ONNX Runtime, llama.cpp) implements.

The CLI, the server's batcher, the chat page and `mmllm eval` talk to a `Backend` only, so any of them
runs on any backend (`--backend torch|onnx|llama.cpp`).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mmllm.conversation import Message
from mmllm.images import ImageInput, load_image
from mmllm.processor import MultimodalProcessor

if TYPE_CHECKING:  # torch and transformers load only where the torch backend runs
    from transformers import GenerationConfig

CAPTION_PROMPT = "Describe this image briefly."
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
        from transformers import GenerationConfig

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
    pixel_values: np.ndarray | None  # (I, 3, S, S), or None without images


OnDelta = Callable[[int, str], None]


class RowTracker:
    """Follows each row of a batch as it grows by one token a step: decodes its text, applies its own
    token limit and stop strings, ends it when its client cancels, and hands new text to `on_delta`.

    Every backend's decoding loop feeds it, so an answer ends the same way whichever backend made it.
    """

    def __init__(
        self,
        processor: MultimodalProcessor,
        limits: list[int],
        stops: list[list[str]],
        on_delta: OnDelta | None,
        ignore_eos: bool,
        cancelled: list[threading.Event] | None = None,
    ):
        self.tokenizer = processor.tokenizer
        self.stop_token_ids = processor.stop_token_ids
        self.stop_ids = set() if ignore_eos else set(self.stop_token_ids)
        self.limits, self.stops, self.on_delta = limits, stops, on_delta
        self.cancelled = cancelled or [threading.Event() for _ in limits]
        self.ids: list[list[int]] = [[] for _ in limits]
        self.text = [""] * len(limits)
        self.finish = [""] * len(limits)

    @property
    def done(self) -> bool:
        return all(self.finish)

    def step(self, tokens: list[int], rows: list[int] | None = None) -> None:
        """One new token per row, or per row of `rows` when a backend decodes a batch's rows in groups
        (rows already finished ignore theirs)."""
        for row, token in zip(rows or range(len(tokens)), tokens, strict=True):
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

    def completions(self, prompt_tokens: list[int]) -> list[Completion]:
        finish = [f or "stop" for f in self.finish]
        return [
            Completion(self.text[row].strip(), prompt_tokens[row], len(self.ids[row]), finish[row])
            for row in range(len(self.limits))
        ]


class FeatureLRU:
    """Vision results of recently seen images, keyed by pixel content: a follow-up question is free."""

    def __init__(self, capacity: int):
        self.capacity, self.entries = capacity, OrderedDict()

    def get(self, key: str):
        if key in self.entries:
            self.entries.move_to_end(key)
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def through(self, pixels: np.ndarray, compute: Callable[[list[int]], list]) -> list:
        """Per image of (I, 3, S, S) `pixels`: the cached result, or `compute(indices)` of the missing
        ones in one call (a batch larger than the cache still gets all its results)."""
        keys = [hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest() for row in pixels]
        found = {key: self.get(key) for key in keys}
        missing = [i for i, key in enumerate(keys) if found[key] is None]
        if missing:
            for i, result in zip(missing, compute(missing), strict=True):
                found[keys[i]] = result
                self.put(keys[i], result)
        return [found[key] for key in keys]


class Backend:
    """An engine that answers prepared prompts. Subclasses implement `decode` (and say what they cannot
    do in `check`); everything else — preparing prompts, per-row limits and stops, batches, streams,
    questions, captions — is shared."""

    processor: MultimodalProcessor
    name: str = ""
    context_length: int
    """The most tokens the language model reads: prompt (image placeholders included) + answer."""
    trained_parts: list[str]
    """The model's parts that carry learned weights (the chat page and /health say whether it sees)."""

    def __init__(self, processor: MultimodalProcessor, feature_cache_size: int = 64):
        self.processor = processor
        self.features = FeatureLRU(feature_cache_size)

    @property
    def vision_trained(self) -> bool:
        return "vision_tower" in self.trained_parts

    def check(self, settings: GenerationSettings) -> None:
        """Raise ValueError for settings this backend cannot decode with (before a request queues)."""

    def prepare(self, conversation: list[Message], images: list[ImageInput] | None = None) -> Prompt:
        """Check and encode one conversation on its own (images loaded once, resized, tokens counted).

        What fails here fails this request alone, before it joins a batch with anyone else's. A model
        that reads images as words has them read here, so its prompt is text alone.
        """
        loaded = [load_image(image) for image in images or ()]
        pixels = self.processor.image_processor.arrays(loaded) if loaded else None
        words = self.image_words(pixels) if pixels is not None and self.reads_images_as_words else None
        encoded = self.processor.encode_text(conversation, len(loaded), image_words=words)
        if len(encoded["input_ids"]) > self.context_length:
            raise ValueError(
                f"the prompt is {len(encoded['input_ids']):,} tokens; the model's context holds "
                f"{self.context_length:,}"
            )
        return Prompt(encoded["input_ids"], None if words else pixels)

    session = None
    """The backend's running batch (a `running.StepSession`): answers join and leave it between
    decoding steps, what the continuous scheduler needs; None where the engine cannot keep one."""

    reads_images_as_words: bool = False
    """Whether the model reads images as words (the labels bridge) rather than as projected rows."""

    def image_words(self, pixels: np.ndarray) -> list[str]:
        """(I, 3, S, S) pixels -> the words each image reads as (models that read images as words)."""
        raise NotImplementedError(f"the {self.name} backend cannot read images as words")

    def complete_prompts(
        self,
        prompts: list[Prompt],
        settings: GenerationSettings | None = None,
        max_tokens: list[int] | None = None,
        stop: list[list[str]] | None = None,
        on_delta: OnDelta | None = None,
        cancelled: list[threading.Event] | None = None,
    ) -> list[Completion]:
        """Answer prepared prompts as one batch; each row may have its own token limit and stop strings,
        `on_delta(row, text)` receives each row's new text, and a row whose `cancelled` event is set
        stops at its next token."""
        settings = settings or GenerationSettings()
        self.check(settings)
        limits = max_tokens or [settings.max_new_tokens] * len(prompts)
        stops = stop or [[] for _ in prompts]
        rows = RowTracker(self.processor, limits, stops, on_delta, settings.ignore_eos, cancelled)
        return rows.completions(self.decode(prompts, settings, rows))

    def decode(self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker) -> list[int]:
        """Generate for the batch, handing each step's tokens to `rows.step` until `rows.done` (or the
        longest limit); returns each prompt's token count. What each backend implements."""
        raise NotImplementedError

    def complete(
        self,
        conversations: list[list[Message]],
        images: list[list[ImageInput]] | None = None,
        settings: GenerationSettings | None = None,
        max_tokens: list[int] | None = None,
        stop: list[list[str]] | None = None,
        on_delta: OnDelta | None = None,
    ) -> list[Completion]:
        """Answer a batch of conversations in one go (see `complete_prompts`)."""
        images = images or [[] for _ in conversations]
        prompts = [self.prepare(c, i) for c, i in zip(conversations, images, strict=True)]
        return self.complete_prompts(prompts, settings, max_tokens, stop, on_delta)

    def generate(
        self,
        conversations: list[list[Message]],
        images: list[list[ImageInput]] | None = None,
        settings: GenerationSettings | None = None,
    ) -> list[str]:
        """Answer a batch of conversations (left-padded, one batch)."""
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
        conversation = [{"role": "user", "content": question}]
        return self.generate([conversation], [[image] if image else []], settings)[0]

    def caption(
        self,
        images: list[ImageInput],
        settings: GenerationSettings | None = None,
        prompt: str = CAPTION_PROMPT,
    ) -> list[str]:
        conversations = [[{"role": "user", "content": prompt}] for _ in images]
        return self.generate(conversations, [[image] for image in images], settings)


def sampling_rng(seed: int | None) -> np.random.Generator:
    """The generator a seed names; any seed in SEED_RANGE (numpy itself takes no negative ones)."""
    return np.random.default_rng(None if seed is None else seed % 2**64)


def choose_tokens(
    logits: np.ndarray,
    settings: GenerationSettings,
    rng: np.random.Generator,
    stop_ids: list[int],
    seen: list[list[int]] | None = None,
) -> np.ndarray:
    """(B, V) logits -> the next token per row: argmax, or a sample from the temperature/top-k/top-p
    distribution (for backends that sample outside transformers). With `ignore_eos` the stop tokens
    are never chosen, as transformers' `min_new_tokens` does; `seen` (each row's prompt and answer so
    far) gets the repetition penalty, as transformers' `RepetitionPenaltyLogitsProcessor` gives it."""
    if settings.ignore_eos or seen is not None:
        logits = logits.copy()
    if settings.ignore_eos:
        logits[:, stop_ids] = -np.inf
    for row, ids in enumerate(seen or ()):
        tokens = np.unique([token for token in ids if token < logits.shape[1]])  # placeholders lie outside
        scores = logits[row, tokens]
        penalty = settings.repetition_penalty
        logits[row, tokens] = np.where(scores < 0, scores * penalty, scores / penalty)
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
