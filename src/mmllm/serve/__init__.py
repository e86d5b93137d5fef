"""Serving: FastAPI app (REST + OpenAI-compatible API) over a backend, with continuous batching (the
batcher for `--scheduler batch` and the onnx backend)."""
