"""Typed result of one push and the classification of every APNs answer (APNS.md §5, §6.3).

An APNs answer is never an exception: ``classify`` turns ``(status, reason)`` into the
:class:`Action` the engine takes, and terminal actions map to an :class:`Outcome` via
``OUTCOME_OF``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = [
    "OUTCOME_CLASSES",
    "OUTCOME_OF",
    "REASONS",
    "Action",
    "Outcome",
    "ReasonInfo",
    "Result",
    "classify",
    "outcome_class",
    "parse_error_body",
]


class Outcome(enum.StrEnum):
    """Final result of one push."""

    DELIVERED = "delivered"
    INVALID_TOKEN = "invalid_token"
    REJECTED = "rejected"
    CONFIG_ERROR = "config_error"
    RETRIES_EXHAUSTED = "retries_exhausted"
    MAYBE_DELIVERED = "maybe_delivered"
    MALFORMED = "malformed"
    SUPERSEDED = "superseded"


class Action(enum.StrEnum):
    """What the engine does with one APNs answer."""

    DELIVERED = "delivered"
    DROP_TOKEN = "drop_token"
    FIX = "fix"
    CONFIG = "config"
    RETRY_TOKEN = "retry_token"
    RETRY_BACKOFF = "retry_backoff"
    RECONNECT = "reconnect"
    REFRESH_AUTH = "refresh_auth"
    CHANNEL_GONE = "channel_gone"


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    status: int
    action: Action
    description: str


_A = Action
REASONS: dict[str, ReasonInfo] = {
    # --- device push, APNS.md §5 ---
    "BadCollapseId": ReasonInfo(400, _A.FIX, "apns-collapse-id longer than 64 bytes"),
    "BadDeviceToken": ReasonInfo(
        400, _A.DROP_TOKEN, "invalid token, or sandbox token sent to production (or vice versa)"
    ),
    "BadExpirationDate": ReasonInfo(400, _A.FIX, "bad apns-expiration"),
    "BadMessageId": ReasonInfo(400, _A.FIX, "bad apns-id"),
    "BadPriority": ReasonInfo(400, _A.FIX, "bad apns-priority (incl. 10 on background)"),
    "BadTopic": ReasonInfo(400, _A.FIX, "invalid apns-topic"),
    "DeviceTokenNotForTopic": ReasonInfo(
        400, _A.DROP_TOKEN, "device token belongs to another topic/app"
    ),
    "DuplicateHeaders": ReasonInfo(400, _A.FIX, "a header was repeated"),
    "IdleTimeout": ReasonInfo(400, _A.RECONNECT, "idle timeout"),
    "InvalidPushType": ReasonInfo(400, _A.FIX, "bad apns-push-type"),
    "MissingDeviceToken": ReasonInfo(400, _A.FIX, "no device token in :path"),
    "MissingTopic": ReasonInfo(400, _A.FIX, "apns-topic required but absent"),
    "PayloadEmpty": ReasonInfo(400, _A.FIX, "empty body"),
    "TopicDisallowed": ReasonInfo(400, _A.CONFIG, "pushing to this topic is not allowed"),
    "BadCertificate": ReasonInfo(403, _A.CONFIG, "bad client certificate"),
    "BadCertificateEnvironment": ReasonInfo(
        403, _A.CONFIG, "client certificate is for the other environment"
    ),
    "ExpiredProviderToken": ReasonInfo(403, _A.REFRESH_AUTH, "provider token (JWT) iat too old"),
    "Forbidden": ReasonInfo(403, _A.CONFIG, "action not allowed"),
    "InvalidProviderToken": ReasonInfo(
        403, _A.CONFIG, "bad provider token: signature, key id or team id"
    ),
    "MissingProviderToken": ReasonInfo(
        403, _A.CONFIG, "no client certificate and no/empty authorization header"
    ),
    "UnrelatedKeyIdInToken": ReasonInfo(
        403, _A.RECONNECT, "key differs from the one used by this connection's first push"
    ),
    "BadEnvironmentKeyIdInToken": ReasonInfo(
        403, _A.CONFIG, "signing key is not valid for this environment"
    ),
    "BadPath": ReasonInfo(404, _A.FIX, "bad :path"),
    "MethodNotAllowed": ReasonInfo(405, _A.FIX, "method is not POST"),
    "ExpiredToken": ReasonInfo(410, _A.DROP_TOKEN, "device token expired"),
    "Unregistered": ReasonInfo(410, _A.DROP_TOKEN, "device token no longer active for the topic"),
    "PayloadTooLarge": ReasonInfo(413, _A.FIX, "payload larger than 4096/5120 bytes"),
    "TooManyProviderTokenUpdates": ReasonInfo(
        429, _A.RECONNECT, "provider token changed too often on this connection: new one"
    ),
    "TooManyRequests": ReasonInfo(429, _A.RETRY_TOKEN, "too many pushes to the same device token"),
    "InternalServerError": ReasonInfo(500, _A.RETRY_BACKOFF, "APNs internal error"),
    "ServiceUnavailable": ReasonInfo(503, _A.RETRY_BACKOFF, "service unavailable"),
    "Shutdown": ReasonInfo(503, _A.RECONNECT, "server shutting down"),
    # --- broadcast / channel management, APNS.md §6.3 (those not already above) ---
    "FeatureNotEnabled": ReasonInfo(400, _A.CONFIG, "broadcast capability not enabled"),
    "MissingChannelId": ReasonInfo(400, _A.FIX, "apns-channel-id required but absent"),
    "BadChannelId": ReasonInfo(400, _A.FIX, "apns-channel-id is not valid base64 or too long"),
    "ChannelNotRegistered": ReasonInfo(400, _A.CHANNEL_GONE, "unknown broadcast channel"),
    "BadRequestParams": ReasonInfo(400, _A.FIX, "unknown JSON attribute in the request"),
    "BadRequestPayload": ReasonInfo(400, _A.FIX, "request body is not parseable JSON"),
    "MissingPushType": ReasonInfo(400, _A.FIX, "apns-push-type required but absent"),
    "CannotCreateChannelConfig": ReasonInfo(
        400, _A.CONFIG, "channel limit (10,000 per app per environment) reached"
    ),
    "TopicMismatch": ReasonInfo(
        403, _A.CONFIG, "token/certificate bundle ids do not include the path topic"
    ),
    # Apple's broadcast error page spells this one with a space.
    "Service Unavailable": ReasonInfo(503, _A.RETRY_BACKOFF, "service unavailable"),
}
del _A

OUTCOME_OF: dict[Action, Outcome] = {
    Action.DELIVERED: Outcome.DELIVERED,
    Action.DROP_TOKEN: Outcome.INVALID_TOKEN,
    Action.FIX: Outcome.REJECTED,
    Action.CONFIG: Outcome.CONFIG_ERROR,
    Action.CHANNEL_GONE: Outcome.REJECTED,
}

_REASON_ACTION: dict[str, Action] = {k: v.action for k, v in REASONS.items()}


def classify(status: int, reason: str | None) -> Action:
    """Action for one APNs answer; a known ``reason`` wins over ``status``."""
    if 200 <= status < 300:
        return Action.DELIVERED
    if reason is not None:
        action = _REASON_ACTION.get(reason)
        if action is not None:
            return action
    if status == 410:
        return Action.DROP_TOKEN
    if status == 429:
        return Action.RETRY_TOKEN
    if 500 <= status < 600:
        return Action.RETRY_BACKOFF
    if status == 403:
        return Action.CONFIG
    return Action.FIX


OUTCOME_CLASSES = frozenset(
    {"ok", "token", "payload", "config", "retry", "transport", "superseded"}
)

_CLASS_OF: dict[Outcome, str] = {
    Outcome.DELIVERED: "ok",
    Outcome.INVALID_TOKEN: "token",
    Outcome.REJECTED: "payload",
    Outcome.MALFORMED: "payload",
    Outcome.CONFIG_ERROR: "config",
    Outcome.RETRIES_EXHAUSTED: "retry",
    Outcome.MAYBE_DELIVERED: "transport",
    Outcome.SUPERSEDED: "superseded",
}


def outcome_class(outcome: Outcome, reason: str | None) -> str:
    """A short label from ``OUTCOME_CLASSES`` for metrics (never the raw reason)."""
    if outcome is Outcome.RETRIES_EXHAUSTED and reason is None:
        return "transport"  # never got an APNs answer
    if outcome is Outcome.REJECTED and reason == "ChannelNotRegistered":
        return "token"  # the broadcast "address" is dead, like a token
    return _CLASS_OF.get(outcome, "payload")


class Result(msgspec.Struct, kw_only=True, omit_defaults=True):
    outcome: Outcome
    id: Any = None
    token: str | None = None
    channel_id: str | None = None
    status: int | None = None
    reason: str | None = None
    apns_id: str | None = None
    timestamp: int | None = None
    attempts: int = 0
    latency_ms: float | None = None
    error: str | None = None
    team: str | None = None  # the team that served it (fanout.teams.Teams)
    environment: str | None = None  # where it went (fanout.teams.Teams): production | sandbox
    resent: bool = False
    """Sent again after an attempt that timed out or whose connection was lost: APNs may
    have had it before, so the device may show it twice (at-least-once delivery)."""
    wrong_environment: bool = False
    """The push named the other environment: APNs there answered BadDeviceToken and this
    ``environment`` accepted it (``Teams(retry_wrong_environment=True)``). The token is
    alive: store its environment, do not delete it."""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.DELIVERED


class _ErrorBody(msgspec.Struct):
    # Any, so that one badly typed field does not hide the other.
    reason: Any = None
    timestamp: Any = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)
_MAX_ERROR_BODY = 16 * 1024  # real bodies are ~50 bytes
_MAX_REASON = 128


def parse_error_body(body: bytes) -> tuple[str | None, int | None]:
    """``{"reason": ..., "timestamp": ...}`` -> ``(reason, timestamp)``; garbage -> ``(None, None)``."""
    if not body or len(body) > _MAX_ERROR_BODY:
        return None, None
    try:
        parsed = _error_decoder.decode(body)
    except (msgspec.MsgspecError, TypeError, ValueError, RecursionError):
        return None, None
    reason = parsed.reason
    if not isinstance(reason, str) or not reason:
        reason = None
    elif len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON]
    ts = parsed.timestamp
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        ts = None
    elif isinstance(ts, float):
        ts = int(ts) if ts == ts and abs(ts) < 2**63 else None
    return reason, ts
