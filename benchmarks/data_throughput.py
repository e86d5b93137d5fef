"""Data-loader throughput and stage-1 training speed, with and without the vision-feature cache.

Real data (easy-VQA images and questions, one multi-turn conversation per image) through the real
loader and model. Stage 1 trains the projector only; the vision tower is frozen, so its features
can come from the cache instead of being recomputed every step.

    python benchmarks/data_throughput.py            # CLIP ViT-B/32 architecture + SmolLM2-135M
    python benchmarks/data_throughput.py --quick    # tiny vision tower, few samples (CI)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile

import torch
from common import report, timed
from transformers import CLIPVisionConfig

from mmllm.data.config import DataConfig, DatasetSpec
from mmllm.data.features import FeatureCache, build_feature_cache, encoder_fingerprint
from mmllm.data.loading import LoadReport, build_dataloader, open_dataset
from mmllm.images import ImageProcessor
from mmllm.models.configuration import CLIP_VIT_B32, MultimodalConfig
from mmllm.models.language import load_language_model, load_tokenizer
from mmllm.models.multimodal import MultimodalLM
from mmllm.processor import MultimodalProcessor


def build(lm: str, quick: bool) -> tuple[MultimodalLM, MultimodalProcessor]:
    vision = (
        {**CLIP_VIT_B32, "num_hidden_layers": 2, "image_size": 64, "patch_size": 16}
        if quick
        else CLIP_VIT_B32
    )
    language_model = load_language_model(lm)
    config = MultimodalConfig(vision_config=CLIPVisionConfig(**vision), text_config=language_model.config)
    processor = MultimodalProcessor(
        load_tokenizer(lm), config.num_image_tokens, ImageProcessor(vision["image_size"])
    )
    config.image_token_id = processor.image_token_id
    return MultimodalLM(config, language_model=language_model), processor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lm", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="tiny vision tower and few samples (CI)")
    parser.add_argument("--images", type=int, default=256, help="easy-VQA images (one conversation each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed stage-1 steps per variant")
    args = parser.parse_args()
    if args.quick:
        args.images, args.steps, args.batch_size = 16, 2, 2
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, processor = build(args.lm, args.quick)
    spec = DatasetSpec("easy-vqa", split="train", per_image=True, limit=args.images)
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        base = DataConfig(datasets=[spec], batch_size=args.batch_size, max_length=512)
        _, seconds = timed(
            lambda: build_feature_cache(model, processor, open_dataset(base).samples, cache_dir)
        )
        rows.append(
            {
                "stage": "build feature cache",
                "variant": f"{args.images} images",
                "throughput": f"{args.images / seconds:.1f} images/s",
                "seconds": round(seconds, 2),
            }
        )
        cache = FeatureCache.open(cache_dir, encoder_fingerprint(model, processor))

        for workers, cached in itertools.product((0, 2), (False, True)):
            cfg = DataConfig(datasets=[spec], batch_size=args.batch_size, num_workers=workers, max_length=512)
            loader = build_dataloader(cfg, processor, feature_cache=cache if cached else None)

            def drain(loader=loader) -> int:
                return sum(LoadReport().update(batch)["input_ids"].shape[0] for batch in loader)

            count, seconds = timed(drain)
            rows.append(
                {
                    "stage": "loader",
                    "variant": f"{workers} workers, {'cache' if cached else 'pixels'}",
                    "throughput": f"{count / seconds:.1f} samples/s",
                    "seconds": round(seconds, 2),
                }
            )

        model.requires_grad_(False)
        model.projector.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-4)
        model.train()
        for cached in (False, True):
            cfg = DataConfig(datasets=[spec], batch_size=args.batch_size, num_workers=2, max_length=512)
            batches = iter(build_dataloader(cfg, processor, feature_cache=cache if cached else None))

            def step(batches=batches) -> int:
                batch = LoadReport().update(next(batches))
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                return batch["input_ids"].shape[0]

            count, seconds = timed(lambda step=step: sum(step() for _ in range(args.steps)), warmup=step)
            rows.append(
                {
                    "stage": "stage-1 train",
                    "variant": "cache" if cached else "pixels",
                    "throughput": f"{args.steps / seconds:.2f} steps/s ({count / seconds:.1f} samples/s)",
                    "seconds": round(seconds, 2),
                }
            )
    report("data_throughput" + ("_quick" if args.quick else ""), rows, vars(args))


if __name__ == "__main__":
    main()
