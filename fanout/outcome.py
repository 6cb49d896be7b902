"""Typed result of one push and the classification of every APNs answer (docs/apns.md, Responses).

An APNs answer is never an exception: ``classify`` turns ``(status, reason)`` into the
:class:`Action` the engine takes, and terminal actions map to an :class:`Outcome` via
``OUTCOME_OF``.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = [
    "OUTCOME_CLASSES",
    "OUTCOME_OF",
    "REASONS",
    "Action",
    "Outcome",
    "Reason",
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


class Reason(enum.StrEnum):
    """An APNs error reason: the ``reason`` of an error body.

    A ``str``, so ``result.reason == "BadDeviceToken"`` holds as well as
    ``result.reason is Reason.BAD_DEVICE_TOKEN``. A reason Apple adds later is not lost:
    ``Reason("SomethingNew")`` is a ``Reason`` whose value is that text (not a member,
    so ``reason in REASONS`` is ``False`` and ``classify`` falls back to the status).
    """

    BAD_COLLAPSE_ID = "BadCollapseId"
    BAD_DEVICE_TOKEN = "BadDeviceToken"
    BAD_EXPIRATION_DATE = "BadExpirationDate"
    BAD_MESSAGE_ID = "BadMessageId"
    BAD_PRIORITY = "BadPriority"
    BAD_TOPIC = "BadTopic"
    DEVICE_TOKEN_NOT_FOR_TOPIC = "DeviceTokenNotForTopic"
    DUPLICATE_HEADERS = "DuplicateHeaders"
    IDLE_TIMEOUT = "IdleTimeout"
    INVALID_PUSH_TYPE = "InvalidPushType"
    MISSING_DEVICE_TOKEN = "MissingDeviceToken"
    MISSING_TOPIC = "MissingTopic"
    PAYLOAD_EMPTY = "PayloadEmpty"
    TOPIC_DISALLOWED = "TopicDisallowed"
    BAD_CERTIFICATE = "BadCertificate"
    BAD_CERTIFICATE_ENVIRONMENT = "BadCertificateEnvironment"
    EXPIRED_PROVIDER_TOKEN = "ExpiredProviderToken"
    FORBIDDEN = "Forbidden"
    INVALID_PROVIDER_TOKEN = "InvalidProviderToken"
    MISSING_PROVIDER_TOKEN = "MissingProviderToken"
    UNRELATED_KEY_ID_IN_TOKEN = "UnrelatedKeyIdInToken"
    BAD_ENVIRONMENT_KEY_ID_IN_TOKEN = "BadEnvironmentKeyIdInToken"
    BAD_PATH = "BadPath"
    METHOD_NOT_ALLOWED = "MethodNotAllowed"
    EXPIRED_TOKEN = "ExpiredToken"
    UNREGISTERED = "Unregistered"
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"
    TOO_MANY_PROVIDER_TOKEN_UPDATES = "TooManyProviderTokenUpdates"
    TOO_MANY_REQUESTS = "TooManyRequests"
    INTERNAL_SERVER_ERROR = "InternalServerError"
    SERVICE_UNAVAILABLE = "ServiceUnavailable"
    SHUTDOWN = "Shutdown"
    FEATURE_NOT_ENABLED = "FeatureNotEnabled"
    MISSING_CHANNEL_ID = "MissingChannelId"
    BAD_CHANNEL_ID = "BadChannelId"
    CHANNEL_NOT_REGISTERED = "ChannelNotRegistered"
    BAD_REQUEST_PARAMS = "BadRequestParams"
    BAD_REQUEST_PAYLOAD = "BadRequestPayload"
    MISSING_PUSH_TYPE = "MissingPushType"
    CANNOT_CREATE_CHANNEL_CONFIG = "CannotCreateChannelConfig"
    TOPIC_MISMATCH = "TopicMismatch"
    BROADCAST_SERVICE_UNAVAILABLE = "Service Unavailable"

    @classmethod
    def _missing_(cls, value: object) -> Reason | None:
        if not isinstance(value, str) or not value:
            return None
        known = _unknown.get(value)
        if known is None:
            known = str.__new__(cls, value)
            known._name_ = value
            known._value_ = value
            if len(_unknown) < _MAX_UNKNOWN:  # bounded: a hostile server cannot grow it
                _unknown[value] = known
        return known


_unknown: dict[str, Reason] = {}
_MAX_UNKNOWN = 256


class ReasonInfo(msgspec.Struct, frozen=True):
    """What Apple documents for one reason: its HTTP status, our action, a short text.

    (A frozen msgspec Struct, not a dataclass: making a slotted dataclass costs every
    start-up ~0.6 ms, and importing dataclasses another 0.5; issue 19.)"""

    status: int
    action: Action
    description: str


_A = Action
_R = Reason
REASONS: dict[str, ReasonInfo] = {  # keyed by Reason members (a str)
    # --- device push ---
    _R.BAD_COLLAPSE_ID: ReasonInfo(400, _A.FIX, "apns-collapse-id longer than 64 bytes"),
    _R.BAD_DEVICE_TOKEN: ReasonInfo(
        400, _A.DROP_TOKEN, "invalid token, or sandbox token sent to production (or vice versa)"
    ),
    _R.BAD_EXPIRATION_DATE: ReasonInfo(400, _A.FIX, "bad apns-expiration"),
    _R.BAD_MESSAGE_ID: ReasonInfo(400, _A.FIX, "bad apns-id"),
    _R.BAD_PRIORITY: ReasonInfo(400, _A.FIX, "bad apns-priority (incl. 10 on background)"),
    _R.BAD_TOPIC: ReasonInfo(400, _A.FIX, "invalid apns-topic"),
    _R.DEVICE_TOKEN_NOT_FOR_TOPIC: ReasonInfo(
        400, _A.DROP_TOKEN, "device token belongs to another topic/app"
    ),
    _R.DUPLICATE_HEADERS: ReasonInfo(400, _A.FIX, "a header was repeated"),
    _R.IDLE_TIMEOUT: ReasonInfo(400, _A.RECONNECT, "idle timeout"),
    _R.INVALID_PUSH_TYPE: ReasonInfo(400, _A.FIX, "bad apns-push-type"),
    _R.MISSING_DEVICE_TOKEN: ReasonInfo(400, _A.FIX, "no device token in :path"),
    _R.MISSING_TOPIC: ReasonInfo(400, _A.FIX, "apns-topic required but absent"),
    _R.PAYLOAD_EMPTY: ReasonInfo(400, _A.FIX, "empty body"),
    _R.TOPIC_DISALLOWED: ReasonInfo(400, _A.CONFIG, "pushing to this topic is not allowed"),
    _R.BAD_CERTIFICATE: ReasonInfo(403, _A.CONFIG, "bad client certificate"),
    _R.BAD_CERTIFICATE_ENVIRONMENT: ReasonInfo(
        403, _A.CONFIG, "client certificate is for the other environment"
    ),
    _R.EXPIRED_PROVIDER_TOKEN: ReasonInfo(403, _A.REFRESH_AUTH, "provider token (JWT) iat too old"),
    _R.FORBIDDEN: ReasonInfo(403, _A.CONFIG, "action not allowed"),
    _R.INVALID_PROVIDER_TOKEN: ReasonInfo(
        403, _A.CONFIG, "bad provider token: check that key_id is the key's own (its file "
        "is AuthKey_<key id>.p8), that team_id is the team that owns the key (Membership "
        "page), that the key is not revoked, and the clock (iat)"
    ),
    _R.MISSING_PROVIDER_TOKEN: ReasonInfo(
        403, _A.CONFIG, "no client certificate and no/empty authorization header"
    ),
    _R.UNRELATED_KEY_ID_IN_TOKEN: ReasonInfo(
        403, _A.RECONNECT, "key differs from the one used by this connection's first push"
    ),
    _R.BAD_ENVIRONMENT_KEY_ID_IN_TOKEN: ReasonInfo(
        403, _A.CONFIG, "signing key is not valid for this environment"
    ),
    _R.BAD_PATH: ReasonInfo(404, _A.FIX, "bad :path"),
    _R.METHOD_NOT_ALLOWED: ReasonInfo(405, _A.FIX, "method is not POST"),
    _R.EXPIRED_TOKEN: ReasonInfo(410, _A.DROP_TOKEN, "device token expired"),
    _R.UNREGISTERED: ReasonInfo(410, _A.DROP_TOKEN, "device token no longer active for the topic"),
    _R.PAYLOAD_TOO_LARGE: ReasonInfo(413, _A.FIX, "payload larger than 4096/5120 bytes"),
    _R.TOO_MANY_PROVIDER_TOKEN_UPDATES: ReasonInfo(
        429, _A.RECONNECT, "provider token changed too often on this connection: new one"
    ),
    _R.TOO_MANY_REQUESTS: ReasonInfo(429, _A.RETRY_TOKEN, "too many pushes to the same device token"),
    _R.INTERNAL_SERVER_ERROR: ReasonInfo(500, _A.RETRY_BACKOFF, "APNs internal error"),
    _R.SERVICE_UNAVAILABLE: ReasonInfo(503, _A.RETRY_BACKOFF, "service unavailable"),
    _R.SHUTDOWN: ReasonInfo(503, _A.RECONNECT, "server shutting down"),
    # --- broadcast / channel management (those not already above) ---
    _R.FEATURE_NOT_ENABLED: ReasonInfo(400, _A.CONFIG, "broadcast capability not enabled"),
    _R.MISSING_CHANNEL_ID: ReasonInfo(400, _A.FIX, "apns-channel-id required but absent"),
    _R.BAD_CHANNEL_ID: ReasonInfo(400, _A.FIX, "apns-channel-id is not valid base64 or too long"),
    _R.CHANNEL_NOT_REGISTERED: ReasonInfo(400, _A.CHANNEL_GONE, "unknown broadcast channel"),
    _R.BAD_REQUEST_PARAMS: ReasonInfo(400, _A.FIX, "unknown JSON attribute in the request"),
    _R.BAD_REQUEST_PAYLOAD: ReasonInfo(400, _A.FIX, "request body is not parseable JSON"),
    _R.MISSING_PUSH_TYPE: ReasonInfo(400, _A.FIX, "apns-push-type required but absent"),
    _R.CANNOT_CREATE_CHANNEL_CONFIG: ReasonInfo(
        400, _A.CONFIG, "channel limit (10,000 per app per environment) reached"
    ),
    _R.TOPIC_MISMATCH: ReasonInfo(
        403, _A.CONFIG, "token/certificate bundle ids do not include the path topic"
    ),
    # Apple's broadcast error page spells this one with a space.
    _R.BROADCAST_SERVICE_UNAVAILABLE: ReasonInfo(503, _A.RETRY_BACKOFF, "service unavailable"),
}
del _A, _R

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
    """The end of one push: exactly one per push handed to the client.

    ``outcome`` says what happened; ``status``/``reason``/``apns_id``/``timestamp`` are APNs'
    answer when there was one (``timestamp``: ms since the epoch, from an ``Unregistered``
    body); ``error`` explains a failure that had no answer; ``attempts`` counts the streams
    opened for it; ``latency_ms`` runs from the first attempt to the end. ``token`` is the
    device token (or ``channel_id`` the broadcast channel) and ``id`` the caller's own id,
    both as given.
    """

    outcome: Outcome
    id: Any = None
    token: str | None = None
    channel_id: str | None = None
    status: int | None = None
    reason: Reason | None = None
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
    priority: int | None = None
    """The priority a Live Activity push went at (its hourly budget lowers 10 to 5); unset
    for other pushes."""
    wrong_environment: bool = False
    """The push named the other environment: APNs there answered BadDeviceToken and this
    ``environment`` accepted it (``Teams(retry_wrong_environment=True)``). The token is
    alive: store its environment, do not delete it."""

    @property
    def ok(self) -> bool:
        """``True`` when APNs accepted the push."""
        return self.outcome is Outcome.DELIVERED


class _ErrorBody(msgspec.Struct):
    # Any, so that one badly typed field does not hide the other.
    reason: Any = None
    timestamp: Any = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)
_MAX_ERROR_BODY = 16 * 1024  # real bodies are ~50 bytes
_MAX_REASON = 128


def parse_error_body(body: bytes) -> tuple[Reason | None, int | None]:
    """``{"reason": ..., "timestamp": ...}`` -> ``(reason, timestamp)``; garbage -> ``(None, None)``."""
    if not body or len(body) > _MAX_ERROR_BODY:
        return None, None
    try:
        parsed = _error_decoder.decode(body)
    except (msgspec.MsgspecError, TypeError, ValueError, RecursionError):
        return None, None
    text = parsed.reason
    reason: Reason | None
    if not isinstance(text, str) or not text:
        reason = None
    else:
        reason = Reason(text[:_MAX_REASON])
    ts = parsed.timestamp
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        ts = None
    elif isinstance(ts, float):
        ts = int(ts) if ts == ts and abs(ts) < 2**63 else None
    return reason, ts
