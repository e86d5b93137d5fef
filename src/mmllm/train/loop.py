"""The training loop: accelerate for devices, precision and DDP; exact token-weighted loss; exact resume.

Loss normalisation: every micro-batch's summed token loss is divided by the number of trained
tokens in the whole optimiser step across all processes, so one process with batch B, or two with
B/2 each, or gradient accumulation, all give the same gradient.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mmllm.data.features import cache_for_training
from mmllm.data.loading import LoadReport, build_dataloader, processor_for
from mmllm.errors import MmllmError
from mmllm.models.build import build_model, load_model
from mmllm.processor import IGNORE_INDEX
from mmllm.train.checkpoint import checkpoints, load_state, save_checkpoint, save_model, set_rng_state
from mmllm.train.config import TrainConfig
from mmllm.train.losses import contrastive_loss, token_target_loss
from mmllm.train.parts import parameter_groups, parameter_table, qlora_quantization_config, setup_parts
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


def find_resume(output_dir: str, resume: str) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        found = checkpoints(output_dir)
        if not found:
            log.info("no checkpoint in %s: starting from scratch", output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise MmllmError(f"{path} is not a checkpoint (no state.pt)")
    return path


def load_trained_weights(model, checkpoint: Path) -> None:
    """Put a checkpoint's trained parts (and LoRA adapter) into a freshly built model."""
    from peft import set_peft_model_state_dict

    model_dir = checkpoint / "model"
    unexpected = model.load_plain_state_dict(load_file(model_dir / "model.safetensors"))
    if unexpected:
        raise MmllmError(f"{checkpoint}: weights that fit no part of this model: {unexpected[:3]}")
    adapter = model_dir / "lora" / "adapter_model.safetensors"
    if adapter.is_file():
        set_peft_model_state_dict(model.language_model, load_file(adapter))


def train(cfg: TrainConfig, resume: str = "") -> Path:
    """Run a recipe; returns the directory of the final model."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        # Without a GPU, a torchrun/`accelerate launch` world still trains: one CPU process per rank (gloo).
        cpu=not torch.cuda.is_available(),
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision],
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    if cfg.data.batch_size % accelerator.num_processes:
        raise MmllmError(
            f"data.batch_size {cfg.data.batch_size} must divide by {accelerator.num_processes} processes"
        )
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    resume_from = find_resume(cfg.output_dir, resume)
    if not resume_from:
        _fresh_output_dir(output_dir, cfg.overwrite_output_dir, accelerator)

    quantization = qlora_quantization_config() if cfg.parts.language_model == "qlora" else None
    if cfg.init_from:
        model, processor = load_model(cfg.init_from)
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
    if accelerator.is_main_process:
        log.info(
            "%d process(es), %s, %s", accelerator.num_processes, accelerator.distributed_type, cfg.precision
        )
        log.info("trainable parameters:\n%s", parameter_table(model))

    cache = cache_for_training(
        cfg.data.feature_cache, cfg.data.augment.enabled, cfg.parts.vision_tower == "full", model, processor
    )
    loader = build_dataloader(cfg.data, processor, feature_cache=cache)
    try:
        steps_per_epoch = len(loader) // cfg.grad_accum
    except TypeError:
        steps_per_epoch = 0
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    if total <= 0:
        raise MmllmError("set max_steps: a streamed dataset has no length to derive steps from")
    image_losses = {
        loss: weight
        for loss, weight in (
            (contrastive_loss, cfg.contrastive_weight),
            (partial(token_target_loss, vocab_weight=cfg.token_target_vocab_weight), cfg.token_target_weight),
        )
        if weight
    }
    if not cfg.language_loss_weight and (not image_losses or accelerator.num_processes > 1):
        raise MmllmError(
            "language_loss_weight: 0 needs contrastive_weight or token_target_weight > 0 and one process "
            "(DDP syncs in LM forward)"
        )
    end = min(total, cfg.stop_after) if cfg.stop_after > 0 else total

    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim), betas=(cfg.optim.beta1, cfg.optim.beta2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    trainable = [p for p in model.parameters() if p.requires_grad]

    step, epoch, consumed, skipped = 0, 0, 0, 0
    report = LoadReport()
    if resume_from:
        state = load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step, epoch, consumed, skipped = state["step"], state["epoch"], state["consumed"], state["skipped"]
        report.counts.update(state["data_counts"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, consumed)

    def batches() -> Iterator[dict]:
        nonlocal epoch, consumed
        while True:
            loader.set_epoch(epoch)  # accelerate passes it on to our sampler or streamed dataset
            for batch in accelerator.skip_first_batches(loader, consumed) if consumed else loader:
                consumed += 1
                yield report.update(batch)
            epoch, consumed = epoch + 1, 0

    tracker = (
        MetricsLogger(output_dir, cfg.tensorboard, cfg.wandb, dataclasses.asdict(cfg), resumed_at=step)
        if accelerator.is_main_process
        else None
    )
    evaluator = _Evaluator(cfg, processor, accelerator, cache) if cfg.eval_data.datasets else None
    stream = batches()
    progress = tqdm(total=end, initial=step, desc="train", disable=not accelerator.is_main_process)
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    while step < end:
        micro = [b for b in (next(stream) for _ in range(cfg.grad_accum)) if "input_ids" in b]
        tokens = torch.tensor(float(sum(trained_tokens(b) for b in micro)), device=accelerator.device)
        global_tokens = accelerator.reduce(tokens, "sum")
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss = torch.zeros((), device=accelerator.device)
                if cfg.language_loss_weight:
                    # The LM divides its summed token loss by this: see the module docstring.
                    output = model(**batch, num_items_in_batch=global_tokens / accelerator.num_processes)
                    loss = cfg.language_loss_weight * output.loss
                    loss_sum += output.loss.detach() * global_tokens / accelerator.num_processes
                for image_loss, weight in image_losses.items():
                    aligned = (
                        weight
                        * image_loss(
                            accelerator.unwrap_model(model), batch, ignore_ids=processor.stop_token_ids
                        )
                        / len(micro)
                    )
                    loss = loss + aligned
                    if not cfg.language_loss_weight:  # the reported loss: the weighted image losses
                        loss_sum += aligned.detach() * global_tokens
            accelerator.backward(loss)
            window_tokens += int(batch["attention_mask"].sum())
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip or float("inf"))
        if torch.isfinite(grad_norm) or accelerator.scaler is not None:
            optimizer.step()  # with fp16 the scaler itself skips non-finite steps
        if not torch.isfinite(grad_norm):
            skipped += 1
            log.warning("step %d: non-finite gradient norm, update skipped (%d so far)", step + 1, skipped)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = float(accelerator.reduce(loss_sum, "sum") / global_tokens.clamp(min=1))
        rates = {group["name"]: group["lr"] for group in optimizer.param_groups}  # after this step's schedule
        # Every step's loss and each trained part's learning rate on the bar; the logs every log_every.
        progress.set_postfix(loss=f"{loss_value:.4f}", **{f"lr_{k}": f"{v:.1e}" for k, v in rates.items()})
        progress.update(1)
        if step % cfg.log_every == 0 or step == end:
            elapsed = time.perf_counter() - window_start
            rate = window_tokens * accelerator.num_processes / max(elapsed, 1e-9)
            metrics = {
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                **{f"lr_{part}": value for part, value in rates.items()},
                "grad_norm": float(grad_norm),
                "tokens_per_s": rate,
                "epoch": epoch,
                "skipped_steps": skipped,
            }
            if tracker:
                tracker.log(step, metrics)
            window_start, window_tokens = time.perf_counter(), 0
        if evaluator and (step == end or (cfg.eval_every and step % cfg.eval_every == 0)):
            eval_loss = evaluator(model)
            if accelerator.is_main_process:
                progress.write(f"mmllm: step {step}: eval_loss {eval_loss:.4f} (held-out)", file=sys.stderr)
            if tracker:
                tracker.log(step, {"eval_loss": eval_loss})
            model.train()
        if step % cfg.save_every == 0 or step == end:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "epoch": epoch,
                    "consumed": consumed,
                    "skipped": skipped,
                    "data_counts": dict(report.counts),
                }
                save_checkpoint(
                    output_dir, step, accelerator.unwrap_model(model), processor, state, cfg.keep_last
                )
            accelerator.wait_for_everyone()
    progress.close()
    final = output_dir / "model"
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), processor, final)
        log.info(report.summary())
        log.info("final model: %s", final)
        if tracker:
            tracker.close()
    accelerator.wait_for_everyone()
    return final


RUN_FILES = ("checkpoints", "model", "metrics.jsonl", "tensorboard")  # what a run writes in output_dir


def _fresh_output_dir(output_dir: Path, overwrite: bool, accelerator) -> None:
    """A new run never mixes with an old one: it refuses a used output_dir, or clears it if told to."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise MmllmError(
            f"output_dir {output_dir} holds a previous run ({', '.join(found)}): `--resume auto` continues "
            "it, `overwrite_output_dir=true` starts clean, or choose another output_dir"
        )
    if accelerator.is_main_process:
        log.info("output_dir %s: removing the previous run (%s)", output_dir, ", ".join(found))
        for name in found:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


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
