"""What the server's handlers share: the `Server` (backend, request queue, limits, metrics, worker threads),
its OpenAI-shaped `ApiError`, and the decoding of a request's images."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from PIL import Image

from mmllm.engine.backend import Prompt
from mmllm.engine.batcher import Job, RequestQueue
from mmllm.engine.rows import Completion
from mmllm.engine.settings import GenerationSettings
from mmllm.errors import MmllmError
from mmllm.images import load_image
from mmllm.serve.config import ServeConfig
from mmllm.serve.metrics import Metrics
from mmllm.serve.schemas import ErrorResponse as ErrorSchema

T = TypeVar("T")
ALIAS = "mmllm"  # a model name every server answers to, whatever it serves
# Text beyond this many characters per allowed prompt token is refused before tokenizing: no
# tokenizer packs more into a token, and a 19 MB prompt took 17 s to tokenize only to be refused.
CHARS_PER_TOKEN = 32
# OpenAI's message fields this server does not declare (legacy function calls, audio output, refusals).
OPENAI_MESSAGE_FIELDS = ("function_call", "audio", "refusal")
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorSchema, "description": description}
    for status, description in (
        (400, "invalid request: the message says which field and why"),
        (401, "missing or wrong API key"),
        (413, "request body over the server's limit"),
        (504, "generation took longer than the server's time limit"),
    )
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def decode_image(value: str, cfg: ServeConfig, shortest_side: int | None = None) -> Image.Image:
    """A data URI or bare base64 (or, only if enabled, an http(s) URL). Never a local path."""
    if value.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise ApiError(400, "remote image URLs are disabled on this server; send a data URI", "image_url")
        import urllib.request

        limit = int(cfg.max_body_mb * 2**20)
        with urllib.request.urlopen(value, timeout=10) as response:
            data = response.read(limit + 1)
        if len(data) > limit:
            raise ApiError(413, "remote image too large")
    else:
        payload = value.partition(",")[2] if value.startswith("data:") else value
        if value.startswith("data:") and ";base64" not in value.partition(",")[0]:
            raise ApiError(400, "image data URIs must be base64-encoded", "image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image is neither a data URI nor valid base64", "image_url") from None
    return image_from_bytes(data, cfg, shortest_side, "image_url")


def image_from_bytes(data: bytes, cfg: ServeConfig, shortest_side: int | None, param: str) -> Image.Image:
    try:
        return load_image(data, max_pixels=cfg.max_image_pixels, shortest_side=shortest_side)
    except MmllmError as err:
        raise ApiError(400, f"bad image: {err}", param) from None


def validation_error(errors: list[dict[str, Any]], prefix: str = "") -> ApiError:
    """The 400 for a body that fails validation: the one error that names the real problem, at a path
    a client can read (`messages.0.content`), which is also the error's `param`.

    A union field reports a mismatch for every branch it could have been; the branch the input took
    fails deeper, and that is the error to show. A field the server does not know is refused by name.
    """
    if not errors:
        return ApiError(400, f"{prefix}invalid request body")

    def rank(error: dict[str, Any]) -> tuple[bool, bool, int]:
        # A field the server does not know explains the errors beside it (an assistant message with
        # `tool_calls` has no content): it goes first.
        return not error["type"].endswith("_type"), error["type"] == "extra_forbidden", len(error["loc"])

    best = max(errors, key=rank)
    if best["type"] == "json_invalid":
        return ApiError(400, f"{prefix}invalid JSON body: {best.get('ctx', {}).get('error', best['msg'])}")
    # Drop pydantic's union branch names ("function-after[...]", "str", "ImageURL") and a content
    # part's tag, which names its `type`, not a field (`content.0.text.lang` is `content.0.lang`).
    kept: list[str] = []
    tag_next = False
    for raw in best["loc"]:
        part = str(raw)
        if raw == "body" or "[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper():
            continue
        if tag_next and part in ("text", "image_url", "input_audio"):
            tag_next = False
            continue
        tag_next = isinstance(raw, int) and kept[-1:] == ["content"]
        kept.append(part)
    param = ".".join(kept) or None
    if best["type"] == "extra_forbidden":
        if kept and kept[-1] in OPENAI_MESSAGE_FIELDS:
            return ApiError(400, f"{prefix}`{param}` is not supported yet", param)
        known = "docs/api.md lists the fields this server knows"
        return ApiError(400, f"{prefix}`{param}` is not a field of this API ({known})", param)
    message = best["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{prefix}{param}: {message}" if param else f"{prefix}{message}", param)


class Server:
    """What the handlers share: the backend's request queue, the settings, the metrics."""

    def __init__(self, requests: RequestQueue, cfg: ServeConfig, model_name: str):
        self.requests, self.backend, self.cfg, self.model_name = requests, requests.backend, cfg, model_name
        self.metrics = Metrics()
        requests.events = self.metrics
        self.metrics.queue_depth.set_function(lambda: self.requests.depth)
        self.metrics.running.set_function(lambda: self.requests.running)
        if self.backend.session is not None:  # the backends that keep a KV cache between steps
            cache = self.backend.session.prefix_cache
            cache.resize(int(cfg.prefix_cache_mb * 2**20))
            self.metrics.prefix_cache_bytes.set_function(lambda: cache.nbytes)
            self.metrics.prefix_cache_entries.set_function(lambda: len(cache.entries))
        self.names = list(dict.fromkeys([model_name, ALIAS]))
        self.created = int(time.time())
        self.shortest_side = self.backend.processor.image_processor.size
        # Requests' CPU work (decoding, resizing, tokenizing, Whisper) runs here, one core short of
        # all: with every core busy the event loop is starved, not blocked (4 x 16-megapixel PNGs on
        # 2 cores: /health took 134 ms in the default pool of 6 threads).
        workers = max(1, (os.cpu_count() or 2) - 1)
        self.workers = ThreadPoolExecutor(workers, thread_name_prefix="mmllm-prepare")

    async def offload(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function(*args)` in the preparation threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, function, *args)

    async def image(self, value: str | bytes, param: str = "image_url") -> Image.Image:
        """A request's image (data URI, base64, allowed URL, or uploaded bytes), decoded off the loop."""
        if isinstance(value, bytes):
            return await self.offload(image_from_bytes, value, self.cfg, self.shortest_side, param)
        return await self.offload(decode_image, value, self.cfg, self.shortest_side)

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(
                404,
                f"model {name!r} is not served here; use one of: {', '.join(self.names)}",
                "model",
                code="model_not_found",
            )

    def check_request(
        self, texts: list[str], n_images: int, settings: GenerationSettings, limit: str = "max_tokens"
    ) -> None:
        """The limits that need no decoding or tokenizing: checked first, on the event loop. `limit`:
        the request's name for `max_new_tokens`."""
        cfg = self.cfg
        if n_images > cfg.max_images:
            raise ApiError(
                400, f"{n_images} images; this server accepts at most {cfg.max_images}", "messages"
            )
        if (asked := settings.max_new_tokens) > cfg.max_tokens:
            raise ApiError(400, f"{limit} {asked} exceeds this server's limit of {cfg.max_tokens}", limit)
        characters = sum(map(len, texts))
        if characters > cfg.max_prompt_tokens * CHARS_PER_TOKEN:
            raise ApiError(
                400,
                f"prompt of {characters:,} characters is longer than {cfg.max_prompt_tokens:,} tokens can be",
                "messages",
            )

    async def prepare(
        self,
        conversation: list[dict[str, Any]],
        images: list[Image.Image],
        tools: list[dict[str, Any]] | None = None,
        salt: str = "",
    ) -> Prompt:
        """Tokenize and preprocess one request on its own (with the tools its prompt shows), off the
        event loop; `salt`: whose it is, for the prefix cache (`cache_salt`)."""
        try:
            prompt = await self.offload(self.backend.prepare, conversation, images, tools)
        except (MmllmError, ValueError) as err:
            raise ApiError(400, str(err), "messages") from None
        prompt.salt = salt
        if len(prompt.input_ids) > self.cfg.max_prompt_tokens:
            raise ApiError(
                400,
                f"prompt of {len(prompt.input_ids):,} tokens exceeds this server's limit of "
                f"{self.cfg.max_prompt_tokens:,}",
                "messages",
            )
        return prompt

    def enqueue(self, prompt: Prompt, settings: GenerationSettings, stop: list[str], stream: bool) -> Job:
        job = self.requests.job(prompt, settings, stop, stream)
        self.requests.submit(job)
        return job

    async def result(self, job: Job, request: Request) -> Completion:
        """The finished answer; a client that disconnects or a timeout cancels the generation."""
        left = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {job.future, left}, timeout=self.cfg.timeout_s, return_when="FIRST_COMPLETED"
            )
        finally:
            left.cancel()
        if job.future not in done:
            job.cancel()
            if left in done:
                raise ApiError(499, "client closed the request", kind="client_closed")
            raise ApiError(504, f"generation took longer than {self.cfg.timeout_s:g} s", kind="timeout")
        if (failure := job.future.exception()) is not None:
            raise ApiError(500, f"generation failed: {failure}", kind="server_error")
        return job.future.result()

    @property
    def default_max_new_tokens(self) -> int:
        """A chat request that names no token limit gets as many as this server allows, up to 256."""
        return min(256, self.cfg.max_tokens)

    def settings(self, grammar_field: str = "response_format", **options: Any) -> GenerationSettings:
        """The request's settings, checked, and checked against the backend; `grammar_field`: the
        request field a grammar came from (`response_format` or `tools`)."""
        try:
            settings = GenerationSettings(**options)
            self.backend.check(settings)
        except ValueError as err:  # "top_k must be ...": the message starts with the setting
            name = str(err).split()[0]
            names = {"max_new_tokens": "max_tokens", "grammar": grammar_field}
            param = names.get(name, name if name in options else None)
            raise ApiError(400, str(err), param) from None
        return settings


def cache_salt(request: Request, salt: str | None = None) -> str:
    """Whose prompt a request's is, for the prefix cache: its API key (whatever `Authorization` it sent:
    behind a gateway that checks several keys, each is a tenant) and its own `cache_salt`, hashed, so
    requests share cached KV, and the time it saves, only with those who hold the same two."""
    tenant = f"{request.headers.get('authorization', '')}\0{salt or ''}"
    return hashlib.sha256(tenant.encode("utf-8", "surrogatepass")).hexdigest()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def server_of(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server_of)]  # what a handler declares to get the app's one `Server`
