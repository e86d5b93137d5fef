"""How answers are decoded: `GenerationSettings`, checked when made, and the default caption prompt.

Light on purpose (no torch, transformers or numpy): the CLI reads and checks settings before any
engine loads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load only where the torch backend runs
    from transformers import GenerationConfig

    from mmllm.processor import MultimodalProcessor

CAPTION_PROMPT = "Describe this image briefly."
MAX_TEMPERATURE = 100.0
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
PER_ROW = ("max_new_tokens",)
"""The settings each row of a batch keeps for itself; rows share all the others (`batch_key`)."""


@dataclass
class GenerationSettings:
    """How answers are decoded."""

    max_new_tokens: int = 128
    """Most tokens to generate per answer: a request's token limit, wherever it travels."""
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
    min_p: float = 0.0
    """Sample only from tokens at least this fraction as likely as the likeliest (0: off)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the answer already holds (OpenAI's, -2 to 2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the answer already holds it (OpenAI's, -2 to 2)."""
    logit_bias: dict[int, float] | None = None
    """Added to these tokens' logits before sampling (-100 to 100: a ban to a certainty)."""
    min_tokens: int = 0
    """The answer's stop tokens are banned until it holds this many tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the answer besides the model's own end of turn."""
    logprobs: int | None = None
    """Record each generated token's log-probability and the `logprobs` likeliest tokens' (None: off)."""
    grammar: str | None = None
    """An llguidance grammar (from JSON schema, Lark, ...) every answer must follow (None: free text)."""

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
                (not 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                (not -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                (not -2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
                (
                    any(not -100 <= bias <= 100 for bias in (self.logit_bias or {}).values()),
                    "logit_bias values must be in [-100, 100]",
                ),
                (self.min_tokens < 0, "min_tokens must be 0 or more"),
                (
                    self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS,
                    f"logprobs must be in [0, {MAX_LOGPROBS}]",
                ),
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

    @property
    def shapes_logits(self) -> bool:
        """Whether the answer's logits change before sampling (bias, penalties, a grammar, `min_tokens`)
        or are recorded (`logprobs`): rows that do none of these take the sampler's plain path."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or any((self.logit_bias or {}).values())
            or self.min_tokens
            or self.logprobs is not None
            or self.grammar is not None
        )

    def batch_key(self) -> tuple:
        """What rows must agree on to decode in one batch: every setting but the per-row ones, by name."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in PER_ROW)

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
