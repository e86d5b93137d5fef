"""Per-row stopping: `RowTracker` follows each answer of a batch token by token, so an answer ends the
same way (end of turn, stop string, token limit, client gone) whichever backend made it, and its
stream and its final text agree."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmllm.engine.settings import GenerationSettings

if TYPE_CHECKING:
    from mmllm.engine.logits import TokenLogprob
    from mmllm.processor import MultimodalProcessor

OnDelta = Callable[[int, str], None]
"""`on_delta(row, text)`: a row's new text, as it is decoded (never empty); a row's pieces joined are
its `Completion.text`. For a row that records log-probabilities each piece is a `Piece`."""


class Piece(str):
    """A piece of a row's text with the log-probabilities of the tokens it begins (`logprobs`)."""

    logprobs: list[TokenLogprob]


@dataclass
class Completion:
    """One answer with the counts an API reports."""

    text: str  # as generated (unstripped), cut before the stop string generated first
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string), "length", or "cancelled" (client left)
    logprobs: list[TokenLogprob] | None = None
    """Per token of `text` (where the row recorded them): each token whose text begins in the answer
    returned, so a stop string's tokens, cut off, have none."""
    cached_tokens: int | None = None
    """Prompt tokens read from the prefix cache (None: the prefix cache was off)."""


class RowTracker:
    """Follows each row of a batch as it grows by one token a step: decodes its text, applies its own
    token limit (`limit`) and stop strings, ends it when its client cancels, and hands new text to
    `on_delta`.

    Each row's limit is its own settings' `max_new_tokens`, capped where its context ends (`room`,
    once a running batch knows it); every backend's decoding loop feeds the tracker.

    Text is decoded incrementally (as vLLM and transformers' `TextStreamer` do): each step decodes the
    row's last few tokens only, and text ending in half a multi-byte character waits for the rest.
    Text that could be the beginning of a stop string is held back until it is known not to be; once
    the row ends (any reason), what is held is handed on. So a row's pieces joined are its final text
    exactly, streamed or not. A row's token log-probabilities (when its settings record them) go out
    with the piece that holds the beginning of each token's text, so they follow the same hold-back.
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
        self.settings, self.on_delta = settings, on_delta
        self.stops = [[s for s in row if s] for row in stops]  # an empty string stops nothing
        self.cancelled = cancelled or [threading.Event() for _ in settings]
        self.room: list[int | None] = [None] * len(settings)
        """Per row, the tokens its context holds after its prompt (None: not known, no cap)."""
        self.cached: list[int | None] = [None] * len(settings)
        """Per row, its prompt tokens the prefix cache held (None: no prefix cache looked)."""
        rows = range(len(settings))
        self.ids: list[list[int]] = [[] for _ in rows]
        self.text = [""] * len(settings)
        """Per row, its text decoded so far (cut before a stop string once one is seen)."""
        self.sent = [0] * len(settings)
        """Per row, how much of its text went to `on_delta`: the rest is held back."""
        self.finish = [""] * len(settings)
        self.closed = [False] * len(settings)
        """Per row, whether it ended and all its text went out."""
        self._prefix = [0] * len(settings)  # incremental decoding: the window decoded for context ...
        self._read = [0] * len(settings)  # ... and where its text already decoded ends
        self.row_stop_ids = [self.stop_ids | set(row.stop_token_ids) for row in settings]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in rows]
        self._starts: list[list[int]] = [[] for _ in rows]  # where each token's text begins
        self._handed = [0] * len(settings)  # log-probabilities already handed on with a piece
        self._stopped = [False] * len(settings)  # whether a stop string cut the row's text

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

    def step(
        self, tokens: list[int], rows: list[int] | None = None, logprobs: list[TokenLogprob] | None = None
    ) -> None:
        """One new token per row, or per row of `rows` when a backend decodes a batch's rows in groups
        (rows already finished ignore theirs), with its log-probabilities where the row records them."""
        for at, (row, token) in enumerate(zip(rows or range(len(tokens)), tokens, strict=True)):
            if self.cancelled[row].is_set() and not self.finish[row]:
                self.end(row, "cancelled")  # the client went away: its row stops costing compute
            if self.finish[row]:
                continue
            if token in self.row_stop_ids[row] and not self.settings[row].ignore_eos:
                self.end(row, "stop")
                continue
            if logprobs is not None:
                self.logprobs[row].append(logprobs[at])
                self._starts[row].append(len(self.text[row]))
            self.ids[row].append(token)
            last = len(self.ids[row]) >= self.limit(row)
            if self._advance(row, final=last):
                self.finish[row], self.closed[row] = "stop", True
            elif last:
                self.finish[row], self.closed[row] = "length", True

    def end(self, row: int, reason: str) -> None:
        """End `row` for `reason` (kept if it already ended): the text it held back goes out, cut
        before a stop string should the last characters complete one."""
        if self.closed[row]:
            return
        self.finish[row] = self.finish[row] or reason
        if self._advance(row, final=True) and self.finish[row] != "cancelled":
            self.finish[row] = "stop"
        self.closed[row] = True

    def completions(self, prompt_tokens: list[int]) -> list[Completion]:
        """Each row's answer; rows not ended yet end here ("stop")."""
        for row in range(len(self.settings)):
            self.end(row, "stop")
        return [
            Completion(
                self.text[row],
                prompt_tokens[row],
                len(self.ids[row]),
                self.finish[row],
                self._kept_logprobs(row) if self.settings[row].logprobs is not None else None,
                self.cached[row],
            )
            for row in range(len(self.settings))
        ]

    def _kept_logprobs(self, row: int) -> list[TokenLogprob]:
        """The row's log-probabilities but those of tokens cut off with a stop string."""
        if self._stopped[row]:
            end = len(self.text[row])
            return [
                lp for lp, start in zip(self.logprobs[row], self._starts[row], strict=True) if start < end
            ]
        return self.logprobs[row]

    def _decode(self, row: int, final: bool) -> str:
        """The row's text from its tokens since the last call: the last few tokens are decoded with
        some before them for context (a tokenizer may drop or merge spaces at a window's start)."""
        ids, prefix, read = self.ids[row], self._prefix[row], self._read[row]
        if read == len(ids):
            return ""
        before = self.tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[prefix:], skip_special_tokens=True)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""  # nothing yet, or half of a multi-byte character: wait for the rest
        self._prefix[row], self._read[row] = read, len(ids)
        return after[len(before) :]

    def _advance(self, row: int, final: bool) -> bool:
        """Decode the row's new tokens and hand on the text no stop string could begin with (all of it
        when `final`), up to the first stop string; returns whether one was found."""
        text = self.text[row] + self._decode(row, final)
        sent, stops = self.sent[row], self.stops[row]
        # Text handed on holds no stop string nor any stop string's beginning at its end, so a stop
        # string can only start in what is held back.
        found = [at for stop in stops if (at := text.find(stop, sent)) >= 0]
        if found:
            text = text[: min(found)]
            end = len(text)
        elif final:
            end = len(text)
        else:
            end = len(text) - self._held(text, sent, stops)
        self.text[row] = text
        if found:
            self._stopped[row] = True
        if end > sent:
            self.sent[row] = end
            if self.on_delta:
                self.on_delta(row, self._piece(row, text[sent:end], end))
        return bool(found)

    def _piece(self, row: int, text: str, end: int) -> str:
        """`text`, handed on up to `end`: with the log-probabilities of the tokens beginning before
        `end` that no piece carried yet, where the row records them."""
        if self.settings[row].logprobs is None:
            return text
        starts, handed = self._starts[row], self._handed[row]
        upto = handed
        while upto < len(starts) and starts[upto] < end:
            upto += 1
        piece = Piece(text)
        piece.logprobs = self.logprobs[row][handed:upto]
        self._handed[row] = upto
        return piece

    @staticmethod
    def _held(text: str, sent: int, stops: list[str]) -> int:
        """The length of the longest end of `text` (after `sent`) that begins some stop string."""
        longest = min(len(text) - sent, max((len(stop) - 1 for stop in stops), default=0))
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in stops):
                return size
        return 0
