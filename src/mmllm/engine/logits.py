"""What rows do to their logits before sampling, beyond temperature, top-k and top-p: `logit_bias`,
presence and frequency penalties, `min_tokens`, a grammar (constrained decoding with llguidance), and
recording log-probabilities (`logprobs`).

`LogitShaper` works on a whole step at once: the rows that ask for none of these are never touched
(`GenerationSettings.shapes_logits`), the grammar masks of every constrained row come from one call
into llguidance's thread pool, and each is applied to its row as numpy array operations. Each row's
own state (its token counts, its grammar's matcher) is a `RowShape`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mmllm.engine.settings import GenerationSettings

if TYPE_CHECKING:
    from llguidance import LLExecutor, LLMatcher, LLTokenizer

    from mmllm.processor import MultimodalProcessor


@dataclass
class TokenLogprob:
    """One generated token's log-probability, and the likeliest tokens' at its step (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class RowShape:
    """One row's state for `LogitShaper`: its settings as arrays, its counts, its grammar's matcher."""

    settings: GenerationSettings
    bias_ids: np.ndarray | None = None
    bias_values: np.ndarray | None = None
    counts: dict[int, int] = field(default_factory=dict)
    """Each token the answer holds, and how many times (for the presence and frequency penalties)."""
    generated: int = 0
    matcher: LLMatcher | None = None
    scores: np.ndarray | None = None
    """This step's shaped (V,) logits and their log-normaliser, while the row records log-probabilities."""
    log_total: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)
    logprob: TokenLogprob | None = None
    """The last chosen token's log-probabilities (when the row asked for them)."""

    @property
    def penalised(self) -> bool:
        return bool(self.settings.presence_penalty or self.settings.frequency_penalty)


def grammar_error(grammar: str, tokenizer: LLTokenizer) -> str:
    """Why llguidance cannot compile `grammar` for this vocabulary ("" when it can)."""
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(grammar, tokenizer)


class LogitShaper:
    """The logit processing of one backend's rows. `width` is the logits' width (the LM's output size,
    which may differ from the tokenizer's count both ways: padded past it, or short of tokens added to
    the tokenizer only, such as the image placeholder). The llguidance vocabulary is built the first
    time a grammar or a token's bytes are asked for (about a second for a 150k vocabulary)."""

    def __init__(self, processor: MultimodalProcessor, width: int):
        self.processor, self.width = processor, width
        self.stop_ids = np.array(processor.stop_token_ids)
        # Tokens no answer may hold, whatever a grammar allows: the image placeholder, and padding
        # unless it is also a stop token.
        never = {processor.image_token_id, processor.tokenizer.pad_token_id} - set(processor.stop_token_ids)
        self.never = np.array(sorted(t for t in never if t is not None and t < width), dtype=np.int64)
        self._lock = threading.Lock()
        self._tokenizer: LLTokenizer | None = None
        self._executor: LLExecutor | None = None

    @property
    def tokenizer(self) -> LLTokenizer:
        """The vocabulary as llguidance reads it (built once, by whichever thread asks first)."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    import llguidance
                    import llguidance.hf
                except ImportError:
                    raise ValueError(
                        "structured outputs and tools need llguidance (the `serve` extra: pip install "
                        "-e '.[serve]' in mmllm's checkout)"
                    ) from None
                tokenizer = self.processor.tokenizer
                self._tokenizer = llguidance.hf.from_tokenizer(
                    tokenizer,
                    n_vocab=max(len(tokenizer), self.width),
                    eos_token=self.processor.stop_token_ids,
                )
                self._executor = llguidance.LLExecutor()
            return self._tokenizer

    def token_bytes(self, token: int) -> bytes:
        """The bytes `token` stands for (a special token: its name)."""
        raw = self.tokenizer.decode_bytes([token])
        return raw[1:] if self.tokenizer.is_special_token(token) and raw[:1] == b"\xff" else raw

    def check(self, settings: GenerationSettings) -> None:
        """ValueError for token ids outside the logits (the message starts with the setting's name)."""
        for name, tokens in (
            ("logit_bias", settings.logit_bias or {}),
            ("stop_token_ids", settings.stop_token_ids),
        ):
            if not all(0 <= token < self.width for token in tokens):
                raise ValueError(f"{name} names tokens outside the vocabulary (0 to {self.width - 1})")

    def state(self, settings: GenerationSettings) -> RowShape | None:
        """A row's state, or None for a row whose logits go to the sampler untouched (the fast path)."""
        if not settings.shapes_logits:
            return None
        self.check(settings)
        shape = RowShape(settings)
        if bias := {token: value for token, value in (settings.logit_bias or {}).items() if value}:
            shape.bias_ids = np.array(list(bias), dtype=np.int64)
            shape.bias_values = np.array(list(bias.values()), dtype=np.float32)
        if settings.grammar is not None:
            from llguidance import LLMatcher

            shape.matcher = LLMatcher(self.tokenizer, settings.grammar, log_level=0)
            if shape.matcher.is_error():
                raise ValueError(f"grammar: {shape.matcher.get_error()}")
        return shape

    def shape(self, states: list[RowShape], logits: np.ndarray) -> None:
        """(R, V) logits of rows with these states, in place: biased, penalised, masked by their
        grammars (one batched llguidance call); the rows that record log-probabilities take them from
        here (before temperature, top-k, top-p)."""
        for row, state in enumerate(states):
            if state.bias_ids is not None:
                logits[row, state.bias_ids] += state.bias_values
            if state.penalised and state.counts:
                ids = np.fromiter(state.counts, dtype=np.int64, count=len(state.counts))
                counts = np.fromiter(state.counts.values(), dtype=np.float32, count=len(state.counts))
                settings = state.settings
                logits[row, ids] -= settings.frequency_penalty * counts + settings.presence_penalty
            if state.generated < state.settings.min_tokens:
                logits[row, self.stop_ids] = -np.inf
                logits[row, list(state.settings.stop_token_ids)] = -np.inf
        constrained = [row for row, state in enumerate(states) if state.matcher is not None]
        if constrained:
            self._mask(logits, constrained, [states[row].matcher for row in constrained])
        # A row every token of which is banned (a grammar that has ended while `min_tokens` bans the
        # stop tokens) ends rather than sample from nothing.
        dead = ~np.isfinite(logits.max(-1))
        if dead.any():
            logits[np.ix_(dead.nonzero()[0], self.stop_ids)] = 0.0
        for row, state in enumerate(states):
            if state.settings.logprobs is not None:
                state.scores = logits[row]
                state.log_total, state.top = log_softmax_top(logits[row], state.settings.logprobs)

    def _mask(self, logits: np.ndarray, rows: list[int], matchers: list[LLMatcher]) -> None:
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

        vocabulary = self.tokenizer.vocab_size
        bitmask = allocate_token_bitmask(len(rows), vocabulary)
        fill_next_token_bitmask_par(
            self._executor, list(zip(matchers, range(len(rows)), strict=True)), bitmask
        )
        # Bit t of each row's words: token t is allowed; tokens past the vocabulary never are.
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : self.width]
        if allowed.shape[1] < self.width:
            allowed = np.pad(allowed, ((0, 0), (0, self.width - allowed.shape[1])))
        allowed[:, self.never] = 0
        for index, row in enumerate(rows):
            np.putmask(logits[row], allowed[index] == 0, -np.inf)

    def advance(self, states: list[RowShape], tokens: list[int]) -> None:
        """Each row chose its token: count it, feed it to the row's grammar (one batched call), and
        complete its log-probability record."""
        matched = []
        for state, token in zip(states, tokens, strict=True):
            state.generated += 1
            if state.penalised:
                state.counts[token] = state.counts.get(token, 0) + 1
            if state.matcher is not None:
                matched.append((state.matcher, token))
            if state.scores is not None:
                logprob = float(state.scores[token] - state.log_total)
                state.logprob, state.scores = TokenLogprob(token, logprob, state.top), None
        if matched:
            self._executor.consume_token_par(matched)


def log_softmax_top(row: np.ndarray, k: int) -> tuple[float, list[tuple[int, float]]]:
    """A (V,) row's log-normaliser (its logsumexp) and its `k` likeliest tokens as (id, logprob),
    likeliest first."""
    top = row.max()
    log_total = float(top + np.log(np.exp(row - top, dtype=np.float64).sum()))
    ids = np.argpartition(-row, k)[:k] if k < row.shape[0] else np.arange(row.shape[0])
    ids = ids[np.argsort(-row[ids], kind="stable")]
    return log_total, [(int(t), float(row[t] - log_total)) for t in ids]
