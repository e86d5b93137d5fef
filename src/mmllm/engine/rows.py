"""Per-row stopping: `RowTracker` follows each answer of a batch token by token, so an answer ends the
same way (end of turn, stop string, token limit, client gone) whichever backend made it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmllm.engine.settings import GenerationSettings

if TYPE_CHECKING:
    from mmllm.processor import MultimodalProcessor

OnDelta = Callable[[int, str], None]
"""`on_delta(row, text)`: a row's new text, as it is decoded."""


@dataclass
class Completion:
    """One answer with the counts an API reports."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string), "length", or "cancelled" (client left)


class RowTracker:
    """Follows each row of a batch as it grows by one token a step: decodes its text, applies its own
    token limit (`limit`) and stop strings, ends it when its client cancels, and hands new text to
    `on_delta`.

    Each row's limit is its own settings' `max_new_tokens`, capped where its context ends (`room`,
    once a running batch knows it); every backend's decoding loop feeds the tracker.
    """

    def __init__(
        self,
        processor: MultimodalProcessor,
        settings: list[GenerationSettings],
        stops: list[list[str]],
        on_delta: OnDelta | None = None,
        cancelled: list[threading.Event] | None = None,
    ):
        self.tokenizer = processor.tokenizer
        self.stop_token_ids = processor.stop_token_ids
        self.stop_ids = set(self.stop_token_ids)
        self.settings, self.stops, self.on_delta = settings, stops, on_delta
        self.cancelled = cancelled or [threading.Event() for _ in settings]
        self.room: list[int | None] = [None] * len(settings)
        """Per row, the tokens its context holds after its prompt (None: not known, no cap)."""
        self.ids: list[list[int]] = [[] for _ in settings]
        self.text = [""] * len(settings)
        self.finish = [""] * len(settings)

    def limit(self, row: int) -> int:
        """The most tokens `row` generates: what its request asked for, capped where its context ends."""
        asked, room = self.settings[row].max_new_tokens, self.room[row]
        return asked if room is None else min(asked, room)

    @property
    def longest(self) -> int:
        """The longest limit of the batch: steps after it decode for nobody."""
        return max(self.limit(row) for row in range(len(self.settings)))

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
            if token in self.stop_ids and not self.settings[row].ignore_eos:
                self.finish[row] = "stop"
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            cut = min((text.find(s) for s in self.stops[row] if s in text), default=-1)
            if cut >= 0:
                text, self.finish[row] = text[:cut], "stop"
            elif len(self.ids[row]) >= self.limit(row):
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
            for row in range(len(self.settings))
        ]
