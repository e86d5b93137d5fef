"""Peak memory (RSS) of QLoRA against LoRA training on a CPU: Qwen2.5-0.5B-Instruct's real weights, the
same LoRA adapters (every attention and MLP projection, r=16), a few steps of `mmllm train`.

Each variant trains in a process of its own, so each peak is its own, measured by the kernel (VmHWM) in
three phases: the runtime (Python, torch, transformers, bitsandbytes imported), loading and setting up
the model (up to the run's parameter table), and the training steps (the peak reset once the model is
set up). A second table breaks the set-up model's memory down by part, from its tensors: Qwen2.5-0.5B's
136M-parameter input embedding is also its output head (tied) and stays in fp32 under QLoRA, like the
norms and biases, so the 4-bit saving (the 358M weights of the projections) is far from 4x the model.

    python benchmarks/qlora_memory.py [--steps 4] [--lm qwen2.5-0.5b-instruct]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, report

VARIANTS = ("lora", "qlora")
ROOT = Path(__file__).resolve().parents[1]
VISION = "configs/easyvqa/clip-easyvqa"  # a small untrained CLIP: the LM is what is measured


def memory() -> dict[str, float]:
    """This process's resident memory now and its peak since the last reset, in MiB."""
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak RSS (VmHWM) starts again from now


def recipe(args: argparse.Namespace, variant: str, out: Path) -> dict:
    return {
        "model": {"lm": args.lm, "vision": str(ROOT / VISION), "vision_feature_mode": "pooled"},
        "parts": {"vision_tower": "frozen", "projector": "full", "language_model": variant},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {
            "datasets": [{"format": "easy-vqa", "split": "train", "limit": 4 * args.steps * args.batch_size}],
            "batch_size": args.batch_size,
            "max_length": 256,
            "num_workers": 0,
        },
        "precision": "bf16",  # the CPU's QLoRA compute; LoRA's autocast the same
        "max_steps": args.steps,
        "save_every": 10**6,
        "output_dir": str(out),
        "tensorboard": False,
    }


def tensor_bytes(tensors) -> int:
    """Bytes a module's tensors hold; a 4-bit weight's block scales (quant_state) included."""
    total = 0
    for tensor in tensors:
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += sum(
                v.numel() * v.element_size()
                for v in state.as_dict(packed=True).values()
                if hasattr(v, "numel")
            )
    return total


def breakdown(model) -> tuple[dict[str, float], dict[str, int]]:
    """MiB of the set-up model by part (what QLoRA quantises, what it leaves in full precision), and the
    parameter counts of the two big ones."""
    import torch

    lm = model.language_model
    embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    # Linear4bit is a torch Linear too; LoRA's own layers are counted with the adapters.
    projections = [
        m.weight
        for n, m in lm.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n and m.weight is not head
    ]
    adapters = [p for n, p in lm.named_parameters() if "lora_" in n]
    counted = {id(t) for t in [embedding, head, *projections, *adapters]}
    rest = [p for p in lm.parameters() if id(p) not in counted]
    mib = 2**20
    parts = {
        "embedding = head (tied)": tensor_bytes([embedding]) / mib,
        "projections (q k v o gate up down)": tensor_bytes(projections) / mib,
        "norms, biases": tensor_bytes(rest) / mib,
        "LoRA + grads + AdamW states": 4 * tensor_bytes(adapters) / mib,
        "vision tower + projector": tensor_bytes(
            [*model.vision_tower.parameters(), *model.projector.parameters()]
        )
        / mib,
    }
    counts = {
        "embedding": embedding.numel(),
        "projections": sum(
            w.quant_state.shape.numel() if hasattr(w, "quant_state") else w.numel() for w in projections
        ),
        "LoRA": sum(p.numel() for p in adapters),
    }
    return parts, counts


def child(args: argparse.Namespace) -> None:
    """One variant's run in this process; prints its measurements as JSON."""
    import bitsandbytes  # noqa: F401  (imported by both variants, so the runtimes compare)

    from mmllm.config import load_config
    from mmllm.models.build import ModelConfig, build_model
    from mmllm.train.config import TrainConfig
    from mmllm.train.loop import train
    from mmllm.train.parts import qlora_quantization_config, setup_parts

    runtime = memory()["VmRSS"]
    phases: dict[str, dict[str, float]] = {}

    class SetUp(logging.Handler):
        """The run logs its parameter table once the model is loaded and set up: the loading phase ends."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("trainable parameters") and "loaded" not in phases:
                phases["loaded"] = memory()
                reset_peak()

    logging.getLogger("mmllm").addHandler(SetUp())
    logging.getLogger("mmllm").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(TrainConfig, None, base=recipe(args, args.child, Path(out)))
        train(cfg)
    steps = memory()["VmHWM"]
    assert "loaded" in phases, "the run logged no parameter table"
    quantization = qlora_quantization_config(cfg.precision) if args.child == "qlora" else None
    model, _ = build_model(
        ModelConfig(**recipe(args, args.child, Path())["model"]), quantization_config=quantization
    )
    setup_parts(model, cfg.parts, cfg.lora)
    print(
        json.dumps(
            {
                "runtime": runtime,
                "loaded": phases["loaded"]["VmRSS"],
                "load_peak": phases["loaded"]["VmHWM"],
                "steps_peak": steps,
                **dict(zip(("parts", "counts"), breakdown(model), strict=True)),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lm", default="qwen2.5-0.5b-instruct")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.child:
        return child(args)
    measured, parts = [], []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--child", variant, "--lm", args.lm, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            sys.exit(f"{variant}: {result.stderr[-3000:]}")
        found = json.loads(result.stdout.strip().splitlines()[-1])
        name = {"lora": "LoRA (fp32 base)", "qlora": "QLoRA (4-bit NF4 base)"}[variant]
        measured.append(
            {
                "variant": name,
                "runtime (MiB)": round(found["runtime"]),
                "after set-up (MiB)": round(found["loaded"]),
                "peak, loading (MiB)": round(found["load_peak"]),
                "peak, training steps (MiB)": round(found["steps_peak"]),
                "peak (MiB)": round(max(found["load_peak"], found["steps_peak"])),
            }
        )
        in_mib = {f"{k} (MiB)": round(v, 1) for k, v in found["parts"].items()}
        parts.append({"variant": name, **in_mib, "total (MiB)": round(sum(found["parts"].values()))})
    settings = {
        **{k: str(v) for k, v in vars(args).items() if k not in ("child", "out")},
        "parameters": found["counts"],
        "vision": VISION,
        "data": f"easy-VQA train questions, batch {args.batch_size}, max 256 tokens, bf16 autocast",
        "peak": "the kernel's VmHWM: reset once the model is set up, so the two phases' peaks are their own",
    }
    report("qlora_memory", measured, settings, args.out)
    report("qlora_memory_breakdown", parts, settings, args.out)


if __name__ == "__main__":
    main()
