"""A training run on disk, and how it resumes. This module alone knows the layout:

    OUTPUT/
        checkpoints/step-000100/
            model/      the trained parts, Hub-shaped (loadable by `mmllm ask --model .../model`)
            state.pt    optimiser, scheduler, scaler, RNG states, step and data position (`TrainState`)
        model/          the final model
        metrics.jsonl   tensorboard/   (written by `tracking.MetricsLogger`)

A checkpoint is written to `step-N.tmp` and renamed when complete, so any `step-N` directory is
valid and an interrupted save leaves only a `.tmp` behind, removed at the next save. A new run never
mixes with an old one in the same OUTPUT: it resumes it, refuses it, or clears it first.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mmllm.errors import MmllmError
from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import MultimodalProcessor

log = logging.getLogger("mmllm")

PREFIX = "step-"
STATE = "state.pt"
RUN_FILES = ("checkpoints", "model", "metrics.jsonl", "tensorboard")  # what a run writes in OUTPUT


@dataclass
class TrainState:
    """Where a run is: what a resumed run needs, besides weights and optimiser, to go on exactly."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    """Batches of the current epoch already used."""
    skipped: int = 0
    """Steps whose update was skipped for a non-finite gradient."""
    data_counts: dict[str, int] = field(default_factory=dict)
    """The data loader's running counts (bad images, truncations, ...)."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.suffix != ".tmp"]
    return sorted((p for p in found if (p / STATE).is_file()), key=lambda p: int(p.name[len(PREFIX) :]))


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint `--resume` names: `auto` (the newest in output_dir, if any), or a path."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoints(output_dir)
        if not found:
            log.info("no checkpoint in %s: starting from scratch", output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise MmllmError(f"{path} is not a checkpoint (no {STATE})")
    return path


def fresh_output_dir(output_dir: Path, overwrite: bool, main_process: bool) -> None:
    """A new run never mixes with an old one: it refuses a used output_dir, or clears it if told to."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise MmllmError(
            f"output_dir {output_dir} holds a previous run ({', '.join(found)}): `--resume auto` continues "
            "it, `overwrite_output_dir=true` starts clean, or choose another output_dir"
        )
    if main_process:
        log.info("output_dir %s: removing the previous run (%s)", output_dir, ", ".join(found))
        for name in found:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_model(
    model: MultimodalLM, processor: MultimodalProcessor, directory: Path, weights: dict | None = None
) -> None:
    """Only what cannot be rebuilt from a base reference (plus the LoRA adapter, if any); `weights`,
    when given, in place of the model's own (a sharded model's, gathered)."""
    model.save_pretrained(directory, parts=model.parts_without_base(), state_dict=weights)
    processor.save_pretrained(directory)


def load_trained_weights(model: MultimodalLM, checkpoint: Path) -> None:
    """Put a checkpoint's trained parts (and LoRA adapter) into a freshly built model."""
    from peft import set_peft_model_state_dict

    model_dir = checkpoint / "model"
    unexpected = model.load_plain_state_dict(load_file(model_dir / "model.safetensors"))
    if unexpected:
        raise MmllmError(f"{checkpoint}: weights that fit no part of this model: {unexpected[:3]}")
    adapter = model_dir / "lora" / "adapter_model.safetensors"
    if adapter.is_file():
        set_peft_model_state_dict(model.language_model, load_file(adapter))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    model: MultimodalLM,
    processor: MultimodalProcessor,
    states: tuple[dict, dict],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Any,
    state: TrainState,
    keep_last: int,
) -> Path:
    """Write `checkpoints/step-N/` atomically and keep only the newest `keep_last`; `states` are the
    model's weights and the optimiser's state (`sharding.whole_states`)."""
    weights, optimizer_state = states
    root = Path(output_dir) / "checkpoints"
    final = root / f"{PREFIX}{state.step:06d}"
    staging = final.with_suffix(".tmp")
    for stale in root.glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(stale)
    staging.mkdir(parents=True)
    save_model(model, processor, staging / "model", weights)
    saved = {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        **asdict(state),
    }
    torch.save(saved, staging / STATE)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def restore(
    checkpoint: Path, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any
) -> tuple[TrainState, dict]:
    """Load a checkpoint's scheduler, scaler and RNG states; returns where the run was and the
    optimiser's state (for `sharding.load_optimizer_state`). Its weights go in before, with
    `load_trained_weights`, so the optimiser is built on them."""
    saved = torch.load(checkpoint / STATE, weights_only=False)
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"])
    state = TrainState(**{name: saved[name] for name in TrainState.__dataclass_fields__})
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.step, state.epoch, state.consumed
    )
    return state, saved["optimizer"]
