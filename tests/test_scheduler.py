"""The continuous scheduler on the torch backend: answers alike alone or in a busy batch, per-row
settings, rows that leave (done, cancelled, failed) without disturbing the others."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from conftest import generate_texts, make_tiny, run_jobs
from mmllm.engine.scheduler import Scheduler, request_queue
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline

LIMITS = [3, 40, 7, 25, 1, 33, 12]


@pytest.fixture(scope="module", params=["qwen2", "llama", "llama-static"])
def pipeline(request):
    """The eager session over a dynamic cache, and (llama-static) the static-cache one, its passes
    traced by torch.compile (the "eager" backend: the graphs dynamo captures, run uncompiled)."""
    kind, _, static = request.param.partition("-")
    model, processor = make_tiny(kind, feature_mode="patch", lm_init_std=0.3)
    return Pipeline(model, processor, compiler="eager" if static else None)


@pytest.fixture(scope="module")
def prompts(pipeline):
    """Prompts of different lengths, every other one with an image (placeholders mid-prompt)."""
    colours = ["red", "blue", "green"]
    out = []
    for n in range(len(LIMITS)):
        image = [Image.new("RGB", (40, 30), colours[n % 3])] if n % 2 else []
        question = [{"role": "user", "content": f"Question {'word ' * (3 * n)}{n}?"}]
        out.append(pipeline.prepare(question, image))
    return out


def greedy(limit: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=limit, ignore_eos=True)


def test_answers_are_the_same_alone_or_joining_a_busy_batch(pipeline, prompts):
    # Three rows at a time and 16 tokens a step: later rows join while others run (their prompts read
    # in chunks between steps, longer and shorter than the batch), and rows leave at their own limits.
    alone = [generate_texts(pipeline, [p], greedy(n))[0] for p, n in zip(prompts, LIMITS, strict=True)]
    queue = Scheduler(pipeline, max_rows=3, step_tokens=16)
    busy = run_jobs(queue, [(p, greedy(n)) for p, n in zip(prompts, LIMITS, strict=True)])
    assert [c.text for c in busy] == alone
    assert [c.completion_tokens for c in busy] == LIMITS
    assert [c.prompt_tokens for c in busy] == [len(p.input_ids) for p in prompts]
    session = pipeline.session
    assert not session.rows_held  # nothing left behind
    queue.close()


def test_rows_keep_their_own_settings_in_one_batch(pipeline, prompts):
    sampled = GenerationSettings(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    penalised = GenerationSettings(max_new_tokens=20, repetition_penalty=1.5, ignore_eos=True)
    items = [(prompts[1], sampled), (prompts[2], greedy(15)), (prompts[3], penalised), (prompts[0], sampled)]
    queue = Scheduler(pipeline, max_rows=8)
    together = run_jobs(queue, items)
    apart = [run_jobs(queue, [item])[0] for item in items]
    assert [c.text for c in together] == [c.text for c in apart]  # a seed gives one answer, batched or not
    assert together[1].text == generate_texts(pipeline, [prompts[2]], greedy(15))[0]
    # The repetition penalty as transformers applies it; and it changes this answer, so it was applied.
    assert together[2].text == generate_texts(pipeline, [prompts[3]], penalised)[0]
    assert together[2].text != generate_texts(pipeline, [prompts[3]], greedy(20))[0]
    queue.close()


def test_sampled_rows_follow_their_temperature_top_k_top_p_and_seed(pipeline, prompts):
    """Rows sampled in one batch: a seed gives one answer, other seeds other ones, and top_k=1, a tiny
    top_p or a tiny temperature bring a hot row back to the greedy answer."""

    def hot(**options) -> GenerationSettings:
        return GenerationSettings(**{"max_new_tokens": 12, "ignore_eos": True, "temperature": 1.5, **options})

    seeds = range(5)
    items = [(prompts[1], greedy(12))]
    items += [(prompts[1], hot(seed=seed)) for seed in seeds]
    items += [(prompts[1], hot(seed=0))]
    items += [(prompts[1], hot(top_k=1, temperature=100.0, seed=1))]
    items += [(prompts[1], hot(top_p=1e-9, temperature=100.0, seed=2))]
    items += [(prompts[1], hot(temperature=1e-4, seed=3))]
    queue = Scheduler(pipeline, max_rows=len(items))
    texts = [c.text for c in run_jobs(queue, items)]
    queue.close()
    greedy_text, sampled, again, narrowed = texts[0], texts[1:6], texts[6], texts[7:]
    assert greedy_text == generate_texts(pipeline, [prompts[1]], greedy(12))[0]
    assert again == sampled[0]  # the same seed, the same answer
    assert len(set(sampled)) >= 4, sampled  # other seeds, other answers
    assert greedy_text not in sampled  # a temperature of 1.5 leaves the argmax path
    assert narrowed == [greedy_text] * 3, narrowed


def test_stop_strings_and_cancelled_rows_leave_while_others_go_on(pipeline, prompts):
    queue = Scheduler(pipeline, max_rows=8)
    full = run_jobs(queue, [(prompts[1], greedy(30))])[0].text
    stop = full.split()[2]
    [cut] = run_jobs(queue, [(prompts[1], greedy(30))], stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]

    loop = asyncio.new_event_loop()
    long_job = queue.job(prompts[3], greedy(60), stream=True, loop=loop)
    short_job = queue.job(prompts[5], greedy(5), loop=loop)

    async def cancel_after_first_piece() -> None:
        queue.submit(long_job)
        await long_job.deltas.get()
        queue.submit(short_job)
        long_job.cancelled.set()  # the client left: its row goes at its next step

    loop.run_until_complete(cancel_after_first_piece())
    short = loop.run_until_complete(short_job.future)
    loop.close()
    assert short.text == pipeline.complete_prompts([prompts[5]], greedy(5))[0].text
    # A client that leaves before the scheduler takes its job: the job still ends, as cancelled.
    loop = asyncio.new_event_loop()
    gone = queue.job(prompts[2], greedy(5), loop=loop)
    gone.cancelled.set()
    queue.submit(gone)
    left = loop.run_until_complete(asyncio.wait_for(gone.future, 30))  # before the fix: never settled
    loop.close()
    assert left.finish_reason == "cancelled" and left.completion_tokens == 0
    assert not pipeline.session.rows_held
    queue.close()


def test_a_failing_request_fails_alone(pipeline, prompts):
    broken = type(prompts[1])(prompts[1].input_ids, np.concatenate([prompts[1].pixel_values] * 2))
    queue = Scheduler(pipeline, max_rows=8)
    results = run_jobs(queue, [(prompts[0], greedy(5)), (broken, greedy(5)), (prompts[2], greedy(5))])
    assert isinstance(results[1], ValueError) and "placeholders" in str(results[1])
    assert results[0].text == pipeline.complete_prompts([prompts[0]], greedy(5))[0].text
    assert results[2].text == pipeline.complete_prompts([prompts[2]], greedy(5))[0].text
    queue.close()


def test_beams_run_alone_and_batch_is_the_old_batcher(pipeline, prompts):
    beams = GenerationSettings(max_new_tokens=6, num_beams=2)
    queue = request_queue(pipeline)
    assert isinstance(queue, Scheduler)
    [beamed] = run_jobs(queue, [(prompts[2], beams)])
    assert beamed.text == pipeline.complete_prompts([prompts[2]], beams)[0].text
    queue.close()
    batcher = request_queue(pipeline, "batch")
    assert not isinstance(batcher, Scheduler)
    assert (
        run_jobs(batcher, [(prompts[2], greedy(6))])[0].text
        == run_jobs(Scheduler(pipeline), [(prompts[2], greedy(6))])[0].text
    )
    batcher.close()
