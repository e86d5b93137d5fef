"""The OpenAI-compatible routes: `POST /v1/chat/completions` (text, images, audio; SSE streaming;
structured outputs, tools, log-probabilities), `GET /v1/models`, and vLLM's `/tokenize` and
`/detokenize`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from PIL import Image

from mmllm.engine.batcher import Job
from mmllm.engine.logits import TokenLogprob, grammar_error
from mmllm.engine.rows import Completion
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.tools import ToolCallParser, json_grammar, tool_call_grammar
from mmllm.engine.tools import parse as parse_tool_calls
from mmllm.errors import MmllmError
from mmllm.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    NamedToolChoice,
    TokenizeRequest,
    TokenizeResponse,
)
from mmllm.serve.schemas import ErrorResponse as ErrorSchema
from mmllm.serve.server import ERRORS, ApiError, Server, ServerDep, cache_salt

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
    if message.content is None:
        return False
    if isinstance(message.content, str):
        return bool(message.content.strip())
    return any(part.type != "text" or part.text.strip() for part in message.content)


def _tool_calls(message: ChatMessage, i: int) -> list[dict[str, Any]]:
    """An assistant message's calls as chat templates take them: arguments as a JSON object."""
    calls = []
    for j, call in enumerate(message.tool_calls or ()):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError as err:
            param = f"messages.{i}.tool_calls.{j}.function.arguments"
            raise ApiError(400, f"{param} is not JSON: {err}", param) from None
        calls.append(
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": arguments},
            }
        )
    return calls


async def chat_inputs(
    server: Server, messages: list[ChatMessage], settings: GenerationSettings, limit_field: str = "max_tokens"
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    texts, image_urls = [], {}
    for i, message in enumerate(messages):
        parts = [message.content] if isinstance(message.content, str) else message.content or []
        for j, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
            elif part.type == "text":
                texts.append(part.text)
            elif part.type == "image_url":
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                image_urls[f"messages.{i}.content.{j}.image_url"] = url
    if not any(m.role == "user" and _has_content(m) for m in messages):
        raise ApiError(400, "messages need a non-empty user message", "messages")
    server.check_request(texts, len(image_urls), settings, limit_field)
    images = []
    for param, url in image_urls.items():
        try:
            images.append(await server.image(url))
        except ApiError as err:
            err.param = param  # which image of which message
            raise
    conversation: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.content is None or isinstance(message.content, str):
            text = message.content or ""
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
        turn: dict[str, Any] = {"role": role, "content": text}
        if message.tool_calls:
            turn["tool_calls"] = _tool_calls(message, i)
        if message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        conversation.append(turn)
    return conversation, images


def _grammar(server: Server, body: ChatCompletionRequest) -> tuple[str, str]:
    """The grammar a constrained request's answer must follow, and the field that asked for it; run
    in a worker thread (the first grammar builds the vocabulary's llguidance tables)."""
    fmt, choice = body.response_format, body.tool_choice
    field = "response_format"
    if body.forced_call:
        field = "tool_choice"
        shaper = server.backend.shaper
        chosen = [
            tool
            for tool in body.tools
            if not isinstance(choice, NamedToolChoice) or tool.function.name == choice.function.name
        ]
        parallel = choice == "required" and body.parallel_tool_calls is not False
        functions = [tool.model_dump(exclude_none=True) for tool in chosen]
        grammar = tool_call_grammar(functions, parallel, server.backend.processor, shaper.tokenizer)
    elif fmt.type == "json_object":
        grammar = json_grammar({"type": "object"})
    else:
        try:
            grammar = json_grammar(fmt.json_schema.schema_ or {"type": "object"})
        except ValueError as err:
            raise ApiError(400, f"response_format.json_schema.schema: {err}", "response_format") from None
    try:
        error = grammar_error(grammar, server.backend.shaper.tokenizer)
    except ValueError as err:  # llguidance is not installed
        raise ApiError(400, f"{field}: {err}", field) from None
    if error:
        raise ApiError(400, f"{field}: the schema cannot be decoded to: {error}", field)
    return grammar, field


def _logprobs(server: Server, entries: list[TokenLogprob]) -> dict[str, Any]:
    """Log-probability records in OpenAI's shape: each token's text and UTF-8 bytes."""

    def described(token: int, logprob: float) -> dict[str, Any]:
        raw = server.backend.shaper.token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    content = [
        {**described(entry.token, entry.logprob), "top_logprobs": [described(t, lp) for t, lp in entry.top]}
        for entry in entries
    ]
    return {"content": content, "refusal": None}


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
    if contradiction := body.invalid():
        raise ApiError(400, contradiction[1], contradiction[0])
    try:
        options = body.generation_options(server.default_max_new_tokens)
    except ValueError as err:  # a logit_bias key that is not a token id
        raise ApiError(400, str(err), "logit_bias") from None
    settings = server.settings(**options)
    calling = bool(body.tools) and body.tool_choice != "none"
    if body.constrained:
        grammar, field = await server.offload(_grammar, server, body)
        settings = server.settings(field, **options, grammar=grammar)
    if settings.logprobs is not None:
        await server.offload(lambda: server.backend.shaper.tokenizer)  # built off the loop, once
    conversation, images = await chat_inputs(server, body.messages, settings, body.limit_field)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if calling else None
    prompt = await server.prepare(conversation, images, tools, cache_salt(request, body.cache_salt))
    try:
        server.backend.shaper.check(settings)  # token ids out of the vocabulary: a 400, not a failed row
    except ValueError as err:
        raise ApiError(400, str(err), str(err).split()[0]) from None
    job = server.enqueue(prompt, settings, body.stop_strings(), bool(body.stream))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        answer = _Answer(server, completion_id, body.model, calling)
        events = _events(job, server.cfg.timeout_s, answer, usage)
        return StreamingResponse(events, media_type="text/event-stream")
    done = await server.result(job, request)
    content, calls = parse_tool_calls(done.text) if calling else (done.text, [])
    choice = {
        "message": {"content": content, "tool_calls": calls or None},
        "finish_reason": "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason,
    }
    if done.logprobs is not None:
        choice["logprobs"] = await server.offload(_logprobs, server, done.logprobs)
    return ChatCompletion(
        id=completion_id, created=int(time.time()), model=body.model, choices=[choice], usage=_usage(done)
    )


def _usage(done: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens or 0},
    }


class _Answer:
    """One streamed answer's chunks: text pieces become content deltas (or, for a request with tools,
    content and tool-call deltas), each carrying the log-probabilities of the tokens it begins."""

    def __init__(self, server: Server, completion_id: str, model: str, calling: bool):
        self.server, self.completion_id, self.model = server, completion_id, model
        self.parser = ToolCallParser() if calling else None
        self.pending: list[TokenLogprob] = []  # records whose text is held back (by the parser)
        self.sent = 0  # records sent

    def chunk(self, delta: dict | None, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if delta is not None and self.pending:
            choice["logprobs"] = _logprobs(self.server, self.pending)
            self.sent += len(self.pending)
            self.pending = []
        body = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [] if delta is None else [choice],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def pieces(self, piece: str) -> list[str]:
        self.pending += getattr(piece, "logprobs", [])
        deltas = self.parser.feed(piece) if self.parser else [{"content": piece}]
        return [self.chunk(delta) for delta in deltas]

    def end(self, done: Completion, usage: bool) -> list[str]:
        """The last chunks: what the parser held, the finish reason (with records not sent yet)."""
        chunks = [self.chunk(delta) for delta in (self.parser.finish() if self.parser else ())]
        self.pending = (done.logprobs or [])[self.sent :]
        calls = self.parser is not None and bool(self.parser.calls)
        finish = "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason
        chunks.append(self.chunk({}, finish))
        if usage:
            chunks.append(self.chunk(None, usage=_usage(done)))
        return chunks


async def _events(job: Job, timeout_s: float, answer: _Answer, usage: bool = False) -> AsyncIterator[str]:
    """A streamed answer as server-sent events: the role, the text piece by piece (or its tool calls,
    their arguments piece by piece), the finish reason, (with `usage`) a chunk holding the token
    counts, then `[DONE]`; an error after the 200 has gone out travels in-band."""
    deadline = time.monotonic() + timeout_s
    try:
        yield answer.chunk({"role": "assistant", "content": ""})
        while (piece := await asyncio.wait_for(job.deltas.get(), deadline - time.monotonic())) is not None:
            for chunk in answer.pieces(piece):  # joined: the non-streamed content
                yield chunk
        for chunk in answer.end(await job.future, usage):
            yield chunk
    except TimeoutError:
        error = {"message": f"generation took longer than {timeout_s:g} s", "type": "timeout"}
        yield f"data: {json.dumps({'error': error})}\n\n"
    except Exception as err:  # after the 200 has gone out, an error can only travel in-band
        yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
    finally:
        job.cancel()  # the client left (the response is cancelled) or the answer is complete
    yield "data: [DONE]\n\n"


@router.post("/tokenize", response_model=TokenizeResponse, responses={**ERRORS, 404: {"model": ErrorSchema}})
async def tokenize(body: TokenizeRequest, server: ServerDep):
    """vLLM's `/tokenize`: a prompt's tokens, or a conversation's as the chat endpoint builds them."""
    server.check_model(body.model)
    tokenizer = server.backend.processor.tokenizer
    if body.prompt is not None:
        server.check_request([body.prompt], 0, GenerationSettings(max_new_tokens=1))
        encoded = await server.offload(
            lambda: tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)
        )
        ids = encoded["input_ids"]
    else:
        conversation, images = await chat_inputs(server, body.messages, GenerationSettings(max_new_tokens=1))
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools or ()]
        ids = (await server.prepare(conversation, images, tools)).input_ids
    strings = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=server.backend.context_length, tokens=ids, token_strs=strings
    )


@router.post(
    "/detokenize", response_model=DetokenizeResponse, responses={**ERRORS, 404: {"model": ErrorSchema}}
)
async def detokenize(body: DetokenizeRequest, server: ServerDep):
    """vLLM's `/detokenize`: token ids back to text (special tokens included)."""
    server.check_model(body.model)
    tokenizer = server.backend.processor.tokenizer
    if unknown := [token for token in body.tokens if token >= len(tokenizer)]:
        raise ApiError(
            400, f"tokens: {unknown[0]} is not in the vocabulary (0 to {len(tokenizer) - 1})", "tokens"
        )
    return DetokenizeResponse(prompt=await server.offload(tokenizer.decode, body.tokens))


@router.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
async def models(server: ServerDep):
    return ModelList(data=[{"id": name, "created": server.created} for name in server.names])
