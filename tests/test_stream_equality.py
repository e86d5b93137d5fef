"""Streams equal answers: `RowTracker` decodes incrementally and holds back text that could begin a stop
string, so the pieces a row streams joined are its final text, on every path (a backend's `on_delta`
and `stream`, the request queues' streams, the chat page's) — and that text is as generated."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import check_streams_equal_answers, cut_at_stops, make_tiny, make_tokenizer, stop_lists
from mmllm.engine.batcher import DynamicBatcher
from mmllm.engine.rows import RowTracker
from mmllm.engine.scheduler import Scheduler
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline

TEXTS = [
    "The answer is yes. The answer is no. How many? Two.",
    "Café au lait, naïve façade — 日本語のテキスト 🙂👍🏽 done.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "  A cat sleeps on a sofa.\n\nNext to a cup of coffee.  ",
]


def track(tokenizer, ids: list[int], stops: list[str], limit: int = 1000, then: str = "eos"):
    """Feed `ids` to a one-row tracker a token at a step, then end the row (`then`: "eos" sends the end
    of turn, "length" ends on the limit, "cancel" cancels before the last token, "ask" just asks for
    the completion); its pieces and its completion."""
    processor = SimpleNamespace(tokenizer=tokenizer, stop_token_ids=[tokenizer.eos_token_id])
    pieces: list[str] = []
    cancelled = threading.Event()
    settings = GenerationSettings(max_new_tokens=len(ids) if then == "length" else limit)
    rows = RowTracker(processor, [settings], [stops], lambda row, text: pieces.append(text), [cancelled])
    for index, token in enumerate(ids):
        if then == "cancel" and index == len(ids) - 1:
            cancelled.set()
        rows.step([token])
    if then == "eos":
        rows.step([tokenizer.eos_token_id])
    [done] = rows.completions([0])
    return pieces, done


@pytest.fixture(scope="module", params=["qwen2", "phi3", "llama"])
def tokenizer(request):
    return make_tokenizer(request.param)


def check_decodes_incrementally(tokenizer) -> None:
    """Decoded a few tokens at a time, ordinary text is the whole decode; no piece holds half a
    character."""
    calls: list[int] = []

    def counting(ids, **options):
        calls.append(len(ids))
        return tokenizer.decode(ids, **options)

    counted = SimpleNamespace(decode=counting, eos_token_id=tokenizer.eos_token_id)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        calls.clear()
        pieces, done = track(counted, ids, [])
        assert done.text == "".join(pieces) == whole, text
        assert not any("\ufffd" in piece for piece in pieces)
        assert max(calls) <= 8, "decoded the whole answer again"


def test_incremental_decoding_matches_decoding_the_whole_answer(tokenizer):
    check_decodes_incrementally(tokenizer)
    multibyte = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    assert tokenizer.decode(multibyte) == TEXTS[1]
    assert any(tokenizer.decode([token]).endswith("\ufffd") for token in multibyte)  # characters split


def test_every_short_stop_string_cuts_where_it_first_occurs(tokenizer):
    """Every substring of up to 4 characters (inside multi-byte characters, across tokens, at the very
    start, at the end) as the stop string: the text is cut before its first occurrence, and the
    pieces joined are the text."""
    for text in TEXTS[:3]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        stops = {text[i : i + n] for n in range(1, 5) for i in range(len(text) - n + 1)}
        for stop in sorted(stops):
            pieces, done = track(tokenizer, ids, [stop])
            assert (done.text, done.finish_reason) == (text[: text.find(stop)], "stop"), stop
            assert "".join(pieces) == done.text, stop


def test_stop_strings_that_begin_one_another_and_several_at_once(tokenizer):
    text = TEXTS[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    for stops in [
        *stop_lists(text),
        ["é", "éa"],
        ["ïve f", "ï"],
        ["日本", "日本語の"],
        ["🙂👍", "🙂"],
        ["👍🏽 d", "👍"],
        ["telle"],  # never whole; its beginning seen again and again
        ["", "au"],  # an empty stop string stops nothing
    ]:
        expected, stopped = cut_at_stops(text, [s for s in stops if s])
        pieces, done = track(tokenizer, ids, stops, then="length")
        assert (done.text, done.finish_reason) == (expected, "stop" if stopped else "length"), stops
        assert "".join(pieces) == done.text, stops


def test_the_stop_string_generated_first_wins(tokenizer):
    """As vLLM does (and OpenAI: generation stops at the first stop sequence generated): "本語" ends
    before "日本語の" does, so the answer stops there, though "日本語の" begins earlier."""
    text = TEXTS[1]
    pieces, done = track(tokenizer, tokenizer.encode(text, add_special_tokens=False), ["本語", "日本語の"])
    assert done.text == "".join(pieces) == text[: text.index("本語")]


@pytest.mark.parametrize("then", ["eos", "length", "cancel", "ask"])
def test_held_back_text_goes_out_however_the_row_ends(tokenizer, then):
    text = "The answer is yes, then 🙂"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop = text[-6:] + " never"  # its beginning ends the answer: held back until the row ends
    pieces, done = track(tokenizer, ids, [stop], then=then)
    fed = ids[:-1] if then == "cancel" else ids
    assert done.text == "".join(pieces) == tokenizer.decode(fed)
    reasons = {"eos": "stop", "length": "length", "cancel": "cancelled", "ask": "stop"}
    assert done.finish_reason == reasons[then]
    assert done.completion_tokens == len(fed)
    if then != "cancel":
        assert pieces[-1] == "then 🙂"  # held back from its first letter on, out when the row ended


def test_half_a_character_waits_and_a_row_ending_there_keeps_it(tokenizer):
    ids = tokenizer.encode("ok 🙂", add_special_tokens=False)
    split = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    pieces, _ = track(tokenizer, ids[: split + 1], [], then="ask")
    assert not any("\ufffd" in piece for piece in pieces[:-1])
    pieces, done = track(tokenizer, ids[:split], [], then="length")  # the limit cuts the emoji in half
    assert done.text == "".join(pieces) == tokenizer.decode(ids[:split]) and done.text.endswith("\ufffd")


def test_answers_come_as_generated():
    tokenizer = make_tokenizer("qwen2")
    text = "  spaces around \n"
    pieces, done = track(tokenizer, tokenizer.encode(text, add_special_tokens=False), [])
    assert done.text == "".join(pieces) == text


# -- backends and queues ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["eager", "static"])
def pipeline(request):
    """The torch backend over its eager session and over its static one (traced, uncompiled)."""
    model, processor = make_tiny("qwen2", lm_init_std=0.3)
    return Pipeline(model, processor, compiler="eager" if request.param == "static" else None)


def conversations(images):
    return [
        [{"role": "user", "content": "<image>\nWhat is it?"}],
        [{"role": "user", "content": "A longer question without an image, about colours?"}],
    ], [[images[0]], []]


def test_torch_streams_equal_answers(pipeline, images):
    check_streams_equal_answers(pipeline, *conversations(images))


async def streamed_job(queue, prompt, settings, stop):
    """A streaming request's pieces joined, and its answer."""
    job = queue.job(prompt, settings, stop, stream=True)
    queue.submit(job)
    pieces = []
    while (piece := await job.deltas.get()) is not None:
        pieces.append(piece)
    return "".join(pieces), await job.future


@pytest.mark.parametrize("kind", [Scheduler, DynamicBatcher])
def test_request_queues_stream_what_they_answer(pipeline, images, kind):
    """The server's path (a streaming job with stop strings) and the chat page's (`RequestQueue.stream`)
    give the answer a non-streamed request gets."""
    prompts = [pipeline.prepare(c, i) for c, i in zip(*conversations(images), strict=True)]
    settings = GenerationSettings(max_new_tokens=16, ignore_eos=True)
    reference = [c.text for c in pipeline.complete_prompts(prompts, settings)]
    queue = kind(pipeline)

    async def run() -> None:
        for stops in [stop_lists(reference[0])[i] for i in (0, 1, 2, 5)]:  # 5: held, then handed on
            results = await asyncio.gather(*(streamed_job(queue, p, settings, stops) for p in prompts))
            for full, (joined, done) in zip(reference, results, strict=True):
                assert joined == done.text == cut_at_stops(full, stops)[0], stops
        conversation, pictures = conversations(images)
        page = "".join([piece async for piece in queue.stream(conversation[0], pictures[0], settings)])
        assert page == reference[0]

    try:
        asyncio.run(run())
    finally:
        queue.close()


# -- real tokenizers and weights ----------------------------------------------------------------------------
WEIGHTS = Path.home() / ".cache" / "mmllm" / "weights"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-0.5b-instruct"])
def test_real_tokenizers_decode_incrementally(name):
    from transformers import AutoTokenizer

    if not (WEIGHTS / name / "tokenizer.json").is_file():
        pytest.skip(f"{name} is not installed (mmllm weights install {name})")
    check_decodes_incrementally(AutoTokenizer.from_pretrained(WEIGHTS / name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-0.5b-instruct"])
def test_the_issues_examples_stream_their_answers(name):
    """Issue #35: a stop string spanning tokens streamed its beginning (`" is a"` streamed "Paris is",
    answered "Paris"); now the stream is the answer, cut where the stop string first occurs."""
    if not (WEIGHTS / name / "model.safetensors").is_file():
        pytest.skip(f"{name} is not installed (mmllm weights install {name})")
    pipeline = Pipeline.load(name, device="cpu")
    settings = GenerationSettings(max_new_tokens=32)
    capital = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    counting = [{"role": "user", "content": "Count from 1 to 10, separated by commas. Only the numbers."}]
    for conversation, stop_choices in [
        (capital, [[" is a"], ["Paris is"], ["Paris"]]),
        (counting, [["7,", "8"], [", "]]),
    ]:
        [full] = pipeline.complete([conversation], settings=settings)
        for stops in stop_choices:
            [answer] = pipeline.complete([conversation], settings=settings, stop=[stops])
            streamed = "".join(pipeline.stream(conversation, settings=settings, stop=stops))
            text, stopped = cut_at_stops(full.text, stops)
            assert streamed == answer.text == text, (stops, full.text)
            assert answer.finish_reason == ("stop" if stopped else full.finish_reason), stops
