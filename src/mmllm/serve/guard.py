"""The server's outermost layer (plain ASGI): what every request passes, whatever route it reaches.

- the body limit counts the bytes as they arrive, so a chunked upload with no Content-Length is
  stopped at the limit too (a header check alone let a 50 MB chunked body through);
- the API key: one rule for every path (see `ServeConfig.api_key`);
- every response is counted in /metrics by its status, 5xx included, and an unexpected error
  becomes an OpenAI-shaped JSON 500, never a plain-text page.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmllm.serve.config import ServeConfig
from mmllm.serve.metrics import Metrics

log = logging.getLogger("mmllm")

# Readable without the key: liveness, and what the API is (not what it serves). The chat page
# has its own login form, since a browser cannot send a Bearer header.
PUBLIC_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
UI_PATH = "/ui"


class ErrorResponse(JSONResponse):
    """An OpenAI-shaped error. ASCII-escaped, so no echo of a client's text can fail to encode."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        super().__init__(body, status_code=status, headers=headers)

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


class BodyTooLarge(Exception):
    pass


class Guard:
    def __init__(self, app: ASGIApp, cfg: ServeConfig, metrics: Metrics, route_of: Callable[[str], str]):
        self.app, self.cfg, self.metrics, self.route_of = app, cfg, metrics, route_of
        self.limit = int(cfg.max_body_mb * 2**20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, counted_send)
        except Exception:
            log.exception("unexpected error serving %s %s", scope["method"], scope["path"])
            if not status[0]:  # once a response has started, the connection is all that can be closed
                await ErrorResponse(500, "internal server error", "server_error")(
                    scope, receive, counted_send
                )
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe_request(self.route_of(scope["path"]), status[0] or 499, seconds)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, headers = scope["path"], dict(scope["headers"])
        key = f"Bearer {self.cfg.api_key}".encode()
        if self.cfg.api_key and not _public(path) and headers.get(b"authorization", b"") != key:
            await ErrorResponse(
                401, "missing or invalid API key (Authorization: Bearer ...)", "authentication_error"
            )(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
        except BodyTooLarge:
            await self._too_large(scope, receive, send)
            return
        if body is None:  # the client left before sending its whole request
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = ErrorResponse(
            413, f"request body over {self.cfg.max_body_mb:g} MB", headers={"Connection": "close"}
        )
        await response(scope, receive, send)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path == UI_PATH or path.startswith(UI_PATH + "/")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body once, then the connection's own messages (so a disconnect is still seen)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
