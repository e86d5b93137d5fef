"""Inference backends behind one interface (`mmllm.generation.Backend`): `torch` (the `Pipeline`,
transformers' generate) and `onnx` (an export run by onnxruntime). `--backend` on ask, caption, serve,
ui and eval picks one; a new backend subclasses `Backend` and joins `BACKENDS`."""

from __future__ import annotations

from mmllm.errors import MmllmError
from mmllm.generation import Backend

BACKENDS = ("torch", "onnx")


def load_backend(kind: str, name_or_path: str, device: str | None = None, dtype: str = "auto") -> Backend:
    """The model at `name_or_path` on backend `kind`; device and dtype are the torch backend's."""
    if kind == "torch":
        from mmllm.pipeline import Pipeline

        return Pipeline.load(name_or_path, device=device, dtype=dtype)
    if kind == "onnx":
        from mmllm.backends.onnx import OnnxBackend

        if (device or "cpu") != "cpu" or dtype != "auto":
            raise MmllmError(
                "the onnx backend runs on the CPU with the export's own weights (no --device/--dtype)"
            )
        return OnnxBackend.load(name_or_path)
    raise MmllmError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
