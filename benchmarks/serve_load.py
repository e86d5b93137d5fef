"""Server throughput and latency under load, with dynamic batching on and off, in one run.

A real `mmllm` server (uvicorn, in this process) on loopback; a bounded number of chat requests
(32-token answers) at concurrency 1, 4 and 16.

    python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--requests 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import threading
import time

import httpx
import uvicorn
from common import report

from mmllm.pipeline import Pipeline
from mmllm.serve.app import create_app
from mmllm.serve.config import ServeConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(pipeline: Pipeline, batching: bool) -> tuple[str, uvicorn.Server]:
    port = free_port()
    cfg = ServeConfig(port=port, max_batch_size=16 if batching else 1, max_wait_ms=20 if batching else 0)
    server = uvicorn.Server(uvicorn.Config(create_app(pipeline, cfg), port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


async def load(url: str, requests: int, concurrency: int, tokens: int) -> tuple[float, list[float]]:
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(client: httpx.AsyncClient, n: int) -> None:
        async with limit:
            body = {
                "messages": [{"role": "user", "content": f"Tell me a short story about the number {n}."}],
                "max_tokens": tokens,
                "ignore_eos": True,
            }
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient() as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, n) for n in range(requests)))
        return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="8 requests of 4 tokens (CI)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.tokens = 8, 4
    logging.basicConfig(level=logging.WARNING)
    pipeline = Pipeline.load(args.model)
    rows = []
    for batching in (False, True):
        url, server = start(pipeline, batching)
        for concurrency in (1, 4, 16):
            seconds, latencies = asyncio.run(load(url, args.requests, concurrency, args.tokens))
            latencies.sort()
            rows.append(
                {
                    "batching": "on" if batching else "off",
                    "concurrency": concurrency,
                    "requests/s": round(args.requests / seconds, 2),
                    "tokens/s": round(args.requests * args.tokens / seconds, 1),
                    "p50 (s)": round(statistics.median(latencies), 2),
                    "p95 (s)": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
                }
            )
        server.should_exit = True
    report("serve_load" + ("_quick" if args.quick else ""), rows, vars(args))


if __name__ == "__main__":
    main()
