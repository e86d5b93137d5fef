"""The plain REST routes: `POST /generate` (a prompt, maybe an image) and `POST /caption` (an image),
each taking JSON with a base64 image or a multipart upload."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from mmllm.engine.settings import CAPTION_PROMPT, GenerationSettings
from mmllm.serve.schemas import CaptionRequest, GenerateRequest, TextResponse
from mmllm.serve.schemas import ErrorResponse as ErrorSchema
from mmllm.serve.server import ERRORS, ApiError, Server, ServerDep, cache_salt, validation_error

router = APIRouter()


def body_schema(model: type, file_required: bool = False) -> dict:
    """OpenAPI request body for JSON (base64 `image`) or multipart (an uploaded `file` + the same fields)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    fields = {k: v for k, v in schema["properties"].items() if k != "image"}
    form = {
        "type": "object",
        "additionalProperties": False,  # as in JSON: a field the server does not know is a 400
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


async def form_or_json(server: Server, request: Request, model: type) -> tuple[Any, list[Image.Image]]:
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
            raise validation_error(err.errors(), "invalid form: ") from None
    if not kind.startswith("application/json"):
        raise ApiError(415, "send application/json or multipart/form-data")
    try:
        body = model.model_validate_json(await request.body())
    except ValueError as err:
        raise validation_error(err.errors()) from None
    images = [await server.image(body.image)] if body.image else []
    return body, images


async def answer(
    server: Server, request: Request, prompt_text: str, images: list, settings: GenerationSettings
) -> TextResponse:
    server.check_request([prompt_text], len(images), settings)
    prompt = await server.prepare(
        [{"role": "user", "content": prompt_text}], images, salt=cache_salt(request)
    )
    job = server.enqueue(prompt, settings, [], False)
    done = await server.result(job, request)
    return TextResponse(
        text=done.text,
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        finish_reason=done.finish_reason,
    )


form_errors = {**ERRORS, 415: {"model": ErrorSchema, "description": "neither JSON nor multipart"}}


@router.post(
    "/generate",
    response_model=TextResponse,
    openapi_extra=body_schema(GenerateRequest),
    responses=form_errors,
)
async def generate(request: Request, server: ServerDep):
    body, images = await form_or_json(server, request, GenerateRequest)
    if not body.prompt.strip():
        raise ApiError(400, "the prompt is empty", "prompt")
    settings = server.settings(**body.generation_options())
    return await answer(server, request, body.prompt, images, settings)


@router.post(
    "/caption",
    response_model=TextResponse,
    openapi_extra=body_schema(CaptionRequest, file_required=True),
    responses=form_errors,
)
async def caption(request: Request, server: ServerDep):
    body, images = await form_or_json(server, request, CaptionRequest)
    if not images:
        raise ApiError(400, "no image", "image")
    settings = server.settings(**body.generation_options())
    return await answer(server, request, CAPTION_PROMPT, images, settings)
