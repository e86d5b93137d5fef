"""The HTTP server: REST (`/generate`, `/caption`) and the OpenAI API (`/v1/chat/completions`, `/v1/models`).

Every bad input gets a 4xx with an OpenAI-shaped error body, never a traceback. The event loop only
parses, validates and streams: decoding images, transcribing audio and tokenizing run in worker
threads, and the model runs in the request queue's one thread (the continuous scheduler, by
default). A request whose client disconnects stops generating at its next token. The routes live in
`openai_api.py` and `rest.py`; what they share in `server.py`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmllm import __version__
from mmllm.engine.backend import Backend
from mmllm.engine.batcher import RequestQueue
from mmllm.serve import openai_api, rest
from mmllm.serve.config import ServeConfig
from mmllm.serve.guard import UI_PATH, ErrorResponse, Guard
from mmllm.serve.schemas import Health
from mmllm.serve.server import ALIAS, ERRORS, ApiError, Server, ServerDep, validation_error


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


async def api_error(request: Request, err: ApiError) -> ErrorResponse:
    return ErrorResponse(err.status, err.message, err.kind, err.param, err.code)


async def invalid(request: Request, err: RequestValidationError) -> ErrorResponse:
    error = validation_error(list(err.errors()))
    return ErrorResponse(400, error.message, param=error.param)


async def http_error(request: Request, err: StarletteHTTPException) -> ErrorResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return ErrorResponse(err.status_code, str(err.detail), kind, headers=err.headers)  # 405 keeps Allow


async def health(server: ServerDep) -> Health:
    return Health(
        model=server.model_name,
        version=__version__,
        vision_trained=server.backend.vision_trained,
        queue_depth=server.requests.depth,
    )


async def prometheus(server: ServerDep) -> PlainTextResponse:
    return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")


def create_app(
    backend: Backend, cfg: ServeConfig, model_name: str = ALIAS, requests: RequestQueue | None = None
) -> FastAPI:
    """The API app for `backend`, answering through `requests` (a queue of its own by default; `mmllm
    serve --ui` passes the one the chat page shares)."""
    app = FastAPI(title="mmllm", description="Multimodal LLM server: REST and OpenAI-compatible API.")
    if requests is None:
        from mmllm.engine.scheduler import request_queue

        requests = request_queue(
            backend, cfg.scheduler, cfg.max_batch_size, cfg.max_wait_ms, cfg.max_step_tokens
        )
    server = Server(requests, cfg, model_name)
    app.state.server = server

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.include_router(openai_api.router)
    app.include_router(rest.router)
    app.add_api_route("/health", health, methods=["GET"], response_model=Health)
    app.add_api_route(
        "/metrics",
        prometheus,
        methods=["GET"],
        response_class=PlainTextResponse,
        responses={401: ERRORS[401]},
    )
    routes = [*app.routes, *openai_api.router.routes, *rest.router.routes]  # included routers hide theirs
    paths = frozenset(route.path for route in routes if hasattr(route, "path"))
    app.add_middleware(Guard, cfg=cfg, metrics=server.metrics, route_of=partial(route_label, paths=paths))
    if cfg.cors_origins:  # outside the guard: a browser's preflight carries no API key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins.split(","),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_limits(FastAPI.openapi(app), cfg)
        return app.openapi_schema

    app.openapi = openapi
    return app


def route_label(path: str, paths: frozenset[str]) -> str:
    """A bounded set of metric labels, whatever paths clients send."""
    if path == UI_PATH or path.startswith(UI_PATH + "/"):
        return UI_PATH
    return path if path in paths else "other"
