"""CPU inference against the physical limit: one table for every way mmllm can run a model.

For each variant — PyTorch fp32 / bf16 / int8 (torchao weight-only and dynamic), ONNX Runtime (fp32,
and int8 `MatMulNBits`), plain transformers `generate`, and `--backend llama.cpp` on the export's GGUF
files (f16, and q8_0 / q4_k_m quantised by llama.cpp itself), image rows included — a fresh process
measures time to first token (1 image + a 20-token question), decode tokens/s and peak RSS. Beside
them, llama.cpp's own generation (llama-cpp-python's `Llama.generate`) on the same q8_0 / q4_k_m files,
with a text prompt of the same length: the "vs llama.cpp" column is the backend's decode speed over
llama.cpp's own on the same file.

Decode on a CPU is memory-bound: each token reads every weight once, so its ceiling is the memory
bandwidth divided by the bytes of weights read per token: the roofline. The bandwidth is measured as
decode uses it: reads (a sum over 1 GB), with as many threads as decode runs. For the ONNX rows,
"weight products alone" runs only the decoder's weight matrix products (its MatMul/MatMulNBits nodes,
real weights, one token): the most the matrix kernels allow before any other op costs a thing.

    python benchmarks/inference.py [--model qwen2.5-0.5b-instruct] [--tokens 32] [--reps 3] [--quick]

The llama.cpp rows need llama-cpp-python (`make install-llamacpp`); without it they are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

QUESTION = "Which shapes and colours do you see in this picture, and where exactly are they placed?"
VARIANTS = (
    "fp32",
    "bf16",
    "int8-weight-only",
    "int8-dynamic",
    "onnx",
    "onnx-int8",
    "transformers",
    "llama.cpp-f16",
    "llama.cpp-q8_0",
    "llama.cpp-q4_k_m",
    "llama.cpp-own-q8_0",
    "llama.cpp-own-q4_k_m",
)
DEFAULT_MODEL = "qwen2.5-0.5b-instruct"
ISA_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def read_bandwidth(threads: int, gigabytes: float = 1.0, reps: int = 5) -> float:
    """GB/s read by `threads` threads summing a large array, best of `reps`: decode reads its weights
    with all its threads (a one-thread copy understates that by 2x on some machines)."""
    import torch

    torch.set_num_threads(threads)
    weights = torch.ones(int(gigabytes * 2**30) // 4)
    best = min(_time(weights.sum) for _ in range(reps))
    return weights.nbytes / best / 1e9


def cpu_isa() -> list[str]:
    """The vector instruction sets this CPU has that matmul kernels use (AVX2, AVX-512, VNNI, AMX)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    flags = next((line.split()[2:] for line in lines if line.startswith("flags")), [])
    return [flag for flag in ISA_FLAGS if flag in flags]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model) -> int:
    """Bytes read per decoded token: every LM weight except the embedding rows not looked up (the
    tied output matrix is read in full, as lm_head)."""
    lm = model.language_model
    skip = {id(lm.get_input_embeddings().weight)} - {id(lm.get_output_embeddings().weight)}
    total = 0
    for parameter in lm.parameters():
        if id(parameter) in skip:
            continue
        inner = [getattr(parameter, name) for name in ("qdata", "scale") if hasattr(parameter, name)]
        total += sum(t.nbytes for t in inner) if inner else parameter.nbytes
    return total


def matmuls_alone(decoder: Path, reps: int = 20) -> float:
    """Tokens/s if a decode step ran nothing but the decoder's weight products: its MatMul and
    MatMulNBits nodes with their real weights, fed one token's activations, every other op removed.
    Separates what the matrix kernels can do on this CPU from what the rest of the graph costs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    decoder_model = onnx.load(str(decoder))
    graph = decoder_model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes, inputs, outputs = [], {}, []
    for node in graph.node:
        if node.op_type not in ("MatMul", "MatMulNBits") or node.input[1] not in weights:
            continue
        if node.op_type == "MatMul":
            width = weights[node.input[1]].dims[0]
        else:
            width = next(a.i for a in node.attribute if a.name == "K")
        inputs.setdefault(width, helper.make_tensor_value_info(f"x{width}", TensorProto.FLOAT, [1, width]))
        outputs.append(helper.make_tensor_value_info(f"y{len(nodes)}", TensorProto.FLOAT, None))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0], copy.output[0] = f"x{width}", f"y{len(nodes)}"
        nodes.append(copy)
    used = {name for node in nodes for name in node.input}
    model = helper.make_model(
        helper.make_graph(
            nodes, "matmuls", list(inputs.values()), outputs, [weights[n] for n in used if n in weights]
        ),
        opset_imports=list(decoder_model.opset_import),
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:  # a file with external data: no 2 GB protobuf limit
        onnx.save(model, f"{tmp}/matmuls.onnx", save_as_external_data=True)
        session = ort.InferenceSession(f"{tmp}/matmuls.onnx", options, providers=["CPUExecutionProvider"])
    feed = {f"x{width}": np.random.default_rng(0).standard_normal((1, width), np.float32) for width in inputs}
    session.run(None, feed)
    return 1 / min(_time(lambda: session.run(None, feed)) for _ in range(reps))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry over an exec)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024


def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))


def measure(variant: str, model_name: str, tokens: int, reps: int, export_dir: Path) -> dict:
    """Runs in its own process: TTFT ms, decode tokens/s and weight bytes; RSS is added by the caller.

    Each variant's `run()` generates `tokens` tokens (EOS ignored) and returns the seconds to its
    first and to its last token: decode speed is measured inside one generation.
    """
    from mmllm.engine.settings import GenerationSettings

    messages = [{"role": "user", "content": QUESTION}]
    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)

    def timed(backend):
        """Time to the first and the last token of one answer through `backend.complete`."""

        def run():
            backend.features.entries.clear()  # a new image each time: TTFT includes the vision tower
            marks, start = [], time.perf_counter()
            backend.complete(
                [messages],
                [[image()]],
                settings,
                on_delta=lambda row, text: marks.append(time.perf_counter()),
            )
            return marks[0] - start, marks[-1] - start

        return run

    if variant.startswith("llama.cpp-own"):
        run, size = _llama_cpp(tokens, _gguf(export_dir, variant)), None
    elif variant.startswith("llama.cpp"):
        from mmllm.engine.llama_cpp import LlamaCppBackend

        run, size = timed(LlamaCppBackend.load(export_dir / "gguf", variant.split("-")[-1])), None
    elif variant.startswith("onnx"):
        from mmllm.engine.onnx import OnnxBackend

        run = timed(OnnxBackend.load(export_dir / variant))
        size = sum(f.stat().st_size for f in (export_dir / variant).glob("decoder.onnx*"))
    else:  # only these rows import torch: the llama.cpp and ONNX rows' RSS is their backend's alone
        import torch
        from transformers.generation.streamers import BaseStreamer

        from mmllm.engine.torch_backend import Pipeline, prepare_for_cpu_decoding

        dtype = "bf16" if variant == "bf16" else "fp32"
        pipeline = Pipeline.load(model_name, device="cpu", dtype=dtype, cpu_kernels=False)
        if variant.startswith("int8"):
            from mmllm.models.int8 import quantize_int8

            quantize_int8(pipeline.model, variant.removeprefix("int8-"))
        size = weight_bytes(pipeline.model)
        if variant != "transformers":  # the torch backend as `Pipeline.load` gives it
            prepare_for_cpu_decoding(pipeline.model)
        if variant == "transformers":  # the processor's tensors straight into generate: no cache, no streamer
            model, processor = pipeline.model, pipeline.processor

            class Marks(BaseStreamer):  # generate calls put() with the prompt, then once per token
                def __init__(self):
                    self.times = []

                def put(self, value):
                    self.times.append(time.perf_counter())

                def end(self):
                    pass

            def run():
                marks, start = Marks(), time.perf_counter()
                batch = processor([messages], [[image()]])
                with torch.inference_mode():
                    model.generate(
                        **batch,
                        max_new_tokens=tokens,
                        min_new_tokens=tokens,
                        do_sample=False,
                        pad_token_id=processor.tokenizer.pad_token_id,
                        streamer=marks,
                    )
                return marks.times[1] - start, marks.times[-1] - start
        else:
            run = timed(pipeline)

    run()  # warm-up
    timings = [run() for _ in range(reps)]
    first = statistics.median(t[0] for t in timings)
    decode = statistics.median((tokens - 1) / (t[1] - t[0]) for t in timings)
    return {"ttft_ms": 1000 * first, "decode_tok_s": decode, "weight_bytes": size}


def _gguf(export_dir: Path, variant: str) -> Path:
    return export_dir / "gguf" / f"model-{variant.split('-')[-1]}.gguf"


def _llama_cpp(tokens: int, path: Path):
    """llama.cpp's own generation of the LM alone: a text prompt of the same token count."""
    from llama_cpp import Llama

    from mmllm.processor import MultimodalProcessor

    processor = MultimodalProcessor.from_pretrained(path.parent, without_torch=True)
    prompt = processor.encode_text([{"role": "user", "content": "<image>\n" + QUESTION}], 1)["input_ids"]
    prompt = [t if t != processor.image_token_id else processor.tokenizer.pad_token_id for t in prompt]
    llm = Llama(str(path), n_ctx=512, n_threads=os.cpu_count(), verbose=False)

    def run():
        llm.reset()
        marks, start = [], time.perf_counter()
        for _ in llm.generate(prompt, temp=0.0):
            marks.append(time.perf_counter())
            if len(marks) == tokens:
                break
        return marks[0] - start, marks[-1] - start

    return run


def prepare(model_name: str, export_dir: Path, variants: list[str]) -> list[str]:
    """Exports the runs need; variants that cannot run here are dropped with a reason."""
    from mmllm.export.gguf import export_gguf
    from mmllm.export.onnx import export_onnx

    for variant in variants:
        if variant.startswith("onnx"):
            export_onnx(model_name, export_dir / variant, "int8" if variant.endswith("int8") else "fp32")
    if any(v.startswith("llama.cpp") for v in variants):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed (make install-llamacpp); skipped")
            return [v for v in variants if not v.startswith("llama.cpp")]
        kinds = sorted({v.split("-")[-1] for v in variants if v.startswith("llama.cpp")})
        export_gguf(model_name, export_dir / "gguf", kinds)  # q8_0, q4_k_m: by llama.cpp's quantiser
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the LM (wrapped with the default vision tower) or a saved model",
    )
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)} (all)")
    parser.add_argument(
        "--quick", action="store_true", help="SmolLM2-135M, 4 tokens, one repetition, one row an engine (CI)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # VARIANT:EXPORT_DIR, run in a fresh process
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.quick:
        args.model, args.tokens, args.reps = "smollm2-135m-instruct", 4, 1
    # Quick runs drive each engine once: torch, torchao, ONNX Runtime, our llama.cpp backend, llama.cpp's.
    quick = "fp32,int8-weight-only,onnx-int8,llama.cpp-q8_0,llama.cpp-own-q8_0"
    args.variants = args.variants or (quick if args.quick else ",".join(VARIANTS))
    if args.child:
        variant, export_dir = args.child.split(":", 1)
        result = measure(variant, args.model, args.tokens, args.reps, Path(export_dir))
        result["peak_rss_mb"] = peak_rss_mb()
        if variant.startswith("onnx"):  # after the RSS reading: it loads the weights a second time
            result["matmuls_alone_tok_s"] = matmuls_alone(Path(export_dir) / variant / "decoder.onnx")
        print("RESULT " + json.dumps(result))
        return

    from common import report  # imports torch: not in the children above

    threads = os.cpu_count() or 1  # torch's default, and llama.cpp's: one thread a core
    bandwidth = read_bandwidth(threads, 0.25 if args.quick else 1.0)
    rows, own = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = prepare(args.model, Path(tmp), args.variants.split(","))
        for variant in variants:
            command = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens)]
            command += ["--reps", str(args.reps), "--child", f"{variant}:{tmp}"]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{variant}: failed\n{done.stderr[-2000:]}")
                continue
            result = json.loads(lines[-1].removeprefix("RESULT "))
            if result["weight_bytes"] is None:  # read here: the GGUF reader touches the whole file
                from mmllm.export.gguf import bytes_read_per_token

                result["weight_bytes"] = bytes_read_per_token(_gguf(Path(tmp), variant))
            if variant.startswith("llama.cpp-own"):
                own[variant.split("-")[-1]] = result["decode_tok_s"]
            roofline = bandwidth * 1e9 / result["weight_bytes"]
            rows.append(
                {
                    "variant": variant,
                    "TTFT (ms)": round(result["ttft_ms"], 1),
                    "decode (tok/s)": round(result["decode_tok_s"], 1),
                    "weights read/token (MB)": round(result["weight_bytes"] / 1e6, 1),
                    "roofline (tok/s)": round(roofline, 1),
                    "of roofline": f"{result['decode_tok_s'] / roofline:.0%}",
                    "weight products alone (tok/s)": round(result.get("matmuls_alone_tok_s", 0), 1) or "–",
                    "peak RSS (MB)": round(result["peak_rss_mb"]),
                }
            )
    for row in rows:  # the backend against llama.cpp's own generation on the same file, same run
        kind = row["variant"].split("-")[-1]
        mine = row["variant"] == f"llama.cpp-{kind}" and kind in own
        row["vs llama.cpp"] = f"{row['decode (tok/s)'] / own[kind]:.2f}x" if mine else "–"
    settings = {
        **vars(args),
        "read_bandwidth_GBps": round(bandwidth, 2),
        "threads": threads,
        "isa": cpu_isa(),
    }
    print(f"read bandwidth ({threads} threads): {bandwidth:.1f} GB/s; ISA: {', '.join(cpu_isa())}")
    name = "inference" if args.model == DEFAULT_MODEL or args.quick else f"inference_{Path(args.model).name}"
    report(name + ("_quick" if args.quick else ""), rows, settings)


if __name__ == "__main__":
    main()
