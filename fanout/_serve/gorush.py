"""``POST /api/push``: gorush's request and response, mapped onto fanout's push lines.

gorush (github.com/appleboy/gorush) takes ``{"notifications": [...]}``, each notification
a flat object (``tokens``, ``platform``, ``message``, ``title``, ``badge``, ``alert``, ...)
from which it builds the APNs payload and headers. :func:`decode_gorush` does the same
building and hands back one :class:`~fanout._daemon.lines.PushLine` per iOS notification;
the rest is refused per notification (:class:`Refusal`), never silently dropped as gorush
drops a platform it has not enabled. Only the *shape* is checked here: a field of the wrong
JSON type is a :class:`GorushError` naming it, while values (tokens, push types, priority
rules, sizes) are fanout's payload validation's, when the server prepares the push.

The response is gorush's sync-mode answer, ``{"counts": N, "logs": [...], "success":
"ok"}``, with a log entry for each push that failed (:func:`log_entry`,
:func:`refusal_logs`). The mapping, field by field, is docs/serve-gorush.md.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from .._daemon.lines import PushLine
from ..errors import redact

__all__ = [
    "GorushError",
    "GorushRequest",
    "Refusal",
    "decode_gorush",
    "gorush_error",
    "gorush_response",
    "log_entry",
    "refusal_logs",
]

IOS = 1
PLATFORM_NAMES = {1: "ios", 2: "android", 3: "huawei"}
"""gorush's platform numbers, as its log entries name them."""
_SERVED_NOT = {2: "Android", 3: "Huawei"}
_PRIORITIES = {"high": 10, "normal": 5}
FAILED_PUSH = "failed-push"

# gorush's alert object, in the order apns2 writes it, and the type of each key.
_ALERT_STRINGS = ("action", "action-loc-key", "body", "launch-image", "loc-key", "title",
                  "subtitle", "title-loc-key", "summary-arg")
_ALERT_LISTS = ("loc-args", "title-loc-args")
_ALERT_ORDER = ("action", "action-loc-key", "body", "launch-image", "loc-args", "loc-key",
                "title", "subtitle", "title-loc-args", "title-loc-key", "summary-arg",
                "summary-arg-count")
_APS_ORDER = ("alert", "badge", "category", "content-available", "interruption-level",
              "mutable-content", "relevance-score", "sound", "thread-id", "url-args",
              "content-state", "dismissal-date", "stale-date", "event", "timestamp",
              "attributes-type", "attributes")


class GorushError(ValueError):
    """The request as a whole cannot be taken (gorush answers 400); the message says why.

    ``code`` is the API's error code (``bad_request`` or ``too_many_tokens``)."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
        self.status = 400


@dataclass(frozen=True, slots=True)
class Refusal:
    """A notification fanout does not send: its 0-based ``index`` in ``notifications`` and
    ``message``, why. ``tokens``, ``notif_id``, ``platform`` and ``push_message`` (the
    notification's own ``message``) are kept for the gorush log entries
    (:func:`refusal_logs`); ``tokens`` stays out of the repr, which may be logged."""

    index: int
    message: str
    platform: int | None = None
    notif_id: str | None = None
    push_message: str = ""
    tokens: tuple[str, ...] = field(default=(), repr=False)


@dataclass(slots=True)
class GorushRequest:
    """A decoded ``/api/push`` body: ``pushes[k]`` came from notification ``indexes[k]``,
    whose ``message`` (for its log entries) is ``messages[k]``; ``refused`` the rest."""

    pushes: list[PushLine] = field(default_factory=list, repr=False)
    refused: list[Refusal] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list, repr=False)

    @property
    def counts(self) -> int:
        """gorush's ``counts``: the device tokens taken (gorush also counts one per
        notification with a ``topic``, an FCM topic's count; fanout does not)."""
        return sum(1 if p.token is not None else len(p.tokens or ()) for p in self.pushes)


# ------------------------------------------------------------------ shape checks

_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object", type(None): "null"}


def _kind(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


class _Fields:
    """One JSON object's fields, read with gorush's (Go's) rules: a missing key or ``null``
    is the zero value, a value of another JSON type is an error naming ``path.key``."""

    __slots__ = ("obj", "path")

    def __init__(self, obj: dict[str, Any], path: str) -> None:
        self.obj = obj
        self.path = path

    def _wrong(self, key: str, want: str, value: object) -> GorushError:
        return GorushError(f"{self.path}.{key} must be {want}, got {_kind(value)}")

    def text(self, key: str) -> str:
        value = self.obj.get(key)
        if value is None:
            return ""
        if type(value) is not str:
            raise self._wrong(key, "a string", value)
        return value

    def flag(self, key: str) -> bool:
        value = self.obj.get(key)
        if value is None:
            return False
        if type(value) is not bool:
            raise self._wrong(key, "a boolean (true or false)", value)
        return value

    def integer(self, key: str) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if type(value) is not int:  # Go refuses 3.0 and "3" for an int field, so do we
            raise self._wrong(key, "an integer", value)
        return value

    def number(self, key: str) -> float | int | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if type(value) not in (int, float):
            raise self._wrong(key, "a number", value)
        return value  # type: ignore[no-any-return]

    def strings(self, key: str) -> list[str]:
        value = self.obj.get(key)
        if value is None:
            return []
        if type(value) is not list:
            raise self._wrong(key, "a list of strings", value)
        for i, item in enumerate(value):
            if type(item) is not str:
                raise GorushError(f"{self.path}.{key}[{i}] must be a string, got {_kind(item)}")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.obj.get(key)
        if value is None:
            return {}
        if type(value) is not dict:
            raise self._wrong(key, "an object", value)
        return value


# ------------------------------------------------------------------ decoding

def decode_gorush(body: bytes, *, max_tokens: int,
                  environments: Collection[str] | None = None) -> GorushRequest:
    """gorush's ``/api/push`` body -> the pushes fanout sends and the notifications it
    refuses. ``max_tokens`` caps the device tokens of the whole request (every platform's:
    gorush's own cap counts notifications); ``environments`` (``production``,
    ``sandbox``), when given, are the APNs environments the server reaches, and a
    notification whose ``production``/``development`` asks for another one is refused.
    Raises :class:`GorushError` for a body that cannot be taken at all."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise GorushError(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise GorushError("body is not JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise GorushError(f"body is not JSON: not UTF-8 at byte {exc.start}") from None
    if type(data) is not dict or data.get("notifications") is None:
        raise GorushError("Missing notifications field.")
    notifications = data["notifications"]
    if type(notifications) is not list:
        raise GorushError(f"notifications must be a list, got {_kind(notifications)}")
    if not notifications:
        raise GorushError("Notifications field is empty.")
    request = GorushRequest()
    total = 0
    for index, raw in enumerate(notifications):
        path = f"notifications[{index}]"
        if type(raw) is not dict:
            raise GorushError(f"{path} must be an object, got {_kind(raw)}")
        total += _one(request, index, _Fields(raw, path), environments)
    if total > max_tokens:
        raise GorushError(f"Number of device tokens ({total}) over limit ({max_tokens})",
                          "too_many_tokens")
    return request


def _one(request: GorushRequest, index: int, f: _Fields,
         environments: Collection[str] | None) -> int:
    """Map notification ``index`` into ``request``; returns its token count."""
    tokens = f.strings("tokens")
    notif_id = f.text("notif_id") or None
    message = f.text("message")
    platform = f.integer("platform")

    def refuse(why: str) -> int:
        request.refused.append(Refusal(index, why, platform, notif_id, message, tuple(tokens)))
        return len(tokens)

    if platform != IOS:
        if platform is None:
            return refuse("platform is missing: fanout serves platform 1 (iOS) only")
        name = _SERVED_NOT.get(platform)
        label = f"platform {platform} ({name})" if name else f"platform {platform}"
        return refuse(f"{label} is not served: fanout sends to APNs only")
    payload = _payload(f, message)
    headers = _headers(f)
    environment = ("production" if f.flag("production")
                   else "sandbox" if f.flag("development") else None)
    if not tokens:
        return refuse("no device token (tokens is empty)")
    if "aps" in f.mapping("data"):
        return refuse("data.aps is not allowed: the aps dictionary is built from the "
                      "notification's fields")
    if environment is not None and environments is not None and environment not in environments:
        flag = "production" if environment == "production" else "development"
        return refuse(f"{flag}: true asks for APNs {environment}, but this server sends to "
                      f"{' and '.join(sorted(environments)) or 'no environment'} only")
    one = len(tokens) == 1
    request.pushes.append(PushLine(
        payload=payload, token=tokens[0] if one else None, tokens=None if one else tokens,
        id=notif_id, environment=environment, **headers))
    request.indexes.append(index)
    request.messages.append(message)
    return len(tokens)


def _headers(f: _Fields) -> dict[str, Any]:
    """The APNs headers of one notification, as PushLine fields (None: not given)."""
    priority = f.text("priority")
    if priority and priority not in _PRIORITIES:
        shown = priority if len(priority) <= 40 else priority[:40] + "..."
        raise GorushError(f'{f.path}.priority must be "high" or "normal", got {shown!r}')
    return {
        "topic": f.text("topic") or None,
        "push_type": f.text("push_type") or None,
        "priority": _PRIORITIES.get(priority),  # absent: fanout's default (10; background 5)
        "expiration": f.integer("expiration"),  # 0 is sent, as gorush does: expire at once
        "collapse_id": f.text("collapse_id") or None,
        "apns_id": f.text("apns_id") or None,
    }


def _payload(f: _Fields, message: str) -> dict[str, Any]:
    """The APNs payload gorush builds from one notification (its ``buildIOSPayload``)."""
    aps: dict[str, Any] = {}
    title = f.text("title")
    alert = _alert(f, title, message)
    if alert:
        aps["alert"] = alert
    elif message and not title:
        aps["alert"] = message  # a plain alert: only while no alert key is set
    badge = f.integer("badge")
    if badge is not None and badge >= 0:  # 0 clears the badge; below 0 is left out
        aps["badge"] = badge
    for key, name in (("category", "category"), ("interruption_level", "interruption-level"),
                      ("thread-id", "thread-id"), ("event", "event"),
                      ("attributes-type", "attributes-type")):
        if text := f.text(key):
            aps[name] = text
    if f.flag("content_available"):
        aps["content-available"] = 1
    if f.flag("mutable_content"):
        aps["mutable-content"] = 1
    if (score := f.number("relevance-score")) is not None:
        aps["relevance-score"] = score
    sound = _sound(f)
    if sound is not None:
        aps["sound"] = sound
    if url_args := f.strings("url-args"):
        aps["url-args"] = url_args
    for key in ("content-state", "attributes"):
        if obj := f.mapping(key):
            aps[key] = obj
    for key in ("dismissal-date", "stale-date", "timestamp"):
        if (stamp := f.integer(key)) is not None and stamp > 0:
            aps[key] = stamp
    payload: dict[str, Any] = {"aps": {k: aps[k] for k in _APS_ORDER if k in aps}}
    for key, value in f.mapping("data").items():
        if key != "aps":  # refused by the caller
            payload[key] = value
    return payload


def _alert(f: _Fields, title: str, message: str) -> dict[str, Any]:
    """``aps.alert`` as a dictionary ({}: none). Any key of it replaces a plain
    ``message`` alert, as in gorush: ``message`` is the body only beside a ``title``."""
    raw = f.obj.get("alert")
    if raw is not None and type(raw) is not dict:
        raise f._wrong("alert", "an object (a plain alert is the message field)", raw)
    a = _Fields(raw or {}, f"{f.path}.alert")
    alert: dict[str, Any] = {}
    if title:
        alert["title"] = title
        if message:
            alert["body"] = message
    for key in _ALERT_STRINGS:
        if text := a.text(key):
            alert[key] = text
    for key in _ALERT_LISTS:
        if args := a.strings(key):
            alert[key] = args
    if (count := a.integer("summary-arg-count")) is not None and count > 0:
        alert["summary-arg-count"] = count
    return {k: alert[k] for k in _ALERT_ORDER if k in alert}


def _sound(f: _Fields) -> str | dict[str, Any] | None:
    """``aps.sound``: ``sound`` (a name, or ``{critical, name, volume}`` with its zero
    values left out), replaced by a critical sound when ``name`` or ``volume`` is given."""
    raw = f.obj.get("sound")
    sound: str | dict[str, Any] | None = None
    if type(raw) is str:
        sound = raw or None
    elif type(raw) is dict:
        s = _Fields(raw, f"{f.path}.sound")
        critical = raw.get("critical")
        if type(critical) is float and critical.is_integer():  # gorush reads it via a map
            critical = int(critical)
        elif critical is not None and type(critical) is not int:
            raise s._wrong("critical", "an integer", critical)
        name, volume = s.text("name"), s.number("volume")
        sound = {k: v for k, v in (("critical", critical), ("name", name), ("volume", volume))
                 if v}
    elif raw is not None:
        raise f._wrong("sound", "a string or an object", raw)
    name, volume = f.text("name"), f.number("volume")
    if name or (volume is not None and volume > 0):
        sound = {"critical": 1, "name": name or "default",
                 "volume": volume if volume is not None and volume > 0 else 1.0}
    return sound


# ------------------------------------------------------------------ the answer

class _Outcome(Protocol):
    """What a log entry needs of a :class:`fanout.outcome.Result` or a daemon
    ``ResultLine``."""

    @property
    def outcome(self) -> str: ...
    @property
    def token(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...


def _entry(notif_id: str | None, platform: str, token: str, message: str, error: str,
           hide_token: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"notif_id": notif_id} if notif_id else {}
    entry.update(type=FAILED_PUSH, platform=platform,
                 token=redact(token) if hide_token and token else token,
                 message=message, error=error)
    return entry


def log_entry(result: _Outcome, *, notif_id: str | None = None, message: str = "",
              hide_token: bool = False) -> dict[str, Any] | None:
    """gorush's log entry for one push that failed (None when it was delivered):
    ``{"notif_id"?, "type": "failed-push", "platform": "ios", "token", "message",
    "error"}``. ``error`` is APNs' reason when there was one (``BadDeviceToken``,
    ``Unregistered``: what gorush reports), else ``outcome: error``. The whole token goes
    back to the caller, as gorush does; ``hide_token`` shortens it (gorush's
    ``log.hide_token``)."""
    if result.outcome == "delivered":
        return None
    if result.reason:
        error = str(result.reason)
    elif result.error:
        error = f"{result.outcome}: {result.error}"
    else:
        error = str(result.outcome)
    return _entry(notif_id, "ios", result.token or "", message, error, hide_token)


def refusal_logs(refusal: Refusal, *, hide_token: bool = False) -> list[dict[str, Any]]:
    """The log entries of a refused notification: one per token (one with an empty token
    when it had none), ``error`` the refusal's message."""
    platform = PLATFORM_NAMES.get(refusal.platform or 0, "")
    return [_entry(refusal.notif_id, platform, token, refusal.push_message, refusal.message,
                   hide_token) for token in refusal.tokens or ("",)]


_encode = msgspec.json.Encoder().encode


def gorush_response(counts: int, logs: list[dict[str, Any]]) -> bytes:
    """gorush's 200 body: ``{"counts": N, "logs": [...], "success": "ok"}``."""
    return _encode({"counts": counts, "logs": logs, "success": "ok"})


def gorush_error(message: str, status: int = 400) -> bytes:
    """gorush's error body: ``{"code": 400, "message": "..."}``."""
    return _encode({"code": status, "message": message})
