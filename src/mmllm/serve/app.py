"""The HTTP server: REST (`/generate`, `/caption`) and the OpenAI API (`/v1/chat/completions`, `/v1/models`).

Every bad input gets a 4xx with an OpenAI-shaped error body, never a traceback; the model runs in
one batcher thread, so the event loop only parses, validates and streams.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmllm.errors import MmllmError
from mmllm.images import load_image
from mmllm.pipeline import Completion, GenerationSettings, Pipeline
from mmllm.serve.batcher import DynamicBatcher, Job
from mmllm.serve.config import ServeConfig
from mmllm.serve.metrics import Metrics
from mmllm.serve.schemas import (
    CaptionRequest,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    GenerateRequest,
    Health,
    ModelList,
    TextResponse,
)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def decode_image(value: str, cfg: ServeConfig) -> Image.Image:
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
    try:
        image = load_image(data)
    except MmllmError as err:
        raise ApiError(400, f"bad image: {err}", "image_url") from None
    if image.width * image.height > cfg.max_image_pixels:
        raise ApiError(400, f"image of {image.width}x{image.height} exceeds {cfg.max_image_pixels:,} pixels")
    return image


def create_app(pipeline: Pipeline, cfg: ServeConfig, model_name: str = "mmllm") -> FastAPI:
    app = FastAPI(title="mmllm", description="Multimodal LLM server: REST and OpenAI-compatible API.")
    metrics = Metrics()
    batcher = DynamicBatcher(pipeline, cfg.max_batch_size, cfg.max_wait_ms, on_batch=metrics.observe_batch)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    created = int(time.time())
    vision_trained = "vision_tower" in (pipeline.model.config.trained_parts or ())
    app.state.batcher = batcher
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins.split(","),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_body_mb * 2**20:
            response = _error(413, f"request body over {cfg.max_body_mb} MB")
        else:
            response = await call_next(request)
        metrics.observe_request(request.url.path, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.kind, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return _error(
            400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body"
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(
            err.status_code,
            str(err.detail),
            "not_found_error" if err.status_code == 404 else "invalid_request_error",
        )

    async def authorized(request: Request) -> None:
        if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            raise ApiError(
                401, "missing or invalid API key (Authorization: Bearer ...)", kind="authentication_error"
            )

    def check(conversation: list[dict], images: list, max_tokens: int) -> None:
        if len(images) > cfg.max_images:
            raise ApiError(400, f"{len(images)} images; this server accepts at most {cfg.max_images}")
        if max_tokens > cfg.max_tokens:
            raise ApiError(
                400, f"max_tokens {max_tokens} exceeds this server's limit of {cfg.max_tokens}", "max_tokens"
            )
        try:
            prompt = pipeline.processor.encode_text(conversation, len(images))["input_ids"]
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None
        if len(prompt) > cfg.max_prompt_tokens:
            raise ApiError(400, f"prompt of {len(prompt)} tokens exceeds {cfg.max_prompt_tokens}", "messages")

    def enqueue(conversation, images, settings, max_tokens, stop, stream: bool) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(
            conversation,
            images,
            settings,
            max_tokens,
            stop,
            loop,
            loop.create_future(),
            asyncio.Queue() if stream else None,
        )
        batcher.submit(job)
        return job

    async def result(job: Job) -> Completion:
        try:
            completion = await asyncio.wait_for(asyncio.shield(job.future), cfg.timeout_s)
        except TimeoutError:
            job.future.cancel()
            raise ApiError(504, f"generation took longer than {cfg.timeout_s} s", kind="timeout") from None
        metrics.generated_tokens.inc(completion.completion_tokens)
        return completion

    def speech_to_text(data: str) -> str:
        from mmllm.audio import transcribe

        try:
            audio = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "input_audio.data is not valid base64", "input_audio") from None
        try:
            return transcribe(audio)
        except MmllmError as err:
            raise ApiError(400, f"audio: {err}", "input_audio") from None

    async def chat_inputs(request: ChatCompletionRequest) -> tuple[list[dict], list]:
        conversation, images = [], []
        for message in request.messages:
            if isinstance(message.content, str):
                text = message.content
            else:
                pieces = []
                for part in message.content:
                    if part.type == "text":
                        pieces.append(part.text)
                    elif part.type == "image_url":
                        url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                        images.append(decode_image(url, cfg))
                        pieces.append(pipeline.processor.image_token)
                    else:  # Whisper runs off the event loop
                        pieces.append(await asyncio.to_thread(speech_to_text, part.input_audio.data))
                text = "\n".join(pieces)
            conversation.append({"role": message.role, "content": text})
        if not any(m["role"] == "user" and m["content"].strip() for m in conversation):
            raise ApiError(400, "messages need a non-empty user message", "messages")
        return conversation, images

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={400: {"model": ErrorResponse}},
        dependencies=[Depends(authorized)],
    )
    async def chat_completions(request: ChatCompletionRequest):
        conversation, images = await chat_inputs(request)
        max_tokens = request.max_completion_tokens or request.max_tokens or 256
        check(conversation, images, max_tokens)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        settings = GenerationSettings(
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
        )
        job = enqueue(conversation, images, settings, max_tokens, stop, request.stream)
        completion_id, model = f"chatcmpl-{uuid.uuid4().hex}", request.model
        if not request.stream:
            done = await result(job)
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
            yield chunk({"role": "assistant", "content": ""})
            first = True
            while (piece := await job.deltas.get()) is not None:
                # Answers are stripped of leading whitespace, as in the non-streamed form.
                piece = piece.lstrip() if first else piece
                first = first and not piece
                if piece:
                    yield chunk({"content": piece})
            try:
                done = await result(job)
                yield chunk({}, done.finish_reason)
            except (ApiError, Exception) as err:
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def form_or_json(request: Request, model: type) -> tuple[Any, list]:
        """JSON bodies carry base64 images; multipart forms carry an uploaded `file`."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            fields = {k: v for k, v in form.items() if k != "file"}
            image = None
            if upload is not None and hasattr(upload, "read"):
                try:
                    image = load_image(await upload.read())
                except MmllmError as err:
                    raise ApiError(400, f"bad image: {err}", "file") from None
                fields.setdefault("image", "uploaded")
            try:
                return model.model_validate(fields), [image] if image else []
            except ValueError as err:
                raise ApiError(400, f"invalid form: {err}") from None
        if not kind.startswith("application/json"):
            raise ApiError(415, "send application/json or multipart/form-data")
        try:
            body = model.model_validate_json(await request.body())
        except ValueError as err:
            raise ApiError(400, f"invalid JSON body: {str(err).splitlines()[0]}") from None
        return body, [decode_image(body.image, cfg)] if body.image else []

    def body_schema(model: type) -> dict:
        schema = {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}
        form = {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}
        return {
            "requestBody": {
                "required": True,
                "content": {"application/json": schema, "multipart/form-data": form},
            }
        }

    async def answer(prompt: str, images: list, settings: GenerationSettings) -> TextResponse:
        conversation = [{"role": "user", "content": prompt}]
        check(conversation, images, settings.max_new_tokens)
        done = await result(enqueue(conversation, images, settings, settings.max_new_tokens, [], False))
        return TextResponse(
            text=done.text,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            finish_reason=done.finish_reason,
        )

    @app.post(
        "/generate",
        response_model=TextResponse,
        openapi_extra=body_schema(GenerateRequest),
        responses={400: {"model": ErrorResponse}},
        dependencies=[Depends(authorized)],
    )
    async def generate(request: Request):
        body, images = await form_or_json(request, GenerateRequest)
        if not body.prompt.strip():
            raise ApiError(400, "the prompt is empty", "prompt")
        settings = GenerationSettings(
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            num_beams=body.num_beams,
            seed=body.seed,
        )
        return await answer(body.prompt, images, settings)

    @app.post(
        "/caption",
        response_model=TextResponse,
        openapi_extra=body_schema(CaptionRequest),
        responses={400: {"model": ErrorResponse}},
        dependencies=[Depends(authorized)],
    )
    async def caption(request: Request):
        body, images = await form_or_json(request, CaptionRequest)
        if not images:
            raise ApiError(400, "no image", "image")
        return await answer(
            "Describe this image briefly.", images, GenerationSettings(max_new_tokens=body.max_tokens)
        )

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)])
    async def models():
        return ModelList(data=[{"id": model_name, "created": created}])

    @app.get("/health", response_model=Health)
    async def health():
        return Health(model=model_name, vision_trained=vision_trained, queue_depth=batcher.depth)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(authorized)])
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
