"""Structured outputs, log-probabilities and the logit controls (`logit_bias`, presence and frequency
penalties, `min_p`, `min_tokens`, `stop_token_ids`): in the running batch beside free rows, on the torch
and llama.cpp backends, and through a live `mmllm serve` with the openai client."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import numpy as np
import pytest
from pydantic import BaseModel

from conftest import make_tiny, run_jobs, save_tiny, serving
from mmllm.engine.logits import LogitShaper
from mmllm.engine.scheduler import Scheduler
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.tools import json_grammar
from mmllm.engine.torch_backend import Pipeline

# Schemas a random tiny model finishes within a few tokens (no free strings to ramble in).
SMALL = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
CHOICE = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
    "required": ["colour", "sure"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def pipeline():
    model, processor = make_tiny("qwen2", lm_init_std=0.3)
    return Pipeline(model, processor)


def ask(pipeline, text: str = "What is it?"):
    return pipeline.prepare([{"role": "user", "content": text}])


def test_constrained_rows_validate_and_free_rows_answer_as_alone(pipeline):
    """Constrained and free rows share the running batch's steps; each answer that ends with `stop`
    validates against its schema, one cut by its limit is a prefix of JSON, and the free rows answer
    as they do alone."""
    prompts = [ask(pipeline, f"Question {'word ' * n}{n}?") for n in range(8)]
    free = GenerationSettings(max_new_tokens=12, ignore_eos=True)
    schemas = [SMALL, CHOICE, SMALL, CHOICE]
    constrained = [
        GenerationSettings(max_new_tokens=40, grammar=json_grammar(schema), temperature=t, seed=n)
        for n, (schema, t) in enumerate(zip(schemas, [0, 1.0, 1.5, 0], strict=True))
    ]
    cut = GenerationSettings(max_new_tokens=3, grammar=json_grammar(CHOICE))
    settings = [free, constrained[0], free, constrained[1], cut, constrained[2], free, constrained[3]]
    queue = Scheduler(pipeline, max_rows=4, step_tokens=16)  # rows join mid-answer
    answers = run_jobs(queue, list(zip(prompts, settings, strict=True)))
    queue.close()
    for answer, setting in zip(answers, settings, strict=True):
        if setting.grammar is None:
            continue
        if setting is cut:
            assert answer.finish_reason == "length" and '{"colour": "'.startswith(answer.text)
            continue
        assert answer.finish_reason == "stop", answer
        schema = SMALL if '"ok"' in answer.text else CHOICE
        assert jsonschema_rs.is_valid(schema, json.loads(answer.text)), answer.text
        assert " " not in answer.text.replace(", ", "").replace(": ", "")  # no free whitespace
    alone = [
        pipeline.complete_prompts([p], free)[0] for p, s in zip(prompts, settings, strict=True) if s is free
    ]
    assert [a for a, s in zip(answers, settings, strict=True) if s is free] == alone


def test_masks_are_one_batched_call_the_logits_width_and_never_allow_placeholders(pipeline):
    shaper = LogitShaper(pipeline.processor, pipeline.logits_width)
    processor = pipeline.processor
    width = pipeline.logits_width
    # A grammar that allows any string: only the placeholder and padding are out of it.
    anything = json_grammar({"type": "string"})
    states = [shaper.state(GenerationSettings(grammar=anything)) for _ in range(3)]
    logits = np.random.default_rng(0).normal(size=(3, width)).astype(np.float32)
    shaper.shape(states, logits)
    assert logits.shape == (3, width)
    allowed = np.isfinite(logits)
    assert allowed[:, processor.tokenizer.encode('"')[0]].all() and allowed.sum(1).min() == 1  # `"` alone
    shaper.advance(states, [processor.tokenizer.encode('"')[0]] * 3)
    logits = np.zeros((3, width), np.float32)
    shaper.shape(states, logits)
    never = [processor.tokenizer.pad_token_id]
    assert not np.isfinite(logits[:, never]).any() and np.isfinite(logits).sum(1).min() > width // 2
    assert processor.image_token_id >= width  # the tiny LM's placeholder lies outside its logits
    calls = []
    shaper._executor = type("Counting", (), {"unsafe_compute_mask_ptr": lambda _, *a: calls.append(a)})()
    shaper.shape(states, np.zeros((3, width), np.float32))
    assert len(calls) == 1 and len(calls[0][0]) == 3  # every constrained row in one call


def test_bias_penalties_and_min_tokens_on_hand_made_logits(pipeline):
    shaper = LogitShaper(pipeline.processor, 8)
    stop = pipeline.processor.stop_token_ids[0]
    settings = GenerationSettings(
        presence_penalty=0.5, frequency_penalty=0.25, logit_bias={1: 3.0, 2: -100}, min_tokens=2
    )
    [state] = [shaper.state(settings)]
    shaper.advance([state], [4])
    shaper.advance([state], [4])
    shaper.advance([state], [5])
    logits = np.zeros((1, 8), np.float32)
    shaper.shape([state], logits)
    assert logits[0].tolist()[:6] == [0.0, 3.0, -100.0, 0.0, -1.0, -0.75]
    fresh = shaper.state(settings)
    logits = np.zeros((1, 8), np.float32)
    shaper.shape([fresh], logits)
    assert logits[0, stop] == -np.inf  # no stop before min_tokens
    with pytest.raises(ValueError, match="logit_bias"):
        shaper.state(GenerationSettings(logit_bias={8: 1.0}))


def test_logit_controls_change_answers_as_they_say(pipeline):
    prompt = ask(pipeline)

    def tokens(**options) -> list[int]:
        """The answer's token ids (as its log-probability records have them)."""
        settings = GenerationSettings(**{"max_new_tokens": 10, "ignore_eos": True, "logprobs": 0, **options})
        return [entry.token for entry in pipeline.complete_prompts([prompt], settings)[0].logprobs]

    greedy = tokens()
    assert tokens(logit_bias={7: 100}) == [7] * 10
    assert greedy[0] not in tokens(logit_bias={greedy[0]: -100})
    assert tokens(logit_bias={7: 10}) == [7] * 10
    assert tokens(logit_bias={7: 10}, frequency_penalty=2, presence_penalty=2).count(7) < 4
    stop_at = greedy[3]
    stopped = pipeline.complete_prompts(
        [prompt], GenerationSettings(max_new_tokens=10, stop_token_ids=(stop_at,))
    )[0]
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == greedy.index(stop_at)
    eos = pipeline.processor.stop_token_ids[0]
    early = pipeline.complete_prompts(
        [prompt], GenerationSettings(max_new_tokens=10, logit_bias={eos: 100}, min_tokens=4)
    )[0]
    assert early.completion_tokens == 4 and early.finish_reason == "stop"


def test_logprobs_go_with_the_text_they_begin(pipeline):
    prompt = ask(pipeline)
    settings = GenerationSettings(max_new_tokens=16, ignore_eos=True, logprobs=3)
    [whole] = pipeline.complete_prompts([prompt], settings)
    ids = pipeline.processor.tokenizer.encode(whole.text)
    assert len(whole.logprobs) == whole.completion_tokens == 16
    for entry in whole.logprobs:  # greedy: the chosen token is the likeliest
        assert entry.top[0] == (entry.token, entry.logprob) and len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.logprob <= 0
    assert pipeline.processor.tokenizer.decode([e.token for e in whole.logprobs]) == whole.text
    assert len(ids) > 4
    for stop in (whole.text[5:8], whole.text[:2], whole.text[-2:]):
        pieces = []
        [cut] = pipeline.complete_prompts(
            [prompt], settings, [[stop]], on_delta=lambda row, text, out=pieces: out.append(text)
        )
        streamed = [entry for piece in pieces for entry in piece.logprobs]
        assert streamed == cut.logprobs[: len(streamed)]
        kept = pipeline.processor.tokenizer.decode([e.token for e in cut.logprobs])
        assert kept.startswith(cut.text) and len(cut.logprobs) <= cut.completion_tokens, (stop, kept)
        fewer = pipeline.processor.tokenizer.decode([e.token for e in cut.logprobs[:-1]])
        assert len(fewer) < len(cut.text) or not cut.text  # the last kept token begins in the text


def test_min_p_keeps_tokens_near_the_top():
    from mmllm.engine.sampler import choose_tokens, sampling_rng

    logits = np.tile(np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32)), (2000, 1))
    chosen = choose_tokens(logits, GenerationSettings(temperature=1.0, min_p=0.35), sampling_rng(0), [])
    assert set(chosen.tolist()) == {0, 1}


def test_backends_without_a_running_batch_refuse_shaping_by_name():
    from mmllm.engine.onnx import OnnxBackend

    backend = OnnxBackend.__new__(OnnxBackend)
    for options, name in (
        ({"logprobs": 0}, "logprobs"),
        ({"grammar": "x"}, "grammar"),
        ({"min_tokens": 2}, "min_tokens"),
    ):
        with pytest.raises(ValueError, match=f"^{name} is not supported by the onnx backend"):
            backend.check(GenerationSettings(**options))
    backend.check(GenerationSettings(min_p=0.1))  # its sampler has min_p


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from mmllm.engine.llama_cpp import LlamaCppBackend
    from mmllm.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("structured_gguf")
    model = save_tiny(root / "model", lm_init_std=0.3)
    export_gguf(str(model), root / "gguf", ["f32"])
    return Pipeline.load(str(model), device="cpu"), LlamaCppBackend.load(root / "gguf", "f32")


def test_llama_cpp_decodes_grammars_logprobs_and_controls_as_torch(llama_pair):
    # Questions whose greedy answers have no near-tie that llama.cpp's arithmetic could tip either way.
    conversations = [[{"role": "user", "content": f"Question {n}?"}] for n in range(2)]
    for settings in (
        GenerationSettings(max_new_tokens=30, grammar=json_grammar(CHOICE)),
        GenerationSettings(max_new_tokens=8, ignore_eos=True, logit_bias={7: 4}, frequency_penalty=1.5),
        GenerationSettings(max_new_tokens=8, ignore_eos=True, logprobs=2, presence_penalty=-1),
    ):
        torch_answers, llama_answers = (b.complete(conversations, None, settings) for b in llama_pair)
        assert [a.text for a in llama_answers] == [a.text for a in torch_answers], settings
        for mine, theirs in zip(llama_answers, torch_answers, strict=True):
            if settings.logprobs is not None:
                assert [e.token for e in mine.logprobs] == [e.token for e in theirs.logprobs]
                assert np.allclose(
                    [e.logprob for e in mine.logprobs], [e.logprob for e in theirs.logprobs], atol=0.05
                )
            if settings.grammar is not None:
                assert mine.finish_reason == "stop" and jsonschema_rs.is_valid(CHOICE, json.loads(mine.text))


# -- the live server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny(tmp_path_factory.mktemp("structured"), lm_init_std=0.3)
    with serving(model, "--max-tokens", "64") as url:
        yield url


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none")


QUESTION = [{"role": "user", "content": "Describe it as JSON."}]


class Shape(BaseModel):
    colour: str
    sides: int
    filled: bool


def test_openai_sdk_structured_outputs(server):
    openai = client(server)
    plain = openai.chat.completions.create(
        model="mmllm", messages=QUESTION, max_tokens=40, response_format={"type": "json_object"}
    )
    choice = plain.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")
    schema = {"type": "json_schema", "json_schema": {"name": "choice", "schema": CHOICE, "strict": True}}
    answer = openai.chat.completions.create(
        model="mmllm", messages=QUESTION, max_tokens=40, response_format=schema
    )
    assert answer.choices[0].finish_reason == "stop"
    assert jsonschema_rs.is_valid(CHOICE, json.loads(answer.choices[0].message.content))
    stream = openai.chat.completions.create(
        model="mmllm", messages=QUESTION, max_tokens=40, response_format=schema, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer.choices[0].message.content
    # The SDK's parse(): a pydantic model as the schema (strict, $defs-free), parsed back into it. A
    # random model's free strings may run to the limit, as OpenAI's do: then the SDK says so.
    from openai import LengthFinishReasonError

    try:
        parsed = openai.chat.completions.parse(
            model="mmllm", messages=QUESTION, max_tokens=64, response_format=Shape
        )
        assert isinstance(parsed.choices[0].message.parsed, Shape)
    except LengthFinishReasonError as cut:
        assert cut.completion.choices[0].message.content.startswith('{"colour": "')


def test_logprobs_in_openais_shape_streamed_as_not(server):
    openai = client(server)
    ask = {"model": "mmllm", "messages": QUESTION, "max_tokens": 10, "logprobs": True, "top_logprobs": 2}
    plain = openai.chat.completions.create(**ask, stop=["\n\n"])
    content = plain.choices[0].logprobs.content
    assert content and len(content) <= plain.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) or "\ufffd" in entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob
    streamed = list(openai.chat.completions.create(**ask, stop=["\n\n"], stream=True))
    entries = [
        e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in content]
    without = openai.chat.completions.create(model="mmllm", messages=QUESTION, max_tokens=10)
    assert without.choices[0].logprobs is None
    assert without.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"100000": 1}}, "logit_bias", "outside the vocabulary"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids", "outside the vocabulary"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
            "nope",
        ),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "constrained"),
        ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
        ({"min_p": 1.5}, "min_p", ""),
    ],
)
def test_bad_structured_or_logit_requests_are_400_naming_the_field(server, body, param, message):
    response = httpx.post(f"{server}/v1/chat/completions", json={"messages": QUESTION, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_tokenize_and_detokenize_like_vllm(server):
    text = "What colour is the shape?"
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert (
        tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
        and tokens["max_model_len"] == 512
    )
    back = httpx.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text
    chat = httpx.post(f"{server}/tokenize", json={"messages": QUESTION}).json()
    answer = client(server).chat.completions.create(model="mmllm", messages=QUESTION, max_tokens=2)
    assert chat["count"] == answer.usage.prompt_tokens
    refused = httpx.post(f"{server}/detokenize", json={"tokens": [10**6]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tokens"
    both = httpx.post(f"{server}/tokenize", json={"prompt": text, "messages": QUESTION})
    assert both.status_code == 400
