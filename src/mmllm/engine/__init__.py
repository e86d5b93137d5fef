"""The inference engine: what answers prompts, behind one interface (`backend.Backend`).

Backends: `torch` (`torch_backend.Pipeline`, over its running batch: `running`, `static_session`),
`onnx` (an export run by onnxruntime) and `llama.cpp` (a GGUF export, its LM run by llama.cpp); the
exported two share `exported`. Around them: `settings` (`GenerationSettings`), `rows` (per-row
stopping), `sampler` (choosing tokens outside transformers), and the request queues the server, the
chat page and `mmllm eval` submit to (`batcher`, `scheduler`). `--backend` on ask, caption, serve, ui
and eval picks a backend through `load_backend`; a new backend subclasses `Backend` and joins
`BACKENDS`.

This module stays light (no torch, numpy or transformers): the CLI reads `BACKENDS` at start-up, and
`load_backend` imports a backend only when asked for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmllm.errors import MmllmError

if TYPE_CHECKING:
    from mmllm.engine.backend import Backend

BACKENDS = ("torch", "onnx", "llama.cpp")
LLAMA_CPP_TYPES = ("auto", "f32", "f16", "q8_0", "q4_k_m")


def load_backend(
    kind: str, name_or_path: str, device: str | None = None, dtype: str = "auto", compile: str = "auto"
) -> Backend:
    """The model at `name_or_path` on backend `kind`; device, dtype and compile are the torch backend's
    (dtype also picks llama.cpp's GGUF file)."""
    if kind == "torch":
        from mmllm.engine.torch_backend import Pipeline

        return Pipeline.load(name_or_path, device=device, dtype=dtype, compile=compile)
    if compile == "on":
        raise MmllmError(f"--compile on is the torch backend's; the {kind} backend runs its own engine")
    if kind == "onnx":
        from mmllm.engine.onnx import OnnxBackend

        if (device or "cpu") != "cpu" or dtype != "auto":
            raise MmllmError(
                "the onnx backend runs on the CPU with the export's own weights (no --device/--dtype)"
            )
        return OnnxBackend.load(name_or_path)
    if kind == "llama.cpp":
        from mmllm.engine.llama_cpp import LlamaCppBackend

        if (device or "cpu") != "cpu" or dtype not in LLAMA_CPP_TYPES:
            raise MmllmError(
                "the llama.cpp backend runs on the CPU; --dtype picks the export's GGUF file "
                f"({', '.join(LLAMA_CPP_TYPES)})"
            )
        return LlamaCppBackend.load(name_or_path, dtype)
    raise MmllmError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
