"""The daemon's NDJSON schemas: one input line (a push or a fan-out) and one result line."""

from __future__ import annotations

import operator
from typing import Any

import msgspec

from ..outcome import Result
from ..payload import ENVIRONMENTS


class LineError(ValueError):
    """The line cannot be understood; the message says what is wrong."""


class LiveActivityLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True,
                       rename="kebab"):
    """``"live_activity": {...}``: fanout builds the ``aps`` (timestamp stamped at send time)
    and applies the per-activity budget and ordering. Keys as in Apple's payload, plus
    ``activity-id`` (budget and order are per activity) and ``source-time`` (when the
    event happened, epoch seconds: an older update than the last one sent is superseded).
    """

    event: str
    activity_id: str | None = None
    source_time: float | None = None
    content_state: dict[str, Any] | None = None
    attributes_type: str | None = None
    attributes: dict[str, Any] | None = None
    alert: str | dict[str, Any] | None = None
    input_push_token: bool = False
    input_push_channel: str | None = None
    stale_date: int | None = None
    relevance_score: float | None = None
    dismissal_date: int | None = None


class PushLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One input line: exactly one of ``token``, ``tokens``, ``tokens_file`` or
    ``channel_id`` (a broadcast); ``payload`` unless ``live_activity`` builds it."""

    payload: dict[str, Any] | None = None
    live_activity: LiveActivityLine | None = None
    channel_id: str | None = None
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
    environment: str | None = None
    """production or sandbox; routed by a daemon with ``[[team]]`` tables, otherwise it
    must match the daemon's own environment."""


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
    except RecursionError:  # msgspec's own depth limit: a hostile or broken line
        raise LineError("JSON nested too deeply") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for bad bytes inside a string
        raise LineError(f"not JSON: not UTF-8 at byte {exc.start}") from None
    targets = sum(x is not None for x in (line.token, line.tokens, line.tokens_file,
                                          line.channel_id))
    if targets != 1:
        raise LineError("needs exactly one of token, tokens, tokens_file or channel_id"
                        if targets else "missing token (or tokens, tokens_file, channel_id)")
    if line.environment is not None and line.environment not in ENVIRONMENTS:
        raise LineError(f"environment must be production or sandbox, not {line.environment!r}")
    la = line.live_activity
    if la is None and line.payload is None:
        raise LineError("missing payload (or live_activity)")
    if la is not None:
        if la.event not in ("start", "update", "end"):
            raise LineError(f"live_activity.event must be start, update or end, not {la.event!r}")
        if line.tokens is not None or line.tokens_file is not None:
            raise LineError("live_activity goes with token or channel_id, not a fan-out")
        if la.event == "start" and line.channel_id is not None:
            raise LineError("a broadcast cannot start a Live Activity (use token)")
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
    entry: str | None = None
    """The Redis Stream entry id (``fanout run --source redis://...``)."""
    team: str | None = None
    """The team that served the push (``[[team]]`` tables, or ``--teams FILE``)."""
    environment: str | None = None
    """Where a team's push went: production or sandbox."""
    priority: int | None = None
    """A Live Activity line: the priority it went at (the budget lowers 10 to 5)."""
    wrong_environment: bool = False
    """The line named the other environment; this one accepted the token (see
    :attr:`fanout.outcome.Result.wrong_environment`)."""

    @classmethod
    def from_result(cls, result: Result, *, id: Any, line: int,
                    input: str | None) -> ResultLine:
        """The line for ``result``: every field the two share, as the result has it
        (``latency_ms`` rounded to the microsecond), with the caller's ``id``, the input
        ``line`` and the ``input`` label."""
        record = cls(id, line, str(result.outcome), input=input,
                     **dict(zip(_FROM_RESULT, _shared(result), strict=True)))
        if record.latency_ms is not None:
            record.latency_ms = round(record.latency_ms, 3)
        return record


_FROM_RESULT = tuple(name for name in ResultLine.__struct_fields__
                     if name in Result.__struct_fields__ and name not in ("id", "outcome"))
"""The fields :class:`ResultLine` copies from a :class:`~fanout.outcome.Result`."""
_shared = operator.attrgetter(*_FROM_RESULT)  # as fast as naming each one

result_encoder = msgspec.json.Encoder()
