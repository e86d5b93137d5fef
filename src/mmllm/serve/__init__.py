"""Serving: FastAPI app (REST + OpenAI-compatible API) over the pipeline, with dynamic batching."""
