"""The `Backend` base class, whose `decode` each backend (PyTorch, ONNX Runtime, llama.cpp) implements,
and what every backend shares: prepared prompts (`Prompt`) and the cache of image features (`FeatureLRU`).

The CLI, the server's request queues, the chat page and `mmllm eval` talk to a `Backend` only, so any
of them runs on any backend (`--backend torch|onnx|llama.cpp`).
"""

from __future__ import annotations

import functools
import hashlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmllm.conversation import Message
from mmllm.engine.logits import LogitShaper
from mmllm.engine.rows import Completion, OnDelta, RowTracker
from mmllm.engine.settings import CAPTION_PROMPT, GenerationSettings
from mmllm.images import ImageInput, load_image
from mmllm.processor import MultimodalProcessor


@dataclass
class Prompt:
    """One conversation, checked and encoded on its own: what a batch is made of."""

    input_ids: list[int]
    pixel_values: np.ndarray | None  # (I, 3, S, S), or None without images
    salt: str = ""
    """Whose prompt it is (the server's tenant): the prefix cache shares KV between equal salts only."""


def image_digest(image: np.ndarray) -> bytes:
    """A (3, S, S) image's content hash: the key of its vision results and of its cached prefixes."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()


class FeatureLRU:
    """Vision results of recently seen images, keyed by pixel content: a follow-up question is free.

    Safe under threads (the server prepares requests in several, and a model that reads images as
    words runs its tower there): each look-up and store holds the lock; computing does not.
    """

    def __init__(self, capacity: int):
        self.capacity, self.entries = capacity, OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: bytes):
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
            return self.entries.get(key)

    def put(self, key: bytes, value) -> None:
        with self.lock:
            self.entries[key] = value
            self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)

    def through(self, pixels: np.ndarray, compute: Callable[[list[int]], list]) -> list:
        """Per image of (I, 3, S, S) `pixels`: the cached result, or `compute(indices)` of the missing
        ones in one call (a batch larger than the cache still gets all its results)."""
        keys = [image_digest(row) for row in pixels]
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
        if settings.num_beams > 1 and (settings.shapes_logits or settings.min_p or settings.stop_token_ids):
            raise ValueError(
                "num_beams > 1 decodes through transformers' beam search, without logprobs, penalties, "
                "logit_bias, grammars, min_p, min_tokens or stop_token_ids"
            )

    logits_width: int
    """The width of the LM's logits (its output vocabulary, which may be padded past the tokenizer's)."""

    @functools.cached_property
    def shaper(self) -> LogitShaper:
        """What rows that bias, penalise, constrain or record their logits go through (`logits`)."""
        return LogitShaper(self.processor, self.logits_width)

    def prepare(
        self,
        conversation: list[dict[str, Any]],
        images: list[ImageInput] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Prompt:
        """Check and encode one conversation on its own (images loaded once, resized, tokens counted).

        What fails here fails this request alone, before it joins a batch with anyone else's. A model
        that reads images as words has them read here, so its prompt is text alone. `tools` (OpenAI's
        function definitions) and a conversation with tool calls or results are rendered in the chat
        template's own tool format (`tools.encode_with_tools`).
        """
        from mmllm.engine.tools import encode_with_tools, has_tool_messages

        loaded = [load_image(image) for image in images or ()]
        pixels = self.processor.image_processor.arrays(loaded) if loaded else None
        words = self.image_words(pixels) if pixels is not None and self.reads_images_as_words else None
        if tools or has_tool_messages(conversation):
            encoded = encode_with_tools(self.processor, conversation, len(loaded), words, tools or [])
        else:
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
        settings: GenerationSettings | list[GenerationSettings] | None = None,
        stop: list[list[str]] | None = None,
        on_delta: OnDelta | None = None,
        cancelled: list[threading.Event] | None = None,
    ) -> list[Completion]:
        """Answer prepared prompts as one batch. `settings` is one for every row or one per row (rows
        may differ in their token limit, `max_new_tokens`, only); each row may have its own stop strings,
        `on_delta(row, text)` receives each row's new text, and a row whose `cancelled` event is set
        stops at its next token."""
        if isinstance(settings, list):
            per_row = settings
            batch = max(per_row, key=lambda row: row.max_new_tokens)  # the longest limit decodes longest
            if len(per_row) != len(prompts) or any(row.batch_key() != batch.batch_key() for row in per_row):
                raise ValueError("one batch takes one settings per prompt, alike but for max_new_tokens")
        else:
            batch = settings or GenerationSettings()
            per_row = [batch] * len(prompts)
        self.check(batch)
        rows = RowTracker(self.processor, per_row, stop or [[] for _ in prompts], on_delta, cancelled)
        return rows.completions(self.decode(prompts, batch, rows))

    def decode(self, prompts: list[Prompt], settings: GenerationSettings, rows: RowTracker) -> list[int]:
        """Generate for the batch with `settings` (those of its longest row: rows share all others),
        handing each step's tokens to `rows.step` until `rows.done` (or `rows.longest` steps); returns
        each prompt's token count. What each backend implements."""
        raise NotImplementedError

    def complete(
        self,
        conversations: list[list[Message]],
        images: list[list[ImageInput]] | None = None,
        settings: GenerationSettings | list[GenerationSettings] | None = None,
        stop: list[list[str]] | None = None,
        on_delta: OnDelta | None = None,
    ) -> list[Completion]:
        """Answer a batch of conversations in one go (see `complete_prompts`)."""
        images = images or [[] for _ in conversations]
        prompts = [self.prepare(c, i) for c, i in zip(conversations, images, strict=True)]
        return self.complete_prompts(prompts, settings, stop, on_delta)

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
        stop: list[str] | None = None,
    ) -> Iterator[str]:
        """Yield the answer to one conversation piece by piece as `complete` generates it (`stop`: its
        stop strings): the pieces joined are `complete`'s text."""
        settings = settings or GenerationSettings()
        if settings.num_beams > 1:
            raise ValueError("streaming needs num_beams=1")
        pieces: queue.Queue = queue.Queue()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.complete(
                    [messages],
                    [images or []],
                    settings,
                    [stop or []],
                    on_delta=lambda row, text: pieces.put(text),
                )
            except BaseException as err:  # re-raised in the caller's thread below
                failure.append(err)
            finally:
                pieces.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while (piece := pieces.get()) is not None:
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
