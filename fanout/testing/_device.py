"""Validating device pushes (``POST /3/device/<token>``): request line, provider token,
headers, topic, payload, then the token's own faults (docs/apns.md, Headers; Payload)."""

from __future__ import annotations

import uuid

from . import _apple
from ._config import MockConfig
from ._faults import server_fault, throttled, token_fault
from ._http import Answer, Request, json_object
from ._jwt import MockState, ProviderTokens


def evaluate_device(mock: MockState, tokens: ProviderTokens, request: Request) -> Answer:
    """Decide the answer to a device push, in APNs' terms."""
    cfg = mock.config
    fields = request.fields
    given_id = fields.get(b"apns-id")
    id_ok = given_id is not None and _apple.UUID.fullmatch(given_id) is not None
    apns_id = given_id if given_id is not None and id_ok else str(uuid.uuid4()).encode()
    path = request.path
    token_b = path[10:] if path is not None and path.startswith(_apple.DEVICE_PREFIX) else b""
    token = token_b.decode("ascii", "replace") if token_b else None

    def fail(failure: tuple[int, str], auth_ok: bool = False) -> Answer:
        return Answer(failure[0], failure[1], apns_id, token, auth_ok)

    failure = server_fault(cfg, mock.rng, tokens.wedged)
    if failure is not None:
        return fail(failure)
    if cfg.validate:
        failure = _request_line_failure(request, token_b) or tokens.authorize(
            fields.get(b"authorization"), mock
        )
        if failure is not None:
            return fail(failure)
        reason = check_headers(cfg, fields, id_ok, given_id is not None, request.body)
        if reason is not None:
            return fail((413 if reason == "PayloadTooLarge" else 400, reason), True)
    if token is not None:
        failure = token_fault(cfg, token, fields.get(b"apns-topic"))
        if failure is not None:
            return fail(failure, True)
    if throttled(cfg, mock.rng):
        return fail((429, "TooManyRequests"), True)
    if cfg.record_bodies and token is not None:
        priority = int(fields.get(b"apns-priority", b"10"))
        mock.stats.bodies.setdefault(token, []).append((priority, bytes(request.body)))
    return Answer(200, None, apns_id, token, True)


def _request_line_failure(request: Request, token: bytes) -> tuple[int, str] | None:
    """Method, path and device token, and duplicate headers."""
    if request.method != b"POST":
        return 405, "MethodNotAllowed"
    if request.path in (b"/3/device", b"/3/device/"):
        return 400, "MissingDeviceToken"
    if not token:
        return 404, "BadPath"
    if len(token) % 2 or _apple.HEX.fullmatch(token) is None:
        return 400, "BadDeviceToken"
    if request.duplicate:
        return 400, "DuplicateHeaders"
    return None


def topic_reason(topic: str, push_type: str | None, allowed: set[str]) -> str | None:
    """``None`` if ``topic`` fits ``push_type`` for an allowed bundle id, else the APNs reason."""

    def base_allowed(suffix: str) -> bool:
        return topic.endswith(suffix) and topic[: len(topic) - len(suffix)] in allowed

    if push_type is not None and base_allowed(_apple.PUSH_TYPE_TOPIC_SUFFIX[push_type]):
        return None
    fits_some_type = any(base_allowed(s) for s in _apple.SUFFIXES)
    if push_type is None:  # no push type: APNs infers it from the topic
        return None if fits_some_type else "TopicDisallowed"
    return "BadTopic" if fits_some_type else "TopicDisallowed"


def check_headers(
    cfg: MockConfig, fields: dict[bytes, bytes], id_ok: bool, id_given: bool, body: bytearray
) -> str | None:
    """The reason a request's APNs headers or payload are invalid, or ``None``."""
    topic_b = fields.get(b"apns-topic")
    if not topic_b:
        return "MissingTopic"
    push_type_b = fields.get(b"apns-push-type")
    push_type = None
    if push_type_b is not None:
        push_type = push_type_b.decode("ascii", "replace")
        if push_type not in _apple.PUSH_TYPE_TOPIC_SUFFIX:
            return "InvalidPushType"
    return (
        _topic_check(cfg, topic_b.decode("ascii", "replace"), push_type)
        or _option_reason(fields, push_type, id_ok, id_given)
        or _payload_reason(body, push_type)
    )


def _topic_check(cfg: MockConfig, topic: str, push_type: str | None) -> str | None:
    if _apple.TOPIC.fullmatch(topic) is None:
        return "BadTopic"
    if cfg.topics is not None:
        return topic_reason(topic, push_type, cfg.topics)
    return None


def _option_reason(
    fields: dict[bytes, bytes], push_type: str | None, id_ok: bool, id_given: bool
) -> str | None:
    """apns-priority, apns-id, apns-expiration, apns-collapse-id."""
    priority = fields.get(b"apns-priority")
    if priority is not None and priority not in _apple.PRIORITIES:
        return "BadPriority"
    if push_type == "background" and priority != b"5":
        return "BadPriority"
    if id_given and not id_ok:
        return "BadMessageId"
    expiration = fields.get(b"apns-expiration")
    if expiration is not None and not expiration.isdigit():
        return "BadExpirationDate"
    collapse_id = fields.get(b"apns-collapse-id")
    if collapse_id is not None and len(collapse_id) > _apple.COLLAPSE_ID_MAX:
        return "BadCollapseId"
    return None


def _payload_reason(body: bytearray, push_type: str | None) -> str | None:
    limit = _apple.VOIP_PAYLOAD_LIMIT if push_type == "voip" else _apple.PAYLOAD_LIMIT
    return json_object(body, limit)[0]
