"""A live `mmllm serve` (tiny model) driven by the official openai client and by raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

import mmllm
from conftest import save_tiny, serving
from mmllm.engine.settings import CAPTION_PROMPT

KEY = "test-key"


def data_uri(colour: str = "red", fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny(tmp_path_factory.mktemp("served"), lm_init_std=0.3)
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
    assert "Tested: 6" in result.stdout, result.stdout[-2000:]  # every operation was exercised
