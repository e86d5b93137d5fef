"""Where training metrics go: a JSONL file always, TensorBoard and wandb when available."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mmllm")


class MetricsLogger:
    def __init__(
        self, output_dir: Path, tensorboard: bool, wandb: bool, config: dict[str, Any], resumed_at: int = 0
    ):
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        if resumed_at and path.is_file():  # rows the interrupted run logged after its checkpoint come again
            rows = path.read_text().splitlines(keepends=True)
            path.write_text("".join(row for row in rows if json.loads(row)["step"] <= resumed_at))
        self.file = path.open("a")
        self.writer = self.run = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                log.info("TensorBoard logging off: pip install tensorboard")
        if wandb:
            try:
                import wandb as wandb_module

                self.run = wandb_module.init(project="mmllm", dir=str(output_dir), config=config)
            except ImportError:
                log.info("wandb logging off: pip install wandb")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
