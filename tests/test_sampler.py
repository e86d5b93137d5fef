"""`choose_tokens`, the sampler every session outside transformers uses, on hand-made logits:
temperature, top-k, top-p, seeds, `ignore_eos` and the repetition penalty each do what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from mmllm.engine.sampler import choose_tokens, sampling_rng
from mmllm.engine.settings import GenerationSettings

DRAWS = 4000
LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])  # distinct: a clear order


def draw(logits: np.ndarray, n: int = DRAWS, seed: int = 0, **settings) -> np.ndarray:
    """n tokens drawn from one row of float32 logits (what the sessions pass) in one call: n identical
    rows, one generator."""
    rows = np.tile(np.asarray(logits, dtype=np.float32), (n, 1))
    return choose_tokens(rows, GenerationSettings(**settings), sampling_rng(seed), stop_ids=[])


def frequencies(tokens: np.ndarray, vocab: int) -> np.ndarray:
    return np.bincount(tokens, minlength=vocab) / len(tokens)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_zero_is_the_argmax_of_every_row():
    logits = np.random.default_rng(0).normal(size=(16, 50))
    chosen = choose_tokens(logits, GenerationSettings(), sampling_rng(1), stop_ids=[])
    assert chosen.tolist() == logits.argmax(-1).tolist()
    # At temperature 0, top-k, top-p and the seed change nothing: still the argmax.
    greedy = GenerationSettings(top_k=3, top_p=0.5, seed=5)
    assert choose_tokens(logits, greedy, sampling_rng(5), []).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_sampled_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    tokens = draw(LOGITS, temperature=temperature)
    expected = softmax(LOGITS / temperature)
    # 4,000 draws: a frequency's standard error is at most 0.008; 0.03 is ~4 of them.
    np.testing.assert_allclose(frequencies(tokens, len(LOGITS)), expected, atol=0.03)


def test_low_temperature_concentrates_and_high_temperature_flattens():
    top = [frequencies(draw(LOGITS, temperature=t), len(LOGITS))[0] for t in (0.25, 1.0, 4.0)]
    assert top[0] > 0.95 > top[1] > top[2]  # softmax at T: 0.98, 0.56, 0.22
    flat = frequencies(draw(LOGITS, temperature=100.0), len(LOGITS))
    assert flat.min() > 0.09  # near uniform (1/8 each) at the highest temperature allowed


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_draws_only_and_every_one_of_the_k_largest(k):
    logits = np.random.default_rng(k).normal(size=40)
    largest = set(np.argsort(-logits)[:k].tolist())
    tokens = draw(logits, n=2000, temperature=50.0, top_k=k)  # high T: nearly uniform over the k
    assert set(tokens.tolist()) == largest


def test_top_k_renormalises_the_kept_tokens_as_a_softmax():
    tokens = draw(LOGITS, temperature=1.0, top_k=3)
    expected = np.zeros(len(LOGITS))
    expected[:3] = softmax(LOGITS[:3])
    np.testing.assert_allclose(frequencies(tokens, len(LOGITS)), expected, atol=0.03)


def test_top_k_one_at_a_high_temperature_is_greedy():
    logits = np.random.default_rng(2).normal(size=(64, 100))
    chosen = choose_tokens(logits, GenerationSettings(temperature=100.0, top_k=1), sampling_rng(0), [])
    assert chosen.tolist() == logits.argmax(-1).tolist()


# probabilities 0.4, 0.3, 0.2, 0.1: cumulative 0.4, 0.7, 0.9, 1.0
NUCLEUS = np.log(np.array([0.4, 0.3, 0.2, 0.1]))


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.39, {0}),
        (0.41, {0, 1}),  # 0.4 alone falls short of 0.41: the token that crosses p is kept
        (0.69, {0, 1}),
        (0.71, {0, 1, 2}),  # the boundary: 0.7 does not reach 0.71, so the third token joins
        (0.89, {0, 1, 2}),
        (0.91, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(top_p, kept):
    tokens = draw(NUCLEUS, n=3000, temperature=1.0, top_p=top_p)
    assert set(tokens.tolist()) == kept
    # ... and samples within it in proportion to the probabilities, renormalised.
    expected = np.zeros(4)
    members = sorted(kept)
    expected[members] = np.exp(NUCLEUS[members]) / np.exp(NUCLEUS[members]).sum()
    np.testing.assert_allclose(frequencies(tokens, 4), expected, atol=0.03)


@pytest.mark.parametrize(
    "dtype",
    [
        np.float64,
        np.float32,  # float32 compared with top_p cast to float32 kept nothing below 1e-45: NaN
    ],
)
def test_a_tiny_top_p_keeps_only_the_top_token(dtype):
    """top_p=1e-300 is a valid setting: the nucleus is the top token alone, for the float32 logits
    every session passes too."""
    logits = (np.random.default_rng(3).normal(size=(32, 200)) * 5).astype(dtype)
    settings = GenerationSettings(temperature=2.0, top_p=1e-300)
    chosen = choose_tokens(logits, settings, sampling_rng(0), [])
    assert chosen.tolist() == logits.argmax(-1).tolist()


def test_top_p_with_a_top_probability_that_underflows_the_rest():
    """One dominant logit: every other probability is 0 after exp; sampling stays finite and greedy."""
    logits = np.array([[0.0, 2000.0, -5.0, 3.0]])
    for top_p in (1e-300, 0.5, 1.0):
        settings = GenerationSettings(temperature=1.0, top_p=top_p, top_k=2)
        assert choose_tokens(logits, settings, sampling_rng(0), []).tolist() == [1]


def test_the_same_seed_gives_the_same_sequence_and_other_seeds_other_ones():
    sequences = {seed: tuple(draw(LOGITS, n=30, seed=seed, temperature=2.0)) for seed in range(6)}
    assert tuple(draw(LOGITS, n=30, seed=3, temperature=2.0)) == sequences[3]
    assert len(set(sequences.values())) == 6
    # None draws from fresh OS entropy: two unseeded runs differ (30 draws over 8 tokens).
    assert tuple(draw(LOGITS, n=30, seed=None, temperature=2.0)) != tuple(
        draw(LOGITS, n=30, seed=None, temperature=2.0)
    )


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63, 2**64 - 1])
def test_negative_and_large_seeds_name_reproducible_generators(seed):
    first = draw(LOGITS, n=30, seed=seed, temperature=2.0)
    assert first.tolist() == draw(LOGITS, n=30, seed=seed, temperature=2.0).tolist()
    # A seed names numpy's generator for seed mod 2**64, as torch.manual_seed reads a negative seed:
    # -1 is 2**64 - 1 (not 1), -2**63 is 2**63 (the one seed both readings agree on).
    assert sampling_rng(seed).integers(2**62) == np.random.default_rng(seed % 2**64).integers(2**62)
    if -(2**63) < seed < 0:
        assert sampling_rng(seed).integers(2**62) != sampling_rng(-seed).integers(2**62)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 100.0])
def test_ignore_eos_never_picks_a_stop_id(temperature):
    logits = np.zeros((500, 6))
    logits[:, [2, 4]] = 10.0  # the stop ids are by far the likeliest
    settings = GenerationSettings(temperature=temperature, ignore_eos=True)
    chosen = choose_tokens(logits, settings, sampling_rng(0), stop_ids=[2, 4])
    assert not set(chosen.tolist()) & {2, 4}
    if temperature >= 1:  # and the rest are still sampled
        assert set(chosen.tolist()) == {0, 1, 3, 5}
    # Without ignore_eos the same call picks them: the stop ids are otherwise left alone.
    plain = choose_tokens(logits, GenerationSettings(temperature=temperature), sampling_rng(0), [2, 4])
    assert np.isin(plain, [2, 4]).mean() > (0.99 if temperature <= 1 else 0.2)
    assert logits[0, 2] == 10.0  # the caller's logits are not written to


@pytest.mark.parametrize("penalty", [0.5, 1.3, 3.0])
def test_repetition_penalty_matches_transformers_processor(penalty):
    """Rows of positive, negative and mixed scores, each with its own `seen` tokens (repeats, and a
    placeholder id past the vocabulary): greedy picks the argmax of transformers' penalised scores,
    and sampling at T=1 follows their softmax."""
    rng = np.random.default_rng(4)
    vocab, rows = 10, 3000
    logits = rng.normal(size=(rows, vocab)) * 2 + rng.choice([-6.0, 0.0, 6.0], size=(rows, 1))
    seen = [[*rng.integers(0, vocab, size=rng.integers(1, 8)).tolist(), vocab + 3] for _ in range(rows)]
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    reference = np.stack(
        [
            processor(torch.tensor([[t for t in ids if t < vocab]]), torch.tensor(logits[[row]]))[0].numpy()
            for row, ids in enumerate(seen)
        ]
    )
    winners = reference.argmax(-1)
    assert (winners != logits.argmax(-1)).mean() > 0.1  # the penalty changes many rows' winner
    settings = GenerationSettings(repetition_penalty=penalty)
    greedy = choose_tokens(logits, settings, sampling_rng(0), [], seen=seen)
    assert greedy.tolist() == winners.tolist()

    # One row, sampled: the whole penalised distribution, not only its top.
    row = np.array([1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
    ids = [0, 0, 3, 4]
    penalised = processor(torch.tensor([ids]), torch.tensor(row[None]))[0].numpy()
    sampled = GenerationSettings(temperature=1.0, repetition_penalty=penalty)
    tokens = choose_tokens(np.tile(row, (DRAWS, 1)), sampled, sampling_rng(1), [], seen=[ids] * DRAWS)
    np.testing.assert_allclose(frequencies(tokens, len(row)), softmax(penalised), atol=0.03)


def test_a_top_k_past_the_vocabulary_keeps_every_token():
    """top_k larger than the vocabulary (the API puts no upper bound on it) was an IndexError."""
    for top_k in (len(LOGITS), len(LOGITS) + 1, 10**30):
        tokens = draw(LOGITS, temperature=1.0, top_k=top_k)
        np.testing.assert_allclose(frequencies(tokens, len(LOGITS)), softmax(LOGITS), atol=0.03)


@pytest.mark.parametrize("penalty", [1e-300, 5e-324])
def test_a_tiny_repetition_penalty_gives_no_nan(penalty):
    """A penalty that is 0 in float32 made -inf * 0 = NaN (a stop token banned by ignore_eos, seen in
    the prompt), and one that overflows positive logits to +inf made inf - inf = NaN when sampling: the
    seen tokens whose logit is +inf share the draws; greedy decoding takes the first of them."""
    logits = np.tile(LOGITS.astype(np.float32), (64, 1))
    seen = [[0, 1, 3, 6]] * 64  # 0 and 1 have positive logits: divided by ~0, +inf; 3 (a stop id) is banned
    for temperature in (0.0, 1.0):
        settings = GenerationSettings(temperature=temperature, repetition_penalty=penalty, ignore_eos=True)
        chosen = choose_tokens(logits, settings, sampling_rng(0), stop_ids=[3], seen=seen)
        assert set(chosen.tolist()) <= {0, 1} and (temperature or set(chosen.tolist()) == {0})
    assert set(chosen.tolist()) == {0, 1}  # sampled: both +inf tokens drawn
