"""Hostile clients against a live `mmllm serve`: malformed text, extreme numbers, oversized and
chunked bodies, dropped connections, slow work. Every answer is a 4xx with a message or a correct
200, /health stays responsive, and every response is counted in /metrics by its status."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image

from conftest import save_tiny, serving

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 12000  # tokens; the tiny model needs about 1 ms each: a long answer outlasts the 4 s timeout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A context long enough for the long answers below (answers end where the context does).
    model = save_tiny(tmp_path_factory.mktemp("served"), lm_init_std=0.3, context=LONG + 256)
    limits = ("--max-body-mb", "1", "--max-tokens", str(LONG), "--timeout-s", "4", "--max-wait-ms", "5")
    with serving(model, "--api-key", KEY, *limits) as url:
        yield url


def chat(url: str, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "content-type": "application/json"}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, content=content, timeout=timeout)


def user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4}


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(w in line for w in wanted):
            total += float(line.split()[-1])
    return total


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (CRC fixed up) declares another size: a decompression bomb's shape."""
    data = bytearray(png(1, 1))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def image_part(data: bytes) -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()},
    }


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages":[{"role":"user","content":"\\ud800"}]}',
        b'{"messages":[{"role":"user","content":"a\\u0000b\\udfff\\u0000"}]}',
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"x\\udc00"}]}]}',
        b'{"messages":[{"role":"user","content":"hi"}],"stop":"\\ud800"}',
    ],
)
def test_lone_surrogates_get_400_naming_them(server, raw):
    response = chat(server, raw)
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["error"]["message"]


def test_nul_characters_alone_are_ordinary_text(server):
    assert chat(server, user("what\u0000 is it?")).status_code == 200


def test_tiny_temperature_decodes_greedily(server):
    greedy = chat(server, user("What colour is it?")).json()["choices"][0]["message"]["content"]
    for temperature in (1e-300, 5e-324, 1e-6):
        response = chat(server, {**user("What colour is it?"), "temperature": temperature})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == greedy


@pytest.mark.parametrize("stream", [False, True])
def test_tiny_top_p_keeps_the_top_token(server, stream):
    """`temperature: 1, top_p: 1e-300` was a 500 ("Probabilities contain NaN"): a nucleus that small is
    the likeliest token alone, as is OpenAI's `top_p: 0`, streamed or not."""
    greedy = chat(server, user("What colour is it?")).json()["choices"][0]["message"]["content"]
    for top_p in (1e-300, 5e-324, 0):
        for temperature in (1, 2):
            sampled = {"temperature": temperature, "top_p": top_p, "stream": stream}
            response = chat(server, {**user("What colour is it?"), **sampled})
            assert response.status_code == 200, response.text
            if stream:
                events = [line[6:] for line in response.text.split("\n\n") if line]
                assert events[-1] == "[DONE]" and all('"error"' not in event for event in events)
                chunks = [json.loads(event) for event in events[:-1]]
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            else:
                text = response.json()["choices"][0]["message"]["content"]
            assert text == greedy, (top_p, temperature)


@pytest.mark.parametrize(
    "options",
    [
        {"top_k": 10**30},  # more than the vocabulary: IndexError (500) before
        {"repetition_penalty": 5e-324, "ignore_eos": True},  # -inf * 0 = NaN probabilities before
        {"repetition_penalty": 1e-300, "top_k": 2**64},
    ],
)
def test_extreme_sampling_extensions_answer(server, options):
    for stream in (False, True):
        response = chat(server, {**user("hi"), "temperature": 2, "seed": 1, "stream": stream, **options})
        assert response.status_code == 200 and '"error"' not in response.text, response.text


@pytest.mark.parametrize("seed", [2**64 + 1, 10**30, -(2**63) - 1])
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_seeds_get_400_streamed_or_not(server, seed, stream):
    response = chat(server, {**user("hi"), "seed": seed, "stream": stream})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("seed:")


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), -1])
def test_seeds_at_either_end_of_int64_are_used(server, seed):
    body = {**user("hi"), "seed": seed, "temperature": 1.0}
    first, second = chat(server, body).json(), chat(server, body).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def _send_chunked(url: str, total: int) -> bytes:
    """POST `total` bytes chunked (no Content-Length); return what the server answered."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"x" * 65536
        try:
            for _ in range(total // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending
        return sock.recv(65536)


def test_chunked_body_over_the_limit_is_413_on_the_bytes(server):
    before = metric(server, "mmllm_requests_total", status="413")
    answer = _send_chunked(server, 8 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request body over 1 MB" in answer
    assert metric(server, "mmllm_requests_total", status="413") == before + 1


def test_declared_body_over_the_limit_is_413(server):
    response = chat(server, user("x" * (2 * 2**20)))
    assert response.status_code == 413


def test_prompt_longer_than_the_limit_is_refused_without_tokenizing(server):
    start = time.perf_counter()
    response = chat(server, user("word " * 180_000))  # 900 kB: under the body limit
    assert response.status_code == 400
    assert "characters is longer than 4,096 tokens can be" in response.json()["error"]["message"]
    assert time.perf_counter() - start < 5
    tokens = chat(server, user("word " * 5000))  # few enough characters, too many tokens for the model
    assert tokens.status_code == 400 and f"tokens; the model's context holds {LONG + 256:,}" in tokens.text


def test_health_answers_while_large_images_decode(server):
    """Four 16-megapixel PNGs decode and resize in worker threads; /health stays quick meanwhile."""
    big = png(4000, 4000)  # ~50 kB on the wire, 48 MB once decoded
    body = {"messages": [{"role": "user", "content": [image_part(big), {"type": "text", "text": "?"}]}]}
    statuses, latencies = [], []

    def heavy() -> None:
        statuses.append(chat(server, {**body, "max_tokens": 2}).status_code)

    workers = [threading.Thread(target=heavy) for _ in range(4)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        start = time.perf_counter()
        assert httpx.get(f"{server}/health", timeout=10).status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.02)
    assert statuses == [200] * 4
    assert max(latencies) < 1.0, latencies  # generous for a busy 2-core CI machine; the goal is < 0.1 s


def test_extreme_aspect_ratio_and_declared_size(server):
    strip = chat(server, {**user([image_part(png(1, 60_000)), {"type": "text", "text": "?"}])})
    assert strip.status_code == 200, strip.text
    for (width, height), message in (
        ((5000, 5000), "5000x5000 pixels is too large (limit 16,000,000 pixels)"),  # the server's limit
        ((100_000, 100_000), "too large (decompression bomb guard)"),  # PIL's own, at open
    ):
        bomb = chat(server, user([image_part(png_claiming(width, height)), {"type": "text", "text": "?"}]))
        assert bomb.status_code == 400 and message in bomb.json()["error"]["message"], bomb.text


def _wait_for(condition, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _long_request(stream: bool) -> dict:
    return {**user("Tell me everything."), "max_tokens": LONG, "ignore_eos": True, "stream": stream}


def test_a_dropped_stream_stops_generating(server):
    cancelled = metric(server, "mmllm_cancelled_total")
    tokens = metric(server, "mmllm_generated_tokens_total")
    content = json.dumps(_long_request(stream=True)).encode()
    headers = {**AUTH, "content-type": "application/json"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=headers, content=content) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")  # the stream has begun; now the client goes away
    assert _wait_for(lambda: metric(server, "mmllm_cancelled_total") == cancelled + 1)
    assert metric(server, "mmllm_generated_tokens_total") - tokens < 2000  # it stopped long before its end
    start = time.perf_counter()
    assert chat(server, user("hi")).status_code == 200
    assert time.perf_counter() - start < 3  # nothing left running ahead of it


def test_a_short_request_does_not_wait_for_a_long_stream(server):
    # The continuous scheduler lets the short one join the running batch and leave when done: it
    # finishes while the long answer is still streaming (behind a dynamic batch it waited for all of it).
    ttft = metric(server, "mmllm_time_to_first_token_seconds_count")
    content = json.dumps(_long_request(stream=True)).encode()
    headers = {**AUTH, "content-type": "application/json"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=headers, content=content) as response:
        lines = (line for line in response.iter_lines() if line)
        assert next(lines).startswith("data:") and '"content": "' in next(lines)  # it is generating
        short = chat(server, {**user("hi"), "max_tokens": 3, "ignore_eos": True})
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
        assert metric(server, "mmllm_running_requests") == 1  # the long one, still going
        assert "[DONE]" not in "".join(line for _, line in zip(range(3), lines, strict=False))
    assert _wait_for(lambda: metric(server, "mmllm_running_requests") == 0)
    assert metric(server, "mmllm_time_to_first_token_seconds_count") == ttft + 2


def test_a_dropped_plain_request_stops_generating(server):
    cancelled = metric(server, "mmllm_cancelled_total")
    tokens = metric(server, "mmllm_generated_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        chat(server, _long_request(stream=False), timeout=1.0)
    assert _wait_for(lambda: metric(server, "mmllm_cancelled_total") == cancelled + 1)
    assert metric(server, "mmllm_generated_tokens_total") - tokens < 2000  # it stopped long before its end
    assert metric(server, "mmllm_requests_total", path="/v1/chat/completions", status="499") >= 1


def test_timeouts_are_504_and_counted_among_5xx(server):
    before = metric(server, "mmllm_requests_total", status="504")
    response = chat(server, _long_request(stream=False))
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    assert metric(server, "mmllm_requests_total", status="504") == before + 1


def test_model_names(server):
    names = [m["id"] for m in httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"]]
    assert "mmllm" in names and len(names) == 2
    for name in names:
        assert chat(server, {**user("hi"), "model": name}).status_code == 200
    unknown = chat(server, {**user("hi"), "model": "gpt-4o"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found" and "gpt-4o" in unknown.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "messages.0.content: content is null; give a string or a list of content parts"),
        ([{"type": "video", "video": {}}], "Input tag 'video' found using 'type' does not match"),
        ([{"text": "no type"}], "part 0 needs a `type`"),
        ([{"type": "image_url"}], "messages.0.content.0.image_url: Field required"),
        ([{"type": "image_url", "image_url": {}}], "messages.0.content.0.image_url.url: Field required"),
        (
            [{"type": "input_audio", "input_audio": {}}],
            "messages.0.content.0.input_audio.data: Field required",
        ),
        ([{"type": "text"}], "messages.0.content.0.text: Field required"),
        (42, "content is int; give a string or a list of content parts"),
    ],
)
def test_malformed_content_is_named(server, content, message):
    response = chat(server, user(content))
    assert response.status_code == 400
    assert message in response.json()["error"]["message"], response.text


def test_one_rule_for_the_key(server):
    for public in ("/health", "/openapi.json", "/docs"):
        assert httpx.get(f"{server}{public}").status_code == 200, public
    for guarded in ("/v1/models", "/metrics", "/no/such/path"):
        response = httpx.get(f"{server}{guarded}")
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server}/no/such/path", headers=AUTH).status_code == 404


def test_wrong_method_is_405_with_allow(server):
    response = httpx.request("TRACE", f"{server}/v1/chat/completions", headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_one_bad_request_never_fails_its_neighbours(server):
    good = user([image_part(png(40, 30)), {"type": "text", "text": "What is in this image?"}])
    alone = chat(server, good).json()["choices"][0]["message"]["content"]
    bad = user([image_part(b"\x89PNG\r\n\x1a\n broken"), {"type": "text", "text": "What is in this image?"}])
    results: list[httpx.Response] = [None] * 16  # type: ignore[list-item]

    def send(i: int) -> None:
        results[i] = chat(server, good if i % 2 else bad)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, response in enumerate(results):
        if i % 2:
            assert (
                response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == alone
            )
        else:
            assert response.status_code == 400 and "bad image" in response.json()["error"]["message"]


def test_every_status_is_counted(server):
    cases = [("/v1/chat/completions", "200"), ("/v1/chat/completions", "400"), ("/v1/models", "401")]
    cases.append(("/v1/chat/completions", "404"))
    before = [metric(server, "mmllm_requests_total", path=p, status=s) for p, s in cases]
    chat(server, user("hi"))
    chat(server, user(None))
    httpx.get(f"{server}/v1/models")
    chat(server, {**user("hi"), "model": "nope"})
    after = [metric(server, "mmllm_requests_total", path=p, status=s) for p, s in cases]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]
