"""Training throughput through the real trainer: stage 1 (pixels vs feature cache) and stage 2 LoRA,
padded and packed (`data.pack`).

easy-VQA conversations (one per image), the CLIP ViT-B/32 architecture and SmolLM2-135M by
default. Reports samples/s and real (non-pad) tokens/s (steady state: the first step is warm-up),
and the model FLOPs utilisation (4 x the LM's body weights x tokens/s, `common.lm_weights`, over the
device's peak, stated: a GPU's data sheet, or a measured matmul on a CPU).
A second table (`train_packing`) gives the pad tokens' share of each batch, padded and packed, on
easy-VQA's per-image mix and on a LLaVA-format file of conversations of 1 to 8 turns.

    python benchmarks/train_throughput.py [--quick] [--steps 6] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
from pathlib import Path

import torch
from common import lm_weights, mfu, peak_flops, report

from mmllm.config import load_config
from mmllm.data.config import DataConfig, DatasetSpec
from mmllm.data.features import build_feature_cache
from mmllm.data.loading import build_dataloader
from mmllm.data.readers import read
from mmllm.models.build import ModelConfig, build_model
from mmllm.train.config import TrainConfig
from mmllm.train.loop import train


def steady_rates(metrics_file: Path, batch_size: int) -> tuple[float, float]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()][1:]  # first step: warm-up
    seconds = rows[-1]["time"] - json.loads(metrics_file.read_text().splitlines()[0])["time"]
    tokens = sum(r["tokens_per_s"] for r in rows) / len(rows)
    return len(rows) * batch_size / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lm", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="small vision tower, 3 steps (CI)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    vision = "configs/easyvqa/clip-easyvqa" if args.quick else "clip-vit-base-patch32"
    if args.quick:
        args.steps, args.batch_size = 3, 2
    logging.basicConfig(level=logging.WARNING)
    model_cfg = ModelConfig(lm=args.lm, vision=vision, vision_feature_mode="patch", projector_type="mlp_gelu")
    spec = {
        "format": "easy-vqa",
        "split": "train",
        "per_image": True,
        "limit": args.steps * args.batch_size * 2,
    }
    rows = []
    peak, peak_source = peak_flops(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "cache"
        # One saved model for every variant: a random (offline) vision tower must match the cache.
        model, processor = build_model(model_cfg)
        model.save_pretrained(Path(scratch) / "base")
        processor.save_pretrained(Path(scratch) / "base")
        data = DataConfig(datasets=[DatasetSpec(**spec)])
        build_feature_cache(model, processor, (s for d in data.datasets for s in read(d, data)), cache)
        body, _ = lm_weights(model)
        del model
        variants = [
            ("stage 1 (projector)", "pixels", {"language_model": "frozen"}, ""),
            ("stage 1 (projector)", "feature cache", {"language_model": "frozen"}, str(cache)),
            ("stage 2 (projector + LoRA)", "feature cache", {"language_model": "lora"}, str(cache)),
        ]
        variants.append(
            ("stage 2 (projector + LoRA), packed", "feature cache", {"language_model": "lora"}, str(cache))
        )
        for stage, source, parts, feature_cache in variants:
            out = Path(scratch) / f"run-{len(rows)}"
            base = {
                "init_from": str(Path(scratch) / "base"),
                "max_steps": args.steps,
                "log_every": 1,
                "save_every": 10**6,
                "output_dir": str(out),
                "tensorboard": False,
                "precision": "bf16" if torch.cuda.is_available() else "fp32",
                "parts": {"vision_tower": "frozen", "projector": "full", **parts},
                "data": {
                    "datasets": [spec],
                    "batch_size": args.batch_size,
                    "num_workers": 2,
                    "max_length": 512,
                    "feature_cache": feature_cache,
                    "pack": "packed" in stage,
                },
            }
            train(load_config(TrainConfig, None, base=base))
            samples, tokens = steady_rates(out / "metrics.jsonl", args.batch_size)
            row = {
                "stage": stage,
                "vision input": source,
                "samples/s": round(samples, 2),
                "tokens/s": round(tokens),
            }
            row["MFU"] = mfu(4 * body, tokens, peak)
            rows.append(row)
        packing = padding_rows(processor, spec, args.batch_size, Path(scratch))
    settings = {
        **vars(args),
        "peak FLOP/s": f"{peak:.3g} ({peak_source})",
        "MFU": "4 x LM body weights x tokens/s / peak (common.lm_weights)",
    }
    report("train_throughput" + ("_quick" if args.quick else ""), rows, settings)
    report("train_packing" + ("_quick" if args.quick else ""), packing, vars(args))


def pad_share(cfg: DataConfig, processor, batches: int) -> float:
    """The pad tokens' share of the first `batches` training batches (as the trainer forms them)."""
    loader = build_dataloader(cfg, processor)
    real = total = 0
    for batch, _ in zip(loader, range(batches), strict=False):
        total += batch["input_ids"].numel()
        real += batch.get("real_tokens") or int(batch["attention_mask"].sum())
    return 1 - real / total


def padding_rows(processor, easy_vqa: dict, batch_size: int, scratch: Path) -> list[dict]:
    """Pad share padded vs packed: easy-VQA per image, and a LLaVA-format file of 1 to 8 turns."""
    rng = random.Random(0)
    records = []
    for n, sample in enumerate(read(DatasetSpec(**{**easy_vqa, "limit": 64}), DataConfig())):
        turns = [
            {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
            for m in sample.conversation
        ]
        keep = 2 * rng.randint(1, min(8, len(turns) // 2))
        records.append({"id": str(n), "image": sample.images[0], "conversations": turns[:keep]})
    llava = scratch / "llava.json"
    llava.write_text(json.dumps(records))
    mixes = {
        "easy-VQA, one conversation an image": DatasetSpec(**easy_vqa),
        "LLaVA-format, 1 to 8 turns": DatasetSpec("llava", str(llava)),
    }
    rows = []
    for name, spec in mixes.items():
        shares = {
            pack: pad_share(
                DataConfig(datasets=[spec], batch_size=batch_size, max_length=512, num_workers=0, pack=pack),
                processor,
                8,
            )
            for pack in (False, True)
        }
        rows.append(
            {
                "mix": name,
                "pad share, padded": f"{shares[False]:.1%}",
                "pad share, packed": f"{shares[True]:.1%}",
            }
        )
    return rows


if __name__ == "__main__":
    main()
