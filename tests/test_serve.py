"""A live `mmllm serve` (tiny model) driven by the official openai client and by raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

import mmllm
from conftest import cut_at_stops, save_tiny, serving, stop_lists
from mmllm.engine.settings import CAPTION_PROMPT

KEY = "test-key"


def data_uri(colour: str = "red", fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A context long enough for a prompt that lists tools (the Hermes system prompt is ~450 tokens).
    model = save_tiny(tmp_path_factory.mktemp("served"), lm_init_std=0.3, context=2048)
    limits = ("--max-wait-ms", "50", "--max-batch-size", "16", "--max-body-mb", "1", "--max-tokens", "64")
    with serving(model, "--api-key", KEY, *limits) as url:
        yield url


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=KEY)


def test_openai_client_plain_streamed_and_image(server):
    openai = client(server)
    assert [m.id for m in openai.models.list().data]
    plain = openai.chat.completions.create(
        model="mmllm", messages=[{"role": "user", "content": "What colour is it?"}], max_tokens=6
    )
    assert plain.choices[0].message.role == "assistant" and plain.usage.completion_tokens <= 6
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    stream = openai.chat.completions.create(
        model="mmllm", messages=[{"role": "user", "content": "What colour is it?"}], max_tokens=6, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == plain.choices[0].message.content  # greedy: same answer either way
    with_image = openai.chat.completions.create(
        model="mmllm",
        max_tokens=6,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": data_uri()}},
                ],
            }
        ],
    )
    assert with_image.usage.prompt_tokens > plain.usage.prompt_tokens
    bare = httpx.post(
        f"{server}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": data_uri()},
                        {"type": "text", "text": "What is in this image?"},
                    ],
                }
            ],
            "max_tokens": 6,
        },
        timeout=60,
    )
    assert bare.status_code == 200, bare.text


def test_rest_generate_and_caption_json_and_multipart(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    image = data_uri().partition(",")[2]
    as_json = httpx.post(
        f"{server}/generate",
        headers=headers,
        json={"prompt": "Colour?", "image": image, "max_tokens": 4},
        timeout=60,
    )
    assert as_json.status_code == 200 and as_json.json()["completion_tokens"] <= 4
    png = base64.b64decode(image)
    as_form = httpx.post(
        f"{server}/generate",
        headers=headers,
        data={"prompt": "Colour?", "max_tokens": "4"},
        files={"file": ("x.png", png, "image/png")},
        timeout=60,
    )
    assert as_form.json()["text"] == as_json.json()["text"]
    caption = httpx.post(
        f"{server}/caption", headers=headers, files={"file": ("x.png", png, "image/png")}, timeout=60
    )
    assert caption.status_code == 200
    # A caption is the answer to the caption prompt, whichever way the image arrives.
    described = httpx.post(
        f"{server}/generate",
        headers=headers,
        json={"prompt": CAPTION_PROMPT, "image": image, "max_tokens": 48},
        timeout=60,
    )
    as_json = httpx.post(f"{server}/caption", headers=headers, json={"image": image}, timeout=60)
    assert caption.json()["text"] == as_json.json()["text"] == described.json()["text"]
    assert caption.json()["completion_tokens"] > 0


def test_concurrent_requests_share_decoding_steps(server):
    headers = {"Authorization": f"Bearer {KEY}"}

    def ask(n: int) -> int:
        body = {"messages": [{"role": "user", "content": f"Question {n}?"}], "max_tokens": 4}
        return httpx.post(
            f"{server}/v1/chat/completions", headers=headers, json=body, timeout=120
        ).status_code

    def metrics() -> dict[str, float]:
        text = httpx.get(f"{server}/metrics", headers=headers).text
        return {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line[:1] != "#"}

    before = metrics()
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(ask, range(32)))
    assert statuses == [200] * 32
    after = metrics()
    steps = after["mmllm_batch_size_count"] - before["mmllm_batch_size_count"]
    rows = after["mmllm_batch_size_sum"] - before["mmllm_batch_size_sum"]
    assert rows / steps > 2, f"32 requests ran {rows:g} rows in {steps:g} decoding steps"
    first_tokens = "mmllm_time_to_first_token_seconds_count"
    assert after[first_tokens] - before[first_tokens] == 32
    assert after["mmllm_queue_depth"] == after["mmllm_running_requests"] == 0


def test_stream_usage_and_sampling_extensions(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.8,
        "top_k": 5,
        "seed": 3,
        "repetition_penalty": 1.2,
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=headers, json=body) as response:
        chunks = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])

    def answer(**options) -> str:
        plain = httpx.post(
            f"{server}/v1/chat/completions",
            headers=headers,
            json={**body, "stream": False, **options},
            timeout=60,
        )
        assert plain.status_code == 200, plain.text
        return plain.json()["choices"][0]["message"]["content"]

    assert answer() == text  # one seed, one answer
    # Each extension reaches the sampler: other seeds give other answers, and the temperature, top_k,
    # top_p and repetition_penalty each change the answer the way they should.
    sampled = [answer(seed=seed) for seed in range(4)]
    assert len({text, *sampled}) >= 4, sampled
    greedy = answer(temperature=0)
    assert greedy not in {text, *sampled}
    assert answer(temperature=1e-4) == greedy  # a tiny temperature is all but greedy
    assert answer(top_k=1, temperature=2) == greedy  # the argmax alone, however hot
    assert answer(top_p=1e-9, temperature=2) == greedy  # the top token's mass alone reaches p
    assert answer(temperature=0, repetition_penalty=0.2) != greedy  # below 1: seen tokens win


def test_streams_equal_answers_with_stop_strings(server):
    """Joined, a stream's pieces are the non-streamed content (as generated: unstripped), and the finish
    reasons agree, for stop strings that fire mid-answer, at its start, or begin without ending."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "Describe it."}], "max_tokens": 16, "ignore_eos": True}

    def answer(**options) -> tuple[str, str]:
        plain = httpx.post(
            f"{server}/v1/chat/completions", headers=headers, json={**body, **options}, timeout=60
        )
        assert plain.status_code == 200, plain.text
        choice = plain.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]

    def streamed(**options) -> tuple[str, str]:
        request = {**body, **options, "stream": True}
        with httpx.stream("POST", f"{server}/v1/chat/completions", headers=headers, json=request) as response:
            chunks = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        return text, chunks[-1]["choices"][0]["finish_reason"]

    full, _ = answer()
    for stop in [*stop_lists(full)[:3], stop_lists(full)[5], stop_lists(full)[0][0]]:
        assert streamed(stop=stop) == answer(stop=stop), stop
        text, stopped = cut_at_stops(full, [stop] if isinstance(stop, str) else stop)
        assert answer(stop=stop) == (text, "stop" if stopped else "length"), stop
    assert streamed() == answer() == (full, "length")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, 400, "non-empty user message"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "exceeds"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"},
                            }
                        ],
                    }
                ]
            },
            400,
            "bad image",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}],
                    }
                ]
            },
            400,
            "base64",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}
                        ],
                    }
                ]
            },
            400,
            "remote image URLs are disabled",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}
                ]
            },
            400,
            "neither a data URI",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]}
                ]
            },
            400,
            "audio",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ],
)
def test_bad_chat_requests_get_4xx_with_openai_error_shape(server, body, status, message):
    response = httpx.post(
        f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"]


def test_transport_level_errors(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = f"{server}/v1/chat/completions"
    assert httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    assert httpx.post(chat, headers={"Authorization": "Bearer wrong"}, json={}).status_code == 401
    assert (
        httpx.post(
            chat,
            headers=headers,
            content=b"{not json",
        ).status_code
        == 400
    )
    assert (
        httpx.post(
            f"{server}/generate", headers={**headers, "content-type": "text/plain"}, content=b"hi"
        ).status_code
        == 415
    )
    huge = {"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}
    assert httpx.post(chat, headers=headers, json=huge).status_code == 413
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["version"] == mmllm.__version__
    assert json.loads(httpx.get(f"{server}/openapi.json").text)["paths"]["/v1/chat/completions"]


def test_schemathesis_finds_no_server_errors(server):
    """Property-based requests generated from the live OpenAPI schema, bounded in count and time: no 5xx,
    every status and header as documented, wrong methods answered 405 with `Allow`.

    Left out: positive_data_acceptance (a schema cannot say which base64 strings are images, nor
    count images across messages) and negative_data_rejection (extra form fields are ignored).
    """
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
        "response_schema_conformance,unsupported_method,allow_header_conformance,missing_required_header"
    )
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server}/openapi.json",
        "--checks",
        checks,
        "--max-examples",
        "12",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--request-timeout",
        "60",
        "--phases",
        "examples,coverage,fuzzing",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Tested: 8" in result.stdout, result.stdout[-2000:]  # every operation was exercised


QUESTION = [{"role": "user", "content": "What colour is it?"}]
# OpenAI's bookkeeping fields, each set: none may change the answer.
METADATA = {
    "user": "user-1",
    "metadata": {"run": "test"},
    "store": True,
    "service_tier": "flex",
    "prompt_cache_key": "key",
    "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
    "prompt_cache_retention": "24h",
    "safety_identifier": "hashed-id",
}
# Each field with a no-op value, at that value (it asks for nothing): all pass, and change nothing.
NO_OPS = {
    "logprobs": False,
    "top_logprobs": 0,
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "logit_bias": {"17": 0},
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "functions": [],
    "function_call": "none",
    "modalities": ["text"],
    "audio": None,
    "prediction": None,
    "reasoning_effort": "none",
    "verbosity": None,
    "web_search_options": None,
    "moderation": None,
    "n": 1,
}
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}
# ... and at a value that asks for something: a 400 naming the field (the fields still not supported).
REFUSED = [
    ("functions", [TOOL["function"]]),
    ("function_call", {"name": "lookup"}),
    ("n", 2),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "Paris"}),
    ("reasoning_effort", "low"),
    ("verbosity", "medium"),
    ("web_search_options", {}),
    ("moderation", {"model": "omni-moderation-latest"}),
]
# The fields this server has honoured since structured outputs and tools (tests/test_structured.py and
# tests/test_tools.py test what they do), at values that ask for something.
HONOURED = [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("tools", [TOOL]),
    ("tool_choice", "required"),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("logit_bias", {"17": -100}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1.5),
    ("min_p", 0.1),
    ("min_tokens", 2),
    ("stop_token_ids", [17]),
]


def post(url: str, path: str, body: dict, **options) -> httpx.Response:
    return httpx.post(
        f"{url}{path}", headers={"Authorization": f"Bearer {KEY}"}, json=body, timeout=60, **options
    )


def test_openai_sdk_stream_options_metadata_and_no_ops(server):
    openai = client(server)
    ask = {"model": "mmllm", "messages": QUESTION, "max_tokens": 6}
    plain = openai.chat.completions.create(**ask)
    stream = openai.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == plain.choices[0].message.content
    answer = plain.choices[0].message.content
    assert openai.chat.completions.create(**ask, **METADATA).choices[0].message.content == answer
    assert openai.chat.completions.create(**ask, **NO_OPS).choices[0].message.content == answer
    # The newer token limit and null for OpenAI's defaults, as the SDK sends them.
    newer = {**ask, "max_tokens": None, "max_completion_tokens": 6, "temperature": None, "top_p": None}
    assert openai.chat.completions.create(**newer).choices[0].message.content == answer
    developer = [{"role": "developer", "content": "Be brief."}, *QUESTION]
    assert openai.chat.completions.create(**{**ask, "messages": developer}).choices[0].message.content


@pytest.mark.parametrize(("field", "value"), REFUSED, ids=[f"{f}={v}"[:40] for f, v in REFUSED])
def test_fields_not_supported_yet_are_400_naming_them(server, field, value):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as refused:
        client(server).chat.completions.create(
            model="mmllm", messages=QUESTION, max_tokens=4, extra_body={field: value}
        )
    error = refused.value.body
    assert error["param"] == field and error["code"] == "unsupported_parameter", error
    assert error["message"].startswith(f"`{field}` is not supported yet"), error
    assert refused.value.status_code == 400 and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"use_beam_search": True}, "use_beam_search"),  # a vLLM extension this server does not have
        ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
        (
            {"stream": True, "stream_options": {"include_usage": True, "continuous": True}},
            "stream_options.continuous",
        ),
        ({"messages": [{**QUESTION[0], "reasoning": "x"}]}, "messages.0.reasoning"),
        (
            {"messages": [{"role": "assistant", "content": None, "function_call": {}}, *QUESTION]},
            "messages.0.function_call",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "lang": "en"}]}]},
            "messages.0.content.0.lang",
        ),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "1", "audio": {}}, *QUESTION]},
            "messages.0.audio",
        ),
    ],
)
def test_unknown_fields_are_400_naming_them(server, body, param):
    response = post(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert f"`{param}`" in error["message"], error


def test_rest_endpoints_refuse_unknown_fields(server):
    image = data_uri().partition(",")[2]
    png = base64.b64decode(image)
    for path, body in (
        ("/generate", {"prompt": "Colour?", "max_tokens": 4, "stop": ["."]}),
        ("/caption", {"image": image, "prompt": "Colour?"}),
    ):
        response = post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] in ("stop", "prompt")
    form = post(
        server, "/caption", None, files={"file": ("x.png", png, "image/png")}, data={"temperature": "0"}
    )
    assert form.status_code == 400 and form.json()["error"]["param"] == "temperature", form.text


def test_langchain_chat_openai_invoke_stream_and_image(server):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server}/v1", api_key=KEY, model="mmllm", max_tokens=6)
    answer = llm.invoke("What colour is it?")
    plain = client(server).chat.completions.create(
        model="mmllm", messages=[{"role": "user", "content": "What colour is it?"}], max_completion_tokens=6
    )
    assert answer.content == plain.choices[0].message.content  # the same greedy answer
    assert answer.usage_metadata["output_tokens"] == plain.usage.completion_tokens <= 6
    assert "".join(chunk.content for chunk in llm.stream("What colour is it?")) == answer.content
    counted = ChatOpenAI(
        base_url=f"{server}/v1", api_key=KEY, model="mmllm", max_tokens=6, stream_usage=True, temperature=0
    )
    chunks = list(counted.stream("What colour is it?", stop=["\n\n"]))
    assert (
        sum(chunks[1:], chunks[0]).usage_metadata["output_tokens"] == answer.usage_metadata["output_tokens"]
    )
    question = HumanMessage(
        content=[
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": data_uri()}},
        ]
    )
    with_image = llm.invoke([question])
    assert with_image.usage_metadata["input_tokens"] > answer.usage_metadata["input_tokens"]


def test_lmms_eval_openai_model_payloads(server):
    """The requests lmms-eval 0.7.3's `--model openai` (alias `openai_compatible`) sends, built as its
    source builds them and sent as it sends them: `self.client.chat.completions.create(**payload)`."""
    openai = client(server)
    image = data_uri().partition(",")[2]
    context = "What colour is the shape? Answer with one word."
    # The commonest task settings (`temperature: 0` in 416 task yamls, `top_p: 1.0` in 286, `top_p: 0` in 16;
    # `temperature: null` and `top_p: null` in 10 each).
    for gen_kwargs in (
        {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1},
        {"max_new_tokens": 32, "temperature": 0, "top_p": 0, "num_beams": 1, "seed": 42},
        {"max_new_tokens": 8, "temperature": None, "top_p": None},
        {"max_new_tokens": 8, "temperature": 0.2, "top_p": 0.95, "n": 1},
    ):
        # lmms_eval/models/chat/openai.py:203-212 (the chat model, the default): messages from
        # `ChatMessages.to_openai_messages` (lmms_eval/protocol.py:105-113: every content a list of
        # parts, images as PNG data URIs), then the sampling keys a task's gen_kwargs set.
        payload = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                        {"type": "text", "text": context},
                    ],
                }
            ],
            "model": "mmllm",
            "max_tokens": gen_kwargs.get("max_new_tokens", 1024),
            "temperature": gen_kwargs.get("temperature", 0),
        }
        for parameter in ("top_p", "seed", "presence_penalty", "frequency_penalty", "n"):
            value = gen_kwargs.get(parameter)
            if value is not None:
                payload[parameter] = value
        response = openai.chat.completions.create(**payload)
        greedy = not payload["temperature"]  # 0 or null; then top_p, even 0, changes nothing
        reference = openai.chat.completions.create(
            model="mmllm", messages=payload["messages"], max_tokens=payload["max_tokens"]
        )
        if greedy:
            assert response.choices[0].message.content == reference.choices[0].message.content
        assert response.usage.prompt_tokens == reference.usage.prompt_tokens
        # lmms_eval/models/simple/openai.py:450-471 (the simple model): text first, then the images.
        payload = {
            "model": "mmllm",
            "messages": [{"role": "user", "content": []}],
            "max_tokens": gen_kwargs.get("max_new_tokens", 1024),
            "temperature": gen_kwargs.get("temperature", 0),
        }
        payload["messages"][0]["content"].append({"type": "text", "text": context})
        payload["messages"][0]["content"].append(
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
        )
        response = openai.chat.completions.create(**payload)
        assert response.choices[0].finish_reason in ("stop", "length") and response.usage.prompt_tokens


def _fields(valid: bool):
    """Every request field over its declared range and edges (hypothesis strategies); unless `valid`,
    past them too, and the fields not supported yet with values that ask for something."""
    from hypothesis import strategies as st

    def one_of(*values):
        return st.sampled_from(values)

    def edges(inside: tuple, outside: tuple = ()):
        return one_of(*inside) if valid else one_of(*inside, *outside)

    tiny = (5e-324, 1e-323, 2.2250738585072014e-308, 1e-300, 1e-45, 1e-6, 1e-5)
    too_big = (2**63, 2**64, 10**30)
    limits = st.none() | edges((1, 2, 63, 64), (0, -1, 65, 10**6, *too_big)) | st.integers(1, 64)
    # Stop strings: empty, whitespace, pieces of the tiny model's vocabulary (so they fire), unicode
    # across byte boundaries, NUL, a lone surrogate (a 400), and anything else.
    inside = ("", " ", "\n", "e", "th", " the", "a", ".", "é", "日本", "🙂", "\u0000")
    texts = edges(inside, ("\ud800",)) | st.text(st.characters(exclude_categories=("Cs",)), max_size=6)
    # The fields with a no-op value: null, that value, the values the honoured ones take, or (not
    # `valid`) values that ask for what is not supported. Valid bodies hold no contradiction
    # (`contradictory`): top_logprobs without logprobs, ignore_eos with a constrained answer.
    unsupported = {field: [value] for field, value in NO_OPS.items()}
    for field, value in [*HONOURED, *(REFUSED if not valid else ())]:
        unsupported.setdefault(field, []).append(value)
    unsupported["n"].append(None)  # and n = 1 (from NO_OPS)
    return {
        **{field: st.none() | one_of(*values) for field, values in unsupported.items()},
        **{field: st.just(value) for field, value in METADATA.items()},
        "temperature": st.none()
        | edges(
            (0, 0.0, -0.0, *tiny, 1, 2, 2.0), (2.0000000000000004, -1e-300, 100.0, float("inf"), float("nan"))
        )
        | st.floats(0, 2),
        "top_p": st.none()
        | edges((0, *tiny, 0.5, 1, 1.0), (1.0000000000000002, -1e-300, 2))
        | st.floats(0, 1),
        "top_k": edges((0, 1, 2, 50, 255, 256, 257, 10**6, 2**31, 2**63 - 1, *too_big), (-1,))
        | st.integers(0, 2**70),
        "repetition_penalty": edges((*tiny, 0.2, 1, 1.0, 1.5, 100), (100.00000000000001, 0, -1.0))
        | st.floats(1e-300, 100),
        "seed": st.none()
        | edges((-(2**63), 2**63 - 1, 0, -1), (-(2**63) - 1, 2**63))
        | st.integers(-(2**63), 2**63 - 1),
        "max_tokens": limits,
        "max_completion_tokens": limits,
        "stop": st.none() | texts | st.lists(texts, max_size=40),
        "n": st.none() | edges((1,), (2, 0, -1, 128, 1.0)),
        "stream_options": st.none()
        | st.fixed_dictionaries(
            {}, optional={"include_usage": st.booleans(), "include_obfuscation": st.booleans()}
        ),
        "ignore_eos": st.booleans(),
    }


def _contradictory(body: dict) -> bool:
    """Fields that are each in range but refused together (as OpenAI refuses them)."""
    fmt = (body.get("response_format") or {}).get("type", "text")
    forced = bool(body.get("tools")) and body.get("tool_choice") == "required"
    return bool(
        (body.get("top_logprobs") and not body.get("logprobs"))
        or (body.get("ignore_eos") and (fmt != "text" or forced))
        or (body.get("tool_choice") == "required" and not body.get("tools"))
        or (forced and fmt != "text")
    )


def _messages():
    from hypothesis import strategies as st

    question = {"role": "user", "content": "What is in this image?"}
    with_image = [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": data_uri()}},
    ]
    return st.sampled_from(
        [
            [question],
            [{"role": "system", "content": "Be brief."}, question],
            [{"role": "developer", "content": "Be brief.", "name": "ops"}, question],
            [question, {"role": "assistant", "content": "A shape."}, {"role": "user", "content": "Colour?"}],
            [{"role": "user", "content": with_image}],
        ]
    )


def _well_formed(body: dict, response: httpx.Response, valid: bool) -> None:
    """A 200 is a whole answer (streamed: whole events, [DONE] last, no in-band error); a 4xx is an
    OpenAI-shaped error naming a field of the request; nothing is a 5xx; a `valid` body gets a 200."""
    assert response.status_code < 500, response.text
    assert response.status_code == 200 or not valid, response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"] == "invalid_request_error", error
        assert error["param"] and error["param"].split(".")[0] in body, error
        return
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 64
    stops = [
        s for s in ([body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []) if s
    ]
    if body.get("stream"):
        lines = [line for line in response.text.split("\n\n") if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert all("error" not in chunk for chunk in chunks), chunks
        usage = (body.get("stream_options") or {}).get("include_usage")
        if usage:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= limit
            chunks = chunks[:-1]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        assert finishes[-1] in ("stop", "length", "tool_calls") and not any(finishes[:-1]), finishes
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        answer = response.json()
        choice, usage = answer["choices"][0], answer["usage"]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length", "tool_calls")
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        assert usage["completion_tokens"] <= limit
        text = choice["message"]["content"] or ""  # null: the answer is tool calls
    assert isinstance(text, str) and not any(stop in text for stop in stops), (text, stops)


def test_no_parameter_combination_gets_a_server_error(server):
    """Hypothesis draws every request field (OpenAI's, the extensions, the ones not supported yet) over
    its range and edges, streamed or not, and half the time past them too (and the fields not supported
    yet asking for something): never a 5xx, every 200 well formed, every 4xx an OpenAI error naming a
    field it was sent, and every body within the ranges a 200."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    http = httpx.Client(headers=headers, timeout=60)
    statuses = Counter()

    def bodies(valid: bool):
        streamed = st.sampled_from([None, False, True, True])  # null is the field left out
        fields = st.fixed_dictionaries({"messages": _messages(), "stream": streamed}, optional=_fields(valid))
        if valid:
            fields = fields.filter(lambda body: not _contradictory(body))
        return st.tuples(st.just(valid), fields)

    @settings(
        max_examples=150,
        deadline=20_000,
        database=None,
        derandomize=True,  # the same 150 requests every run: CI's verdict does not depend on the draw
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(bodies(True) | bodies(False))
    def never_a_server_error(drawn):
        valid, body = drawn
        response = http.post(f"{server}/v1/chat/completions", content=json.dumps(body))
        statuses[response.status_code, "stream" if body.get("stream") else "plain"] += 1
        _well_formed(body, response, valid)

    with http:
        never_a_server_error()
    print(dict(statuses))  # -s shows what was drawn: 200s streamed and plain, and 400s
    assert statuses[200, "stream"] and statuses[200, "plain"] and sum(statuses.values()) >= 100


def test_every_openai_field_is_declared():
    """Each field of the installed `openai` SDK's request is honoured, accepted without effect, or
    refused by name: a field a newer SDK adds fails here until it is sorted into one of those."""
    import typing

    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    from mmllm.serve.schemas import METADATA_FIELDS, ChatCompletionRequest

    assert set(METADATA) == set(METADATA_FIELDS)
    openai_fields = {*typing.get_type_hints(CompletionCreateParamsBase), "stream"}
    ours = set(ChatCompletionRequest.model_fields)
    assert openai_fields - ours == set()
    assert ours - openai_fields >= {"top_k", "repetition_penalty", "ignore_eos"}  # (an older SDK has fewer)
    sorted_out = {*METADATA, *NO_OPS, *(field for field, _ in REFUSED), *(field for field, _ in HONOURED)}
    honoured = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop"}
    honoured |= {"seed", "stream", "stream_options"}
    assert openai_fields - sorted_out - honoured == set()  # the tests above send every one
