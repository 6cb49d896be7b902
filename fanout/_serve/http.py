"""``fanout serve``'s HTTP plumbing: one request and its response over ASGI (hypercorn),
with the limits every body is read under, and the JSON error every refusal is."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import trio

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

NDJSON = b"application/x-ndjson"
JSON = b"application/json"


class Limits(msgspec.Struct, kw_only=True):
    """What one request may ask for (``fanout serve --max-...``)."""

    max_body: int = 1 << 20
    """Bytes of a whole body (``/v1/push``, ``/v1/fanout``, channels, ``/api/push``)."""
    max_stream_body: int = 1 << 30
    """Bytes of a ``/v1/pushes`` body (read as it arrives)."""
    max_line: int = 1 << 20
    """Bytes of one NDJSON line."""
    max_tokens: int = 100_000
    """Pushes one request may hold (a fan-out's tokens, a stream's pushes)."""
    body_timeout: float = 30.0
    """Seconds the server waits for the next piece of a body."""
    max_connections: int = 1024
    """Client connections open at once (a request on one opened beyond: 429)."""
    max_requests: int = 1024
    """Push and channel requests in progress at once (all connections together)."""
    push_timeout: float = 30.0
    """Seconds ``/v1/push`` waits for APNs by default (``?timeout=`` lowers it)."""


class HttpError(Exception):
    """An answer of the app itself: ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or []


class Exchange:
    """One request and its response: body reading with the limits, JSON and NDJSON out."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, limits: Limits) -> None:
        self.scope, self._receive, self._send, self.limits = scope, receive, send, limits
        self.started = False
        self.status = 0
        self.disconnected = False
        headers = dict(scope["headers"])
        self._more = bool(headers.get(b"transfer-encoding")) or \
            headers.get(b"content-length", b"0").strip() not in (b"0", b"") or \
            scope.get("http_version") == "2"

    @property
    def unread(self) -> bool:
        """Whether part of the request body was never read."""
        return self._more

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return bytes(value)
        return None

    def query(self, name: str) -> str | None:
        values = urllib.parse.parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        return values[name][-1] if name in values else None

    def media_type(self) -> bytes:
        return (self.header(b"content-type") or b"").split(b";")[0].strip().lower()

    async def chunks(self, limit: int) -> AsyncIterator[bytes]:
        """The body as it arrives; HttpError 413 past ``limit`` bytes, 408 when a piece
        takes longer than ``body_timeout``."""
        seen = 0
        while self._more:
            with trio.move_on_after(self.limits.body_timeout) as waited:
                message = await self._receive()
            if waited.cancelled_caught:
                raise HttpError(408, "body_timeout",
                                f"no body data for {self.limits.body_timeout:g} s")
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self._more = False
                raise HttpError(499, "disconnected", "the client went away")
            self._more = bool(message.get("more_body"))
            data = message.get("body", b"")
            seen += len(data)
            if seen > limit:
                raise HttpError(413, "payload_too_large",
                                f"the body is over {limit} bytes")
            if data:
                yield data

    async def body(self) -> bytes:
        return b"".join([c async for c in self.chunks(self.limits.max_body)])

    async def lines(self) -> AsyncIterator[bytes]:
        """The NDJSON lines of the body (``max_line`` each, ``max_stream_body`` in all)."""
        pending = b""
        async for chunk in self.chunks(self.limits.max_stream_body):
            pending += chunk
            *whole, pending = pending.split(b"\n")
            for line in whole:
                if line.strip():
                    yield line
            if len(pending) > self.limits.max_line:
                raise HttpError(413, "payload_too_large",
                                f"a line is over {self.limits.max_line} bytes")
        if pending.strip():
            yield pending

    async def start(self, status: int, content_type: bytes = JSON,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.started, self.status = True, status
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", content_type), *(headers or [])]})

    async def write(self, data: bytes, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, body: Any,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        await self.start(status, JSON, headers)
        await self.write(data, more=False)

    async def empty(self, status: int) -> None:
        self.started, self.status = True, status
        await self._send({"type": "http.response.start", "status": status, "headers": []})
        await self.write(b"", more=False)


def error_body(code: str, message: str) -> bytes:
    return msgspec.json.encode({"error": {"code": code, "message": message}})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
