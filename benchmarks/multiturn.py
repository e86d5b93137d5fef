"""Multi-turn chat: time to first token per turn, with and without the prefix cache.

A chat client (the chat page, an OpenAI client) re-sends the whole conversation every turn, image
included; without the prefix cache every turn reads all of it again, so TTFT grows with the
conversation. Protocol: a live, idle `mmllm serve` (uvicorn) over the model, warmed by a conversation
of its own; `--turns` turns, the image in turn 1 only, each answer `--tokens` tokens (ignore_eos);
TTFT is the time from sending a streamed request to its first content chunk; per turn, the least over
`--reps` conversations (each about its own new image): on a shared machine the least is the cost of
the turn itself, the rest is other jobs'. The server runs with `--prefix-cache-mb 0`
(off) and with the default budget (on), one after the other, on the same weights.

Models: the default (mmllm-photo: EfficientNet-Lite0 read as words by SmolLM2-135M, shipped), and
`--lm NAME` under a LLaVA-style recipe (a random CLIP ViT-B/32 tower, patch features, an MLP
projector: 50 image rows; speed does not depend on the tower's weights), e.g. qwen2.5-0.5b-instruct
(`mmllm weights install qwen2.5-0.5b-instruct`).

    python benchmarks/multiturn.py [--lm qwen2.5-0.5b-instruct] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import threading
import time

import httpx
import numpy as np
import torch
from common import RESULTS, report
from PIL import Image

from mmllm.engine.torch_backend import Pipeline, prepare_for_cpu_decoding
from mmllm.models.build import ModelConfig, build_model
from mmllm.serve.app import create_app
from mmllm.serve.config import ServeConfig
from mmllm.serve.launch import free_port

QUESTIONS = [
    "What do you see in this picture?",
    "Which colours stand out the most?",
    "Is there anything unusual about it?",
    "Where could it have been taken?",
    "What time of day does it look like?",
    "Describe the background in more detail.",
    "What would you title this picture?",
    "Summarise our conversation in one sentence.",
]


def photo(seed: int) -> str:
    """A new 256 px image (a data URI): the vision tower runs for each conversation's."""
    pixels = np.random.default_rng(seed).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class LiveServer:
    """`create_app` over `pipeline` under uvicorn on a free port, in a thread, for the block."""

    def __init__(self, pipeline: Pipeline, cfg: ServeConfig):
        import uvicorn

        port = free_port()
        config = uvicorn.Config(create_app(pipeline, cfg), port=port, log_level="warning")
        self.server, self.url = uvicorn.Server(config), f"http://127.0.0.1:{port}"

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()


def turn(client: httpx.Client, messages: list[dict], tokens: int) -> tuple[float, str, dict]:
    """One streamed turn: (TTFT in s, the answer, its usage)."""
    body = {
        "messages": messages,
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, text, usage = time.perf_counter(), None, "", {}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if piece and first is None:
                first = time.perf_counter()
            text += piece or ""
            usage = chunk.get("usage") or usage
    return first - start, text, usage


def conversation(client: httpx.Client, image: str, turns: int, tokens: int) -> list[dict]:
    """A conversation about `image` (sent in turn 1 only): per turn, TTFT and the prompt's tokens."""
    messages: list[dict] = []
    results = []
    for number in range(turns):
        content: str | list = QUESTIONS[number % len(QUESTIONS)]
        if number == 0:
            content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": content}]
        messages.append({"role": "user", "content": content})
        ttft, answer, usage = turn(client, messages, tokens)
        messages.append({"role": "assistant", "content": answer})
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        results.append({"ttft": ttft, "prompt": usage["prompt_tokens"], "cached": cached})
    return results


def run(pipeline: Pipeline, budget_mb: float, args: argparse.Namespace) -> list[list[dict]]:
    with (
        LiveServer(pipeline, ServeConfig(prefix_cache_mb=budget_mb)) as url,
        httpx.Client(base_url=url, timeout=600) as client,
    ):
        conversation(client, photo(1000), 2, args.tokens)  # warm-up: first passes, allocations
        return [conversation(client, photo(rep), args.turns, args.tokens) for rep in range(args.reps)]


def load(args: argparse.Namespace) -> Pipeline:
    if args.lm is None:
        return Pipeline.load(args.model, args.device, args.dtype, compile=args.compile)
    cfg = ModelConfig(
        lm=args.lm, vision="clip-vit-base-patch32", vision_feature_mode="patch", projector_type="mlp_gelu"
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, processor = build_model(cfg, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if device.type == "cpu" and not compiled:
        prepare_for_cpu_decoding(model)
    return Pipeline(model.to(device), processor, compiler="inductor" if compiled else None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="a saved or shipped model (without --lm)")
    parser.add_argument("--lm", help="this LM under a random CLIP tower (LLaVA-style), instead of --model")
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24, help="tokens per answer")
    parser.add_argument("--reps", type=int, default=3, help="conversations per setting")
    parser.add_argument("--quick", action="store_true", help="4 turns of 8 tokens, one conversation (CI)")
    parser.add_argument("--name", default="", help="results file name (default: multiturn[_LM][_quick])")
    parser.add_argument("--out", default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.turns, args.tokens, args.reps = 4, 8, 1
    logging.basicConfig(level=logging.WARNING)
    pipeline = load(args)
    off = run(pipeline, 0, args)
    on = run(Pipeline(pipeline.model, pipeline.processor, compiler=pipeline.compiler), 512, args)
    rows = []
    for number in range(args.turns):
        ttft_off = min(rep[number]["ttft"] for rep in off)
        ttft_on = min(rep[number]["ttft"] for rep in on)
        rows.append(
            {
                "turn": number + 1,
                "prompt tokens": on[0][number]["prompt"],
                "cached tokens": on[0][number]["cached"],
                "TTFT off (ms)": round(1000 * ttft_off, 1),
                "TTFT on (ms)": round(1000 * ttft_on, 1),
            }
        )
    first, last = rows[0], rows[-1]
    ratio = {key: f"{last[key] / first[key]:.2f}x" for key in ("TTFT off (ms)", "TTFT on (ms)")}
    rows.append({"turn": f"turn {args.turns} / turn 1", "prompt tokens": "", "cached tokens": "", **ratio})
    model = args.lm or args.model
    name = args.name or "multiturn" + (f"_{args.lm}" if args.lm else "") + ("_quick" if args.quick else "")
    settings = {
        "model": model,
        "turns": args.turns,
        "tokens": args.tokens,
        "reps": args.reps,
        "compile": pipeline.compiler or "off",
        "load average": os.getloadavg()[0],
    }
    report(name, rows, settings, args.out)


if __name__ == "__main__":
    main()
