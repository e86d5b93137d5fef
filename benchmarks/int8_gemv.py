"""Is int8 decoding on this CPU limited by memory or by arithmetic? One matrix-vector kernel, two sizes.

Decoding one token multiplies a vector by every weight matrix (GEMV). For onnxruntime's fp32 `MatMul`
and the 8-bit `MatMulNBits` that `mmllm export onnx --weights int8` writes, this times a chain of
GEMVs over weights that stay in cache (two 896x512 matrices, reused) and over weights streamed from
memory (24 distinct matrices the shape of Qwen2.5-0.5B's MLP, 896x4864), and reports the weight
bytes each consumes per second. A memory-bound kernel is much faster in cache than streamed; a
compute-bound one runs at the same rate in both, below the memory bandwidth, and no memory
bandwidth would make it faster: its roofline is arithmetic, not bytes.

    python benchmarks/int8_gemv.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import report
from inference import read_bandwidth

HIDDEN = 896
CASES = {  # name: (rows of each matrix, distinct matrices, GEMVs in the chain)
    "in cache": (512, 2, 48),
    "streamed": (4864, 24, 24),
}


def chain(path: Path, rows: int, distinct: int, length: int) -> None:
    """An ONNX graph x (M, 896) -> GEMVs alternating 896->rows->896, cycling over `distinct` weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = [(HIDDEN, rows), (rows, HIDDEN)]
    weights = [
        numpy_helper.from_array((rng.standard_normal(shapes[n % 2]) * 0.02).astype(np.float32), f"w{n}")
        for n in range(distinct)
    ]
    nodes, x = [], "x"
    for n in range(length):
        nodes.append(helper.make_node("MatMul", [x, f"w{n % distinct}"], [f"y{n}"]))
        x = f"y{n}"
    graph = helper.make_graph(
        nodes,
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", HIDDEN])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", HIDDEN])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def int8(path: Path, out: Path) -> None:
    """The same rewrite as `mmllm export onnx --weights int8`."""
    from mmllm.export.onnx import quantize_decoder_int8

    out.write_bytes(path.read_bytes())
    quantize_decoder_int8(out)


def weight_rate(path: Path, weight_bytes: float, runs: int) -> float:
    """GB of weights per second through the chain, best of `runs` (M = 1: one decoded token)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, HIDDEN)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - start)
    return weight_bytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer timed runs (CI)")
    args = parser.parse_args()
    runs = 5 if args.quick else 50
    threads = os.cpu_count() or 1  # onnxruntime's default: a thread a core
    bandwidth = read_bandwidth(threads, 0.25 if args.quick else 1.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (size, distinct, length) in CASES.items():
            fp32, q8 = Path(tmp) / f"{size}.onnx", Path(tmp) / f"{size}-int8.onnx"
            chain(fp32, size, distinct, length)
            int8(fp32, q8)
            weights = length * HIDDEN * size  # weights multiplied per run
            # 8-bit weights carry one fp32 scale per 32: 1 + 4/32 bytes a weight.
            for kernel, path, per_weight in (("fp32 MatMul", fp32, 4.0), ("int8 MatMulNBits", q8, 1.125)):
                rate = weight_rate(path, weights * per_weight, runs)
                rows.append(
                    {
                        "kernel": kernel,
                        "weights": case,
                        "working set (MB)": round(distinct * HIDDEN * size * per_weight / 1e6, 1),
                        "weight GB/s": round(rate, 1),
                        "of memory bandwidth": f"{rate / bandwidth:.0%}",
                    }
                )
    print(f"read bandwidth ({threads} threads): {bandwidth:.1f} GB/s")
    report(
        "int8_gemv" + ("_quick" if args.quick else ""),
        rows,
        {"read_bandwidth_GBps": round(bandwidth, 2), "threads": threads, "runs": runs},
    )


if __name__ == "__main__":
    main()
