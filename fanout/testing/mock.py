"""A validating, fault-injecting mock of the APNs device-push endpoint (``POST /3/device/<token>``).

The server speaks real TLS (ALPN ``h2``) and uses the ``h2`` library as its HTTP/2 state machine,
an implementation independent of fanout's own client framer. It validates requests the way
APNs documents them (path, headers, JWT, topic, payload) and answers with APNs status codes and
reasons. On top of that it misbehaves on demand: stream-limit changes (1 until the first valid
token, back to 1 after a rejection), latency and jitter, random 429/500/503, 410 Unregistered,
GOAWAY (optionally with a last-stream-id below streams it received), abrupt closes, streams that
are never answered, "wedged" connections after ``ExpiredProviderToken``, a token that expires once
mid-run, connections that stop reading, server PINGs, and stream windows that never open.

The same listener also plays Apple's *broadcast* side (APNS.md §6), so one mock serves a whole
test: the channel management API (``POST/GET/DELETE /1/apps/<bundleId>/channels``,
``GET /1/apps/<bundleId>/all-channels``; on APNs a separate host on port 2195/2196) and broadcast
sends (``POST /4/broadcasts/apps/<bundleId>``; on APNs port 443). Both verify the JWT like device
pushes and answer Apple's §6.3 reasons with an ``apns-request-id`` header (echoed if the request
carried a valid UUID, else generated). Channels live in ``stats.channels``; 200 broadcasts are
counted per channel in ``stats.broadcasts``. Broadcast rules the docs leave open are settled
strictly here: a No-Message-Stored (policy 0) channel accepts only ``apns-expiration: 0``, an
*absent* header included (absent means APNs' default storage, which such a channel refuses), and a
suffixed bundle id (``com.example.app.push-type.liveactivity``) is ``400 TopicDisallowed``. These
paths always validate (``validate=False`` only affects device pushes).

Everything the mock saw is counted in :class:`MockStats`, so tests can assert exactly-once
delivery (``stats.delivered``) and protocol hygiene (``stats.protocol_errors == []``,
``stats.streams_after_goaway == 0``).

Typical use in a trio test::

    async with trio.open_nursery() as nursery:
        mock = await open_mock(nursery, MockConfig(team_id=key.team_id,
                                                   keys={key.key_id: key.public_key}), pki)
        ...  # push to https://localhost:{mock.port}
        nursery.cancel_scope.cancel()
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import logging
import random
import re
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import jwt
import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from ..errors import redact
from .devcerts import TestPKI, server_ssl_context

__all__ = ["MockAPNs", "MockConfig", "MockStats", "open_mock"]

log = logging.getLogger("fanout.mock")

#: Topic suffix each ``apns-push-type`` requires after the bundle id (APNS.md §2.1).
PUSH_TYPE_TOPIC_SUFFIX: dict[str, str] = {
    "alert": "",
    "background": "",
    "mdm": "",
    "location": ".location-query",
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
    "widgets": ".push-type.widgets",
    "controls": ".push-type.controls",
}
_SUFFIXES = sorted(set(PUSH_TYPE_TOPIC_SUFFIX.values()), key=len, reverse=True)

STREAM_LIMIT_VIOLATION = "Maximum active streams violated for this endpoint."

_PREFACE_LEN = 24
_FRAME_HEADER_LEN = 9
_FRAME_HEADERS = 0x1
_MAX_FRAME_SIZE = 16_384  # h2's default SETTINGS_MAX_FRAME_SIZE, which the mock keeps
_READ_SIZE = 65_536
_BODY_CAP = 8_192  # bytes buffered per stream; anything longer is too large anyway
_PRIORITIES = frozenset({b"10", b"5", b"1"})
_HEX = re.compile(rb"[0-9a-fA-F]+")
_UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_GOAWAY_PING = b"fanoutGA"  # PING sent right after our GOAWAY; its ACK proves the client saw it
_SERVER_PING = b"fanoutSP"  # server_ping_interval's PINGs
_STOPPED_POLL = 0.1  # stop_reading_after: how often a connection that stopped reading checks
# whether the client went away (the socket's TCP state; it cannot read the EOF)
_TCP_ESTABLISHED = 1  # tcpi_state in Linux's struct tcp_info
_LINGER = 0.5  # seconds to wait for the client's EOF before closing our side
_DRAIN_TIMEOUT = 5.0  # seconds after a GOAWAY before the connection is closed regardless
_HOLD_FALLBACK = 0.05  # goaway_last_stream_low: GOAWAY this soon if the client stops sending
_GOAWAY_HOLD = 10  # goaway_last_stream_low: at most this many streams (and at most half of
# goaway_after) are left unanswered above the last-stream-id
_MAX_CLOCK_SKEW = 300.0  # seconds a JWT's iat may lie in the future
_JWT_CACHE_MAX = 4_096
_JWS = jwt.PyJWS(algorithms=["ES256"])
_STATUS_BYTES = {
    code: str(code).encode()
    for code in (200, 201, 204, 400, 403, 404, 405, 410, 413, 429, 500, 503)
}
_BROADCAST_PAYLOAD_LIMIT = 5120
_CHANNEL_ID_MAX = 128  # characters of base64; Apple: "bad base64 or too long", size not fixed
_BROADCAST_PREFIX = b"/4/broadcasts/apps/"
_MANAGE_PREFIX = b"/1/apps/"
_CHANNEL_FIELDS = frozenset({"message-storage-policy", "push-type"})


@dataclass
class MockConfig:
    """How the mock validates and misbehaves. Fields may be changed while the mock runs."""

    team_id: str | None = None
    """Expected JWT ``iss``; ``None`` accepts any issuer."""
    keys: dict[str, EllipticCurvePublicKey] = field(default_factory=dict)
    """``kid`` -> public key. Empty: accept any well-formed ES256 JWT without checking signatures."""
    validate: bool = True
    """``False``: fast accept-all mode for benchmarks: no request checks (not even h2's header
    validation); faults still apply."""
    topics: set[str] | None = None
    """Allowed bundle ids (the push type's suffix is added per APNS.md §2.1); ``None``: any."""
    token_max_age: float = 3600.0
    """A JWT whose ``iat`` is older than this many seconds gets 403 ExpiredProviderToken."""
    token_update_min_interval: float = 0.0
    """If > 0: a new JWT sooner than this after the previous one on a connection gets
    429 TooManyProviderTokenUpdates (APNs uses 20 minutes)."""
    bind_key_to_connection: bool = True
    """With ``keys``: a JWT from another key than the connection's first gets 403
    UnrelatedKeyIdInToken, as on APNs."""
    initial_max_streams: int = 1
    """SETTINGS_MAX_CONCURRENT_STREAMS at connect, until the first request with a valid token."""
    max_streams: int = 1000
    """Stream limit announced (new SETTINGS frame) after the first valid authenticated request."""
    drop_to_one_on_reject: bool = True
    """After a rejected push (4xx but 410) announce a limit of 1; restore after the next 200."""
    penalty_accepts: int = 1
    """Accepted pushes needed on the connection before a dropped limit is restored (APNs
    was seen restoring on the next one; a larger number models a stricter server)."""
    latency: float = 0.0
    """Seconds added before each answer, per stream (other streams are not held up)."""
    jitter: float = 0.0
    """Uniform ± jitter seconds added to ``latency``."""
    p429: float = 0.0
    """Fraction of otherwise valid pushes answered 429 TooManyRequests."""
    p500: float = 0.0
    """Fraction of requests answered 500 InternalServerError."""
    p503: float = 0.0
    """Fraction of requests answered 503 ServiceUnavailable."""
    retry_after: int | None = None
    """If set, 429 and 503 answers carry ``retry-after: <seconds>``."""
    unregistered: Callable[[str], bool] | set[str] | None = None
    """Tokens answered 410 Unregistered (with a ``timestamp`` in ms)."""
    unregistered_fraction: float = 0.0
    """Fraction of tokens answered 410, chosen by a hash of the token: stable across runs."""
    bad_token_fraction: float = 0.0
    """Fraction of tokens answered 400 BadDeviceToken (a rejection: the stream limit drops
    to 1), chosen by a hash of the token from the other end of the range than 410's."""
    token_topic: str | None = None
    """The bundle id every device token belongs to: a push to another (allowed) topic gets
    400 DeviceTokenNotForTopic for every token, as APNs answers a sender with the wrong
    topic. ``None``: tokens fit any topic."""
    environment: str = "production"
    sandbox_token_fraction: float = 0.0
    """Fraction of tokens that belong to the sandbox (by a hash of the token, from the middle
    of the range); the rest belong to production. When set, a token of the other
    environment than ``environment`` is answered 400 BadDeviceToken, as Apple does."""
    goaway_after: int | None = None
    """Per connection: GOAWAY after this many streams, answer those at or below the
    last-stream-id, then close."""
    goaway_reason: str = "Shutdown"
    """Reason in the GOAWAY debug data (``{"reason": ...}``)."""
    goaway_last_stream_low: bool = False
    """The GOAWAY's last-stream-id is below the last streams received (up to 10 of them, at most
    half of ``goaway_after``), which are never answered: the client must resend them elsewhere.
    If the client stops opening streams while some are held, the GOAWAY comes after 50 ms."""
    close_after: int | None = None
    """Per connection: answer this many streams, then close the TCP connection without GOAWAY."""
    never_answer: float = 0.0
    """Fraction of streams never answered (they stay open)."""
    expired_token_wedge: bool = False
    """After an ExpiredProviderToken, answer every later stream on that connection the same."""
    seed: int = 0
    """Seed of the random faults (p429, p500, p503, never_answer, jitter)."""
    alpn: bool = True
    """``False``: serve TLS without ALPN ``h2`` (a correct client refuses to talk)."""
    record_bodies: bool = False
    """Keep (priority, body) of every accepted device push in ``stats.bodies`` (tests)."""
    broadcast_enabled: bool = True
    """``False``: the app's Broadcast Capability is off: every channel-management request and
    broadcast send gets 400 FeatureNotEnabled."""
    max_channels: int = 10_000
    """Channels per bundle id; creating one more gets 400 CannotCreateChannelConfig."""
    stop_reading_after: int | None = None
    """Per connection: once this many complete requests were received (silent ones included),
    the mock stops reading that connection's socket for good (0: nothing after the TLS
    handshake, not even the client's preface). Nothing after them is processed (frames behind
    the last one in the same read are dropped unseen) or read, so the client's socket send
    buffer fills and its writes block. Requests already received are still answered and writing
    goes on (answers, ``server_ping_interval`` PINGs, GOAWAY). A stopped connection ends when a
    write fails, when the mock stops, or (Linux) within 0.1 s of the client's FIN or RST reaching
    the socket (a FIN queued behind data the mock does not read never arrives)."""
    server_ping_interval: float | None = None
    """Every connection sends an HTTP/2 PING (data ``fanoutSP``) every this many seconds, whatever
    else it does (stopped reading included), until it closes; counted in ``stats.server_pings``
    and, when the client's ACK is read, ``stats.server_ping_acks``. Read when a connection opens
    (later changes of the interval apply from the next PING; ``None`` then stops them)."""
    initial_window_size: int | None = None
    """SETTINGS_INITIAL_WINDOW_SIZE announced in the server's first SETTINGS (and enforced by h2
    from the start, see :class:`_Connection`). When set, the mock never opens a stream's window
    (no stream WINDOW_UPDATE, ever): each request can carry at most this many body bytes, and with
    0 none at all, so a request with a body never completes. The connection window is credited
    back for a stream's bytes once the stream is answered. Read when a connection opens."""
    expire_token_once_after: int | None = None
    """After this many 200 answers across the whole mock (``stats.by_status[200]``, so
    :meth:`MockStats.reset` restarts the count), the next request whose token is otherwise valid
    gets 403 ExpiredProviderToken, once (set another value to arm it again); later requests are
    validated normally. The connection's token is not replaced by that request's, so a fresh
    token on the same connection is then subject to ``token_update_min_interval`` (429
    TooManyProviderTokenUpdates), as on APNs. With ``expired_token_wedge`` the connection wedges.
    Needs ``validate=True`` for device pushes."""


@dataclass
class MockStats:
    """What the mock saw. Per-connection lists are indexed by connection number."""

    requests: int = 0
    """Complete requests received (including those never answered)."""
    by_status: Counter[int] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    delivered: Counter[str] = field(default_factory=Counter)
    """Token -> number of 200 answers sent."""
    seen: Counter[str] = field(default_factory=Counter)
    """Token -> number of complete requests received."""
    connections: int = 0
    """TLS connections accepted (handshake completed)."""
    streams_per_connection: list[int] = field(default_factory=list)
    max_concurrent: list[int] = field(default_factory=list)
    rejected_per_connection: list[int] = field(default_factory=list)
    """Rejections (4xx but 410: those that drop the stream limit) per connection."""
    jwts: set[str] = field(default_factory=set)
    """SHA-256 hex digests of the distinct JWTs seen (never the JWTs themselves)."""
    goaways_sent: int = 0
    closes: int = 0
    """Connections closed abruptly (``close_after``)."""
    never_answered: int = 0
    streams_after_goaway: int = 0
    """New streams opened after the client acknowledged a PING sent right behind our GOAWAY."""
    stopped_reading: int = 0
    """Connections that stopped reading (``stop_reading_after``)."""
    server_pings: int = 0
    """PINGs sent by ``server_ping_interval``."""
    server_ping_acks: int = 0
    """ACKs of those PINGs read from clients."""
    protocol_errors: list[str] = field(default_factory=list)
    """HTTP/2 violations by the client (stream-limit excess, h2 ProtocolError)."""
    broadcasts: Counter[str] = field(default_factory=Counter)
    bodies: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    """With ``record_bodies``: token -> [(apns-priority, body)] of accepted device pushes."""
    """Channel id -> number of broadcast pushes answered 200."""
    channels: dict[str, dict[str, int]] = field(default_factory=dict)
    """The live broadcast channels: bundle id -> {channel id: message-storage-policy}. This is
    the mock's channel registry (server state): tests may edit it, and :meth:`reset` keeps it."""

    def reset(self) -> None:
        """Forget everything but :attr:`channels` (connections already open keep counting into
        the new numbers, except their per-connection entries)."""
        fresh = MockStats()
        for f in dataclasses.fields(self):
            if f.name != "channels":
                setattr(self, f.name, getattr(fresh, f.name))


@dataclass(slots=True)
class _TokenInfo:
    """Cached facts about one JWT string; the signature check is done once per key."""

    digest: str
    malformed: bool
    kid: str | None = None
    iss: object = None
    iat: float | None = None
    key: EllipticCurvePublicKey | None = None  # key the signature was checked against
    valid: bool = False


def _parse_jwt(token: bytes) -> _TokenInfo:
    digest = hashlib.sha256(token).hexdigest()
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return _TokenInfo(digest, malformed=True)
    iat = claims.get("iat")
    if header.get("alg") != "ES256" or not isinstance(claims, dict):
        return _TokenInfo(digest, malformed=True)
    if not isinstance(iat, int | float) or isinstance(iat, bool):
        iat = None
    kid = header.get("kid")
    return _TokenInfo(digest, False, kid if isinstance(kid, str) else None, claims.get("iss"), iat)


def _signature_ok(token: bytes, key: EllipticCurvePublicKey) -> bool:
    try:
        _JWS.decode(token, key, algorithms=["ES256"])
    except jwt.PyJWTError:
        return False
    return True


def is_sandbox_token(token: str, config: MockConfig) -> bool:
    """Whether ``token`` is a sandbox token under ``config.sandbox_token_fraction``."""
    h = _hash_fraction(token)
    return 0.5 <= h < 0.5 + config.sandbox_token_fraction


def _hash_fraction(token: str) -> float:
    """A stable number in [0, 1) for a token (the same token always gets the same number)."""
    digest = hashlib.sha256(b"fanout-mock:" + token.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _topic_reason(topic: str, push_type: str | None, allowed: set[str]) -> str | None:
    """``None`` if ``topic`` fits ``push_type`` for an allowed bundle id, else the APNs reason."""

    def base_allowed(suffix: str) -> bool:
        return topic.endswith(suffix) and topic[: len(topic) - len(suffix)] in allowed

    if push_type is not None and base_allowed(PUSH_TYPE_TOPIC_SUFFIX[push_type]):
        return None
    fits_some_type = any(base_allowed(s) for s in _SUFFIXES)
    if push_type is None:  # no push type: APNs infers it from the topic
        return None if fits_some_type else "TopicDisallowed"
    return "BadTopic" if fits_some_type else "TopicDisallowed"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Stream:
    """One request being received or waiting for its answer."""

    __slots__ = ("id", "headers", "body", "silent", "abort_after")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.id = stream_id
        self.headers = headers
        self.body = bytearray()
        self.silent = False  # held back by a fault: never answered
        self.abort_after = False  # close_after: close the connection once this one is answered


class _Answer:
    __slots__ = ("status", "reason", "apns_id", "token", "auth_ok", "extra", "body")

    def __init__(
        self,
        status: int,
        reason: str | None,
        apns_id: bytes,
        token: str | None,
        auth_ok: bool,
        extra: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> None:
        self.status = status
        self.reason = reason
        self.apns_id = apns_id
        self.token = token
        self.auth_ok = auth_ok
        # Broadcast / channel answers: headers after :status (apns-request-id first) and the
        # success body; device answers leave ``extra`` None.
        self.extra = extra
        self.body = body


def _request_id(fields: dict[bytes, bytes]) -> tuple[bytes, bool]:
    """The ``apns-request-id`` to answer with, and whether the request's one was malformed."""
    given = fields.get(b"apns-request-id")
    if given is not None and _UUID.fullmatch(given) is not None:
        return given, False
    return str(uuid.uuid4()).encode(), given is not None


def _channel_id_reason(value: bytes | None) -> str | None:
    """MissingChannelId / BadChannelId for an ``apns-channel-id`` header, or ``None``."""
    if not value:
        return "MissingChannelId"
    if len(value) > _CHANNEL_ID_MAX:
        return "BadChannelId"
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "BadChannelId"
    return None


def _bundle_reason(bundle: str) -> str | None:
    """Why a bundle id in a broadcast/channel path is refused: a push-type suffix
    (TopicDisallowed) or a malformed id (BadPath), else ``None``."""
    if _TOPIC.fullmatch(bundle) is None:
        return "BadPath"
    if ".push-type." in bundle or any(s and bundle.endswith(s) for s in _SUFFIXES):
        return "TopicDisallowed"
    return None


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


def _channel_body_reason(body: bytearray) -> str | None:
    """Why a create-channel body is refused (APNS.md §6.1/§6.3), or ``None``."""
    if not body:
        return "PayloadEmpty"
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return "BadRequestPayload"
    if not isinstance(parsed, dict):
        return "BadRequestPayload"
    if set(parsed) - _CHANNEL_FIELDS or not _CHANNEL_FIELDS <= set(parsed):
        return "BadRequestParams"  # unknown or missing attribute
    policy = parsed["message-storage-policy"]
    if type(policy) is not int or policy not in (0, 1):
        return "BadRequestParams"
    push_type = parsed["push-type"]
    if not isinstance(push_type, str):
        return "BadRequestParams"
    if push_type != "LiveActivity":
        return "InvalidPushType"  # §6.3: only LiveActivity is allowed
    return None


class _Connection:
    """Server side of one HTTP/2 connection: a reader feeding h2 and a writer flushing it.

    The server's first SETTINGS are h2's ``local_settings`` built with ``initial_values``: h2
    sends exactly those values (``initiate_connection``) and treats them as current at once, not
    only after the client's ACK (later changes, made with ``update_settings``, apply on the ACK).
    So an announced SETTINGS_INITIAL_WINDOW_SIZE is the window h2 gives every inbound stream, and
    a client that overruns it gets h2's FLOW_CONTROL_ERROR. (The connection window is not a
    setting: h2 keeps 65,535 for it.)
    """

    def __init__(
        self, mock: MockAPNs, stream: trio.SSLStream[trio.SocketStream], index: int
    ) -> None:
        self.mock = mock
        self.stream = stream
        self.index = index
        stats = mock.stats
        self._per_conn_streams = stats.streams_per_connection  # kept across stats.reset()
        self._per_conn_concurrent = stats.max_concurrent
        self._per_conn_rejected = stats.rejected_per_connection
        cfg = mock.config
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=cfg.validate,  # h2's check costs ~20 µs a request
                validate_outbound_headers=False,  # our own answers are well-formed
                normalize_outbound_headers=False,
            )
        )
        initial_values = {
            SettingCodes.HEADER_TABLE_SIZE: 4096,
            SettingCodes.MAX_CONCURRENT_STREAMS: cfg.initial_max_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: 8000,
        }
        # initial_window_size: stream windows are never opened; a stream's bytes are credited
        # to the connection window once it is answered (stream id -> bytes held)
        self._held_credit: dict[int, int] | None = None
        if cfg.initial_window_size is not None:
            initial_values[SettingCodes.INITIAL_WINDOW_SIZE] = cfg.initial_window_size
            self._held_credit = {}
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values=initial_values)
        self.conn.decoder.max_header_list_size = 8000
        self.conn.initiate_connection()
        self.advertised_limit = cfg.initial_max_streams
        self._authenticated = False
        self._penalty = 0  # accepted pushes still needed before the limit is restored
        self._wedged = False
        self._kid: str | None = None
        self._jwt: bytes | None = None
        self._jwt_since = 0.0

        self._inbuf = bytearray()
        self._out = bytearray()
        self._preface_done = False
        self._streams: dict[int, _Stream] = {}  # open inbound streams, as h2 counts them
        self._pending: set[int] = set()  # streams we will answer (a GOAWAY drain waits for them)
        self._count = 0  # streams opened on this connection
        self._max_sid = 0
        self._last_unheld = 0
        self._holding = False
        self._goaway_last: int | None = None
        self._goaway_acked = False
        self._dead = False  # stop feeding h2 (protocol error or abort)
        self._halt = False  # stop feeding frames: _dead, or stopped reading
        self._stopped = False  # stop_reading_after reached: never read the socket again
        self._completed = 0  # complete requests received on this connection
        self._close_mode: Literal["graceful", "abort"] | None = None
        self._wake = trio.Event()
        self._reader_scope = trio.CancelScope()
        self._reader_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._debug = log.isEnabledFor(logging.DEBUG)

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write_loop)
            if self.mock.config.server_ping_interval is not None:
                nursery.start_soon(self._ping_loop)
            self._kick()  # our SETTINGS
            with self._reader_scope:
                await self._read_loop()
            self._reader_done.set()
            if self._close_mode is None:  # the client went away
                nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        try:
            stop = self.mock.config.stop_reading_after
            if stop is not None and stop <= 0:
                self._stop_reading()  # not even the client's preface
            while not self._stopped:
                data = await self.stream.receive_some(_READ_SIZE)
                if not data:
                    return
                if not self._dead:
                    self._receive(data)
                    self._kick()
            await self._wait_client_gone()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            return

    async def _wait_client_gone(self) -> None:
        """Stopped reading: return once the TCP connection is no longer established (the client's
        FIN or RST arrived, or we closed our side), seen without reading the socket."""
        tcp_info = getattr(socket, "TCP_INFO", None)
        if tcp_info is None:  # not Linux: only a failed write or a cancel ends the connection
            await trio.sleep_forever()
        sock = self.stream.transport_stream.socket
        while True:  # ends when the client is gone, or by cancellation with the connection
            try:
                state = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 8)[0]
            except OSError:
                return
            if state != _TCP_ESTABLISHED:
                return
            await trio.sleep(_STOPPED_POLL)

    async def _ping_loop(self) -> None:
        """server_ping_interval: a PING every interval until the connection closes."""
        while True:  # ends when the connection closes or the interval is set to None
            interval = self.mock.config.server_ping_interval
            if interval is None:
                return
            await trio.sleep(interval)
            if self._dead or self._close_mode is not None:
                return
            try:
                self.conn.ping(_SERVER_PING)
            except h2.exceptions.ProtocolError:  # h2 has closed the connection
                return
            self.mock.stats.server_pings += 1
            self._kick()

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while True:  # more may be queued while we send: flush it all before closing
                    self._out += self.conn.data_to_send()
                    if not self._out:
                        break
                    data = bytes(self._out)
                    self._out.clear()
                    await self.stream.send_all(data)
                if self._close_mode is not None:
                    await self._finish_close(self._close_mode)
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
        # The connection is over: its timers (drain deadline, held-stream GOAWAY) go with it.
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _finish_close(self, mode: Literal["graceful", "abort"]) -> None:
        """Close after everything queued was sent, letting the client read it first."""
        transport = self.stream.transport_stream
        if mode == "abort":
            try:
                await transport.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass
        with trio.move_on_after(_LINGER):
            await self._reader_done.wait()
        self._reader_scope.cancel()
        await self._reader_done.wait()
        if mode == "abort":
            await trio.aclose_forcefully(transport)
        else:
            with trio.move_on_after(_LINGER):
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await trio.aclose_forcefully(self.stream)

    def _kick(self) -> None:
        self._wake.set()

    def _close(self, mode: Literal["graceful", "abort"]) -> None:
        if self._close_mode is not None:
            return
        self._close_mode = mode
        if mode == "abort":
            self._dead = self._halt = True
            self.mock.stats.closes += 1
        self._kick()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # ---------------------------------------------------------------- inbound frames

    def _receive(self, data: bytes) -> None:
        """Split ``data`` into frames and feed h2 one frame at a time.

        One frame per call keeps h2's events when a later frame raises, lets the mock refuse
        a stream that exceeds the limit before h2 sees it, and ignores streams above the
        last-stream-id of our GOAWAY (h2 itself cannot keep serving after a GOAWAY).
        """
        buf = self._inbuf
        buf += data
        pos = 0
        if not self._preface_done:
            if len(buf) < _PREFACE_LEN:
                return
            self._feed(bytes(buf[:_PREFACE_LEN]))
            pos = _PREFACE_LEN
            self._preface_done = True
        size = len(buf)
        while not self._halt and size - pos >= _FRAME_HEADER_LEN:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if length > _MAX_FRAME_SIZE:  # let h2 raise FrameTooLargeError
                self._feed(bytes(buf[pos:]))
                break
            end = pos + _FRAME_HEADER_LEN + length
            if end > size:
                break
            frame_type = buf[pos + 3]
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            frame = bytes(buf[pos:end])
            pos = end
            if stream_id == 0 or self._admit(frame_type, stream_id):
                self._feed(frame)
        if self._dead:
            buf.clear()
        else:
            del buf[:pos]

    def _admit(self, frame_type: int, stream_id: int) -> bool:
        """Whether a frame on ``stream_id`` goes to h2 (see :meth:`_receive`)."""
        if frame_type == _FRAME_HEADERS and stream_id > self._max_sid:  # opens a new stream
            self._max_sid = stream_id
            if self._goaway_last is not None:
                if self._goaway_acked:
                    self.mock.stats.streams_after_goaway += 1
                return False
            limit = self.conn.local_settings.max_concurrent_streams
            if len(self._streams) >= limit:
                self.mock.stats.protocol_errors.append(
                    f"connection {self.index}: stream {stream_id} opened with {len(self._streams)}"
                    f" streams open, MAX_CONCURRENT_STREAMS={limit}"
                )
                self._goaway(
                    self.conn.highest_inbound_stream_id,
                    ErrorCodes.REFUSED_STREAM,
                    STREAM_LIMIT_VIOLATION.encode(),
                )
                return False
            return True
        return self._goaway_last is None or stream_id <= self._goaway_last

    def _feed(self, frame: bytes) -> None:
        try:
            events = self.conn.receive_data(frame)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the right error code; send it and close.
            self.mock.stats.protocol_errors.append(
                f"connection {self.index}: {type(exc).__name__}: {exc}"
            )
            self.mock.stats.goaways_sent += 1
            self._dead = self._halt = True
            self._close("graceful")
            return
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                self._on_data(event)
            elif kind is h2.events.RequestReceived:
                self._on_request(event)
            elif kind is h2.events.StreamEnded:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    self._on_complete(stream)
            elif kind is h2.events.StreamReset:
                self._streams.pop(event.stream_id, None)
                self._pending.discard(event.stream_id)
                if self._held_credit:
                    self._release_credit(event.stream_id)
                self._check_drain()
            elif kind is h2.events.PingAckReceived:
                if event.ping_data == _GOAWAY_PING:
                    self._goaway_acked = True
                elif event.ping_data == _SERVER_PING:
                    self.mock.stats.server_ping_acks += 1
            elif kind is h2.events.ConnectionTerminated:
                # The client's GOAWAY: h2 can no longer answer anything, so just close.
                self._dead = self._halt = True
                self._close("graceful")

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        stream = _Stream(sid, event.headers)  # type: ignore[arg-type]
        self._streams[sid] = stream
        self._count = n = self._count + 1
        self._per_conn_streams[self.index] += 1
        if len(self._streams) > self._per_conn_concurrent[self.index]:
            self._per_conn_concurrent[self.index] = len(self._streams)
        cfg = self.mock.config
        if cfg.close_after is not None and n >= cfg.close_after:
            stream.abort_after = n == cfg.close_after
            stream.silent = n > cfg.close_after
        if cfg.goaway_after is not None and self._goaway_last is None:
            hold = max(1, min(_GOAWAY_HOLD, cfg.goaway_after // 2))
            if cfg.goaway_last_stream_low and n > cfg.goaway_after - hold:
                stream.silent = True
                if not self._holding:
                    self._holding = True
                    self._spawn(self._goaway_if_stalled)
            else:
                self._last_unheld = sid
        if not stream.silent:
            self._pending.add(sid)
        if cfg.goaway_after is not None and n >= cfg.goaway_after:
            self._goaway(self._last_unheld if cfg.goaway_last_stream_low else sid)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None and len(stream.body) <= _BODY_CAP:
            stream.body += event.data
        if event.flow_controlled_length:
            held = self._held_credit
            if held is None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:  # initial_window_size: never reopen the stream's window
                held[event.stream_id] = held.get(event.stream_id, 0) + event.flow_controlled_length

    def _release_credit(self, stream_id: int) -> None:
        """initial_window_size: credit a finished stream's bytes to the connection window only
        (h2 does not open the windows of streams that are closed)."""
        assert self._held_credit is not None
        size = self._held_credit.pop(stream_id, 0)
        if size and not self._dead:
            self.conn.acknowledge_received_data(size, stream_id)

    def _on_complete(self, stream: _Stream) -> None:
        stats = self.mock.stats
        stats.requests += 1
        token = self._token_of(stream)
        if token is not None:
            stats.seen[token] += 1
        cfg = self.mock.config
        self._completed = n = self._completed + 1
        if cfg.stop_reading_after is not None and n >= cfg.stop_reading_after:
            self._stop_reading()
        if stream.silent:
            return
        rng = self.mock.rng
        if cfg.never_answer and rng.random() < cfg.never_answer:
            stats.never_answered += 1
            self._pending.discard(stream.id)
            if stream.abort_after:
                self._close("abort")
            self._check_drain()
            return
        delay = cfg.latency
        if cfg.jitter:
            delay += rng.uniform(-cfg.jitter, cfg.jitter)
        if delay > 0:
            self._spawn(self._answer_later, stream, delay)
        else:
            self._answer(stream)

    def _stop_reading(self) -> None:
        """stop_reading_after: feed no more frames and never read the socket again."""
        if not self._stopped:
            self._stopped = self._halt = True
            self.mock.stats.stopped_reading += 1
            if self._debug:
                log.debug("connection %d: stopped reading", self.index)

    @staticmethod
    def _token_of(stream: _Stream) -> str | None:
        for name, value in stream.headers:
            if name == b":path":
                if value.startswith(b"/3/device/") and len(value) > 10:
                    return value[10:].decode("ascii", "replace")
                return None
        return None

    # ---------------------------------------------------------------- GOAWAY

    def _goaway(
        self, last_stream_id: int, code: int = ErrorCodes.NO_ERROR, debug: bytes | None = None
    ) -> None:
        """Send GOAWAY (crafted by hand so that h2 keeps serving streams <= last_stream_id)."""
        if self._goaway_last is not None:
            return
        if debug is None:
            debug = msgspec.json.encode({"reason": self.mock.config.goaway_reason})
        self._goaway_last = last_stream_id
        self._out += self.conn.data_to_send()
        self._out += GoAwayFrame(
            0, last_stream_id=last_stream_id, error_code=code, additional_data=debug
        ).serialize()
        self.conn.ping(_GOAWAY_PING)
        self.mock.stats.goaways_sent += 1
        if self._debug:
            log.debug(
                "connection %d: GOAWAY last-stream-id=%d code=%d", self.index, last_stream_id, code
            )
        self._spawn(self._drain_deadline)
        self._check_drain()
        self._kick()

    def _check_drain(self) -> None:
        """After our GOAWAY, close once every stream at or below last-stream-id is answered."""
        last = self._goaway_last
        if last is None or self._close_mode is not None:
            return
        if all(sid > last for sid in self._pending):
            self._close("graceful")

    async def _drain_deadline(self) -> None:
        await trio.sleep(_DRAIN_TIMEOUT)
        self._close("graceful")

    async def _goaway_if_stalled(self) -> None:
        """goaway_last_stream_low: a client that waits for held streams still gets its GOAWAY."""
        await trio.sleep(_HOLD_FALLBACK)
        if self._goaway_last is None and not self._dead:
            self._goaway(self._last_unheld)

    # ---------------------------------------------------------------- answers

    async def _answer_later(self, stream: _Stream, delay: float) -> None:
        await trio.sleep(delay)
        self._answer(stream)
        self._kick()

    def _answer(self, stream: _Stream) -> None:
        if self._dead or self._close_mode is not None or self._streams.get(stream.id) is not stream:
            return
        mock = self.mock
        try:
            answer = self._evaluate(stream)
        except Exception:  # a mock bug must not take the connection down
            log.exception("connection %d: evaluating stream %d failed", self.index, stream.id)
            answer = _Answer(500, "InternalServerError", str(uuid.uuid4()).encode(), None, False)
        status, reason = answer.status, answer.reason
        if answer.extra is not None:  # broadcast / channel management
            headers, body = self._broadcast_response(answer)
        elif status == 200:
            headers = [(b":status", b"200"), (b"apns-id", answer.apns_id)]
            body = b""
        else:
            error: dict[str, object] = {"reason": reason}
            if status == 410:
                error["timestamp"] = int(time.time() * 1000)
            body = msgspec.json.encode(error)
            headers = [
                (b":status", _STATUS_BYTES.get(status) or str(status).encode()),
                (b"apns-id", answer.apns_id),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            retry_after = mock.config.retry_after
            if retry_after is not None and status in (429, 503):
                headers.append((b"retry-after", str(retry_after).encode()))
        try:
            self.conn.send_headers(stream.id, headers, end_stream=not body)
            if body:
                self.conn.send_data(stream.id, body, end_stream=True)
        except h2.exceptions.ProtocolError as exc:  # stream gone or window exhausted
            log.debug("connection %d: cannot answer stream %d: %s", self.index, stream.id, exc)
            try:
                self.conn.reset_stream(stream.id, ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            self._forget(stream.id)
            if self._held_credit:
                self._release_credit(stream.id)
            return
        self._forget(stream.id)
        if self._held_credit:
            self._release_credit(stream.id)

        stats = mock.stats
        stats.by_status[status] += 1
        if reason is not None:
            stats.by_reason[reason] += 1
        elif answer.token is not None:
            stats.delivered[answer.token] += 1
        if self._debug:
            log.debug(
                "connection %d stream %d token %s -> %d %s",
                self.index,
                stream.id,
                redact(answer.token),
                status,
                reason or "",
            )

        cfg = mock.config
        if answer.auth_ok:
            self._authenticated = True
        if status < 300:  # 200, or 201/204 from channel management
            if self._penalty:
                self._penalty -= 1
        elif 400 <= status < 500 and status != 410:
            self._per_conn_rejected[self.index] += 1
            if cfg.drop_to_one_on_reject:
                self._penalty = cfg.penalty_accepts
        self.retarget_limit()
        if stream.abort_after:
            self._close("abort")
        self._check_drain()

    def _broadcast_response(self, answer: _Answer) -> tuple[list[tuple[bytes, bytes]], bytes]:
        status = answer.status
        headers = [(b":status", _STATUS_BYTES.get(status) or str(status).encode())]
        assert answer.extra is not None
        headers += answer.extra
        body = answer.body
        if answer.reason is not None:
            body = msgspec.json.encode({"reason": answer.reason})
            headers += _json_headers(body)
            retry_after = self.mock.config.retry_after
            if retry_after is not None and status in (429, 503):
                headers.append((b"retry-after", str(retry_after).encode()))
        return headers, body

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self._pending.discard(stream_id)

    def retarget_limit(self) -> None:
        """Announce the stream limit the connection's state calls for, if it changed."""
        cfg = self.mock.config
        if self._penalty:
            target = 1
        elif self._authenticated:
            target = cfg.max_streams
        else:
            target = cfg.initial_max_streams
        if target != self.advertised_limit and self._close_mode is None and not self._dead:
            self.advertised_limit = target
            self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: target})
            self._kick()

    def _evaluate(self, stream: _Stream) -> _Answer:
        """Decide the answer to a complete request, in APNs' terms."""
        cfg = self.mock.config
        rng = self.mock.rng
        method = path = None
        fields: dict[bytes, bytes] = {}
        duplicate = False
        for name, value in stream.headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
            elif name in fields:
                duplicate = True
            else:
                fields[name] = value

        given_id = fields.get(b"apns-id")
        id_ok = given_id is not None and _UUID.fullmatch(given_id) is not None
        apns_id = given_id if id_ok else str(uuid.uuid4()).encode()  # type: ignore[assignment]
        token_b = path[10:] if path is not None and path.startswith(b"/3/device/") else b""
        token = token_b.decode("ascii", "replace") if token_b else None
        if not token_b and path is not None and path[:3] in (b"/1/", b"/4/"):
            return self._evaluate_broadcast(method, path, fields, duplicate, stream.body)

        def fail(status: int, reason: str, auth_ok: bool = False) -> _Answer:
            return _Answer(status, reason, apns_id, token, auth_ok)

        if self._wedged:
            return fail(403, "ExpiredProviderToken")
        if cfg.p500 and rng.random() < cfg.p500:
            return fail(500, "InternalServerError")
        if cfg.p503 and rng.random() < cfg.p503:
            return fail(503, "ServiceUnavailable")

        auth_ok = True
        if cfg.validate:
            if method != b"POST":
                return fail(405, "MethodNotAllowed")
            if path in (b"/3/device", b"/3/device/"):
                return fail(400, "MissingDeviceToken")
            if not token_b:
                return fail(404, "BadPath")
            if len(token_b) % 2 or _HEX.fullmatch(token_b) is None:
                return fail(400, "BadDeviceToken")
            if duplicate:
                return fail(400, "DuplicateHeaders")
            reason = self._check_authorization(fields.get(b"authorization"))
            if reason is not None:
                if reason == "ExpiredProviderToken" and cfg.expired_token_wedge:
                    self._wedged = True
                status = 429 if reason == "TooManyProviderTokenUpdates" else 403
                return fail(status, reason)
            reason = self._check_headers(fields, id_ok, given_id is not None, stream.body)
            if reason is not None:
                return fail(413 if reason == "PayloadTooLarge" else 400, reason, auth_ok)

        if token is not None:
            unregistered = cfg.unregistered
            if (
                (callable(unregistered) and unregistered(token))
                or (isinstance(unregistered, set | frozenset) and token in unregistered)
                or (cfg.unregistered_fraction and _hash_fraction(token) < cfg.unregistered_fraction)
            ):
                return fail(410, "Unregistered", auth_ok)
            if cfg.bad_token_fraction and 1.0 - _hash_fraction(token) <= cfg.bad_token_fraction:
                return fail(400, "BadDeviceToken", auth_ok)
            if cfg.sandbox_token_fraction and \
                    (cfg.environment == "sandbox") != is_sandbox_token(token, cfg):
                return fail(400, "BadDeviceToken", auth_ok)
            if cfg.token_topic is not None:
                topic = fields.get(b"apns-topic", b"").decode("ascii", "replace")
                if topic != cfg.token_topic and not topic.startswith(cfg.token_topic + "."):
                    return fail(400, "DeviceTokenNotForTopic", auth_ok)
        if cfg.p429 and rng.random() < cfg.p429:
            return fail(429, "TooManyRequests", auth_ok)
        if cfg.record_bodies and token is not None:
            priority = int(fields.get(b"apns-priority", b"10"))
            self.mock.stats.bodies.setdefault(token, []).append((priority, bytes(stream.body)))
        return _Answer(200, None, apns_id, token, auth_ok)

    def _evaluate_broadcast(
        self,
        method: bytes | None,
        path: bytes,
        fields: dict[bytes, bytes],
        duplicate: bool,
        body: bytearray,
    ) -> _Answer:
        """Channel management (``/1/apps/...``) and broadcast sends (``/4/broadcasts/...``)."""
        mock = self.mock
        cfg = mock.config
        request_id, bad_request_id = _request_id(fields)
        auth_ok = False

        def answer(
            status: int,
            reason: str | None = None,
            extra: list[tuple[bytes, bytes]] | None = None,
            body: bytes = b"",
        ) -> _Answer:
            headers = [(b"apns-request-id", request_id)]
            if extra:
                headers += extra
            return _Answer(status, reason, request_id, None, auth_ok, headers, body)

        if self._wedged:
            return answer(403, "ExpiredProviderToken")
        if cfg.p500 and mock.rng.random() < cfg.p500:
            return answer(500, "InternalServerError")
        if cfg.p503 and mock.rng.random() < cfg.p503:
            return answer(503, "ServiceUnavailable")

        # Route: (operation, bundle id)
        path = path.partition(b"?")[0]
        if path.startswith(_BROADCAST_PREFIX):
            bundle_b, op = path[len(_BROADCAST_PREFIX) :], "broadcast"
            allowed = (b"POST",)
        elif path.startswith(_MANAGE_PREFIX):
            bundle_b, _, tail = path[len(_MANAGE_PREFIX) :].partition(b"/")
            if tail == b"channels":
                op = {b"POST": "create", b"GET": "read", b"DELETE": "delete"}.get(
                    method or b"", "channels"
                )
                allowed = (b"POST", b"GET", b"DELETE")
            elif tail == b"all-channels":
                op, allowed = "list", (b"GET",)
            else:
                return answer(404, "BadPath")
        else:
            return answer(404, "BadPath")
        if not bundle_b or b"/" in bundle_b:
            return answer(404, "BadPath")
        if method not in allowed:
            return answer(405, "MethodNotAllowed")
        if duplicate:
            return answer(400, "DuplicateHeaders")
        reason = self._check_authorization(fields.get(b"authorization"))
        if reason is not None:
            if reason == "ExpiredProviderToken" and cfg.expired_token_wedge:
                self._wedged = True
            return answer(429 if reason == "TooManyProviderTokenUpdates" else 403, reason)
        auth_ok = True
        bundle = bundle_b.decode("ascii", "replace")
        reason = _bundle_reason(bundle)
        if reason is not None:
            return answer(404 if reason == "BadPath" else 400, reason)
        if cfg.topics is not None and bundle not in cfg.topics:
            return answer(403, "TopicMismatch")
        if not cfg.broadcast_enabled:
            return answer(400, "FeatureNotEnabled")
        if bad_request_id:
            return answer(400, "BadMessageId")
        apns_id = fields.get(b"apns-id")
        if apns_id is not None and _UUID.fullmatch(apns_id) is None:
            return answer(400, "BadMessageId")
        channels = mock.stats.channels.get(bundle) or {}

        if op == "list":
            listing = msgspec.json.encode({"channels": list(channels)})
            return answer(200, None, _json_headers(listing), listing)
        if op == "create":
            reason = _channel_body_reason(body)
            if reason is not None:
                return answer(400, reason)
            if len(channels) >= cfg.max_channels:
                return answer(400, "CannotCreateChannelConfig")
            channel_id = base64.b64encode(secrets.token_bytes(16)).decode("ascii")
            channels = mock.stats.channels.setdefault(bundle, channels)
            channels[channel_id] = msgspec.json.decode(body)["message-storage-policy"]
            return answer(201, None, [(b"apns-channel-id", channel_id.encode("ascii"))])

        channel_b = fields.get(b"apns-channel-id")
        reason = _channel_id_reason(channel_b)
        if reason is not None:
            return answer(400, reason)
        assert channel_b is not None
        channel_id = channel_b.decode("ascii")
        policy = channels.get(channel_id)
        if op == "read":
            if policy is None:
                return answer(400, "ChannelNotRegistered")
            info = msgspec.json.encode(
                {"message-storage-policy": policy, "push-type": "LiveActivity"}
            )
            return answer(200, None, _json_headers(info), info)
        if op == "delete":
            if channels.pop(channel_id, None) is None:
                return answer(400, "ChannelNotRegistered")
            return answer(204)

        # op == "broadcast"
        push_type = fields.get(b"apns-push-type")
        if push_type is None:
            return answer(400, "MissingPushType")
        if push_type.lower() != b"liveactivity":
            return answer(400, "InvalidPushType")
        if policy is None:
            return answer(400, "ChannelNotRegistered")
        priority = fields.get(b"apns-priority")
        if priority is not None and priority not in _PRIORITIES:
            return answer(400, "BadPriority")
        expiration = fields.get(b"apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return answer(400, "BadExpirationDate")
        if policy == 0 and (expiration is None or int(expiration) != 0):
            return answer(400, "BadExpirationDate")  # No Message Stored: only 0 (see module doc)
        if not body:
            return answer(400, "PayloadEmpty")
        if len(body) > _BROADCAST_PAYLOAD_LIMIT:
            return answer(413, "PayloadTooLarge")
        try:
            payload = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return answer(400, "BadRequestPayload")
        if not isinstance(payload, dict):
            return answer(400, "BadRequestPayload")
        if cfg.p429 and mock.rng.random() < cfg.p429:
            return answer(429, "TooManyRequests")
        mock.stats.broadcasts[channel_id] += 1
        return answer(200)

    def _check_authorization(self, value: bytes | None) -> str | None:
        """The 403/429 reason for an ``authorization`` header, or ``None`` if it is good."""
        if not value:
            return "MissingProviderToken"
        scheme, _, token = value.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer":
            return "InvalidProviderToken"
        if not token:
            return "MissingProviderToken"
        mock = self.mock
        cfg = mock.config
        info = mock.token_info(token)
        if info.malformed:
            return "InvalidProviderToken"
        if cfg.keys:
            key = cfg.keys.get(info.kid) if info.kid is not None else None
            if key is None:
                return "InvalidProviderToken"
            if info.key is not key:  # verify once per (JWT, key)
                info.valid = _signature_ok(token, key)
                info.key = key
            if not info.valid:
                return "InvalidProviderToken"
        if cfg.team_id is not None and info.iss != cfg.team_id:
            return "InvalidProviderToken"
        if info.iat is None:
            return "InvalidProviderToken"
        now = time.time()
        age = now - info.iat
        if age > cfg.token_max_age:
            return "ExpiredProviderToken"
        if age < -_MAX_CLOCK_SKEW:
            return "InvalidProviderToken"
        if cfg.keys and cfg.bind_key_to_connection:
            if self._kid is None:
                self._kid = info.kid
            elif info.kid != self._kid:
                return "UnrelatedKeyIdInToken"
        if token != self._jwt:
            if (
                self._jwt is not None
                and cfg.token_update_min_interval > 0
                and now - self._jwt_since < cfg.token_update_min_interval
            ):
                return "TooManyProviderTokenUpdates"
            if cfg.expire_token_once_after is not None and mock.expire_token_now():
                return "ExpiredProviderToken"  # not the connection's token: not recorded
            self._jwt, self._jwt_since = token, now
        elif cfg.expire_token_once_after is not None and mock.expire_token_now():
            return "ExpiredProviderToken"
        return None

    def _check_headers(
        self, fields: dict[bytes, bytes], id_ok: bool, id_given: bool, body: bytearray
    ) -> str | None:
        """The reason a request's APNs headers or payload are invalid, or ``None``."""
        cfg = self.mock.config
        topic_b = fields.get(b"apns-topic")
        if not topic_b:
            return "MissingTopic"
        push_type_b = fields.get(b"apns-push-type")
        push_type = None
        if push_type_b is not None:
            push_type = push_type_b.decode("ascii", "replace")
            if push_type not in PUSH_TYPE_TOPIC_SUFFIX:
                return "InvalidPushType"
        topic = topic_b.decode("ascii", "replace")
        if _TOPIC.fullmatch(topic) is None:
            return "BadTopic"
        if cfg.topics is not None:
            reason = _topic_reason(topic, push_type, cfg.topics)
            if reason is not None:
                return reason
        priority = fields.get(b"apns-priority")
        if priority is not None and priority not in _PRIORITIES:
            return "BadPriority"
        if push_type == "background" and priority != b"5":
            return "BadPriority"
        if id_given and not id_ok:
            return "BadMessageId"
        expiration = fields.get(b"apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return "BadExpirationDate"
        collapse_id = fields.get(b"apns-collapse-id")
        if collapse_id is not None and len(collapse_id) > 64:
            return "BadCollapseId"
        if not body:
            return "PayloadEmpty"
        if len(body) > (5120 if push_type == "voip" else 4096):
            return "PayloadTooLarge"
        try:
            payload = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return "BadRequestPayload"
        if not isinstance(payload, dict):
            return "BadRequestPayload"
        return None


class MockAPNs:
    """The mock server. Start it with :meth:`serve` (or :func:`open_mock`), read :attr:`stats`."""

    def __init__(self, config: MockConfig | None = None, pki: TestPKI | None = None) -> None:
        if pki is None:
            raise ValueError("MockAPNs needs a TestPKI (see fanout.testing.devcerts.make_pki)")
        self.config = config if config is not None else MockConfig()
        self.pki = pki
        self.stats = MockStats()
        self.rng = random.Random(self.config.seed)
        self.host = "127.0.0.1"
        self.port = 0
        self._connections: set[_Connection] = set()
        self._jwt_cache: dict[bytes, _TokenInfo] = {}
        self._expired_for: int | None = None  # expire_token_once_after value already used

    @property
    def stream_limits(self) -> list[int]:
        """MAX_CONCURRENT_STREAMS last announced on each live connection."""
        return [c.advertised_limit for c in self._connections]

    def set_max_streams(self, n: int) -> None:
        """Change ``config.max_streams`` and announce it now on every authenticated connection."""
        self.config.max_streams = n
        for connection in self._connections:
            connection.retarget_limit()

    def expire_token_now(self) -> bool:
        """Whether ``expire_token_once_after`` calls for its one ExpiredProviderToken now (and
        if so, uses it up)."""
        after = self.config.expire_token_once_after
        if after is None or after == self._expired_for or self.stats.by_status[200] < after:
            return False
        self._expired_for = after
        return True

    def token_info(self, token: bytes) -> _TokenInfo:
        """Cached parse of a JWT (the signature is checked once per key); records its digest."""
        info = self._jwt_cache.get(token)
        if info is None:
            if len(self._jwt_cache) >= _JWT_CACHE_MAX:
                self._jwt_cache.clear()
            info = self._jwt_cache[token] = _parse_jwt(token)
        self.stats.jwts.add(info.digest)
        return info

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_remote: bool = False,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 = any free port) until cancelled.

        Reports the bound port through ``task_status`` (``await nursery.start(mock.serve)``).
        Only loopback addresses are allowed unless ``allow_remote=True``.
        """
        if not _is_loopback(host) and not allow_remote:
            raise ValueError(
                f"refusing to serve the mock APNs on non-loopback host {host!r};"
                " pass allow_remote=True to do it anyway"
            )
        if host == "localhost":  # one address, so that port 0 means one port
            host = "127.0.0.1"
        ssl_context = server_ssl_context(self.pki, alpn=self.config.alpn)
        tcp_listeners = await trio.open_tcp_listeners(port, host=host)
        self.host = host
        self.port = tcp_listeners[0].socket.getsockname()[1]
        listeners = [
            trio.SSLListener(listener, ssl_context, https_compatible=False)
            for listener in tcp_listeners
        ]
        log.info("mock APNs listening on %s:%d", host, self.port)
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            with trio.move_on_after(10):
                await stream.do_handshake()
            if not stream.selected_alpn_protocol() and self.config.alpn:
                log.debug("client negotiated no ALPN protocol; speaking h2 anyway")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(stream)
            return
        stats = self.stats
        index = len(stats.streams_per_connection)
        stats.connections += 1
        stats.streams_per_connection.append(0)
        stats.max_concurrent.append(0)
        stats.rejected_per_connection.append(0)
        connection = _Connection(self, stream, index)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:  # never let one connection take the server down
            log.exception("mock connection %d failed", index)
        finally:
            self._connections.discard(connection)
            await trio.aclose_forcefully(stream)


async def open_mock(
    nursery: trio.Nursery,
    config: MockConfig | None = None,
    pki: TestPKI | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> MockAPNs:
    """Start a :class:`MockAPNs` in ``nursery`` and return it once it is listening."""
    mock = MockAPNs(config, pki)
    await nursery.start(partial(mock.serve, host, port))
    return mock
