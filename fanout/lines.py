"""The daemon's NDJSON schemas: one input line (a push or a fan-out) and one result line."""

from __future__ import annotations

from typing import Any

import msgspec


class LineError(ValueError):
    """The line cannot be understood; the message says what is wrong."""


class PushLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One input line. Exactly one of ``token``, ``tokens`` or ``tokens_file``."""

    payload: dict[str, Any] | None = None
    id: Any = None
    token: str | None = None
    tokens: list[str] | None = None
    tokens_file: str | None = None
    push_type: str | None = None
    topic: str | None = None
    priority: int | None = None
    expiration: int | None = None
    collapse_id: str | None = None
    apns_id: str | None = None


_decoder = msgspec.json.Decoder(PushLine)


def decode_line(data: bytes) -> PushLine:
    """Decode and check one line; raises LineError with a precise message."""
    if not data.strip():
        raise LineError("blank line")
    try:
        line = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise LineError(f"invalid push: {exc}") from None
    except msgspec.DecodeError as exc:
        raise LineError(f"not JSON: {exc}") from None
    targets = sum(x is not None for x in (line.token, line.tokens, line.tokens_file))
    if targets != 1:
        raise LineError("needs exactly one of token, tokens or tokens_file"
                        if targets else "missing token (or tokens, tokens_file)")
    if line.payload is None:
        raise LineError("missing payload")
    return line


class ResultLine(msgspec.Struct, omit_defaults=True):
    """One output line: the result of one push (or of one malformed input line)."""

    id: Any
    line: int
    outcome: str
    token: str | None = None
    channel_id: str | None = None
    status: int | None = None
    reason: str | None = None
    apns_id: str | None = None
    timestamp: int | None = None
    attempts: int = 0
    latency_ms: float | None = None
    error: str | None = None
    resent: bool = False
    input: str | None = None


result_encoder = msgspec.json.Encoder()
