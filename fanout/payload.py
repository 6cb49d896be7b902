"""Notification model, validation and encoding (docs/apns.md: Topics and push types, Payload).

Everything is checked before any network I/O and raises
:class:`fanout.errors.ValidationError` naming the field. ``PushTemplate`` validates and
encodes everything but the token once, so the per-token cost of a fan-out is a hex check
and one ``bytes`` concatenation.
"""

from __future__ import annotations

import enum
import math
import re
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal, get_args

import msgspec

from .errors import ValidationError, redact

__all__ = [
    "DEFAULT_PAYLOAD_LIMIT",
    "INTERRUPTION_LEVELS",
    "LIVE_ACTIVITY_EVENTS",
    "MAX_COLLAPSE_ID_BYTES",
    "MAX_TOKEN_LENGTH",
    "PRIORITIES",
    "ENVIRONMENTS",
    "TOPIC_SUFFIX",
    "TOPIC_SUFFIXES",
    "VOIP_PAYLOAD_LIMIT",
    "Alert",
    "Aps",
    "Environment",
    "CriticalSound",
    "Notification",
    "Payload",
    "Prepared",
    "PushTemplate",
    "PushType",
    "bundle_of",
    "decode_payload",
    "encode_payload",
    "payload_limit",
    "prepare",
    "topic_for",
]

DEFAULT_PAYLOAD_LIMIT = 4096
VOIP_PAYLOAD_LIMIT = 5120
MAX_COLLAPSE_ID_BYTES = 64
MAX_TOKEN_LENGTH = 512
MAX_TOPIC_LENGTH = 255
PRIORITIES = frozenset({10, 5, 1})
INTERRUPTION_LEVELS = frozenset({"passive", "active", "time-sensitive", "critical"})
LIVE_ACTIVITY_EVENTS = frozenset({"start", "update", "end"})
# Beyond year 5000: such an expiration is almost surely milliseconds, not epoch seconds.
_MAX_EXPIRATION = 10**11


class PushType(enum.StrEnum):
    """The ``apns-push-type`` header. Each type fixes the topic's suffix (``TOPIC_SUFFIX``)
    and the priorities APNs accepts (docs/apns.md, Topics and push types)."""

    ALERT = "alert"  #: shows an alert, plays a sound or sets a badge
    BACKGROUND = "background"  #: silent, ``content-available: 1``; priority 5 only
    LOCATION = "location"  #: a location query; topic ``<bundle>.location-query``
    VOIP = "voip"  #: PushKit VoIP; topic ``<bundle>.voip``, payload up to 5120 bytes
    COMPLICATION = "complication"  #: watchOS complication; topic ``<bundle>.complication``
    FILEPROVIDER = "fileprovider"  #: File Provider; topic ``<bundle>.pushkit.fileprovider``
    MDM = "mdm"  #: device management wake-up; the topic comes from the MDM certificate
    LIVEACTIVITY = "liveactivity"  #: Live Activity; topic ``<bundle>.push-type.liveactivity``
    PUSHTOTALK = "pushtotalk"  #: Push to Talk; topic ``<bundle>.voip-ptt``
    WIDGETS = "widgets"  #: widget reload; topic ``<bundle>.push-type.widgets``
    CONTROLS = "controls"  #: Control Center controls; topic ``<bundle>.push-type.controls``


TOPIC_SUFFIX: dict[PushType, str | None] = {
    PushType.ALERT: "",
    PushType.BACKGROUND: "",
    PushType.LOCATION: ".location-query",
    PushType.VOIP: ".voip",
    PushType.COMPLICATION: ".complication",
    PushType.FILEPROVIDER: ".pushkit.fileprovider",
    PushType.MDM: None,  # the UID from the MDM push certificate, used as is
    PushType.LIVEACTIVITY: ".push-type.liveactivity",
    PushType.PUSHTOTALK: ".voip-ptt",
    PushType.WIDGETS: ".push-type.widgets",
    PushType.CONTROLS: ".push-type.controls",
}
_SUFFIXES: tuple[tuple[PushType, str], ...] = tuple((pt, s) for pt, s in TOPIC_SUFFIX.items() if s)
#: Every suffix a topic can carry, longest first so ``.voip-ptt`` is tried before ``.voip``.
TOPIC_SUFFIXES: tuple[str, ...] = tuple(sorted({s for _, s in _SUFFIXES}, key=len, reverse=True))

#: APNs environments: ``production`` (api.push.apple.com) and ``sandbox`` (development builds).
Environment = Literal["production", "sandbox"]
ENVIRONMENTS: tuple[Environment, ...] = get_args(Environment)


def bundle_of(topic: str) -> str:
    """The bundle id a topic belongs to (``com.x.app.voip-ptt`` -> ``com.x.app``): any push
    type's suffix goes, and so does any ``.push-type.*`` one Apple adds later."""
    topic = topic.split(".push-type.")[0]
    for suffix in TOPIC_SUFFIXES:
        if topic.endswith(suffix) and len(topic) > len(suffix):
            return topic[: -len(suffix)]
    return topic


def payload_limit(push_type: PushType) -> int:
    """Largest body APNs takes for ``push_type``: 5120 bytes for VoIP, else 4096."""
    return VOIP_PAYLOAD_LIMIT if push_type is PushType.VOIP else DEFAULT_PAYLOAD_LIMIT


def _push_type(value: PushType | str) -> PushType:
    if type(value) is PushType:
        return value
    try:
        return PushType(str(value).lower())
    except ValueError:
        raise ValidationError(
            "push_type", f"unknown push type {value!r}; expected one of {', '.join(PushType)}"
        ) from None


def topic_for(bundle_or_topic: str, push_type: PushType) -> str:
    """The ``apns-topic`` for ``push_type``: append its suffix unless already present.

    A topic carrying another push type's suffix is refused rather than double-suffixed.
    """
    push_type = _push_type(push_type)
    t = bundle_or_topic
    if not isinstance(t, str) or not t:
        raise ValidationError("topic", "required: a bundle id or apns-topic")
    if len(t) > MAX_TOPIC_LENGTH or not t.isascii() or not t.isprintable() or " " in t:
        raise ValidationError(
            "topic", f"must be printable ASCII without spaces, at most {MAX_TOPIC_LENGTH} chars"
        )
    suffix = TOPIC_SUFFIX[push_type]
    if suffix is None:
        return t
    if suffix and t.endswith(suffix):
        if len(t) == len(suffix):
            raise ValidationError("topic", f"{t!r} has no bundle id before the suffix")
        return t
    for other, other_suffix in _SUFFIXES:
        if other is not push_type and t.endswith(other_suffix):
            raise ValidationError(
                "topic",
                f"{t!r} ends with the {other} suffix {other_suffix!r} but the push type is "
                f"{push_type} (expected {'no suffix' if not suffix else repr(suffix)})",
            )
    return t + suffix


@lru_cache(maxsize=1024)
def _topic_bytes(topic: str, push_type: PushType) -> bytes:
    return topic_for(topic, push_type).encode("ascii")


# --------------------------------------------------------------------------- payload model


class CriticalSound(msgspec.Struct, rename="kebab", forbid_unknown_fields=True):
    """``aps.sound`` as a dictionary: a critical alert sound (needs Apple's entitlement)."""

    # No omit_defaults: a critical sound dict must carry all three keys.
    critical: int = 1
    name: str = "default"
    volume: float = 1.0

    def __post_init__(self) -> None:
        v = self.volume
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            raise ValidationError("payload", f"aps.sound.volume must be 0..1, got {self.volume}")
        if self.critical not in (0, 1):
            raise ValidationError(
                "payload", f"aps.sound.critical must be 0 or 1, got {self.critical}"
            )


class Alert(msgspec.Struct, omit_defaults=True, rename="kebab", forbid_unknown_fields=True):
    """``aps.alert`` as a dictionary; field names are Apple's keys in snake case
    (``title_loc_key`` is ``title-loc-key``). Unknown keys are refused."""

    title: str | dict[str, Any] | None = None
    subtitle: str | dict[str, Any] | None = None
    body: str | dict[str, Any] | None = None
    launch_image: str | None = None
    title_loc_key: str | None = None
    title_loc_args: list[str] | None = None
    subtitle_loc_key: str | None = None
    subtitle_loc_args: list[str] | None = None
    loc_key: str | None = None
    loc_args: list[str] | None = None
    sound: str | CriticalSound | None = None  # Apple's Live Activity samples put it here
    # Legacy keys still emitted by some clients (Apple's older payload reference; "action"
    # labels the action button of a Safari push, and gorush maps its alert.action to it).
    action: str | None = None
    action_loc_key: str | None = None
    summary_arg: str | None = None
    summary_arg_count: int | None = None


class Aps(msgspec.Struct, omit_defaults=True, rename="kebab", forbid_unknown_fields=True):
    """The ``aps`` dictionary, Live Activity keys included (``content_state``, ``event``,
    ``stale_date`` ...); snake-case names map to Apple's kebab-case keys, unknown keys are
    refused."""

    alert: str | Alert | None = None
    badge: int | None = None
    sound: str | CriticalSound | None = None
    thread_id: str | None = None
    category: str | None = None
    content_available: int | None = None
    mutable_content: int | None = None
    target_content_id: str | None = None
    interruption_level: str | None = None
    relevance_score: float | None = None
    filter_criteria: str | None = None
    stale_date: int | None = None
    content_state: dict[str, Any] | None = None
    timestamp: int | None = None
    event: str | None = None
    dismissal_date: int | None = None
    attributes_type: str | None = None
    attributes: dict[str, Any] | None = None
    input_push_token: int | None = None
    input_push_channel: str | None = None
    content_changed: bool | None = None
    url_args: list[str] | None = None  # legacy (Safari)


_encode = msgspec.json.Encoder().encode
_EMPTY_APS = b"{}"


def _encode_or_raise(obj: Any) -> bytes:
    try:
        out = _encode(obj)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.MsgspecError) as e:
        raise ValidationError("payload", f"cannot be encoded as JSON: {e}") from None
    # msgspec writes NaN and Infinity as null: the device would get a value nobody sent
    if b"null" in out and _non_finite(msgspec.to_builtins(obj)):
        raise ValidationError("payload", "holds NaN or Infinity, which JSON cannot carry "
                                         "(msgspec would send null)")
    return out


def _non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return True
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return False


class Payload(msgspec.Struct, omit_defaults=True):
    """``aps`` plus custom keys, which are encoded *beside* ``aps`` at the top level.

    Encode with :meth:`encode`, not ``msgspec.json.encode`` (which would nest ``custom``).
    """

    aps: Aps = msgspec.field(default_factory=Aps)
    custom: dict[str, Any] = {}

    def encode(self) -> bytes:
        """The JSON body: ``{"aps": ..., **custom}``."""
        aps = _encode_or_raise(self.aps)
        custom = self.custom
        if not custom:
            return b'{"aps":' + aps + b"}"
        if "aps" in custom:
            raise ValidationError("payload", "custom keys may not include 'aps'")
        rest = _encode_or_raise(custom)
        if aps == _EMPTY_APS:
            # e.g. MDM's {"mdm": "<PushMagic>"}: an empty aps carries nothing.
            return rest
        return b'{"aps":' + aps + b"," + rest[1:]


def encode_payload(p: Payload | dict[str, Any] | bytes | str) -> bytes:
    """Body bytes: ``bytes`` pass through unchanged (pre-encoded), ``str`` -> UTF-8."""
    if type(p) is bytes:
        return p
    if isinstance(p, bytes | bytearray | memoryview):
        return bytes(p)
    if isinstance(p, Payload):
        return p.encode()
    if isinstance(p, dict):
        return _encode_or_raise(p)
    if isinstance(p, str):
        try:
            return p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValidationError("payload", f"is not valid UTF-8 text: {e.reason}") from None
    raise ValidationError(
        "payload", f"must be a Payload, dict, bytes or str, not {type(p).__name__}"
    )


def decode_payload(obj: dict[str, Any]) -> Payload:
    """``{"aps": {...}, **custom}`` -> :class:`Payload`; unknown ``aps`` keys or wrong types fail."""
    if not isinstance(obj, dict):
        raise ValidationError("payload", f"must be a JSON object, not {type(obj).__name__}")
    custom = {k: v for k, v in obj.items() if k != "aps"}
    raw = obj.get("aps")
    if raw is None:
        return Payload(custom=custom)
    if not isinstance(raw, dict):
        raise ValidationError("payload", f"aps must be an object, not {type(raw).__name__}")
    try:
        aps = msgspec.convert(raw, Aps)
    except msgspec.ValidationError as e:
        msg = str(e)
        msg = msg.replace("`$", "`$.aps") if "`$" in msg else f"{msg} - in `$.aps`"
        raise ValidationError("payload", msg) from None
    return Payload(aps=aps, custom=custom)


_last_checked: list[Any] = [None, None]  # [the dict payload checked last, its push type]


def _check_dict(payload: dict[str, Any], push_type: PushType) -> None:
    """A plain dict payload is checked as a :class:`Payload` would be: unknown ``aps`` keys,
    wrong types, what the push type needs (custom top-level keys are the app's own). The
    same dict sent again (one payload, many notifications) is not checked twice."""
    last = _last_checked
    if last[0] is payload and last[1] is push_type:
        return
    _check_aps(decode_payload(payload).aps, push_type)
    last[0], last[1] = payload, push_type


def check_dict_payload(payload: dict[str, Any], push_type: PushType) -> None:
    """ValidationError unless the dict ``payload`` is one ``push_type`` can carry (what
    :class:`PushTemplate` checks of it, besides its encoded size)."""
    _check_dict(payload, push_type)


def _check_aps(aps: Aps, push_type: PushType) -> None:
    if push_type is PushType.BACKGROUND and aps.content_available != 1:
        raise ValidationError("payload", "background pushes need aps.content-available = 1")
    level = aps.interruption_level
    if level is not None and (not isinstance(level, str) or level not in INTERRUPTION_LEVELS):
        raise ValidationError(
            "payload",
            f"aps.interruption-level {level!r} is not one of "
            f"{', '.join(sorted(INTERRUPTION_LEVELS))}",
        )
    score = aps.relevance_score
    if score is not None:
        if (
            isinstance(score, bool)
            or not isinstance(score, int | float)
            or not math.isfinite(score)
        ):
            raise ValidationError("payload", "aps.relevance-score must be a finite number")
        if push_type is not PushType.LIVEACTIVITY and not 0.0 <= score <= 1.0:
            raise ValidationError("payload", f"aps.relevance-score must be 0..1, got {score}")
    if push_type is PushType.LIVEACTIVITY:
        event = aps.event
        if not isinstance(event, str) or event not in LIVE_ACTIVITY_EVENTS:
            raise ValidationError(
                "payload", f"liveactivity pushes need aps.event start/update/end, got {event!r}"
            )
        if event == "start":
            missing = [
                key
                for key, value in (
                    ("attributes-type", aps.attributes_type),
                    ("attributes", aps.attributes),
                    ("content-state", aps.content_state),
                    ("alert", aps.alert),
                )
                if value is None
            ]
            if missing:
                raise ValidationError(
                    "payload", f"liveactivity start needs aps.{', aps.'.join(missing)}"
                )
        elif event == "update" and aps.content_state is None:
            raise ValidationError("payload", "liveactivity update needs aps.content-state")


# --------------------------------------------------------------------------- notifications


class Notification(msgspec.Struct, kw_only=True):
    """One push as you write it: a device token and a payload (a :class:`Payload`, a dict,
    or pre-encoded ``bytes``/``str``), plus the optional APNs headers. ``topic`` defaults to
    the client's; its push-type suffix is added for you. ``id`` is yours and comes back in
    the :class:`Result`. Validated, with a ``ValidationError`` naming the field, before any
    network I/O."""

    token: str
    payload: Payload | dict[str, Any] | bytes | str
    push_type: PushType = PushType.ALERT
    topic: str | None = None
    priority: int | None = None
    expiration: int | None = None
    collapse_id: str | None = None
    apns_id: str | None = None
    id: Any = None
    environment: str | None = None
    """production or sandbox: which APNs a :class:`fanout.teams.Teams` router sends it to
    (None: the router's default). A plain Client sends to its own environment."""


class Prepared:
    """One push ready for the HTTP/2 hot path: every header value is already bytes.

    Built by :meth:`PushTemplate.for_token` (device pushes) and ``prepare_broadcast``;
    ``stamp`` and ``environment`` may be set later by the Live Activity budget and the
    daemon.
    """

    __slots__ = (
        "token",
        "path",
        "body",
        "push_type",
        "topic",
        "priority",
        "expiration",
        "collapse_id",
        "apns_id",
        "id",
        "limit",
        "stamp",
        "extra",
        "channel_id",
        "environment",
    )

    token: str  # normalised lowercase hex (a broadcast: its channel id, a key only)
    path: bytes
    body: bytes
    push_type: bytes
    topic: bytes | None  # None: a broadcast, which has no apns-topic
    priority: bytes
    expiration: bytes | None
    collapse_id: bytes | None
    apns_id: bytes | None
    id: Any  # the caller's id, handed back in the Result
    limit: int  # payload byte limit of this push type
    stamp: Callable[[], bytes] | None  # Live Activities: rebuilds the body at send time
    extra: list[tuple[bytes, bytes]] | None  # more headers (apns-channel-id)
    channel_id: str | None  # a broadcast's channel
    environment: str | None  # Teams routing: production | sandbox | None (default)

    def __init__(
        self,
        *,
        token: str,
        path: bytes,
        body: bytes,
        push_type: bytes,
        topic: bytes | None,
        priority: bytes,
        limit: int,
        expiration: bytes | None = None,
        collapse_id: bytes | None = None,
        apns_id: bytes | None = None,
        id: Any = None,
        extra: list[tuple[bytes, bytes]] | None = None,
        channel_id: str | None = None,
        environment: str | None = None,
        stamp: Callable[[], bytes] | None = None,
    ) -> None:
        self.token = token
        self.path = path
        self.body = body
        self.push_type = push_type
        self.topic = topic
        self.priority = priority
        self.expiration = expiration
        self.collapse_id = collapse_id
        self.apns_id = apns_id
        self.id = id
        self.limit = limit
        self.stamp = stamp
        self.extra = extra
        self.channel_id = channel_id
        self.environment = environment

    def __repr__(self) -> str:
        return (
            f"Prepared(token={redact(self.token)}, push_type={self.push_type!r}, "
            f"topic={self.topic!r}, body={len(self.body)}B, id={self.id!r})"
        )


_DEVICE_PATH = b"/3/device/"
_lower_hex = re.compile("[0-9a-f]+").fullmatch  # the common token, checked in one C call
_new = object.__new__
_PRIORITY_BYTES = {p: str(p).encode() for p in PRIORITIES}


def _check_token(token: str) -> str:
    """Lowercase hex token; tokens are variable length, so only parity and a cap are checked."""
    if type(token) is not str:
        raise ValidationError("token", f"must be a hex string, not {type(token).__name__}")
    n = len(token)
    if n == 0:
        raise ValidationError("token", "required")
    if n & 1 or n > MAX_TOKEN_LENGTH:
        raise ValidationError(
            "token",
            f"{redact(token)} has {n} chars; need an even number of hex digits, "
            f"at most {MAX_TOKEN_LENGTH}",
        )
    try:
        bytes.fromhex(token)  # C speed; skips whitespace, which isalnum() then rules out
    except ValueError:
        ok = False
    else:
        ok = token.isalnum()
    if not ok:
        raise ValidationError("token", f"{redact(token)} is not hexadecimal")
    return token if token.islower() or token.isdigit() else token.lower()


def _check_priority(priority: int | None, push_type: PushType) -> bytes:
    if priority is None:
        priority = 5 if push_type is PushType.BACKGROUND else 10
    elif type(priority) is not int or priority not in PRIORITIES:
        raise ValidationError("priority", f"must be 10, 5 or 1, got {priority!r}")
    if push_type is PushType.BACKGROUND and priority != 5:
        raise ValidationError("priority", f"background pushes must use priority 5, got {priority}")
    return _PRIORITY_BYTES[priority]


def check_expiration(expiration: int | None) -> bytes | None:
    """An ``apns-expiration`` value: epoch seconds (int >= 0, below year 5000), or None."""
    if expiration is None:
        return None
    if type(expiration) is not int or expiration < 0:
        raise ValidationError(
            "expiration", f"must be an int >= 0 (absolute epoch seconds), got {expiration!r}"
        )
    if expiration >= _MAX_EXPIRATION:
        raise ValidationError(
            "expiration", f"{expiration} looks like milliseconds; use absolute epoch seconds"
        )
    return str(expiration).encode()


def _check_collapse_id(collapse_id: str | None) -> bytes | None:
    if collapse_id is None:
        return None
    if not isinstance(collapse_id, str) or not collapse_id:
        raise ValidationError("collapse_id", "must be a non-empty string")
    raw = collapse_id.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_COLLAPSE_ID_BYTES:
        raise ValidationError(
            "collapse_id",
            f"is {len(raw)} bytes UTF-8; the limit is {MAX_COLLAPSE_ID_BYTES} bytes",
        )
    if not collapse_id.isprintable():
        raise ValidationError("collapse_id", "must not contain control characters")
    return raw


_HEX = frozenset("0123456789abcdef")


def _check_apns_id(apns_id: str | uuid.UUID | None) -> bytes | None:
    if apns_id is None:
        return None
    if isinstance(apns_id, uuid.UUID):
        return str(apns_id).encode()
    if isinstance(apns_id, str) and len(apns_id) == 36:
        s = apns_id.lower()
        if (
            s[8] == s[13] == s[18] == s[23] == "-"
            and s.count("-") == 4
            and _HEX.issuperset(s.replace("-", ""))
        ):
            return s.encode()
    raise ValidationError(
        "apns_id", f"must be a canonical UUID (8-4-4-4-12 hex digits), got {apns_id!r}"
    )


class PushTemplate:
    """Everything about a push except the token, validated and encoded ONCE (fan-out path)."""

    __slots__ = (
        "payload",
        "body",
        "push_type",
        "topic",
        "priority",
        "expiration",
        "collapse_id",
        "apns_id",
        "limit",
        "_push_type_b",
    )

    payload: Payload | dict[str, Any] | bytes | str
    body: bytes  # encoded once
    push_type: PushType
    topic: bytes
    priority: bytes
    expiration: bytes | None
    collapse_id: bytes | None
    apns_id: bytes | None
    limit: int  # payload byte limit of the push type

    def __init__(
        self,
        payload: Payload | dict[str, Any] | bytes | str,
        *,
        push_type: PushType | str = PushType.ALERT,
        topic: str | None = None,
        default_topic: str | None = None,
        priority: int | None = None,
        expiration: int | None = None,
        collapse_id: str | None = None,
        apns_id: str | uuid.UUID | None = None,
    ) -> None:
        pt = _push_type(push_type)
        base = topic or default_topic
        if not base or not isinstance(base, str):
            raise ValidationError(
                "topic", "required: pass topic= or configure a default topic (bundle id)"
            )
        self.topic: bytes = _topic_bytes(base, pt)
        self.priority: bytes = _check_priority(priority, pt)
        self.expiration = check_expiration(expiration)
        self.collapse_id = _check_collapse_id(collapse_id)
        self.apns_id = _check_apns_id(apns_id)
        if isinstance(payload, Payload):
            _check_aps(payload.aps, pt)
        elif isinstance(payload, dict):
            _check_dict(payload, pt)
        body = encode_payload(payload)
        limit = payload_limit(pt)
        if not body:
            raise ValidationError("payload", "is empty")
        if len(body) > limit:
            raise ValidationError(
                "payload", f"is {len(body)} bytes; the limit for {pt} pushes is {limit} bytes"
            )
        self.payload = payload
        self.body = body
        self.push_type = pt
        self.limit = limit
        self._push_type_b = pt.value.encode()

    def for_token(self, token: str, id: Any = None) -> Prepared:
        """This push for one device token (checked and lowercased); the body is shared.

        The fan-out hot path: a lowercase hex token passes one regex match (anything else
        goes through :func:`_check_token`), and the Prepared is filled by slot stores
        rather than an 11-keyword call (bench/README.md, "Where the CPU goes")."""
        if type(token) is str and not len(token) & 1 and len(token) <= MAX_TOKEN_LENGTH \
                and _lower_hex(token) is not None:
            tok = token
        else:
            tok = _check_token(token)
        p = _new(Prepared)
        p.token = tok
        p.path = _DEVICE_PATH + tok.encode()
        p.body = self.body
        p.push_type = self._push_type_b
        p.topic = self.topic
        p.priority = self.priority
        p.limit = self.limit
        p.expiration = self.expiration
        p.collapse_id = self.collapse_id
        p.apns_id = self.apns_id
        p.id = id
        p.stamp = p.extra = p.channel_id = p.environment = None
        return p


def check_environment(environment: object) -> Environment | None:
    """``environment`` if it is None, ``"production"`` or ``"sandbox"``; else ValidationError."""
    if environment is None:
        return None
    if environment == "production":
        return "production"
    if environment == "sandbox":
        return "sandbox"
    raise ValidationError("environment", f"must be production or sandbox, got {environment!r}")


def prepare(n: Notification, *, default_topic: str | None = None) -> Prepared:
    """Fully validate one notification; raises ValidationError naming the field."""
    _check_token(n.token)  # cheapest check first
    environment = check_environment(n.environment)
    prepared = PushTemplate(
        n.payload,
        push_type=n.push_type,
        topic=n.topic,
        default_topic=default_topic,
        priority=n.priority,
        expiration=n.expiration,
        collapse_id=n.collapse_id,
        apns_id=n.apns_id,
    ).for_token(n.token, n.id)
    prepared.environment = environment  # set after: for_token is the fan-out hot path
    return prepared
