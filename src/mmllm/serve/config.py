"""`mmllm serve` and `mmllm ui` settings, kept apart from the app and the page so the CLI builds its
`--help` without importing FastAPI, Gradio or torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

API_KEY_VARIABLE = "MMLLM_API_KEY"


@dataclass
class ServeConfig:
    """`mmllm serve` settings."""

    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on every endpoint but /health, /docs, /redoc and /openapi.json; the
    chat page (/ui) asks for the key on a login form instead. Default: $MMLLM_API_KEY when set (a key
    in the environment stays out of the process list and the shell history)."""
    scheduler: Literal["continuous", "batch"] = "continuous"
    """continuous: requests join the running batch between decoding steps and leave it when done (the
    torch and llama.cpp backends); batch: requests that arrive together run together to the end (the
    only kind for the onnx backend)."""
    max_batch_size: int = 16
    """Most requests decoding together."""
    max_step_tokens: int = 512
    """Prompt tokens read and tokens decoded in one step, all requests together (continuous): a long
    prompt is read in chunks, between the steps of the answers already running."""
    prefix_cache_mb: float = 512.0
    """Memory for the prefix cache (torch and llama.cpp backends; 0: off): the KV of answered requests,
    prompt and answer, kept so a request that starts alike (the next turn of a conversation, images
    included) reads only what is new; least recently used first out, running requests first in. Shared
    only between requests with the same API key (Authorization header) and `cache_salt`."""
    max_wait_ms: float = 10.0
    """How long a request waits for others to share its batch (batch)."""
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
    """Also serve the Gradio chat page at /ui (needs gradio: the `ui` extra)."""
    cors_origins: str = ""
    """Comma-separated origins allowed by CORS (empty: CORS off)."""

    def __post_init__(self) -> None:
        """Checked when the settings are made, before the model loads."""
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_VARIABLE) or None
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {self.port}")
        limits = (
            "max_batch_size",
            "max_step_tokens",
            "max_body_mb",
            "max_images",
            "max_image_pixels",
            "max_prompt_tokens",
        )
        for name in (*limits, "max_tokens", "timeout_s"):
            if not getattr(self, name) > 0:  # NaN fails too
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("max_wait_ms", "prefix_cache_mb"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.api_key == "":
            raise ValueError("api_key is empty: give a key, or leave the option out for no key")


@dataclass
class UiConfig:
    """`mmllm ui` settings."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 7860
    """TCP port."""
    whisper: str = "whisper-base"
    """Speech model for voice questions: whisper-base (multilingual) or whisper-tiny.en."""
    max_batch_size: int = 16
    """Most questions (from all open pages) decoding together."""
