"""The server under a mixed load, the old dynamic batcher and the continuous scheduler side by side.

A real `mmllm serve` (a process of its own) on loopback, for each kind of request queue:
- idle: a short image question (a photo, answered in a few words) alone, its latency;
- head of line: the same question sent while a 300-token answer streams: its latency, and the ratio
  to idle (the target: at most 2x);
- sequential, then `--clients` concurrent clients over one mixed workload: half short image questions
  (up to 16 tokens), half long `ignore_eos` generations (64 to 256 tokens), every other one streamed.
  Reported: p50/p99 time to first token (streamed requests), p50/p99 latency of the short ones, total
  tokens/s and its ratio to sequential (the target: at least 3x), whether every answer equals the
  sequential one (all greedy), and the slowest `/health` seen while it ran (the target: under 100 ms).

    python benchmarks/serve_load.py [--model default] [--clients 16] [--requests 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from common import report
from PIL import Image

from mmllm.samples import sample
from mmllm.serve.launch import free_port, wait_until_up

PHOTOS = ("chelsea", "astronaut", "coffee", "motorcycle", "rocket", "grace_hopper")
HEAD_OF_LINE_TOKENS = 300


def start(model: str, backend: str, scheduler: str, clients: int) -> tuple[str, subprocess.Popen]:
    """`mmllm serve` in a process of its own, as deployed (clients in this one cannot slow it down)."""
    port = free_port()
    command = [
        sys.executable, "-m", "mmllm.cli", "serve", "--model", model, "--backend", backend,
        "--port", str(port), "--scheduler", scheduler, "--max-batch-size", str(clients),
        "--max-tokens", "1024",
    ]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server's log, read if it fails to start)
    process = subprocess.Popen(command, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, f"{url}/health", timeout=600)
    except RuntimeError as err:
        log.seek(0)
        raise SystemExit(f"{err}:\n{log.read().decode()[-3000:]}") from None
    return url, process


def data_uri(name: str) -> str:
    photo = sample(name)
    image = Image.open(photo) if isinstance(photo, str) else Image.fromarray(photo)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def workload(requests: int, quick: bool) -> list[dict]:
    """Request bodies (with a `kind` key, dropped before sending): short image questions and long
    generations, alternating, every other one of each kind streamed."""
    rng = random.Random(0)
    photos = {name: data_uri(name) for name in PHOTOS}
    bodies = []
    for n in range(requests):
        stream = n % 4 >= 2
        if n % 2 == 0:
            photo = PHOTOS[(n // 2) % len(PHOTOS)]
            content = [
                {"type": "text", "text": "What is in this photo?"},
                {"type": "image_url", "image_url": {"url": photos[photo]}},
            ]
            body = {"kind": "short", "messages": [{"role": "user", "content": content}], "max_tokens": 16}
        else:
            tokens = rng.randint(8, 24) if quick else rng.randint(64, 256)
            body = {
                "kind": "long",
                "messages": [{"role": "user", "content": f"Tell me a long story about the number {n}."}],
                "max_tokens": tokens,
                "ignore_eos": True,
            }
        bodies.append({**body, "stream": stream, "temperature": 0})
    return bodies


async def send(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One request: its answer, tokens, latency and (streamed) time to first token."""
    payload = {k: v for k, v in body.items() if k != "kind"}
    start = time.perf_counter()
    if not body["stream"]:
        response = await client.post(f"{url}/v1/chat/completions", json=payload, timeout=900)
        response.raise_for_status()
        answer = response.json()
        text, tokens, first = (
            answer["choices"][0]["message"]["content"],
            answer["usage"]["completion_tokens"],
            None,
        )
    else:
        payload["stream_options"] = {"include_usage": True}
        pieces, tokens, first = [], 0, None
        async with client.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=900) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if piece := choice["delta"].get("content"):
                        first = first or time.perf_counter() - start
                        pieces.append(piece)
        text = "".join(pieces)
    return {
        "kind": body["kind"],
        "text": text,
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
        "ttft": first,
    }


class HealthWatch:
    """Polls /health every 50 ms from a thread of its own; keeps the slowest answer."""

    def __init__(self, url: str):
        self.url, self.slowest, self.failures, self.running = url, 0.0, 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        with httpx.Client() as client:
            while self.running:
                start = time.perf_counter()
                try:
                    client.get(f"{self.url}/health", timeout=10).raise_for_status()
                except httpx.HTTPError:
                    self.failures += 1
                self.slowest = max(self.slowest, time.perf_counter() - start)
                time.sleep(0.05)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.slowest


async def run(url: str, bodies: list[dict], clients: int) -> tuple[float, list[dict]]:
    limit = asyncio.Semaphore(clients)

    async def one(client: httpx.AsyncClient, body: dict) -> dict:
        async with limit:
            return await send(client, url, body)

    async with httpx.AsyncClient() as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, body) for body in bodies))
        return time.perf_counter() - start, list(results)


async def head_of_line(url: str, short: dict, long_tokens: int) -> float:
    """The short request's latency while a long answer streams (sent once the long one has begun)."""
    long_body = {
        "kind": "long",
        "messages": [{"role": "user", "content": "Tell me everything you know."}],
        "max_tokens": long_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    async with httpx.AsyncClient() as client:
        started = asyncio.Event()

        async def long_stream() -> None:
            payload = {k: v for k, v in long_body.items() if k != "kind"}
            async with client.stream(
                "POST", f"{url}/v1/chat/completions", json=payload, timeout=900
            ) as response:
                async for _ in response.aiter_lines():
                    started.set()

        streaming = asyncio.create_task(long_stream())
        await started.wait()
        await asyncio.sleep(0.5)  # well into the long answer
        result = await send(client, url, short)
        await streaming
        return result["seconds"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", default="torch", help="torch or llama.cpp (an `export gguf` folder)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="8 requests, short answers (CI)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.clients = 8, 4
    long_tokens = 40 if args.quick else HEAD_OF_LINE_TOKENS
    logging.basicConfig(level=logging.WARNING)
    bodies = workload(args.requests, args.quick)
    short = {**bodies[0], "stream": False}
    rows = []
    for scheduler in ("batch", "continuous"):
        url, server = start(args.model, args.backend, scheduler, args.clients)
        asyncio.run(run(url, bodies[:2], 1))  # warm-up
        idle = statistics.median(asyncio.run(run(url, [short] * 3, 1))[1][i]["seconds"] for i in range(3))
        watch = HealthWatch(url)
        blocked = asyncio.run(head_of_line(url, short, long_tokens))
        sequential_s, sequential = asyncio.run(run(url, bodies, 1))
        concurrent_s, concurrent = asyncio.run(run(url, bodies, args.clients))
        slowest_health = watch.stop()
        server.terminate()
        server.wait(timeout=60)
        tokens = sum(r["tokens"] for r in concurrent)
        shorts = [r["seconds"] for r in concurrent if r["kind"] == "short"]
        ttfts = [r["ttft"] for r in concurrent if r["ttft"] is not None]
        rows.append(
            {
                "queue": scheduler,
                "idle short (s)": round(idle, 3),
                "short during a long stream (s)": round(blocked, 3),
                "vs idle": round(blocked / idle, 1),
                "TTFT p50 (s)": round(percentile(ttfts, 0.5), 3),
                "TTFT p99 (s)": round(percentile(ttfts, 0.99), 3),
                "short p50 (s)": round(percentile(shorts, 0.5), 3),
                "short p99 (s)": round(percentile(shorts, 0.99), 3),
                "tokens/s": round(tokens / concurrent_s, 1),
                "sequential tokens/s": round(sum(r["tokens"] for r in sequential) / sequential_s, 1),
                "vs sequential": round(
                    (tokens / concurrent_s) / (sum(r["tokens"] for r in sequential) / sequential_s), 2
                ),
                "answers as sequential": sum(
                    a["text"] == b["text"] for a, b in zip(concurrent, sequential, strict=True)
                ),
                "requests": len(concurrent),
                "slowest /health (ms)": round(1000 * slowest_health, 1),
                "/health failures": watch.failures,
            }
        )
        print(rows[-1], flush=True)
    report("serve_load" + ("_quick" if args.quick else ""), rows, vars(args))


if __name__ == "__main__":
    main()
