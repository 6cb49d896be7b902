"""A request as the mock's evaluators see it, their decision (:class:`Answer`), and how an
answer becomes response headers and body."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ._config import MockConfig

_STATUS_BYTES = {
    code: str(code).encode()
    for code in (200, 201, 204, 400, 403, 404, 405, 410, 413, 429, 500, 503)
}

Headers = list[tuple[bytes, bytes]]


class Request:
    """A complete request: pseudo-headers, the first value of each other header, the body."""

    __slots__ = ("method", "path", "fields", "duplicate", "body")

    def __init__(self, headers: Headers, body: bytearray) -> None:
        self.method: bytes | None = None
        self.path: bytes | None = None
        self.fields: dict[bytes, bytes] = {}
        self.duplicate = False  # a regular header appeared twice
        self.body = body
        fields = self.fields
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    self.method = value
                elif name == b":path":
                    self.path = value
            elif name in fields:
                self.duplicate = True
            else:
                fields[name] = value


class Answer:
    """The mock's decision about one request."""

    __slots__ = ("status", "reason", "apns_id", "token", "auth_ok", "extra", "body")

    def __init__(
        self,
        status: int,
        reason: str | None,
        apns_id: bytes,
        token: str | None,
        auth_ok: bool,
        extra: Headers | None = None,
        body: bytes = b"",
    ) -> None:
        self.status = status
        self.reason = reason
        self.apns_id = apns_id
        self.token = token
        self.auth_ok = auth_ok  # the request's provider token was good
        # Broadcast / channel answers: headers after :status (apns-request-id first) and the
        # success body; device answers leave ``extra`` None.
        self.extra = extra
        self.body = body


def json_headers(body: bytes) -> Headers:
    """``content-type`` and ``content-length`` of a JSON body."""
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


def _status(status: int) -> bytes:
    return _STATUS_BYTES.get(status) or str(status).encode()


def _retry_after(config: MockConfig, status: int, headers: Headers) -> None:
    retry_after = config.retry_after
    if retry_after is not None and status in (429, 503):
        headers.append((b"retry-after", str(retry_after).encode()))


def response(answer: Answer, config: MockConfig) -> tuple[Headers, bytes]:
    """The response headers and body for ``answer``."""
    if answer.extra is not None:  # broadcast / channel management
        return _broadcast_response(answer, config)
    status = answer.status
    if status == 200:
        return [(b":status", b"200"), (b"apns-id", answer.apns_id)], b""
    error: dict[str, object] = {"reason": answer.reason}
    if status == 410:
        error["timestamp"] = int(time.time() * 1000)
    body = msgspec.json.encode(error)
    headers = [
        (b":status", _status(status)),
        (b"apns-id", answer.apns_id),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    _retry_after(config, status, headers)
    return headers, body


def _broadcast_response(answer: Answer, config: MockConfig) -> tuple[Headers, bytes]:
    status = answer.status
    headers = [(b":status", _status(status))]
    assert answer.extra is not None
    headers += answer.extra
    body = answer.body
    if answer.reason is not None:
        body = msgspec.json.encode({"reason": answer.reason})
        headers += json_headers(body)
        _retry_after(config, status, headers)
    return headers, body


def json_object(body: bytearray, limit: int | None = None
                ) -> tuple[str | None, dict[str, Any] | None]:
    """``(reason, None)`` for a body APNs refuses (empty, over ``limit`` bytes, not a JSON
    object), else ``(None, the object)``: the checks every route makes first."""
    if not body:
        return "PayloadEmpty", None
    if limit is not None and len(body) > limit:
        return "PayloadTooLarge", None
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return "BadRequestPayload", None
    if not isinstance(parsed, dict):
        return "BadRequestPayload", None
    return None, parsed
