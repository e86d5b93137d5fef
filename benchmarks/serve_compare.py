"""vLLM's CPU build against `mmllm serve` (torch, llama.cpp): the same models, the same requests.

Each server is a real process of its own on loopback, one at a time; clients are `serve_load.py`'s
(httpx, streamed, `stream_options.include_usage`). Per server and model:
- throughput: C concurrent clients (c = 1, 4, 16) x image questions, greedy, `max_tokens` 32 with
  `ignore_eos` (every answer exactly 32 tokens). Each request's image is its own (one of the sample
  photos, cropped at a shift of its own), so neither server's prefix cache holds a request's image.
  Reported: output tokens/s, time to first token p50/p99, the server's peak RSS (the process tree's:
  vLLM's front end and engine core summed), startup time (to a 200 from /health).
- agreement (the precision-matched pair, mmllm torch bf16 and vLLM bf16): the same questions greedy
  without `ignore_eos`, one at a time; identical answers, and the answers' common first tokens.
- mixed rows (c = 16): a third greedy with `ignore_eos`, a third sampled (temperature 0.8, a seed
  each), a third constrained by `response_format` json_schema; tokens/s, TTFT, answers that parse.

Models: the shipped mmllm-easyvqa and the llava-smollm2 recipe (configs/models/llava-smollm2.yaml: a
random CLIP-B/32 tower, SmolLM2-135M-Instruct's weights), built once and exported (`export vllm`,
`export gguf` q8_0) under $MMLLM_HOME/bench/serve_compare.

    python benchmarks/serve_compare.py [--quick] [--models llava-smollm2,mmllm-easyvqa]
    python benchmarks/serve_compare.py --paired 3    # alternating c = 16 rounds, both servers up
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import report
from PIL import Image
from serve_load import PHOTOS, percentile, run

from mmllm.samples import sample
from mmllm.serve.launch import free_port, wait_until_up
from mmllm.weights import mmllm_home

ROOT = Path(__file__).resolve().parents[1]
MMLLM_PYTHON = ROOT / ".venv" / "bin" / "python"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CACHE = mmllm_home() / "bench" / "serve_compare"
RECIPE = ROOT / "configs" / "models" / "llava-smollm2.yaml"
QUESTIONS = (
    "What is in this photo?",
    "Describe this picture in one sentence.",
    "What colours can you see in the image?",
    "Is there a person in this photo?",
)
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue", "yellow", "black", "white", "other"]},
        "living": {"type": "boolean"},
    },
    "required": ["colour", "living"],
    "additionalProperties": False,
}
VLLM_CPU = {  # vLLM's CPU knobs: 2 GiB of KV cache (its default takes most of the memory)
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "HF_HUB_OFFLINE": "1",
}


# ---- models ----------------------------------------------------------------------------------------


def prepare(model: str, needs: set[str]) -> dict[str, str]:
    """The model's saved folder and its `export vllm` and `export gguf` (q8_0) folders, made once."""
    folders = {"mmllm": model}
    if model == "llava-smollm2":
        folder = CACHE / model
        if not (folder / "config.json").is_file():
            import torch

            from mmllm.models.build import load_model

            torch.manual_seed(0)
            built, processor = load_model(str(RECIPE))
            built.save_pretrained(folder)  # every weight: the random tower travels with it
            processor.save_pretrained(folder)
        folders["mmllm"] = str(folder)
    exports = {"vllm": ["vllm"], "gguf": ["gguf", "--outtype", "q8_0", "--tokenizer-pre", "smollm"]}
    for kind in sorted(needs & set(exports)):
        out = CACHE / f"{model}-{kind}"
        if not (out / ".complete").is_file():
            command = [str(MMLLM_PYTHON), "-m", "mmllm.cli", "export", exports[kind][0], folders["mmllm"]]
            subprocess.run([*command, str(out), *exports[kind][1:]], check=True)
            (out / ".complete").write_text("")
        folders[kind] = str(out)
    return folders


# ---- servers ---------------------------------------------------------------------------------------


def server_command(server: dict, folders: dict[str, str], port: int) -> tuple[list[str], dict]:
    if server["engine"] == "vllm":
        command = [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", folders["vllm"],
            "--port", str(port), "--dtype", server["dtype"], "--max-model-len", "2048",
            "--max-num-seqs", "16", *server.get("args", []),
        ]  # fmt: skip
        return command, {**VLLM_CPU, **server.get("env", {})}
    model = folders["gguf"] if server["backend"] == "llama.cpp" else folders["mmllm"]
    command = [
        str(MMLLM_PYTHON), "-m", "mmllm.cli", "serve", "--model", model, "--backend", server["backend"],
        "--dtype", server["dtype"], "--port", str(port), "--max-batch-size", "16", "--max-tokens", "1024",
    ]  # fmt: skip
    return command, {}


class PeakRSS:
    """Polls the process tree's summed RSS every 0.2 s from a thread of its own; keeps the highest."""

    def __init__(self, pid: int):
        self.root, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            total = 0
            try:
                for process in [self.root, *self.root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak / 2**30


class Server:
    """A server process of its own, its log in a temporary file, its peak RSS watched."""

    def __init__(self, server: dict, folders: dict[str, str]):
        port = free_port()
        command, env = server_command(server, folders, port)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (read if the server fails)
        start = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=self.log, env=os.environ | env, start_new_session=True
        )
        self.rss = PeakRSS(self.process.pid)
        self.url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(self.process, f"{self.url}/health", timeout=900)
        except RuntimeError as err:
            self.stop()
            raise RuntimeError(f"{server['name']}: {err}:\n{self.tail()}") from None
        self.startup = time.perf_counter() - start

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> float:
        """End the server (its whole process group: vLLM's engine core too); its peak RSS in GiB."""
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        return self.rss.stop()


# ---- requests --------------------------------------------------------------------------------------


def photo_uri(n: int) -> str:
    """Request `n`'s image: a sample photo, cropped at an offset of its own, 224 px JPEG."""
    picture = sample(PHOTOS[n % len(PHOTOS)])
    image = (Image.open(picture) if isinstance(picture, str) else Image.fromarray(picture)).convert("RGB")
    shift = n // len(PHOTOS) % 64 + 1
    side = min(image.size) - 2 * shift - 8
    image = image.crop((shift, shift, shift + side, shift + side)).resize((224, 224))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def question(n: int, kind: str = "throughput", tokens: int = 32) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": photo_uri(n)}},
        {"type": "text", "text": QUESTIONS[n % len(QUESTIONS)]},
    ]
    body = {"kind": kind, "messages": [{"role": "user", "content": content}], "max_tokens": tokens}
    return {**body, "temperature": 0, "stream": True}


def throughput_bodies(requests: int, tokens: int, offset: int) -> list[dict]:
    return [{**question(offset + n, tokens=tokens), "ignore_eos": True} for n in range(requests)]


def mixed_bodies(requests: int, tokens: int, offset: int) -> list[dict]:
    bodies = []
    for n in range(requests):
        body = question(offset + n, tokens=tokens)
        if n % 3 == 0:
            body = {**body, "kind": "greedy", "ignore_eos": True}
        elif n % 3 == 1:
            body = {**body, "kind": "sampled", "temperature": 0.8, "top_p": 0.95, "seed": n}
        else:
            body["kind"] = "json_schema"
            body["messages"][0]["content"][1]["text"] = (
                "Answer in JSON: the photo's main colour, and whether its subject is alive."
            )
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "photo", "schema": SCHEMA},
            }
        bodies.append(body)
    return bodies


def cpu_seconds(server: Server) -> tuple[float, float]:
    """(every process's CPU seconds, the server tree's and this client's): what others used, in between."""
    times = psutil.cpu_times()
    busy = times.user + times.nice + times.system + times.irq + times.softirq
    own = 0.0
    for process in [psutil.Process(), server.rss.root, *server.rss.root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            used = process.cpu_times()
            own += used.user + used.system
    return busy, own


def measure(server: Server, bodies: list[dict], clients: int) -> dict[str, Any]:
    before = cpu_seconds(server)
    seconds, results = asyncio.run(run(server.url, bodies, clients))
    after = cpu_seconds(server)
    others = (after[0] - before[0] - (after[1] - before[1])) / seconds
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "results": results,
        "tokens": tokens,
        "tokens/s": round(tokens / seconds, 1),
        "TTFT p50 (ms)": round(1000 * percentile(ttfts, 0.5)),
        "TTFT p99 (ms)": round(1000 * percentile(ttfts, 0.99)),
        "others' CPU (cores)": round(max(others, 0.0), 2),
    }


def answers(url: str, bodies: list[dict]) -> list[str]:
    """Greedy answers, one request at a time (no batch to change the sums' order), no `ignore_eos`."""
    plain = [{k: v for k, v in body.items() if k != "ignore_eos"} | {"stream": False} for body in bodies]
    return [r["text"] for r in asyncio.run(run(url, plain, 1))[1]]


def common_tokens(tokenizer, a: str, b: str) -> int:
    x, y = tokenizer.encode(a, add_special_tokens=False), tokenizer.encode(b, add_special_tokens=False)
    return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))


# ---- the run ---------------------------------------------------------------------------------------


def servers(quick: bool) -> list[dict]:
    """What runs, in order. vLLM's best here: bf16 (the CPU has avx512_bf16), both cores for the
    engine (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`; by default it keeps one of two for its front end)."""
    vllm_best = {
        "name": "vLLM bf16",
        "engine": "vllm",
        "dtype": "bfloat16",
        "env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
        "pair": "bf16",
    }
    torch_bf16 = {
        "name": "mmllm torch bf16",
        "engine": "mmllm",
        "backend": "torch",
        "dtype": "bf16",
        "pair": "bf16",
    }
    if quick:
        return [torch_bf16, vllm_best]
    return [
        torch_bf16 | {"mixed": True},
        {"name": "mmllm llama.cpp q8_0", "engine": "mmllm", "backend": "llama.cpp", "dtype": "q8_0"},
        vllm_best | {"mixed": True},
        {"name": "vLLM bf16, 1 core reserved (default)", "engine": "vllm", "dtype": "bfloat16", "models": 1},
        {"name": "mmllm torch fp32", "engine": "mmllm", "backend": "torch", "dtype": "fp32"},
    ]  # fmt: skip


def isa() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    return f"{model}; {os.cpu_count()} cores; " + " ".join(f for f in wanted if f in flags)


def versions() -> dict[str, str]:
    vllm = subprocess.run(
        [
            str(VLLM_PYTHON),
            "-c",
            "import importlib.metadata as m; print(m.version('vllm-cpu'), m.version('torch'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    return {"vllm-cpu": vllm[0] if vllm else "?", "vllm torch": vllm[1] if len(vllm) > 1 else "?"}


def write(args, rows, pairs, began, load, unfinished="") -> None:
    """The results so far (after every server: a run cut short keeps what it measured)."""
    agreement_rows = []
    for model, found in pairs.items():
        if len(found) != 2:
            continue
        from mmllm.models.build import load_processor

        tokenizer = load_processor(prepare(model, set())["mmllm"]).tokenizer
        (a_name, a), (b_name, b) = found.items()
        shared = [common_tokens(tokenizer, x, y) for x, y in zip(a, b, strict=True)]
        agreement_rows.append(
            {
                "model": model,
                "pair": f"{a_name} vs {b_name}",
                "questions": len(a),
                "identical answers": sum(x == y for x, y in zip(a, b, strict=True)),
                "common first tokens (mean)": round(sum(shared) / len(shared), 1),
                "answer tokens (mean)": round(
                    sum(len(tokenizer.encode(x, add_special_tokens=False)) for x in a) / len(a), 1
                ),
                "examples": [[x, y] for x, y in zip(a, b, strict=True)][:3],
            }
        )
    minutes = (time.perf_counter() - began) / 60
    settings = {
        **vars(args),
        "cpu": isa(),
        **versions(),
        "vLLM": "python -m vllm.entrypoints.openai.api_server --dtype bfloat16 --max-model-len 2048 "
        "--max-num-seqs 16; VLLM_CPU_KVCACHE_SPACE=2, VLLM_CPU_NUM_OF_RESERVED_CPU=0 unless said",
        "mmllm": "mmllm serve --max-batch-size 16 (continuous scheduler, prefix cache on, eager on CPU)",
        "load average at start (1, 5, 15 min)": [round(x, 2) for x in load],
        "load average at end": [round(x, 2) for x in os.getloadavg()],
        "minutes": round(minutes, 1),
        "unfinished": unfinished,
        "agreement": agreement_rows,
    }
    notes = [
        f"CPU: {settings['cpu']}. vllm-cpu {settings['vllm-cpu']} (torch {settings['vllm torch']}).",
        f"vLLM: {settings['vLLM']}. mmllm: {settings['mmllm']}.",
        "others' CPU: cores busy with other processes (not the server, not its clients) while a row ran, "
        "of 2. Clients (httpx, streamed) run on the same cores as the server. Peak RSS: the server's process "
        "tree summed (vLLM: front end + engine core; shared pages count once per process).",
        f"Load average when the run began: {settings['load average at start (1, 5, 15 min)']}, at its end: "
        f"{settings['load average at end']} (other work shares the machine). {minutes:.1f} minutes.",
    ]
    if unfinished:
        notes.append(f"Unfinished: {unfinished}")
    if agreement_rows:
        notes.append("Greedy answers without ignore_eos, one request at a time:")
        notes.append(
            "\n".join(
                f"- {r['model']}: {r['pair']}: {r['identical answers']}/{r['questions']} identical, "
                f"{r['common first tokens (mean)']} common first tokens on average "
                f"({r['answer tokens (mean)']} tokens an answer)"
                for r in agreement_rows
            )
        )
    report("serve_compare" + ("_quick" if args.quick else ""), rows, settings, notes="\n\n".join(notes))


@contextlib.contextmanager
def paused(idle: list[Server]):
    """The `idle` servers stopped (SIGSTOP to each process group: vLLM's engine core busy-polls when
    idle, 0.1 of a core here) for the block, resumed after."""
    for server in idle:
        os.killpg(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for server in idle:
            os.killpg(server.process.pid, signal.SIGCONT)


def paired(models: list[str], rounds: int, tokens: int) -> None:
    """c = 16 in alternating rounds, mmllm torch bf16 and vLLM bf16 (both cores) up together, the one
    not measured paused: this machine's speed drifts by 10-15% from minute to minute (other tenants of
    the host), and rounds that take turns share the drift. Reported: each server's median round,
    every round's tokens/s, and what other processes used meanwhile ("others' CPU")."""
    specs = [s for s in servers(False) if s["name"] in ("mmllm torch bf16", "vLLM bf16")]
    rows, began, load = [], time.perf_counter(), os.getloadavg()
    for model in models:
        folders = prepare(model, {"vllm"})
        up = []
        try:
            for spec in specs:
                up.append(Server(spec, folders))
                measure(up[-1], throughput_bodies(4, 8, 1000), 4)  # warm-up
            runs: dict[str, list[dict]] = {spec["name"]: [] for spec in specs}
            for round_ in range(rounds):
                for spec, server in zip(specs, up, strict=True):  # the same requests for both
                    with paused([other for other in up if other is not server]):
                        result = measure(server, throughput_bodies(64, tokens, 2000 + 64 * round_), 16)
                    runs[spec["name"]].append(result)
                    print(
                        f"{model}: {spec['name']}, round {round_ + 1}: {result['tokens/s']} tok/s", flush=True
                    )
        finally:
            for server in up:
                server.stop()
        for spec in specs:
            done = sorted(runs[spec["name"]], key=lambda r: r["tokens/s"])
            middle = done[len(done) // 2]
            rows.append(
                {
                    "model": model,
                    "server": spec["name"],
                    "c": 16,
                    "median output tokens/s": middle["tokens/s"],
                    "TTFT p50 (ms), median round": middle["TTFT p50 (ms)"],
                    "TTFT p99 (ms), median round": middle["TTFT p99 (ms)"],
                    "rounds (tokens/s)": " / ".join(str(r["tokens/s"]) for r in runs[spec["name"]]),
                    "others' CPU (cores), most": max(r["others' CPU (cores)"] for r in runs[spec["name"]]),
                }
            )
    settings = {
        "models": models,
        "rounds": rounds,
        "requests": f"64 x {tokens} tok, ignore_eos, a round",
        "cpu": isa(),
        **versions(),
        "load average at start (1, 5, 15 min)": [round(x, 2) for x in load],
        "minutes": round((time.perf_counter() - began) / 60, 1),
    }
    notes = (
        "Both servers up, the one not measured paused (SIGSTOP); rounds alternate (mmllm, vLLM, ...), "
        f"{rounds} each, 64 requests x {tokens} "
        "tokens at 16 clients a round, every image different. CPU: " + settings["cpu"] + "."
    )
    report("serve_compare_paired", rows, settings, notes=notes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="llava-smollm2,mmllm-easyvqa")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1:8,4:16,16:64", help="clients:requests, comma-separated")
    parser.add_argument("--agreement", type=int, default=16, help="questions for the bf16 pair's answers")
    parser.add_argument("--mixed", type=int, default=30, help="mixed-row requests at c = 16")
    parser.add_argument("--servers", default="", help="only the servers whose names contain one of these")
    parser.add_argument("--quick", action="store_true", help="mmllm-easyvqa; torch bf16 and vLLM; c = 1, 4")
    parser.add_argument(
        "--paired", type=int, default=0, help="only this: N alternating c = 16 rounds, mmllm bf16 vs vLLM"
    )
    args = parser.parse_args()
    if args.paired:
        paired(args.models.split(","), args.paired, args.tokens)
        return
    if args.quick:
        args.models, args.concurrency, args.agreement, args.mixed = "mmllm-easyvqa", "1:2,4:4", 4, 0
    logging.basicConfig(level=logging.WARNING)
    levels = [tuple(map(int, level.split(":"))) for level in args.concurrency.split(",")]
    began, load = time.perf_counter(), os.getloadavg()
    rows, pairs = [], {}
    models = args.models.split(",")
    for index, model in enumerate(models):
        chosen = [s for s in servers(args.quick) if index < s.get("models", len(models))]
        if args.servers:
            chosen = [s for s in chosen if any(part in s["name"] for part in args.servers.split(","))]
        needs = {
            "vllm" if s["engine"] == "vllm" else "gguf" if s.get("backend") == "llama.cpp" else ""
            for s in chosen
        }
        folders = prepare(model, needs)
        for spec in chosen:
            print(f"{model}: {spec['name']} ...", flush=True)
            server = Server(spec, folders)
            try:
                measure(server, throughput_bodies(4, 8, 1000), 4)  # warm-up (compiles, first batches)
                results, offset = [], 0
                for clients, requests in levels:
                    results.append(
                        (
                            clients,
                            requests,
                            measure(server, throughput_bodies(requests, args.tokens, offset), clients),
                        )
                    )
                    offset += requests
                    done = results[-1][2]
                    others = done["others' CPU (cores)"]
                    print(
                        f"  c = {clients}: {done['tokens/s']} tok/s; others used {others} cores", flush=True
                    )
                mixed = None
                if spec.get("mixed") and args.mixed and model == models[0]:
                    mixed = measure(server, mixed_bodies(args.mixed, args.tokens, 0), 16)
                if spec.get("pair") and args.agreement:
                    pairs.setdefault(model, {})[spec["name"]] = answers(
                        server.url, [question(n) for n in range(args.agreement)]
                    )
            finally:
                peak = server.stop()
            for clients, requests, result in results:
                assert all(r["tokens"] == args.tokens for r in result["results"]), spec["name"]
                rows.append(
                    {
                        "model": model,
                        "server": spec["name"],
                        "requests": f"{requests} x {args.tokens} tok, ignore_eos",
                        "c": clients,
                        "output tokens/s": result["tokens/s"],
                        "TTFT p50 (ms)": result["TTFT p50 (ms)"],
                        "TTFT p99 (ms)": result["TTFT p99 (ms)"],
                        "peak RSS (GiB)": round(peak, 2),
                        "startup (s)": round(server.startup, 1),
                        "others' CPU (cores)": result["others' CPU (cores)"],
                    }
                )
                print(rows[-1], flush=True)
            if mixed:
                kinds = {}
                for r in mixed["results"]:
                    kinds.setdefault(r["kind"], []).append(r)
                constrained = kinds.get("json_schema", [])
                parsed = f"{sum(_parses(r['text']) for r in constrained)}/{len(constrained)} parse"
                rows.append(
                    {
                        **rows[-1],
                        "requests": f"{args.mixed} mixed: greedy / sampled / json_schema ({parsed})",
                        "c": 16,
                        "output tokens/s": mixed["tokens/s"],
                        "TTFT p50 (ms)": mixed["TTFT p50 (ms)"],
                        "TTFT p99 (ms)": mixed["TTFT p99 (ms)"],
                        "others' CPU (cores)": mixed["others' CPU (cores)"],
                    }
                )
                print(rows[-1], flush=True)
            write(args, rows, pairs, began, load, f"the run stopped after {model}: {spec['name']}")
    write(args, rows, pairs, began, load)


def _parses(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"colour", "living"}


if __name__ == "__main__":
    main()
