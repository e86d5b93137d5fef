"""The HTTP server: REST (`/generate`, `/caption`) and the OpenAI API (`/v1/chat/completions`, `/v1/models`).

Every bad input gets a 4xx with an OpenAI-shaped error body, never a traceback. The event loop only
parses, validates and streams: decoding images, transcribing audio and tokenizing run in worker
threads, and the model runs in one batcher thread. A request whose client disconnects stops
generating at its next token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmllm.batcher import DynamicBatcher, Job
from mmllm.errors import MmllmError
from mmllm.generation import CAPTION_PROMPT, Backend, Completion, GenerationSettings, Prompt
from mmllm.images import load_image
from mmllm.processor import Message
from mmllm.serve.config import ServeConfig
from mmllm.serve.guard import UI_PATH, ErrorResponse, Guard
from mmllm.serve.metrics import Metrics
from mmllm.serve.schemas import (
    CaptionRequest,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    GenerateRequest,
    Health,
    ModelList,
    TextResponse,
)
from mmllm.serve.schemas import ErrorResponse as ErrorSchema

T = TypeVar("T")
ALIAS = "mmllm"  # a model name every server answers to, whatever it serves
# Text beyond this many characters per allowed prompt token is refused before tokenizing: no
# tokenizer packs more into a token, and a 19 MB prompt took 17 s to tokenize only to be refused.
CHARS_PER_TOKEN = 32
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


def validation_message(errors: list[dict[str, Any]]) -> str:
    """The one error that names the real problem, at a path a client can read (`messages.0.content`).

    A union field reports a mismatch for every branch it could have been; the branch the input took
    fails deeper, and that is the error to show.
    """
    if not errors:
        return "invalid request body"

    def rank(error: dict[str, Any]) -> tuple[bool, int]:
        return not error["type"].endswith("_type"), len(error["loc"])

    best = max(errors, key=rank)
    if best["type"] == "json_invalid":
        return f"invalid JSON body: {best.get('ctx', {}).get('error', best['msg'])}"
    loc = [str(p) for p in best["loc"] if p != "body"]
    # Drop pydantic's union branch names ("function-after[...]", "str", "ImageURL") and a tagged
    # union's tag, which repeats the field it selects ("image_url", "image_url").
    kept: list[str] = []
    for part in loc:
        if "[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper():
            continue
        if not kept or kept[-1] != part:
            kept.append(part)
    message = best["msg"].removeprefix("Value error, ")
    return f"{'.'.join(kept)}: {message}" if kept else message


def body_schema(model: type, file_required: bool = False) -> dict:
    """OpenAPI request body for JSON (base64 `image`) or multipart (an uploaded `file` + the same fields)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    fields = {k: v for k, v in schema["properties"].items() if k != "image"}
    form = {
        "type": "object",
        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
        "required": [
            *(["file"] if file_required else []),
            *(r for r in schema.get("required", []) if r != "image"),
        ],
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}},
        }
    }


def with_limits(schema: dict[str, Any], cfg: ServeConfig) -> dict[str, Any]:
    """This server's token limit written into its schema: what the schema allows, the server accepts."""
    if isinstance(schema, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in ("max_tokens", "max_completion_tokens"):
                for branch in prop.get("anyOf", [prop]):
                    if branch.get("type") == "integer":
                        branch["maximum"] = cfg.max_tokens
        for value in schema.values():
            with_limits(value, cfg)
    elif isinstance(schema, list):
        for value in schema:
            with_limits(value, cfg)
    return schema


class Server:
    """What the handlers share: the backend's batcher, the settings, the metrics."""

    def __init__(self, batcher: DynamicBatcher, cfg: ServeConfig, model_name: str):
        self.batcher, self.backend, self.cfg, self.model_name = batcher, batcher.backend, cfg, model_name
        self.metrics = Metrics()
        batcher.observers.append(self.metrics.observe_batch)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
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

    def check_request(self, texts: list[str], n_images: int, max_tokens: int) -> None:
        """The limits that need no decoding or tokenizing: checked first, on the event loop."""
        cfg = self.cfg
        if n_images > cfg.max_images:
            raise ApiError(
                400, f"{n_images} images; this server accepts at most {cfg.max_images}", "messages"
            )
        if max_tokens > cfg.max_tokens:
            raise ApiError(
                400, f"max_tokens {max_tokens} exceeds this server's limit of {cfg.max_tokens}", "max_tokens"
            )
        characters = sum(map(len, texts))
        if characters > cfg.max_prompt_tokens * CHARS_PER_TOKEN:
            raise ApiError(
                400,
                f"prompt of {characters:,} characters is longer than {cfg.max_prompt_tokens:,} tokens can be",
                "messages",
            )

    async def prepare(self, conversation: list[Message], images: list[Image.Image]) -> Prompt:
        """Tokenize and preprocess one request on its own, off the event loop."""
        try:
            prompt = await self.offload(self.backend.prepare, conversation, images)
        except (MmllmError, ValueError) as err:
            raise ApiError(400, str(err), "messages") from None
        if len(prompt.input_ids) > self.cfg.max_prompt_tokens:
            raise ApiError(
                400,
                f"prompt of {len(prompt.input_ids):,} tokens exceeds this server's limit of "
                f"{self.cfg.max_prompt_tokens:,}",
                "messages",
            )
        return prompt

    def enqueue(
        self, prompt: Prompt, settings: GenerationSettings, max_tokens: int, stop: list[str], stream: bool
    ) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(
            prompt,
            settings,
            max_tokens,
            stop,
            loop,
            loop.create_future(),
            asyncio.Queue() if stream else None,
        )
        self.batcher.submit(job)
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

    def max_tokens(self, request: ChatCompletionRequest) -> int:
        """What the client asked for, or (asking for nothing) as much as this server allows, up to 256."""
        return request.max_completion_tokens or request.max_tokens or min(256, self.cfg.max_tokens)

    def settings(self, **options: Any) -> GenerationSettings:
        try:
            settings = GenerationSettings(**options)
            self.backend.check(settings)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        return settings


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _speech_to_text(data: str) -> str:
    from mmllm.audio import transcribe

    try:
        audio = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "input_audio.data is not valid base64", "input_audio") from None
    try:
        text = transcribe(audio)
    except MmllmError as err:
        raise ApiError(400, f"audio: {err}", "input_audio") from None
    if not text.strip():
        raise ApiError(400, "audio: no speech was recognised in input_audio", "input_audio")
    return text


def _has_content(message: ChatMessage) -> bool:
    if isinstance(message.content, str):
        return bool(message.content.strip())
    return any(part.type != "text" or part.text.strip() for part in message.content)


def create_app(
    backend: Backend, cfg: ServeConfig, model_name: str = ALIAS, batcher: DynamicBatcher | None = None
) -> FastAPI:
    """The API app for `backend`, answering through `batcher` (one of its own by default; `mmllm serve
    --ui` passes the one the chat page shares)."""
    app = FastAPI(title="mmllm", description="Multimodal LLM server: REST and OpenAI-compatible API.")
    batcher = batcher or DynamicBatcher(backend, cfg.max_batch_size, cfg.max_wait_ms)
    server = Server(batcher, cfg, model_name)
    vision_trained = backend.vision_trained

    def route_of(path: str) -> str:  # a bounded set of metric labels, whatever paths clients send
        if path == UI_PATH or path.startswith(UI_PATH + "/"):
            return UI_PATH
        return path if any(getattr(r, "path", None) == path for r in app.routes) else "other"

    app.add_middleware(Guard, cfg=cfg, metrics=server.metrics, route_of=route_of)
    if cfg.cors_origins:  # outside the guard: a browser's preflight carries no API key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins.split(","),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> ErrorResponse:
        return ErrorResponse(err.status, err.message, err.kind, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> ErrorResponse:
        return ErrorResponse(400, validation_message(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> ErrorResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return ErrorResponse(err.status_code, str(err.detail), kind, headers=err.headers)  # 405 keeps Allow

    async def chat_inputs(request: ChatCompletionRequest) -> tuple[list[Message], list[Image.Image]]:
        texts, image_urls = [], []
        for message in request.messages:
            parts = [message.content] if isinstance(message.content, str) else message.content
            for part in parts:
                if isinstance(part, str):
                    texts.append(part)
                elif part.type == "text":
                    texts.append(part.text)
                elif part.type == "image_url":
                    image_urls.append(
                        part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    )
        if not any(m.role == "user" and _has_content(m) for m in request.messages):
            raise ApiError(400, "messages need a non-empty user message", "messages")
        server.check_request(texts, len(image_urls), server.max_tokens(request))
        images = [await server.image(url) for url in image_urls]
        conversation = []
        for message in request.messages:
            if isinstance(message.content, str):
                text = message.content
            else:
                pieces = []
                for part in message.content:
                    if part.type == "text":
                        pieces.append(part.text)
                    elif part.type == "image_url":
                        pieces.append(backend.processor.image_token)
                    else:
                        pieces.append(await server.offload(_speech_to_text, part.input_audio.data))
                text = "\n".join(pieces)
            conversation.append({"role": message.role, "content": text})
        return conversation, images

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": {}}}
            },  # `stream: true`: chunk events, then [DONE]
            **ERRORS,
            404: {"model": ErrorSchema, "description": "unknown model name"},
        },
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        conversation, images = await chat_inputs(body)
        max_tokens = server.max_tokens(body)
        settings = server.settings(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        prompt = await server.prepare(conversation, images)
        job = server.enqueue(prompt, settings, max_tokens, stop, body.stream)
        completion_id, model = f"chatcmpl-{uuid.uuid4().hex}", body.model
        if not body.stream:
            done = await server.result(job, request)
            return ChatCompletion(
                id=completion_id,
                created=int(time.time()),
                model=model,
                choices=[{"message": {"content": done.text}, "finish_reason": done.finish_reason}],
                usage={
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens,
                },
            )

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            deadline = time.monotonic() + cfg.timeout_s
            try:
                yield chunk({"role": "assistant", "content": ""})
                first = True
                while (
                    piece := await asyncio.wait_for(job.deltas.get(), deadline - time.monotonic())
                ) is not None:
                    # Answers are stripped of leading whitespace, as in the non-streamed form.
                    piece = piece.lstrip() if first else piece
                    first = first and not piece
                    if piece:
                        yield chunk({"content": piece})
                done = await job.future
                yield chunk({}, done.finish_reason)
            except TimeoutError:
                error = {"message": f"generation took longer than {cfg.timeout_s:g} s", "type": "timeout"}
                yield f"data: {json.dumps({'error': error})}\n\n"
            except Exception as err:  # after the 200 has gone out, an error can only travel in-band
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
            finally:
                job.cancel()  # the client left (the response is cancelled) or the answer is complete
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def form_or_json(request: Request, model: type) -> tuple[Any, list[Image.Image]]:
        """JSON bodies carry base64 images; multipart forms carry an uploaded `file`."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            try:
                form = await request.form()
            except Exception as err:  # a malformed multipart body
                raise ApiError(400, f"invalid multipart form: {err}") from None
            names = [name for name, _ in form.multi_items()]
            if repeated := sorted({name for name in names if names.count(name) > 1}):
                raise ApiError(400, f"form field {repeated[0]!r} is given more than once", repeated[0])
            upload = form.get("file")
            # A form has no null: the text "null" stands for it (accepted where the field may be null).
            fields = {k: None if v == "null" else v for k, v in form.items() if k != "file"}
            images = []
            if upload is not None and hasattr(upload, "read"):
                data = await upload.read()
                images.append(await server.image(data, "file"))
                fields.setdefault("image", "uploaded")
            try:
                return model.model_validate(fields, strict=False), images  # form fields are all text
            except ValueError as err:
                raise ApiError(400, f"invalid form: {validation_message(err.errors())}") from None
        if not kind.startswith("application/json"):
            raise ApiError(415, "send application/json or multipart/form-data")
        try:
            body = model.model_validate_json(await request.body())
        except ValueError as err:
            raise ApiError(400, validation_message(err.errors())) from None
        images = [await server.image(body.image)] if body.image else []
        return body, images

    async def answer(
        request: Request, prompt_text: str, images: list, settings: GenerationSettings
    ) -> TextResponse:
        server.check_request([prompt_text], len(images), settings.max_new_tokens)
        prompt = await server.prepare([{"role": "user", "content": prompt_text}], images)
        job = server.enqueue(prompt, settings, settings.max_new_tokens, [], False)
        done = await server.result(job, request)
        return TextResponse(
            text=done.text,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            finish_reason=done.finish_reason,
        )

    form_errors = {**ERRORS, 415: {"model": ErrorSchema, "description": "neither JSON nor multipart"}}

    @app.post(
        "/generate",
        response_model=TextResponse,
        openapi_extra=body_schema(GenerateRequest),
        responses=form_errors,
    )
    async def generate(request: Request):
        body, images = await form_or_json(request, GenerateRequest)
        if not body.prompt.strip():
            raise ApiError(400, "the prompt is empty", "prompt")
        settings = server.settings(
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            num_beams=body.num_beams,
            seed=body.seed,
        )
        return await answer(request, body.prompt, images, settings)

    @app.post(
        "/caption",
        response_model=TextResponse,
        openapi_extra=body_schema(CaptionRequest, file_required=True),
        responses=form_errors,
    )
    async def caption(request: Request):
        body, images = await form_or_json(request, CaptionRequest)
        if not images:
            raise ApiError(400, "no image", "image")
        return await answer(request, CAPTION_PROMPT, images, server.settings(max_new_tokens=body.max_tokens))

    @app.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
    async def models():
        return ModelList(data=[{"id": name, "created": server.created} for name in server.names])

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_limits(FastAPI.openapi(app), cfg)
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/health", response_model=Health)
    async def health():
        return Health(model=model_name, vision_trained=vision_trained, queue_depth=server.batcher.depth)

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: ERRORS[401]})
    async def prometheus():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
