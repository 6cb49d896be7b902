"""The mock's knobs (:class:`MockConfig`) and what it saw (:class:`MockStats`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

_ERRORS_SHOWN = 5  # protocol errors quoted in full by MockStats.summary()


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
    """Allowed bundle ids (the push type's suffix is added,
    docs/apns.md, Topics and push types); ``None``: any."""
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
    """The environment the mock plays (``"production"`` or ``"sandbox"``)."""
    sandbox_token_fraction: float = 0.0
    """Fraction of tokens that belong to the sandbox (by a hash of the token, from the middle
    of the range, wrapping around: 1.0 is every token); the rest belong to production. When
    set, a token of the other environment than ``environment`` is answered 400
    BadDeviceToken, as Apple does."""
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
    from the start, see ``fanout.testing._server._Connection``). When set, the mock never opens
    a stream's window (no stream WINDOW_UPDATE, ever): each request can carry at most this many
    body bytes, and with 0 none at all, so a request with a body never completes. The connection window is credited
    back for a stream's bytes once the stream is answered. Read when a connection opens."""
    expire_token_once_after: int | None = None
    """After this many 200 answers across the whole mock (``stats.by_status[200]``, so
    :meth:`MockStats.reset` restarts the count), the next request whose token is otherwise valid
    gets 403 ExpiredProviderToken, once (set another value to arm it again); later requests are
    validated normally. The connection's token is not replaced by that request's, so a fresh
    token on the same connection is then subject to ``token_update_min_interval`` (429
    TooManyProviderTokenUpdates), as on APNs. With ``expired_token_wedge`` the connection wedges.
    Needs ``validate=True`` for device pushes."""
    path: Literal["h2", "fast"] = "h2"
    """Which HTTP/2 implementation serves connections (read when :meth:`MockAPNs.serve`
    starts): ``"h2"``, the h2 library (the independent oracle, 160-430 µs of CPU a request), or
    ``"fast"``, the hand-written :mod:`fanout.testing._fast` (same validation, faults and stats,
    ~10x cheaper), which hands a connection to h2 when it opens while ``goaway_after``,
    ``close_after``, ``stop_reading_after``, ``server_ping_interval`` or
    ``initial_window_size`` is set (``MockAPNs.paths`` counts each path's connections)."""


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
    """Channel id -> number of broadcast pushes answered 200."""
    bodies: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    """With ``record_bodies``: token -> [(apns-priority, body)] of accepted device pushes."""
    channels: dict[str, dict[str, int]] = field(default_factory=dict)
    """The live broadcast channels: bundle id -> {channel id: message-storage-policy}. This is
    the mock's channel registry (server state): tests may edit it, and :meth:`reset` keeps it."""
    stats_only_connections: int = 0
    """Connections (among :attr:`connections`) that have carried only stats requests
    (``GET /stats``); those requests are in no other count."""

    def summary(self) -> dict[str, Any]:
        """What the mock saw, in numbers, as JSON-ready data: the body of ``GET /stats`` and
        ``fanout mock --stats-file``. No device token or JWT in it (JWTs are counted)."""
        return {
            "requests": self.requests,
            "delivered": sum(self.delivered.values()),
            "tokens": len(self.seen),
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "by_reason": dict(sorted(self.by_reason.items())),
            "jwts": len(self.jwts),
            "connections": self.connections - self.stats_only_connections,
            "max_concurrent": max(self.max_concurrent, default=0),
            "goaways_sent": self.goaways_sent,
            "closes": self.closes,
            "never_answered": self.never_answered,
            "streams_after_goaway": self.streams_after_goaway,
            "protocol_errors": len(self.protocol_errors),
            "first_protocol_errors": self.protocol_errors[:_ERRORS_SHOWN],
            "broadcasts": sum(self.broadcasts.values()),
        }

    def reset(self) -> None:
        """Forget everything but :attr:`channels` (connections already open keep counting into
        the new numbers, except their per-connection entries)."""
        fresh = MockStats()
        for f in dataclasses.fields(self):
            if f.name != "channels":
                setattr(self, f.name, getattr(fresh, f.name))

