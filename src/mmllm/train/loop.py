"""The training loop: accelerate for devices, precision and DDP; exact token-weighted loss; exact resume.

Loss normalisation: every micro-batch's summed token loss is divided by the number of trained
tokens in the whole optimiser step across all processes, so one process with batch B, or two with
B/2 each, or gradient accumulation, all give the same gradient.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmllm.conversation import IGNORE_INDEX
from mmllm.data.config import DataConfig
from mmllm.data.features import cache_for_training
from mmllm.data.loading import LoadReport, build_dataloader, processor_for
from mmllm.errors import MmllmError
from mmllm.models.build import build_model, load_model
from mmllm.models.labels import LabelBridge
from mmllm.models.multimodal import MultimodalLM
from mmllm.models.nf4 import nf4_layers
from mmllm.processor import MultimodalProcessor
from mmllm.train.checkpoint import (
    TrainState,
    find_resume,
    fresh_output_dir,
    load_trained_weights,
    restore,
    save_checkpoint,
    save_model,
)
from mmllm.train.config import TrainConfig
from mmllm.train.losses import ImageLosses
from mmllm.train.parts import parameter_groups, parameter_table, qlora_quantization_config, setup_parts
from mmllm.train.sharding import (
    enable_fsdp_on_cpu,
    held_parameters,
    load_optimizer_state,
    whole_states,
    whole_weights,
)
from mmllm.train.tracking import MetricsLogger

log = logging.getLogger("mmllm")


def cosine_schedule(total: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, round(total * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def trained_tokens(batch: dict) -> int:
    """Tokens that carry a loss (labels shift by one inside the LM)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process that trained before (a notebook, a test session): accelerate keeps its first run's
        # state for the process and refuses another precision, so each run starts from a fresh one.
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        # Without a GPU, a torchrun/`accelerate launch` world still trains: one CPU process per rank (gloo).
        cpu=not torch.cuda.is_available(),
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision],
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    enable_fsdp_on_cpu(accelerator)
    if cfg.data.batch_size % accelerator.num_processes:
        raise MmllmError(
            f"data.batch_size {cfg.data.batch_size} must divide by {accelerator.num_processes} processes"
        )
    return accelerator


def _model(cfg: TrainConfig, resume_from: Path | None) -> tuple[MultimodalLM, MultimodalProcessor]:
    """The model to train, with exactly the recipe's parts trainable (and a checkpoint's weights)."""
    quantization = qlora_quantization_config(cfg.precision) if cfg.parts.language_model == "qlora" else None
    if cfg.init_from:
        model, processor = load_model(cfg.init_from, quantization_config=quantization)
    else:
        model, processor = build_model(cfg.model, quantization_config=quantization)
    processor = processor_for(cfg.data, processor)  # saved with the model: it answers as it was trained
    setup_parts(model, cfg.parts, cfg.lora)
    if resume_from:
        load_trained_weights(model, resume_from)
    if cfg.gradient_checkpointing:
        lm = model.language_model  # transformers 5.24 renamed it; older 5.x have only the first name
        getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)()
        model.language_model.enable_input_require_grads()
    if cfg.compile:
        _compile_layers(model)
    return model, processor


def _check_4bit(model: MultimodalLM, precision: str, main: bool) -> None:
    """Raise unless the LM's linear layers are QLoRA's NF4 (`nf4.nf4_layers`); say so at the start."""
    layers = nf4_layers(model.language_model)
    if main:
        log.info(
            "QLoRA: %d linear layers of the LM in 4-bit NF4 (double quantisation), matmuls in %s; "
            "in full precision: %s",
            len(layers),
            precision,
            ", ".join(model.config.base_quantization["full_precision"]) or "none",
        )


def _compile_layers(model: MultimodalLM) -> None:
    """Compile each decoder layer in place, so its weights keep their names in checkpoints. The layers
    hold the time; they share one code path, and lengths are dynamic, so a few graphs serve the run."""
    layers = [m for m in model.language_model.modules() if type(m).__name__ in model._no_split_modules]
    if not layers:
        raise MmllmError(
            f"compile: true: {type(model.language_model).__name__} names no decoder layers "
            "(_no_split_modules) to compile; set compile: false"
        )
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compiling %d %s layers (the first steps take longer)", len(layers), type(layers[0]).__name__)


def _check_words_model_data(model: MultimodalLM, dataset, data: DataConfig) -> None:
    """A model that reads images as words learns from the words: its data must be text (the bridge's
    sentences already in the prompt), not images it has no rows for; and label-qa's sentences, written
    by the bridge at its default settings, only where the model's bridge is set so."""
    if not model.config.reads_images_as_words:
        return
    if any(spec.format == "label-qa" for spec in data.datasets) and (
        model.config.labels_bridge != (written_with := LabelBridge().settings)
    ):
        raise MmllmError(
            f"label-qa writes the bridge's sentences at its defaults ({written_with}); this model's bridge "
            f"reads at {model.config.labels_bridge}: train at the defaults, or the model would learn from "
            "sentences it is never shown"
        )
    with_images = [s.id for s in getattr(dataset, "samples", ()) if s.images]
    if with_images or not hasattr(dataset, "samples"):
        raise MmllmError(
            "this model reads images as words (the labels projector): train its language model on text "
            "with the bridge's sentences in the prompts, e.g. data.datasets=[{format: label-qa}]"
            + (
                f"; {len(with_images)} samples here have images (first: {with_images[0]})"
                if with_images
                else ""
            )
        )


def _steps(cfg: TrainConfig, loader) -> tuple[int, int]:
    """(steps of the whole schedule, the step this run stops at)."""
    try:
        steps_per_epoch = len(loader) // cfg.grad_accum
    except TypeError:
        steps_per_epoch = 0
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    if total <= 0:
        raise MmllmError("set max_steps: a streamed dataset has no length to derive steps from")
    return total, min(total, cfg.stop_after) if cfg.stop_after > 0 else total


@dataclass
class _StepResult:
    loss: float
    grad_norm: float
    tokens: int  # every token the step read, padding excluded (for throughput)


class _Trainer:
    """One optimiser step at a time: micro-batches, the token-weighted loss, clipping, the update."""

    def __init__(self, cfg: TrainConfig, accelerator, model, optimizer, scheduler, ignore_ids: list[int]):
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.optimizer, self.scheduler, self.ignore_ids = optimizer, scheduler, ignore_ids
        self.image_losses = ImageLosses(cfg)
        if not cfg.language_loss_weight and (not self.image_losses or accelerator.num_processes > 1):
            raise MmllmError(
                "language_loss_weight: 0 needs contrastive_weight or token_target_weight > 0 and one "
                "process (DDP syncs in LM forward)"
            )
        if self.image_losses and cfg.data.pack:
            raise MmllmError(
                "data.pack puts several samples in a row; contrastive_weight and token_target_weight "
                "read one image a row: turn one of them off"
            )
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def _loss(
        self, batch: dict, global_tokens: torch.Tensor, micro_batches: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, its share of the reported loss summed over tokens)."""
        accelerator, weight = self.accelerator, self.cfg.language_loss_weight
        loss = reported = torch.zeros((), device=accelerator.device)
        if weight:
            # The LM divides its summed token loss by this: see the module docstring.
            output = self.model(**batch, num_items_in_batch=global_tokens / accelerator.num_processes)
            loss = weight * output.loss
            reported = output.loss.detach() * global_tokens / accelerator.num_processes
        if self.image_losses:
            images = (
                self.image_losses(accelerator.unwrap_model(self.model), batch, self.ignore_ids)
                / micro_batches
            )
            loss = loss + images
            if not weight:  # the reported loss: the weighted image losses
                reported = images.detach() * global_tokens
        return loss, reported

    def step(self, micro: list[dict]) -> _StepResult:
        accelerator = self.accelerator
        tokens = torch.tensor(float(sum(trained_tokens(b) for b in micro)), device=accelerator.device)
        global_tokens = accelerator.reduce(tokens, "sum")
        reported, seen = torch.zeros((), device=accelerator.device), 0
        for i, batch in enumerate(micro):
            # A packed batch counts its real tokens; a padded one has them in its attention mask.
            seen += batch.pop("real_tokens", None) or int(batch["attention_mask"].sum())
            sync = i == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(self.model), accelerator.autocast():
                loss, share = self._loss(batch, global_tokens, len(micro))
            accelerator.backward(loss)
            reported += share
        grad_norm = accelerator.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip or float("inf"))
        if torch.isfinite(grad_norm) or accelerator.scaler is not None:
            self.optimizer.step()  # with fp16 the scaler itself skips non-finite steps
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(accelerator.reduce(reported, "sum") / global_tokens.clamp(min=1))
        return _StepResult(loss, float(grad_norm), seen)


class _Progress:
    """What a run shows: the console bar (every step's loss, each trained part's learning rate), the
    held-out loss on stderr, and the metrics log (every `log_every` steps, main process only)."""

    def __init__(self, cfg: TrainConfig, output_dir: Path, step: int, end: int, accelerator):
        self.cfg, self.end, self.processes = cfg, end, accelerator.num_processes
        main = accelerator.is_main_process
        config = dataclasses.asdict(cfg)
        self.tracker = (
            MetricsLogger(output_dir, cfg.tensorboard, cfg.wandb, config, resumed_at=step) if main else None
        )
        self.bar = tqdm(total=end, initial=step, desc="train", disable=not main)
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def step(self, state: TrainState, result: _StepResult, optimizer, scheduler) -> None:
        self.window_tokens += result.tokens
        rates = {group["name"]: group["lr"] for group in optimizer.param_groups}  # after this step's schedule
        self.bar.set_postfix(loss=f"{result.loss:.4f}", **{f"lr_{k}": f"{v:.1e}" for k, v in rates.items()})
        self.bar.update(1)
        if self.tracker and (state.step % self.cfg.log_every == 0 or state.step == self.end):
            elapsed = time.perf_counter() - self.window_start
            metrics = {
                "loss": result.loss,
                "lr": scheduler.get_last_lr()[0],
                **{f"lr_{part}": value for part, value in rates.items()},
                "grad_norm": result.grad_norm,
                "tokens_per_s": self.window_tokens * self.processes / max(elapsed, 1e-9),
                "epoch": state.epoch,
                "skipped_steps": state.skipped,
            }
            self.tracker.log(state.step, metrics)
            self.window_start, self.window_tokens = time.perf_counter(), 0

    def held_out(self, step: int, loss: float) -> None:
        if self.tracker:
            self.bar.write(f"mmllm: step {step}: eval_loss {loss:.4f} (held-out)", file=sys.stderr)
            self.tracker.log(step, {"eval_loss": loss})

    def close(self) -> None:
        self.bar.close()
        if self.tracker:
            self.tracker.close()


def train(cfg: TrainConfig, resume: str = "") -> Path:
    """Run a recipe; returns the directory of the final model."""
    from accelerate.utils import set_seed

    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    resume_from = find_resume(cfg.output_dir, resume)
    if not resume_from:
        fresh_output_dir(output_dir, cfg.overwrite_output_dir, main)
        accelerator.wait_for_everyone()
    model, processor = _model(cfg, resume_from)
    if main:
        log.info(
            "%d process(es), %s, %s", accelerator.num_processes, accelerator.distributed_type, cfg.precision
        )
        log.info("trainable parameters:\n%s", parameter_table(model))
    cache = cache_for_training(
        cfg.data.feature_cache, cfg.data.augment.enabled, cfg.parts.vision_tower == "full", model, processor
    )
    loader = build_dataloader(cfg.data, processor, feature_cache=cache)
    _check_words_model_data(model, loader.dataset, cfg.data)
    total, end = _steps(cfg, loader)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim), betas=(cfg.optim.beta1, cfg.optim.beta2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    )
    if cfg.parts.language_model == "qlora" and accelerator.is_fsdp2:
        raise MmllmError("QLoRA with FSDP is out of scope (docs/training.md): launch it without FSDP")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if main and accelerator.is_fsdp2:
        log.info("FSDP2: %s", held_parameters(model))
    if cfg.parts.language_model == "qlora":
        _check_4bit(accelerator.unwrap_model(model), cfg.precision, main)
    trainer = _Trainer(cfg, accelerator, model, optimizer, scheduler, processor.stop_token_ids)
    state = TrainState()
    if resume_from:
        state, optimizer_state = restore(resume_from, scheduler, accelerator.scaler)
        load_optimizer_state(accelerator, model, optimizer, optimizer_state)
    report = LoadReport()
    report.counts.update(state.data_counts)

    def batches() -> Iterator[dict]:
        while True:
            loader.set_epoch(state.epoch)  # accelerate passes it on to our sampler or streamed dataset
            skip = state.consumed
            for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
                state.consumed += 1
                yield report.update(batch)
            state.epoch, state.consumed = state.epoch + 1, 0

    progress = _Progress(cfg, output_dir, state.step, end, accelerator)
    evaluator = _Evaluator(cfg, processor, accelerator, cache) if cfg.eval_data.datasets else None
    stream = batches()
    model.train()
    while state.step < end:
        result = trainer.step([b for b in (next(stream) for _ in range(cfg.grad_accum)) if "input_ids" in b])
        state.step += 1
        if not math.isfinite(result.grad_norm):
            state.skipped += 1
            log.warning(
                "step %d: non-finite gradient norm, update skipped (%d so far)", state.step, state.skipped
            )
        progress.step(state, result, optimizer, scheduler)
        if evaluator and (state.step == end or (cfg.eval_every and state.step % cfg.eval_every == 0)):
            progress.held_out(state.step, evaluator(model))
            model.train()
        if state.step % cfg.save_every == 0 or state.step == end:
            if cfg.parts.language_model == "qlora":  # the base that the adapter trains against is still 4-bit
                _check_4bit(accelerator.unwrap_model(model), cfg.precision, main=False)
            states = whole_states(accelerator, model, optimizer)
            if main:
                state.data_counts = dict(report.counts)
                save_checkpoint(
                    output_dir,
                    accelerator.unwrap_model(model),
                    processor,
                    states,
                    scheduler,
                    accelerator.scaler,
                    state,
                    cfg.keep_last,
                )
            accelerator.wait_for_everyone()
    progress.close()
    final = output_dir / "model"
    weights = whole_weights(accelerator, model)
    if main:
        save_model(accelerator.unwrap_model(model), processor, final, weights)
        log.info(report.summary())
        log.info("final model: %s", final)
    accelerator.wait_for_everyone()
    return final


class _Evaluator:
    """Mean token loss on held-out data (the task metrics live in `mmllm eval`)."""

    def __init__(self, cfg: TrainConfig, processor, accelerator, cache) -> None:
        self.accelerator = accelerator
        self.loader = accelerator.prepare(
            build_dataloader(cfg.eval_data, processor, feature_cache=cache, shuffle=False, train=False)
        )

    @torch.no_grad()
    def __call__(self, model) -> float:
        model.eval()
        total = torch.zeros(2, device=self.accelerator.device)
        for batch in self.loader:
            batch = LoadReport().update(batch)
            if "input_ids" not in batch:
                continue
            with self.accelerator.autocast():
                summed = model(**batch, num_items_in_batch=1).loss  # summed token loss
            total += torch.stack(
                [summed.float(), torch.tensor(float(trained_tokens(batch)), device=total.device)]
            )
        total = self.accelerator.reduce(total, "sum")
        return float(total[0] / total[1].clamp(min=1))
