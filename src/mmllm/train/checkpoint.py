"""Checkpoints: trained parts + optimiser, scheduler, scaler, RNG and data position, written atomically.

    OUTPUT/checkpoints/step-000100/
        model/      the trained parts, Hub-shaped (loadable by `mmllm ask --model .../model`)
        state.pt    optimiser, scheduler, scaler, RNG states, step and data position

A checkpoint is written to `step-N.tmp` and renamed when complete, so any `step-N` directory is
valid and an interrupted save leaves only a `.tmp` behind, removed at the next save.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import MultimodalProcessor

PREFIX = "step-"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.suffix != ".tmp"]
    return sorted((p for p in found if (p / "state.pt").is_file()), key=lambda p: int(p.name[len(PREFIX) :]))


def save_model(model: MultimodalLM, processor: MultimodalProcessor, directory: Path) -> None:
    """Only what cannot be rebuilt from a base reference (plus the LoRA adapter, if any)."""
    model.save_pretrained(directory, parts=model.parts_without_base())
    processor.save_pretrained(directory)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: MultimodalLM,
    processor: MultimodalProcessor,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    root = Path(output_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    staging = final.with_suffix(".tmp")
    for stale in root.glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(stale)
    staging.mkdir(parents=True)
    save_model(model, processor, staging / "model")
    torch.save({**state, "rng": rng_state(), "step": step}, staging / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / "state.pt", weights_only=False)
