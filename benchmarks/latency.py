"""Single-request latency: image encoding, time to first token, decode speed, 32-token answer.

Ours (Pipeline: image-feature cache, streaming) against plain `transformers` generate on the same
model in the same run. Real weights: the default model (the photo model: EfficientNet-Lite0 read as
words by SmolLM2-135M with LoRA) or any other `--model`.

    python benchmarks/latency.py [--model default] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch
from common import lm_weights, mfu, peak_flops, report
from PIL import Image

from mmllm.generation import GenerationSettings
from mmllm.pipeline import Pipeline

QUESTION = "Look at the picture carefully and tell me which objects and colours you can see in it."


def photo(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (256, 256, 3), dtype=np.uint8))


def plain_inputs(model, processor, messages: list[dict], image: Image.Image) -> dict:
    """What plain transformers feeds generate: pixels, or for a model that reads images as words, the
    words (the tower run and the bridge, as `prepare` does, without its cache)."""
    if not model.config.reads_images_as_words:
        return processor([messages], [[image]])
    features = model.get_image_features(processor.image_processor([image]))
    encoded = processor.encode_text(messages, 1, image_words=model.image_words(features))
    return {"input_ids": torch.tensor([encoded["input_ids"]])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M, one repetition (CI)")
    parser.add_argument("--name", default="", help="results file name (default: latency[_quick][_gpu])")
    args = parser.parse_args()
    if args.quick:
        args.model, args.reps, args.tokens = "smollm2-135m-instruct", 1, 8
    logging.basicConfig(level=logging.WARNING)
    pipeline = Pipeline.load(args.model)
    model, processor = pipeline.model, pipeline.processor
    messages = [{"role": "user", "content": QUESTION}]
    settings = GenerationSettings(max_new_tokens=args.tokens, ignore_eos=True)  # every answer: `tokens` long
    pipeline.complete([messages], [[photo(99)]], settings)  # warm-up

    encode, ttft, decode, ours, plain = [], [], [], [], []
    for rep in range(args.reps):
        image = photo(rep)
        start = time.perf_counter()
        pipeline.image_features([image])
        encode.append(time.perf_counter() - start)
        pipeline.features.entries.clear()  # a new image for the end-to-end run below
        first: list[float] = []
        start = time.perf_counter()
        done = pipeline.complete(
            [messages],
            [[image]],
            settings,
            on_delta=lambda row, text, first=first: first or first.append(time.perf_counter()),
        )[0]
        end = time.perf_counter()
        ours.append(end - start)
        ttft.append(first[0] - start)
        decode.append((done.completion_tokens - 1) / (end - first[0]))
        # Plain transformers: processor output straight into generate, no cache, no streamer.
        start = time.perf_counter()
        with torch.inference_mode():
            batch = plain_inputs(model, processor, messages, image)
            model.generate(
                **{k: v.to(model.device) for k, v in batch.items()},
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        plain.append(time.perf_counter() - start)

    peak, peak_source = peak_flops(model.device)
    body, head = lm_weights(model)

    def ms(values: list[float]) -> float:
        return round(1000 * statistics.median(values), 1)

    rows = [
        {"measure": "image encode (ms)", "ours": ms(encode), "plain transformers": "-", "ratio": "-"},
        {"measure": "time to first token (ms)", "ours": ms(ttft), "plain transformers": "-", "ratio": "-"},
        {
            "measure": "decode (tokens/s)",
            "ours": round(statistics.median(decode), 1),
            "plain transformers": "-",
            "ratio": "-",
        },
        {
            "measure": "decode MFU",
            "ours": mfu(2 * (body + head), statistics.median(decode), peak),
            "plain transformers": "-",
            "ratio": "-",
        },
        {
            "measure": f"end to end, {args.tokens}-token answer (ms)",
            "ours": ms(ours),
            "plain transformers": ms(plain),
            "ratio": f"{statistics.median(plain) / statistics.median(ours):.2f}x",
        },
    ]
    settings_out = {
        **vars(args),
        "device": str(model.device),
        "dtype": str(model.dtype),
        "peak FLOP/s": f"{peak:.3g} ({peak_source})",
    }
    default_name = (
        "latency" + ("_quick" if args.quick else "") + ("_gpu" if model.device.type == "cuda" else "")
    )
    report(args.name or default_name, rows, settings_out)


if __name__ == "__main__":
    main()
