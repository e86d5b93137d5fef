"""`mmllm serve` settings (kept apart from the app so the CLI starts without FastAPI installed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """`mmllm serve` settings."""

    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on every endpoint but /health."""
    max_batch_size: int = 8
    """Most requests generated together in one batch."""
    max_wait_ms: float = 10.0
    """How long a request waits for others to share its batch."""
    max_body_mb: float = 20.0
    """Largest request body accepted."""
    max_images: int = 4
    """Most images in one request."""
    max_image_pixels: int = 16_000_000
    """Largest image (width x height) accepted."""
    max_prompt_tokens: int = 4096
    """Longest prompt accepted, image placeholders included."""
    max_tokens: int = 1024
    """Highest max_tokens a request may ask for."""
    timeout_s: float = 120.0
    """Per-request time limit."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs (off: a server that fetches URLs can be aimed at internal hosts)."""
    ui: bool = False
    """Also serve the Gradio chat page at /ui (needs `mmllm[ui]`)."""
    cors_origins: str = ""
    """Comma-separated origins allowed by CORS (empty: CORS off)."""
