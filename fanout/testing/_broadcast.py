"""Apple's broadcast side (docs/apns.md, Broadcast channels): the channel management API
(``POST/GET/DELETE /1/apps/<bundleId>/channels``, ``GET /1/apps/<bundleId>/all-channels``) and
broadcast sends (``POST /4/broadcasts/apps/<bundleId>``). Every answer carries an
``apns-request-id``; these paths always validate."""

from __future__ import annotations

import base64
import binascii
import secrets
import uuid
from collections.abc import Callable

import msgspec

from . import _apple
from ._faults import server_fault, throttled
from ._http import Answer, Headers, Request, json_headers, json_object
from ._jwt import MockState, ProviderTokens

_Channels = dict[str, int]  # channel id -> message-storage-policy


class _Reply:
    """Builds a broadcast/channel :class:`Answer` (``apns-request-id`` first)."""

    __slots__ = ("request_id", "auth_ok")

    def __init__(self, request_id: bytes) -> None:
        self.request_id = request_id
        self.auth_ok = False

    def __call__(
        self,
        status: int,
        reason: str | None = None,
        extra: Headers | None = None,
        body: bytes = b"",
    ) -> Answer:
        headers = [(b"apns-request-id", self.request_id)]
        if extra:
            headers += extra
        return Answer(status, reason, self.request_id, None, self.auth_ok, headers, body)


def evaluate_broadcast(mock: MockState, tokens: ProviderTokens, request: Request) -> Answer:
    """Channel management (``/1/apps/...``) and broadcast sends (``/4/broadcasts/...``)."""
    request_id, bad_request_id = _request_id(request.fields)
    reply = _Reply(request_id)
    failure = server_fault(mock.config, mock.rng, tokens.wedged)
    if failure is not None:
        return reply(*failure)
    op, bundle_b, allowed = _route(request.method, request.path or b"")
    if op is None or not bundle_b or b"/" in bundle_b:
        return reply(404, "BadPath")
    if request.method not in allowed:
        return reply(405, "MethodNotAllowed")
    if request.duplicate:
        return reply(400, "DuplicateHeaders")
    failure = tokens.authorize(request.fields.get(b"authorization"), mock)
    if failure is not None:
        return reply(*failure)
    reply.auth_ok = True
    bundle = bundle_b.decode("ascii", "replace")
    failure = _app_failure(mock, bundle) or _id_failure(request.fields, bad_request_id)
    if failure is not None:
        return reply(*failure)
    channels = mock.stats.channels.get(bundle) or {}
    return _ROUTES[op](mock, request, reply, bundle, channels)


def _route(method: bytes | None, path: bytes) -> tuple[str | None, bytes, tuple[bytes, ...]]:
    """(operation, bundle id, allowed methods); operation ``None``: no such path."""
    path = path.partition(b"?")[0]
    if path.startswith(_apple.BROADCAST_PREFIX):
        return "send", path[len(_apple.BROADCAST_PREFIX) :], (b"POST",)
    if path.startswith(_apple.MANAGE_PREFIX):
        bundle, _, tail = path[len(_apple.MANAGE_PREFIX) :].partition(b"/")
        if tail == b"channels":
            op = {b"POST": "create", b"GET": "read", b"DELETE": "delete"}.get(method or b"")
            return op or "channels", bundle, (b"POST", b"GET", b"DELETE")
        if tail == b"all-channels":
            return "list", bundle, (b"GET",)
    return None, b"", ()


def _app_failure(mock: MockState, bundle: str) -> tuple[int, str] | None:
    """The bundle id's form, whether it is allowed, and the app's Broadcast Capability."""
    reason = _bundle_reason(bundle)
    if reason is not None:
        return (404 if reason == "BadPath" else 400), reason
    cfg = mock.config
    if cfg.topics is not None and bundle not in cfg.topics:
        return 403, "TopicMismatch"
    if not cfg.broadcast_enabled:
        return 400, "FeatureNotEnabled"
    return None


def _id_failure(fields: dict[bytes, bytes], bad_request_id: bool) -> tuple[int, str] | None:
    """A malformed ``apns-request-id`` or ``apns-id``."""
    apns_id = fields.get(b"apns-id")
    if bad_request_id or (apns_id is not None and _apple.UUID.fullmatch(apns_id) is None):
        return 400, "BadMessageId"
    return None


def _list(
    mock: MockState, request: Request, reply: _Reply, bundle: str, channels: _Channels
) -> Answer:
    listing = msgspec.json.encode({"channels": list(channels)})
    return reply(200, None, json_headers(listing), listing)


def _create(
    mock: MockState, request: Request, reply: _Reply, bundle: str, channels: _Channels
) -> Answer:
    reason = _channel_body_reason(request.body)
    if reason is not None:
        return reply(400, reason)
    if len(channels) >= mock.config.max_channels:
        return reply(400, "CannotCreateChannelConfig")
    channel_id = base64.b64encode(secrets.token_bytes(16)).decode("ascii")
    channels = mock.stats.channels.setdefault(bundle, channels)
    channels[channel_id] = msgspec.json.decode(request.body)["message-storage-policy"]
    return reply(201, None, [(b"apns-channel-id", channel_id.encode("ascii"))])


def _read(
    mock: MockState, request: Request, reply: _Reply, bundle: str, channels: _Channels
) -> Answer:
    channel_id, reason = _channel_id(request.fields)
    if reason is not None:
        return reply(400, reason)
    policy = channels.get(channel_id)
    if policy is None:
        return reply(400, "ChannelNotRegistered")
    info = msgspec.json.encode({"message-storage-policy": policy, "push-type": "LiveActivity"})
    return reply(200, None, json_headers(info), info)


def _delete(
    mock: MockState, request: Request, reply: _Reply, bundle: str, channels: _Channels
) -> Answer:
    channel_id, reason = _channel_id(request.fields)
    if reason is not None:
        return reply(400, reason)
    if channels.pop(channel_id, None) is None:
        return reply(400, "ChannelNotRegistered")
    return reply(204)


def _send(
    mock: MockState, request: Request, reply: _Reply, bundle: str, channels: _Channels
) -> Answer:
    fields = request.fields
    channel_id, reason = _channel_id(fields)
    if reason is not None:
        return reply(400, reason)
    push_type = fields.get(b"apns-push-type")
    if push_type is None:
        return reply(400, "MissingPushType")
    if push_type.lower() != b"liveactivity":
        return reply(400, "InvalidPushType")
    policy = channels.get(channel_id)
    if policy is None:
        return reply(400, "ChannelNotRegistered")
    reason = _send_header_reason(fields, policy) or _send_payload_reason(request.body)
    if reason is not None:
        return reply(413 if reason == "PayloadTooLarge" else 400, reason)
    if throttled(mock.config, mock.rng):
        return reply(429, "TooManyRequests")
    mock.stats.broadcasts[channel_id] += 1
    return reply(200)


_ROUTES: dict[str, Callable[[MockState, Request, _Reply, str, _Channels], Answer]] = {
    "list": _list,
    "create": _create,
    "read": _read,
    "delete": _delete,
    "send": _send,
}


def _send_header_reason(fields: dict[bytes, bytes], policy: int) -> str | None:
    priority = fields.get(b"apns-priority")
    if priority is not None and priority not in _apple.PRIORITIES:
        return "BadPriority"
    expiration = fields.get(b"apns-expiration")
    if expiration is not None and not expiration.isdigit():
        return "BadExpirationDate"
    if policy == 0 and (expiration is None or int(expiration) != 0):
        return "BadExpirationDate"  # No Message Stored: only 0 (see fanout.testing.mock)
    return None


def _send_payload_reason(body: bytearray) -> str | None:
    return json_object(body, _apple.BROADCAST_PAYLOAD_LIMIT)[0]


def _request_id(fields: dict[bytes, bytes]) -> tuple[bytes, bool]:
    """The ``apns-request-id`` to answer with, and whether the request's one was malformed."""
    given = fields.get(b"apns-request-id")
    if given is not None and _apple.UUID.fullmatch(given) is not None:
        return given, False
    return str(uuid.uuid4()).encode(), given is not None


def _channel_id(fields: dict[bytes, bytes]) -> tuple[str, str | None]:
    """The ``apns-channel-id``, and MissingChannelId / BadChannelId if it is not usable."""
    value = fields.get(b"apns-channel-id")
    if not value:
        return "", "MissingChannelId"
    if len(value) > _apple.CHANNEL_ID_MAX:
        return "", "BadChannelId"
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "", "BadChannelId"
    return value.decode("ascii"), None


def _bundle_reason(bundle: str) -> str | None:
    """Why a bundle id in a broadcast/channel path is refused: a push-type suffix
    (TopicDisallowed) or a malformed id (BadPath), else ``None``."""
    if _apple.TOPIC.fullmatch(bundle) is None:
        return "BadPath"
    if ".push-type." in bundle or any(s and bundle.endswith(s) for s in _apple.SUFFIXES):
        return "TopicDisallowed"
    return None


def _channel_body_reason(body: bytearray) -> str | None:
    """Why a create-channel body is refused (docs/apns.md, Broadcast channels), or ``None``."""
    reason, parsed = json_object(body)
    if parsed is None:
        return reason
    if set(parsed) - _apple.CHANNEL_FIELDS or not _apple.CHANNEL_FIELDS <= set(parsed):
        return "BadRequestParams"  # unknown or missing attribute
    policy = parsed["message-storage-policy"]
    if type(policy) is not int or policy not in (0, 1):
        return "BadRequestParams"
    push_type = parsed["push-type"]
    if not isinstance(push_type, str):
        return "BadRequestParams"
    if push_type != "LiveActivity":
        return "InvalidPushType"  # only LiveActivity (docs/apns.md, Broadcast channels)
    return None
