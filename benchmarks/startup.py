"""How long `mmllm` takes to start: every command's `--help`, `--version`, and a whole `mmllm ask` of
the default model on the torch backend and on the llama.cpp backend (over the model's GGUF export,
made first), each a fresh process timed from outside, after a warm-up run (warm page cache).

    python benchmarks/startup.py [--runs 5] [--quick]

Targets (issue #34): each `--help` and `--version` <= 0.5 s; `ask` <= 6 s on torch, <= 3 s on llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report

MMLLM = [sys.executable, "-m", "mmllm"]
COMMANDS = [
    "ask",
    "caption",
    "info",
    "features",
    "train",
    "merge",
    "data",
    "eval",
    "serve",
    "ui",
    "transcribe",
    "export",
    "weights",
]
QUESTION = ["ask", "sample:chelsea", "What animal is this?"]


def wall_seconds(argv: list[str], runs: int) -> tuple[list[float], str]:
    """Wall seconds of `runs` fresh processes after one warm-up, and the last run's output."""
    times, output = [], ""
    for attempt in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
        if attempt:
            times.append(time.perf_counter() - start)
        output = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return times, output


def row(label: str, argv: list[str], runs: int, target: float) -> dict:
    times, output = wall_seconds(argv, runs)
    median = statistics.median(times)
    print(f"{label}: median {median:.3f} s", file=sys.stderr, flush=True)
    return {
        "command": label,
        "median s": f"{median:.3f}",
        "min s": f"{min(times):.3f}",
        "max s": f"{max(times):.3f}",
        "target s": target,
        "met": "yes" if median <= target else "NO",
        "prints": output[:40],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command, after one warm-up")
    parser.add_argument("--quick", action="store_true", help="2 runs, and only a few --help commands")
    args = parser.parse_args()
    runs = 2 if args.quick else args.runs
    helps = COMMANDS[:3] if args.quick else COMMANDS
    rows = [row("mmllm --version", [*MMLLM, "--version"], runs, 0.5)]
    rows.append(row("mmllm --help", [*MMLLM, "--help"], runs, 0.5))
    rows += [row(f"mmllm {name} --help", [*MMLLM, name, "--help"], runs, 0.5) for name in helps]
    rows.append(row("mmllm ask (torch)", [*MMLLM, *QUESTION], runs, 6.0))
    gguf = Path(tempfile.mkdtemp(prefix="mmllm-startup-")) / "gguf"
    try:
        subprocess.run([*MMLLM, "export", "gguf", "default", str(gguf)], check=True, capture_output=True)
        llama = [*MMLLM, *QUESTION, "--model", str(gguf), "--backend", "llama.cpp"]
        rows.append(row("mmllm ask (llama.cpp)", llama, runs, 3.0))
    finally:
        shutil.rmtree(gguf.parent, ignore_errors=True)
    settings = {"runs": runs, "warm-up runs": 1, "cores": os.cpu_count(), "model": "default (mmllm-photo)"}
    report("startup_quick" if args.quick else "startup", rows, settings)


if __name__ == "__main__":
    main()
