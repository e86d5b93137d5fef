"""Choosing the next token outside transformers: what the running batch, the ONNX and the llama.cpp
backends decode with (greedy, or temperature/top-k/min-p/top-p sampling, repetition penalty,
`ignore_eos`); what a row does to its logits before (bias, penalties, grammars) is `logits.py`'s."""

from __future__ import annotations

import numpy as np

from mmllm.engine.settings import GenerationSettings


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
        # In float64: a penalty as small as 1e-300 is 0 in float32, and -inf * 0 (a stop token that
        # `ignore_eos` banned) is NaN. What overflows becomes +-inf, which the sampling below takes.
        scores = logits[row, tokens].astype(np.float64)
        penalty = settings.repetition_penalty
        with np.errstate(over="ignore"):
            logits[row, tokens] = np.where(scores < 0, scores * penalty, scores / penalty)
    if not settings.sampling:
        return logits.argmax(-1)
    scaled = logits / settings.temperature
    if top_k := min(settings.top_k, scaled.shape[-1]):  # a top_k past the vocabulary keeps it all
        kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    # The likeliest token weighs 1; where a penalty overflowed to +inf, the +inf tokens share the mass
    # (inf - inf would be NaN).
    top = scaled.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        probs = np.where(scaled == top, 1.0, np.exp(scaled - top)).astype(scaled.dtype)
    probs /= probs.sum(-1, keepdims=True)
    if settings.min_p > 0:  # as vLLM: relative to the likeliest token, after the temperature
        probs = np.where(probs < settings.min_p * probs.max(-1, keepdims=True), 0, probs)
        probs /= probs.sum(-1, keepdims=True)
    if settings.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        # The mass before each token, in float64: numpy 2 would compare float32 probabilities with top_p
        # cast to float32, where a top_p below 1e-45 is 0 and no token at all would be kept (NaN).
        keep = (sorted_probs.cumsum(-1) - sorted_probs).astype(np.float64) < settings.top_p
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, np.where(keep, sorted_probs, 0), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
