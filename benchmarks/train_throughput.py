"""Training throughput through the real trainer: stage 1 (pixels vs feature cache) and stage 2 LoRA,
padded and packed (`data.pack`), at one or more batch sizes.

easy-VQA conversations (one per image), the CLIP ViT-B/32 architecture and SmolLM2-135M by
default; `--random ARCH` trains a real LM architecture with random weights and `--data synthetic`
draws easy-VQA-like conversations on random images, for machines without our weights or data (the
speed is the same). Reports samples/s and real (non-pad) tokens/s (steady state: the first step is
warm-up), and the model FLOPs utilisation (4 x the LM's body weights x tokens/s,
`common.lm_weights`, over the device's peak, stated: a GPU's data sheet, or a measured matmul on a
CPU). A second table (`train_packing`) gives the pad tokens' share of each batch, padded and packed,
on the per-image mix and on a LLaVA-format file of conversations of 1 to 8 turns.

    python benchmarks/train_throughput.py [--quick] [--steps 6] [--batch-sizes 8,32]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import RANDOM_LMS, RESULTS, lm_weights, mfu, peak_flops, random_lm, report
from PIL import Image

from mmllm.config import load_config
from mmllm.data.config import DataConfig, DatasetSpec
from mmllm.data.features import build_feature_cache
from mmllm.data.loading import build_dataloader
from mmllm.data.readers import read
from mmllm.models.build import ModelConfig, build_model
from mmllm.train.config import TrainConfig
from mmllm.train.loop import train

SHAPES, COLOURS = ("circle", "rectangle", "triangle"), ("red", "green", "blue", "yellow", "teal", "brown")


def synthetic_data(folder: Path, images: int) -> dict:
    """easy-VQA's per-image mix drawn anew: a random 64x64 image and 4 to 12 question-answer turns on
    it a record, in LLaVA format; returns its dataset spec."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for n in range(images):
        pixels = np.random.default_rng(n).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{n}.png")
        turns = []
        for _ in range(rng.randint(2, 6)):
            shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
            for question, answer in [
                ("What shape is in the image?", shape),
                (f"Is there a {colour} {rng.choice(SHAPES)} in the image?", rng.choice(["yes", "no"])),
            ]:
                value = ("<image>\n" if not turns else "") + question
                turns += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
        records.append({"id": str(n), "image": f"{n}.png", "conversations": turns})
    (folder / "synthetic.json").write_text(json.dumps(records))
    return {"format": "llava", "path": str(folder / "synthetic.json")}


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
    parser.add_argument("--random", choices=sorted(RANDOM_LMS), help="this LM architecture, random weights")
    parser.add_argument("--data", default="easy-vqa", choices=("easy-vqa", "synthetic"))
    parser.add_argument("--quick", action="store_true", help="small vision tower, 3 steps (CI)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-sizes", default="8", help="comma-separated; each variant runs at each")
    parser.add_argument("--stages", default="1,2", help="which stages: 1, 2 or both")
    parser.add_argument("--compile", action="store_true", help="stage 2 also with train.compile (inductor)")
    parser.add_argument("--ungrouped", action="store_true", help="stage 2 also without length grouping")
    parser.add_argument("--name", default="", help="results file name (default: train_throughput[_quick])")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    vision = "configs/easyvqa/clip-easyvqa" if args.quick else "clip-vit-base-patch32"
    if args.quick:
        args.steps, args.batch_sizes = 3, "2"
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    logging.basicConfig(level=logging.WARNING)
    rows = []
    peak, peak_source = peak_flops(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        images = args.steps * max(batch_sizes) * 2
        if args.data == "synthetic":
            spec = synthetic_data(scratch / "synthetic", images)
        else:
            spec = {"format": "easy-vqa", "split": "train", "per_image": True, "limit": images}
        lm = random_lm(args.random, scratch / args.random) if args.random else args.lm
        model_cfg = ModelConfig(lm=lm, vision=vision, vision_feature_mode="patch", projector_type="mlp_gelu")
        cache = scratch / "cache"
        # One saved model for every variant: a random (offline) vision tower must match the cache.
        model, processor = build_model(model_cfg)
        model.save_pretrained(scratch / "base")
        processor.save_pretrained(scratch / "base")
        data = DataConfig(datasets=[DatasetSpec(**spec)])
        build_feature_cache(model, processor, (s for d in data.datasets for s in read(d, data)), cache)
        body, _ = lm_weights(model)
        del model
        lora, cached = {"language_model": "lora"}, str(cache)
        variants = [  # (stage, vision input, trained parts, feature cache, data settings)
            ("stage 1 (projector)", "pixels", {"language_model": "frozen"}, "", {}),
            ("stage 1 (projector)", "feature cache", {"language_model": "frozen"}, cached, {}),
            ("stage 2 (projector + LoRA)", "feature cache", lora, cached, {}),
            ("stage 2 (projector + LoRA), packed", "feature cache", lora, cached, {"pack": True}),
        ]
        if args.ungrouped:  # padding's and packing's own effect, without length grouping's
            variants += [
                (f"{stage}, no length grouping", source, parts, features, {**data, "group_by_length": False})
                for stage, source, parts, features, data in variants[2:]
            ]
        variants += [
            (f"{v[0]}, compiled", *v[1:]) for v in variants if args.compile and v[0].startswith("stage 2")
        ]
        stages = args.stages.split(",")
        variants = [v for v in variants if v[0].split()[1] in stages]
        for batch_size in batch_sizes:
            for stage, source, parts, feature_cache, data_settings in variants:
                out = scratch / f"run-{len(rows)}"
                base = {
                    "init_from": str(scratch / "base"),
                    "max_steps": args.steps,
                    "log_every": 1,
                    "save_every": 10**6,
                    "output_dir": str(out),
                    "tensorboard": False,
                    "precision": "bf16" if torch.cuda.is_available() else "fp32",
                    "compile": stage.endswith("compiled"),
                    "parts": {"vision_tower": "frozen", "projector": "full", **parts},
                    "data": {
                        "datasets": [spec],
                        "batch_size": batch_size,
                        "num_workers": 2,
                        "max_length": 512,
                        "feature_cache": feature_cache,
                        **data_settings,
                    },
                }
                train(load_config(TrainConfig, None, base=base))
                samples, tokens = steady_rates(out / "metrics.jsonl", batch_size)
                rows.append(
                    {
                        "stage": stage,
                        "vision input": source,
                        "batch": batch_size,
                        "samples/s": round(samples, 2),
                        "tokens/s": round(tokens),
                        "MFU": mfu(4 * body, tokens, peak),
                    }
                )
        packing = padding_rows(processor, spec, max(batch_sizes), scratch)
    settings = {
        **{k: str(v) for k, v in vars(args).items()},
        "peak FLOP/s": f"{peak:.3g} ({peak_source})",
        "MFU": "4 x LM body weights x tokens/s / peak (common.lm_weights)",
    }
    name = args.name or "train_throughput" + ("_quick" if args.quick else "")
    report(name, rows, settings, args.out)
    packing_name = name.replace("train_throughput", "train_packing")
    report(packing_name if packing_name != name else f"{name}_packing", packing, settings, args.out)


def pad_share(cfg: DataConfig, processor, batches: int) -> float:
    """The pad tokens' share of the first `batches` training batches (as the trainer forms them)."""
    loader = build_dataloader(cfg, processor)
    real = total = 0
    for batch, _ in zip(loader, range(batches), strict=False):
        total += batch["input_ids"].numel()
        real += batch.get("real_tokens") or int(batch["attention_mask"].sum())
    return 1 - real / total


def padding_rows(processor, per_image: dict, batch_size: int, scratch: Path) -> list[dict]:
    """Pad share padded vs packed: one conversation an image, and a LLaVA-format file of 1 to 8 turns."""
    rng = random.Random(0)
    records = []
    for n, sample in enumerate(read(DatasetSpec(**{**per_image, "limit": 64}), DataConfig())):
        turns = [
            {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
            for m in sample.conversation
        ]
        keep = 2 * rng.randint(1, min(8, len(turns) // 2))
        records.append({"id": str(n), "image": sample.images[0], "conversations": turns[:keep]})
    llava = scratch / "llava.json"
    llava.write_text(json.dumps(records))
    mixes = {
        f"{per_image['format']}, one conversation an image": DatasetSpec(**per_image),
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
