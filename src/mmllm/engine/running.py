"""A running batch that answers join and leave between decoding steps (iteration-level batching).

A backend that can decode this way hands out a `StepSession`: its engine's KV cache, with rows that
read their prompt (in chunks, images included), then advance one token a step together, each with its
own settings, until each stops. `RunningRows` drives a session: it chooses each row's next token, feeds
the row's `RowTracker`, reads waiting prompts within a per-step token budget, and lets finished rows
go, so the others keep their cache and nobody waits for the slowest row. The server's scheduler
(`scheduler.py`) and the batch decoding of such backends (`decode_all`) both run on it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mmllm.engine.backend import Prompt
from mmllm.engine.logits import LogitShaper, RowShape
from mmllm.engine.prefix_cache import PrefixCache
from mmllm.engine.rows import RowTracker
from mmllm.engine.sampler import choose_tokens, sampling_rng
from mmllm.engine.settings import GenerationSettings

STEP_TOKENS = 512  # tokens one iteration reads or decodes, all rows together (vLLM: max_num_batched_tokens)


class StepSession(Protocol):
    """An engine's running batch, its rows named by the handles `start` returns."""

    max_rows: int
    """Most rows the session holds at once."""
    kv_tokens: int | None
    """Tokens (prompt + answer) all rows may hold together; None where only memory bounds them."""
    context: int
    """Most tokens one row may hold."""

    @property
    def rows_held(self) -> int:
        """Rows started and not stopped yet."""

    prefix_cache: PrefixCache
    """Finished rows' KV kept for later prompts that start alike (off until given a budget)."""

    def start(self, prompt: Prompt) -> tuple[int, int]:
        """Take a row for `prompt` (its images become rows here); returns its handle and how many of
        its prompt's tokens it holds already (from the prefix cache): reading starts there."""

    def read(self, chunks: list[tuple[int, int]]) -> list[np.ndarray | Exception | None]:
        """Each (handle, end): that row reads its prompt up to position `end` (a chunk). Per chunk: the
        (V,) logits after the prompt's last token once the whole prompt is read, else None; or the
        failure that ended this row alone."""

    def step(self, handles: list[int], tokens: list[int]) -> np.ndarray:
        """Append one token to each of these rows (every row whose prompt is read); (R, V) logits."""

    def stop(self, handle: int) -> None:
        """Free the row; its cache goes to the prefix cache where there is one and it read its prompt."""


@dataclass(eq=False)
class Row:
    """One answer in a running batch: row `index` of `tracker`."""

    prompt: Prompt
    tracker: RowTracker
    index: int = 0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    on_first_token: Callable[[], None] | None = None
    handle: int = -1
    read: int = 0  # prompt tokens read so far
    token: int = -1  # the last chosen token, appended at the next step
    failure: Exception | None = None
    shape: RowShape | None = None  # what it does to its logits before sampling (None: nothing)

    @property
    def settings(self) -> GenerationSettings:
        return self.tracker.settings[self.index]

    @property
    def finished(self) -> bool:
        return self.failure is not None or bool(self.tracker.finish[self.index])

    @property
    def reading(self) -> bool:
        """Still reading its prompt."""
        return not self.finished and self.read < len(self.prompt.input_ids)

    @property
    def decoding(self) -> bool:
        """Its prompt read, appending a token a step."""
        return not self.finished and self.read == len(self.prompt.input_ids)

    @property
    def cache_tokens(self) -> int:
        """The cache this row may fill: its prompt and its whole answer."""
        return len(self.prompt.input_ids) + self.tracker.limit(self.index)


class RunningRows:
    """The rows of one `StepSession`; each `iterate` reads waiting prompts (first come, first served,
    within `step_tokens` less one per decoding row) and decodes one token for every row whose prompt is
    read. What finished (a stop, its limit, its client gone, a failure) leaves at once.

    Rows whose settings change their logits (`GenerationSettings.shapes_logits`) have them shaped by
    `shaper`, all of a step's together; the others go straight to the sampler."""

    def __init__(
        self,
        session: StepSession,
        stop_ids: list[int],
        max_rows: int = 16,
        step_tokens: int = STEP_TOKENS,
        shaper: LogitShaper | None = None,
    ):
        self.session, self.stop_ids, self.shaper = session, stop_ids, shaper
        self.max_rows, self.step_tokens = min(max_rows, session.max_rows), step_tokens
        self.rows: list[Row] = []

    def room_for(self, row: Row) -> bool:
        if len(self.rows) >= self.max_rows:
            return False
        kv = self.session.kv_tokens
        return kv is None or not self.rows or sum(r.cache_tokens for r in self.rows) + row.cache_tokens <= kv

    def add(self, row: Row) -> None:
        """Start `row` (its answer ends where the context does); a row that fails to start is
        returned finished by the next `iterate`."""
        row.tracker.room[row.index] = max(1, self.session.context - len(row.prompt.input_ids))
        try:
            if row.settings.shapes_logits:
                if self.shaper is None:
                    raise ValueError("this backend cannot shape logits (logprobs, penalties, grammars)")
                row.shape = self.shaper.state(row.settings)
            row.handle, row.read = self.session.start(row.prompt)
            if self.session.prefix_cache.enabled:
                row.tracker.cached[row.index] = row.read
        except Exception as err:  # this row's images or prompt: it fails alone
            row.failure = err
        self.rows.append(row)

    def iterate(self) -> list[Row]:
        """One step: read prompts, decode a token a row; returns the rows that finished."""
        for row in self.rows:
            if row.tracker.cancelled[row.index].is_set() and not row.finished:
                row.tracker.end(row.index, "cancelled")  # gone before its first token: never decoded
        budget = max(1, self.step_tokens - sum(row.decoding for row in self.rows))
        readers, chunks = [], []
        for row in self.rows:
            if budget <= 0 or not row.reading:
                continue
            end = min(len(row.prompt.input_ids), row.read + budget)
            budget -= end - row.read
            readers.append(row)
            chunks.append((row.handle, end))
        prompts_read, first_logits = [], []
        for row, (_, end), outcome in zip(
            readers, chunks, self.session.read(chunks) if chunks else [], strict=True
        ):
            if isinstance(outcome, Exception):
                row.failure = outcome
                continue
            row.read = end
            if outcome is not None:
                prompts_read.append(row)
                first_logits.append(outcome)
        if prompts_read:
            self._choose(prompts_read, np.stack(first_logits))
            for row in prompts_read:
                if row.on_first_token:
                    row.on_first_token()
        finished = self._release()  # the session steps every row it holds: the finished go first
        decoding = [row for row in self.rows if row.decoding]
        if decoding:
            try:
                logits = self.session.step([row.handle for row in decoding], [row.token for row in decoding])
            except Exception as err:  # the shared step failed: every row in it fails
                for row in decoding:
                    row.failure = err
            else:
                self._choose(decoding, logits)
        return finished + self._release()

    def fail_all(self, err: Exception) -> list[Row]:
        """End every row with `err`; returns them."""
        for row in self.rows:
            row.failure = err
        return self._release()

    def _release(self) -> list[Row]:
        finished = [row for row in self.rows if row.finished]
        for row in finished:
            if row.handle >= 0:
                self.session.stop(row.handle)
            self.rows.remove(row)
        return finished

    def _choose(self, rows: list[Row], logits: np.ndarray) -> None:
        """Each row's next token from its (V,) row of the (R, V) `logits`, handed to its tracker."""
        shaped = [index for index, row in enumerate(rows) if row.shape is not None]
        if shaped:
            states = [rows[index].shape for index in shaped]
            part = logits[shaped]  # a copy (the sessions' logits are this step's own arrays)
            self.shaper.shape(states, part)
            logits[shaped] = part
        for index, row in enumerate(rows):
            seen = None
            if row.settings.repetition_penalty != 1.0:
                seen = [row.prompt.input_ids + row.tracker.ids[row.index]]
            row.token = int(choose_tokens(logits[index, None], row.settings, row.rng, self.stop_ids, seen)[0])
        if shaped:
            self.shaper.advance(states, [rows[index].token for index in shaped])
        for row in rows:
            logprob = row.shape.logprob if row.shape is not None else None
            row.tracker.step([row.token], [row.index], None if logprob is None else [logprob])


def decode_all(
    session: StepSession,
    prompts: list[Prompt],
    settings: GenerationSettings,
    rows: RowTracker,
    shaper: LogitShaper | None = None,
) -> list[int]:
    """A backend's `decode` over its session: the batch's rows join as room frees up, in order, and
    each leaves when it is done; returns each prompt's token count."""
    rng = sampling_rng(settings.seed)
    running = RunningRows(session, rows.stop_token_ids, max_rows=session.max_rows, shaper=shaper)
    waiting = deque(Row(prompt, rows, index, rng) for index, prompt in enumerate(prompts))
    try:
        while waiting or running.rows:
            while waiting and running.room_for(waiting[0]):
                running.add(waiting.popleft())
            for row in running.iterate():
                if row.failure is not None:
                    raise row.failure
    finally:  # a failed batch leaves nothing behind in the session
        for row in running.rows:
            if row.handle >= 0:
                session.stop(row.handle)
    return [len(prompt.input_ids) for prompt in prompts]


def read_each(read_one: Callable[[int, int], np.ndarray | None], chunks: list[tuple[int, int]]) -> list:
    """`StepSession.read` for an engine that reads one row's chunk a pass: `read_one(handle, end)`."""
    outcomes = []
    for handle, end in chunks:
        try:
            outcomes.append(read_one(handle, end))
        except Exception as err:  # this row's prompt: it fails alone
            outcomes.append(err)
    return outcomes
