"""The OpenAI-compatible routes: `POST /v1/chat/completions` (text, images, audio; SSE streaming) and
`GET /v1/models`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from PIL import Image

from mmllm.conversation import Message
from mmllm.engine.batcher import Job
from mmllm.engine.rows import Completion
from mmllm.engine.settings import GenerationSettings
from mmllm.errors import MmllmError
from mmllm.serve.schemas import ChatCompletion, ChatCompletionRequest, ChatMessage, ModelList
from mmllm.serve.schemas import ErrorResponse as ErrorSchema
from mmllm.serve.server import ERRORS, ApiError, Server, ServerDep

router = APIRouter()


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


async def chat_inputs(
    server: Server, request: ChatCompletionRequest, settings: GenerationSettings
) -> tuple[list[Message], list[Image.Image]]:
    texts, image_urls = [], {}
    for i, message in enumerate(request.messages):
        parts = [message.content] if isinstance(message.content, str) else message.content
        for j, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
            elif part.type == "text":
                texts.append(part.text)
            elif part.type == "image_url":
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                image_urls[f"messages.{i}.content.{j}.image_url"] = url
    if not any(m.role == "user" and _has_content(m) for m in request.messages):
        raise ApiError(400, "messages need a non-empty user message", "messages")
    server.check_request(texts, len(image_urls), settings, request.limit_field)
    images = []
    for param, url in image_urls.items():
        try:
            images.append(await server.image(url))
        except ApiError as err:
            err.param = param  # which image of which message
            raise
    conversation = []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, str):
            text = message.content
        else:
            pieces = []
            for j, part in enumerate(message.content):
                if part.type == "text":
                    pieces.append(part.text)
                elif part.type == "image_url":
                    pieces.append(server.backend.processor.image_token)
                else:
                    try:
                        pieces.append(await server.offload(_speech_to_text, part.input_audio.data))
                    except ApiError as err:
                        err.param = f"messages.{i}.content.{j}.input_audio"
                        raise
            text = "\n".join(pieces)
        role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for it
        conversation.append({"role": role, "content": text})
    return conversation, images


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {"schema": {}}}},  # `stream: true`: chunk events, then [DONE]
        **ERRORS,
        404: {"model": ErrorSchema, "description": "unknown model name"},
    },
)
async def chat_completions(body: ChatCompletionRequest, request: Request, server: ServerDep):
    server.check_model(body.model)
    if refused := body.unsupported():  # asked for what this server does not do: say so, never ignore it
        raise ApiError(400, refused[1], refused[0], code="unsupported_parameter")
    settings = server.settings(**body.generation_options(server.default_max_new_tokens))
    conversation, images = await chat_inputs(server, body, settings)
    prompt = await server.prepare(conversation, images)
    job = server.enqueue(prompt, settings, body.stop_strings(), bool(body.stream))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        events = _events(job, server.cfg.timeout_s, completion_id, body.model, usage)
        return StreamingResponse(events, media_type="text/event-stream")
    done = await server.result(job, request)
    return ChatCompletion(
        id=completion_id,
        created=int(time.time()),
        model=body.model,
        choices=[{"message": {"content": done.text}, "finish_reason": done.finish_reason}],
        usage=_usage(done),
    )


def _usage(done: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _chunk(completion_id: str, model: str, delta: dict | None, finish: str | None = None, **extra) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


async def _events(
    job: Job, timeout_s: float, completion_id: str, model: str, usage: bool = False
) -> AsyncIterator[str]:
    """A streamed answer as server-sent events: the role, the text piece by piece, the finish reason,
    (with `usage`) a chunk holding the token counts, then `[DONE]`; an error after the 200 has gone
    out travels in-band."""
    deadline = time.monotonic() + timeout_s
    try:
        yield _chunk(completion_id, model, {"role": "assistant", "content": ""})
        while (piece := await asyncio.wait_for(job.deltas.get(), deadline - time.monotonic())) is not None:
            yield _chunk(completion_id, model, {"content": piece})  # joined: the non-streamed content
        done = await job.future
        yield _chunk(completion_id, model, {}, done.finish_reason)
        if usage:
            yield _chunk(completion_id, model, None, usage=_usage(done))
    except TimeoutError:
        error = {"message": f"generation took longer than {timeout_s:g} s", "type": "timeout"}
        yield f"data: {json.dumps({'error': error})}\n\n"
    except Exception as err:  # after the 200 has gone out, an error can only travel in-band
        yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
    finally:
        job.cancel()  # the client left (the response is cancelled) or the answer is complete
    yield "data: [DONE]\n\n"


@router.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
async def models(server: ServerDep):
    return ModelList(data=[{"id": name, "created": server.created} for name in server.names])
