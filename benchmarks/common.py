"""Shared benchmark helpers: timing, a markdown table, results as JSON next to the scripts."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}


def timed(fn: Callable[[], int], warmup: Callable[[], Any] | None = None) -> tuple[int, float]:
    """Run `fn` (which returns how many items it processed) after an optional warm-up; (items, seconds)."""
    if warmup is not None:
        warmup()
    start = time.perf_counter()
    items = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return items, time.perf_counter() - start


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Print the table and write `results/NAME.json` (and `.md`)."""
    RESULTS.mkdir(exist_ok=True)
    text = table(rows)
    print(text)
    payload = {"benchmark": name, "machine": machine(), "settings": settings, "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{json.dumps(payload['machine'])}\n\n{text}\n")
