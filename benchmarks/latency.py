"""Single-request latency: image encoding, time to first token, decode speed, 32-token answer.

Ours eager (a dynamic KV cache) and compiled (`--compile on`: a static KV cache, torch.compile'd
passes, CUDA graphs on a GPU) against plain `transformers` generate on the same model in the same
run. Real weights: the default model (the photo model: EfficientNet-Lite0 read as words by
SmolLM2-135M with LoRA) or any other `--model`; or `--random ARCH`, a real LM architecture with
random weights under a CLIP ViT-B/32 tower (patch features), for machines without our weights (the
speed is the same).

    python benchmarks/latency.py [--model default | --random qwen2.5-0.5b] [--compile both] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RANDOM_LMS, RESULTS, lm_weights, mfu, peak_flops, random_lm, report
from PIL import Image

from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import DTYPES, Pipeline, prepare_for_cpu_decoding
from mmllm.models.build import ModelConfig, build_model

QUESTION = "Look at the picture carefully and tell me which objects and colours you can see in it."
MODES = {"eager": None, "compiled": "inductor"}


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


def pipeline(model, processor, mode: str) -> Pipeline:
    """The torch backend in `mode`; eager on a CPU decodes a prepared copy, as `Pipeline.load` would
    (the plain-transformers baseline and the compiled mode keep the model as it is)."""
    if MODES[mode] is None and model.device.type == "cpu":
        return Pipeline(prepare_for_cpu_decoding(copy.deepcopy(model)), processor)
    return Pipeline(model, processor, compiler=MODES[mode])


def measure(pipeline: Pipeline, messages: list[dict], settings: GenerationSettings, reps: int) -> dict:
    """Medians over `reps` new images: encode, TTFT and end to end (s), decode (tokens/s); and the
    warm-up call's time (compiling, for the compiled passes)."""
    start = time.perf_counter()
    pipeline.complete([messages], [[photo(99)]], settings)
    times: dict[str, list[float]] = {"first call": [time.perf_counter() - start]}
    for rep in range(reps):
        image = photo(rep)
        start = time.perf_counter()
        pipeline.image_features([image])
        times.setdefault("encode", []).append(time.perf_counter() - start)
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
        times.setdefault("end to end", []).append(end - start)
        times.setdefault("ttft", []).append(first[0] - start)
        times.setdefault("decode", []).append((done.completion_tokens - 1) / (end - first[0]))
    return {key: statistics.median(values) for key, values in times.items()}


def plain_generate(model, processor, messages: list[dict], tokens: int, reps: int) -> float:
    """Plain transformers: processor output straight into generate, no cache, no streamer (median s)."""
    times = []
    for rep in range(reps):
        start = time.perf_counter()
        with torch.inference_mode():
            batch = plain_inputs(model, processor, messages, photo(rep))
            model.generate(
                **{k: v.to(model.device) for k, v in batch.items()},
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(args: argparse.Namespace, scratch: Path):
    if not args.random:
        pipeline = Pipeline.load(args.model, args.device, args.dtype, compile="off", cpu_kernels=False)
        return pipeline.model, pipeline.processor
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = ModelConfig(
        lm=random_lm(args.random, scratch / args.random),
        vision="clip-vit-base-patch32",
        vision_feature_mode="patch",
        projector_type="mlp_gelu",
    )
    model, processor = build_model(cfg, dtype=dtype)
    return model.to(device), processor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--random", choices=sorted(RANDOM_LMS), help="this LM architecture, random weights")
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    parser.add_argument("--compile", default="both", choices=("both", "on", "off"), help="which decoding")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M, one repetition (CI)")
    parser.add_argument("--name", default="", help="results file name (default: latency[_quick][_gpu])")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.model, args.reps, args.tokens = "smollm2-135m-instruct", 1, 8
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        model, processor = load(args, Path(scratch))
    messages = [{"role": "user", "content": QUESTION}]
    settings = GenerationSettings(max_new_tokens=args.tokens, ignore_eos=True)  # every answer: `tokens` long
    modes = [
        mode for mode in MODES if args.compile == "both" or (mode == "compiled") == (args.compile == "on")
    ]
    results = {
        mode: measure(pipeline(model, processor, mode), messages, settings, args.reps) for mode in modes
    }
    plain = plain_generate(model, processor, messages, args.tokens, args.reps)

    peak, peak_source = peak_flops(model.device)
    body, head = lm_weights(model)
    measures = {
        "image encode (ms)": lambda r: round(1000 * r["encode"], 1),
        "time to first token (ms)": lambda r: round(1000 * r["ttft"], 1),
        "decode (tokens/s)": lambda r: round(r["decode"], 1),
        "decode MFU": lambda r: mfu(2 * (body + head), r["decode"], peak),
        f"end to end, {args.tokens}-token answer (ms)": lambda r: round(1000 * r["end to end"], 1),
        "first call, compiling included (s)": lambda r: round(r["first call"], 1),
    }
    rows = []
    for name, value in measures.items():
        row = {"measure": name, **{mode: value(results[mode]) for mode in modes}}
        row["plain transformers"] = round(1000 * plain, 1) if name.startswith("end to end") else "-"
        rows.append(row)
    settings_out = {
        **{k: str(v) for k, v in vars(args).items()},
        "device": str(model.device),
        "dtype": str(model.dtype),
        "prompt tokens": len(Pipeline(model, processor).prepare(messages, [photo(0)]).input_ids),
        "peak FLOP/s": f"{peak:.3g} ({peak_source})",
    }
    default_name = (
        "latency" + ("_quick" if args.quick else "") + ("_gpu" if model.device.type == "cuda" else "")
    )
    report(args.name or default_name, rows, settings_out, args.out)


if __name__ == "__main__":
    main()
