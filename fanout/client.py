"""The library API: ``async with Client(...) as client`` and the outcome of every push.

A push is validated and encoded before any I/O, paced by the limiter, started on a pool
connection, and ends in exactly one :class:`~fanout.outcome.Result`. What APNs answers is
classified by :func:`~fanout.outcome.classify`; transport trouble is typed apart from it:
a stream the server never saw (GOAWAY above last-stream-id, REFUSED_STREAM) is resent
freely, a stream that may have been delivered (connection lost, no answer by the deadline)
is resent under the default at-least-once policy or reported ``maybe_delivered`` under
at-most-once.

Concurrency: the client owns one nursery. The pool's connection tasks, one retry task and
one feeder task per ``send_many`` run in it; nothing outlives ``async with``. There is no
task per push: responses are handled synchronously in each connection's reader task.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import ssl
import sys
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVarTuple

import trio

from ._engine.backoff import Backoff
from ._engine.connection import Connection, Exchange, Headers
from ._engine.hpackdec import Encoded, plain
from ._engine.pool import Pool
from ._engine.proxy import Proxy, resolve
from ._limiter import Limiter, parse_retry_after
from .auth import Auth, CertAuth, TokenAuth
from .errors import ConfigError, TransportError, ValidationError, redact
from .events import Events
from .outcome import REASONS, Action, Outcome, Reason, Result, classify, parse_error_body
from .payload import (
    PRIORITIES,
    Environment,
    Notification,
    Payload,
    Prepared,
    PushTemplate,
    PushType,
    bundle_of,
    check_expiration,
    prepare,
)

if TYPE_CHECKING:
    import uuid

    from .channels import Channel, Channels

log: logging.Logger = logging.getLogger("fanout")
_Ts = TypeVarTuple("_Ts")

#: APNs' push host per environment (docs/apns.md, "Hosts").
HOSTS = {"production": "api.push.apple.com", "sandbox": "api.sandbox.push.apple.com"}
#: Resends of never-processed streams (not counted as attempts) before a push gives up.
MAX_RESENDS = 20
#: Invalidated tokens remembered, so each is reported (and kept off the wire) once.
INVALID_MEMORY = 1_000_000
#: Reasons that make a token dead for this topic and environment whatever the payload: a
#: token APNs answered so is not sent again (each rejection drops the connection's stream
#: limit to 1: resending known-bad tokens throttles everyone else's pushes).
DEAD_REASONS = frozenset({"Unregistered", "BadDeviceToken", "ExpiredToken"})
#: What APNs answers every token when the topic or the environment is wrong: a run of these
#: with no success in between is held back, never reported as dead tokens (the topic guard).
SUSPECT_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
_DELIVERED = Outcome.DELIVERED


def _not_under_trio() -> RuntimeError | None:
    """The error for a Client used outside a trio run (None: under trio), naming the way
    in from where the caller is: fanout.asyncio.Client from asyncio, fanout.sync.Client
    from sync code."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        pass
    else:
        return None
    asyncio = sys.modules.get("asyncio")  # not imported if the program never did
    if asyncio is not None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return RuntimeError("fanout.Client runs on trio; from asyncio use "
                                "fanout.asyncio.Client (same arguments), from threads or "
                                "sync code fanout.sync.Client")
    return RuntimeError("fanout.Client runs on trio: use it inside trio.run(...), or from "
                        "threads or sync code use fanout.sync.Client (same arguments)")


def _not_entered() -> RuntimeError:
    """The error for a Client used outside ``async with`` (or outside trio altogether)."""
    return _not_under_trio() or RuntimeError("use the client inside 'async with Client(...)'")


class _TopicGuard:
    """Answers that would call a token dead, held for one topic until the topic is known good.

    With a wrong topic APNs answers every token ``DeviceTokenNotForTopic``; with sandbox
    tokens sent to production (or the reverse), every token ``BadDeviceToken``. Reporting
    them as invalid tokens tells the user to delete their whole audience. So such answers
    wait here until a verdict:

    * a push to the topic is delivered: the topic is *confirmed*, and what waits is
      released as ``invalid_token`` (the hook hears of each);
    * ``topic_guard`` of them in a row with no delivery between (held or not): the guard
      trips, what waits and every later push for the topic end ``config_error``;
    * nothing else of the topic is in flight, so no verdict is coming (sequential sends,
      a trickle): on a confirmed topic they are dead tokens; on a topic with no delivery
      yet they end ``rejected`` ("not confirmed dead"), never ``invalid_token``.
    """

    __slots__ = ("held", "run", "confirmed")

    def __init__(self) -> None:
        self.held: list[tuple[Push, dict[str, Any]]] = []
        self.run = 0             # such answers since the topic's last delivery
        self.confirmed = False   # a push to the topic was delivered


class Push(Exchange):
    """One notification on its way: the connection's exchange plus the engine's bookkeeping."""

    __slots__ = ("id", "attempts", "resends", "sink", "maybe", "resent", "abandoned")

    prepared: Prepared
    id: Any                   # the caller's id, handed back in the Result
    attempts: int             # sends that may have reached APNs
    resends: int              # resends of attempts APNs never saw
    sink: _Waiter | _Batch    # where its Result goes
    maybe: bool
    resent: bool
    abandoned: bool           # finished or given up: never sent nor reported again

    def __init__(self, prepared: Prepared, sink: _Waiter | _Batch) -> None:
        # Exchange.__init__'s fields, set here without super(): once per push
        self.prepared = prepared
        self.sid = 0
        self.conn = None
        self.auth_generation = 0
        self.avoid = None
        self.sent_id = None
        self.id = prepared.id
        self.attempts = 0
        self.resends = 0
        self.sink = sink
        self.maybe = False    # an attempt was lost or timed out: APNs may have it
        self.resent = False   # sent again after such an attempt: it may arrive twice
        self.abandoned = False


class _Waiter:
    """Sink of a single ``send``."""

    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event: trio.Event = trio.Event()
        self.result: Result | None = None

    def deliver(self, push: Push | None, result: Result) -> None:
        """The push's one result: wake the sender."""
        self.result = result
        self.event.set()


class _Batch:
    """Sink of a ``send_many``: results wait here for the consumer; input is pulled only
    while fewer than ``window`` pushes are in flight or unconsumed (bounded memory)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.results: deque[Result] = deque()
        self.outstanding = 0
        self.live: set[Push] = set()
        self.readable: trio.Event = trio.Event()
        self.space: trio.Event = trio.Event()
        self.done_feeding = False
        self.error: BaseException | None = None

    def deliver(self, push: Push | None, result: Result) -> None:
        """One push of the batch ended: queue its result for the consumer."""
        if push is not None:
            self.live.discard(push)
        self.results.append(result)
        self.readable.set()


def _window(window: int | None) -> int | None:
    """``send_many``/``fan_out``'s window, checked at the door (0 or less hung forever)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ConfigError(f"window must be a whole number >= 1 (or None), not {window!r}")
    return window


def _apns_id(answered: bytes | None, sent: bytes | None) -> str | None:
    """The push's apns-id: APNs echoes the one it was sent (docs/apns.md), so an answer
    left Huffman-coded (hpackdec.Encoded) is that one, and is decoded only if none was."""
    if not answered:
        return sent.decode() if sent else None
    if type(answered) is Encoded:
        return sent.decode() if sent else plain(answered).decode()
    return answered.decode()


def _header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


class LazyChannels:
    """:class:`fanout.channels.Channels` opened on first use and closed with the client
    (what :attr:`Client.channels` returns)."""

    __slots__ = ("channels",)

    def __init__(self, channels: Channels) -> None:
        self.channels: Channels = channels

    async def create(self, storage_policy: int = 0) -> Channel:
        """Create a channel; ``storage_policy`` 0 = No Message Stored, 1 = Most Recent."""
        return await (await self.channels.__aenter__()).create(storage_policy)

    async def read(self, channel_id: str) -> Channel:
        """The channel's settings."""
        return await (await self.channels.__aenter__()).read(channel_id)

    async def list(self) -> list[str]:
        """Ids of every channel of the bundle id in this environment."""
        return await (await self.channels.__aenter__()).list()

    async def delete(self, channel_id: str) -> None:
        """Delete a channel (irreversible)."""
        await (await self.channels.__aenter__()).delete(channel_id)


def prepare_broadcast(channel_id: str, payload: Payload | dict[str, Any] | bytes, *,
                      bundle_id: str | None, priority: int = 10, expiration: int | None = 0,
                      apns_id: str | None = None, id: object = None) -> Prepared:
    """Validate and encode a broadcast push (5120-byte limit, bare bundle id)."""
    from .channels import check_bundle_id, check_channel_id
    from .payload import encode_payload

    check_channel_id(channel_id)  # a malformed header would cost the whole connection
    bundle = check_bundle_id(bundle_id)
    if priority not in PRIORITIES:
        raise ValidationError("priority", f"must be 10, 5 or 1, not {priority!r}")
    expiration_header = check_expiration(expiration)  # milliseconds by mistake refused
    body = encode_payload(payload)
    if not body:
        raise ValidationError("payload", "is empty")
    if len(body) > 5120:
        raise ValidationError("payload", f"is {len(body)} bytes; the limit for broadcast "
                                         f"pushes is 5120 bytes")
    if apns_id is not None:
        import uuid

        try:
            apns_id = str(uuid.UUID(apns_id))
        except ValueError:
            raise ValidationError("apns_id", "must be a UUID") from None
    extra = [(b"apns-channel-id", channel_id.encode())]
    if apns_id is not None:
        extra.append((b"apns-request-id", apns_id.encode()))
    return Prepared(
        token=channel_id, path=b"/4/broadcasts/apps/" + bundle.encode(), body=body,
        push_type=b"liveactivity", topic=None, priority=str(priority).encode(), limit=5120,
        expiration=expiration_header, id=id, extra=extra, channel_id=channel_id,
    )


def _check_settings(environment: str, delivery: str, max_attempts: int, topic_guard: int, *,
                    seconds: dict[str, float], counts: dict[str, int]) -> None:
    """ConfigError for a Client setting that cannot work, naming it."""
    if environment not in HOSTS:
        raise ConfigError(f"environment must be production or sandbox, not {environment!r}")
    if delivery not in ("at_least_once", "at_most_once"):
        raise ConfigError(f"delivery must be at_least_once or at_most_once, not {delivery!r}")
    if max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")
    if not isinstance(topic_guard, int) or topic_guard < 0:
        raise ConfigError(f"topic_guard must be a whole number >= 0, not {topic_guard!r}")
    for name, value in seconds.items():
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, not {count!r}")


def _tls_context(ssl_context: ssl.SSLContext | None, ca_file: str | None, insecure: bool,
                 auth: object) -> ssl.SSLContext:
    """The push connections' TLS context: TLS 1.2+, ALPN h2, verified (unless
    ``insecure``), with the client certificate of a CertAuth."""
    if ssl_context is None:
        ssl_context = ssl.create_default_context(cafile=ca_file)
        ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        ssl_context.set_alpn_protocols(["h2"])
    if insecure:
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
        log.warning("TLS certificate verification is OFF (insecure): anybody on the path "
                    "can read the provider token and the pushes; use only for testing")
    if auth is not None:
        if not isinstance(auth, Auth):
            raise ConfigError(f"auth must be TokenAuth or CertAuth, not {type(auth).__name__}")
        auth.apply(ssl_context)  # a client certificate, if any
    return ssl_context


class Client:
    """Sends pushes to APNs over a few long-lived HTTP/2 connections.

    ``auth`` is a :class:`fanout.auth.TokenAuth` (one JWT shared by every connection) or a
    :class:`fanout.auth.CertAuth`. ``topic`` is the default bundle id. Point ``host``/
    ``port``/``ca_file`` at a mock to test without Apple.

    Args:
        auth: credentials (:class:`~fanout.auth.Auth`); None only against a mock.
        topic: the default bundle id of pushes that name none.
        environment: ``production`` or ``sandbox``: picks Apple's host.
        host, port, ca_file, ssl_context, insecure: where to connect and how to verify
            it (a mock, a test CA); ``insecure`` turns verification off, loudly.
        connections: long-lived HTTP/2 connections (each carries up to the server's
            stream limit, capped by ``max_streams_cap``).
        timeout: seconds a stream waits for its answer; then it is reset and the push
            resent elsewhere (it may have arrived: see ``delivery``).
        ping_timeout: a PING unanswered, or writes that cannot drain, this long: the
            connection is dead.
        unavailable_timeout: no usable connection this long: waiting pushes end
            ``retries_exhausted`` together (``maybe_delivered`` if an earlier attempt may
            have arrived), unless ``on_unavailable="wait"``.
        max_attempts: sends per push that may have reached APNs (resends of streams the
            server never saw do not count).
        delivery: ``at_least_once`` resends a push that may have arrived (then marked
            ``resent``); ``at_most_once`` reports it ``maybe_delivered`` instead.
        rate, topic_rates: pushes per second overall and per topic (None: unlimited).
        max_in_flight: pushes in flight or unconsumed per ``send_many`` by default.
        on_invalid_token: called once per token APNs calls dead ``(token, reason,
            timestamp)``; its errors are logged, never raised.
        events: the hooks (:class:`~fanout.events.Events`, e.g. metrics).
        resend_invalid: send to tokens already called dead (default: answer at once).
        proxy: an ``http://`` or ``socks5://`` proxy URL, ``"none"``, or None for
            HTTPS_PROXY / ALL_PROXY minus NO_PROXY.
        topic_guard: this many BadDeviceToken / DeviceTokenNotForTopic answers in a row
            for a topic with no delivery stop the topic with ``config_error`` instead of
            calling its tokens dead; such answers call a token dead only on a topic with a
            delivery (0: off).
        manage_host, manage_port: the channel-management endpoint (default: Apple's, or
            the push host when that is a mock).
        max_streams_cap, first_stream_id: test hooks.

    Raises ConfigError for a setting that cannot work.
    """

    def __init__(
        self,
        *,
        auth: Auth | None = None,
        topic: str | None = None,
        environment: Environment = "production",
        host: str | None = None,
        port: int = 443,
        ca_file: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connections: int = 2,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
        unavailable_timeout: float = 30.0,
        on_unavailable: Literal["fail", "wait"] = "fail",
        ping_interval: float = 60.0,
        ping_timeout: float = 5.0,
        max_attempts: int = 5,
        delivery: Literal["at_least_once", "at_most_once"] = "at_least_once",
        rate: float | None = None,
        topic_rates: dict[str, float] | None = None,
        max_in_flight: int = 8192,
        backoff: Backoff | None = None,
        on_invalid_token: Callable[[str, str | None, int | None], object] | None = None,
        events: Events | None = None,
        max_streams_cap: int = 4000,
        first_stream_id: int = 1,
        manage_host: str | None = None,
        manage_port: int | None = None,
        insecure: bool = False,
        resend_invalid: bool = False,
        proxy: str | None = None,
        topic_guard: int = 100,
    ) -> None:
        _check_settings(
            environment, delivery, max_attempts, topic_guard,
            seconds={"timeout": timeout, "connect_timeout": connect_timeout,
                     "unavailable_timeout": unavailable_timeout,
                     "ping_interval": ping_interval, "ping_timeout": ping_timeout},
            counts={"connections": connections, "max_in_flight": max_in_flight,
                    "max_streams_cap": max_streams_cap})
        self.environment = environment
        self.host: str = host or HOSTS[environment]
        self.port = port
        self.topic = topic
        self.auth = auth
        self.delivery = delivery
        self.max_attempts = max_attempts
        self.max_in_flight = max_in_flight
        self.events: Events = events or Events()
        self._on_invalid = on_invalid_token
        # token -> (reason, timestamp) APNs gave when it called the token invalid
        self._invalid_seen: OrderedDict[str, tuple[Reason | None, int | None]] = OrderedDict()
        self.resend_invalid = resend_invalid
        self._backoff = backoff or Backoff(base=0.5, cap=60.0)
        self.limiter: Limiter = Limiter(rate, topic_rates)
        self._limited = bool(rate or topic_rates)
        self.topic_guard = topic_guard
        self._guard_reasons = SUSPECT_REASONS  # Teams narrows it when it retries environments
        self._guards: dict[bytes | None, _TopicGuard] = {}
        self._held = 0                          # answers held by the guards
        self._tripped: dict[bytes | None, str] = {}    # topic -> config_error message
        self._topic_out: dict[bytes | None, int] = {}  # pushes outstanding per topic
        self._ssl = _tls_context(ssl_context, ca_file, insecure, auth)
        header_auth = auth if isinstance(auth, TokenAuth) else None
        # an HTTP CONNECT proxy: this argument, or HTTPS_PROXY / ALL_PROXY minus NO_PROXY
        self.proxy: Proxy | None = resolve(proxy, self.host)
        self._proxy_setting = proxy  # the channel-management host resolves its own
        if self.proxy is not None:
            log.info("connecting to %s through proxy %s", self.host, self.proxy)
        self.pool: Pool[Push] = Pool(self.host, port, self._ssl, self, auth=header_auth,
                         size=connections,
                         proxy=self.proxy,
                         timeout=timeout, connect_timeout=connect_timeout,
                         unavailable_timeout=unavailable_timeout,
                         on_unavailable=on_unavailable,
                         ping_interval=ping_interval, ping_timeout=ping_timeout,
                         max_streams_cap=max_streams_cap, first_stream_id=first_stream_id,
                         events=self.events)
        self._retry_heap: list[tuple[float, int, Push]] = []
        self._retry_seq = itertools.count()
        self._retry_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: AbstractAsyncContextManager[trio.Nursery] | None = None
        self.outstanding: int = 0  # pushes taken and not yet finished
        self._ca_file = ca_file
        # channel management: Apple's own host, or the push host when pointed at a mock
        custom = host is not None and host not in HOSTS.values()
        self._manage = (manage_host or (self.host if custom else None),
                        manage_port or (port if custom else None))
        self._channels: dict[str, Channels] = {}  # by bundle id
        self.log_config_errors = True  # False: the caller reports config_error itself

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        """Open the connections (in the background) and start the retry task."""
        wrong_loop = _not_under_trio()
        if wrong_loop is not None:
            raise wrong_loop
        self._nursery_cm = manager = trio.open_nursery()
        self._nursery = nursery = await manager.__aenter__()
        try:
            await nursery.start(self.pool.run)
            nursery.start_soon(self._retry_loop)
        except BaseException as exc:
            nursery.cancel_scope.cancel()
            await manager.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        """Close the channel client and every connection; pushes still out get no result."""
        nursery, manager = self._nursery, self._nursery_cm
        assert nursery is not None and manager is not None, "__aexit__ without __aenter__"
        if self._channels:
            with trio.CancelScope(shield=True):
                for channels in self._channels.values():
                    await channels.aclose()
        nursery.cancel_scope.cancel()
        try:
            return await manager.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # our own tasks never raise: give the caller back their own exception, unwrapped
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                raise exc from None
            raise

    @property
    def guard_reasons(self) -> frozenset[str]:
        """The answers the topic guard holds back (BadDeviceToken, DeviceTokenNotForTopic).

        :class:`fanout.teams.Teams` narrows it to DeviceTokenNotForTopic when it retries
        BadDeviceToken in the other environment instead."""
        return self._guard_reasons

    @guard_reasons.setter
    def guard_reasons(self, reasons: frozenset[str]) -> None:
        self._guard_reasons = reasons

    @property
    def config_error(self) -> str | None:
        """Why APNs refused the credentials or topic, once it did: sending has stopped
        (every push ends ``config_error``) until :meth:`reset_config_error`."""
        halted = self.pool.halt_error
        return None if halted is None else str(halted)

    @property
    def in_flight(self) -> int:
        """Pushes sent and not answered yet, on every connection."""
        return self.pool.in_flight

    @property
    def last_error(self) -> BaseException | None:
        """Why the last connection attempt failed (None: none has)."""
        return self.pool.last_error

    def unavailable_for(self) -> float:
        """Seconds without a usable connection (0.0 while one is up)."""
        return self.pool.unavailable_for()

    @property
    def running(self) -> bool:
        """``async with`` has entered: pushes can be sent and tasks started."""
        return self._nursery is not None

    def start_soon(self, fn: Callable[[*_Ts], Awaitable[object]], *args: *_Ts) -> None:
        """Run ``fn(*args)`` in the client's nursery: it is cancelled when the client
        closes (a metrics sampler, say). Raises RuntimeError outside ``async with``."""
        if self._nursery is None:
            raise _not_entered()
        self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------------ public API

    async def send(self, notification: Notification | Prepared) -> Result:
        """Send one push and return its result. A push that fails validation ends
        ``rejected`` (``error`` names the field) before any I/O, as in :meth:`send_many`;
        what is not a push at all (not a Notification) raises ValidationError."""
        try:
            prepared = self._convert(notification)
        except ValidationError as exc:
            if not isinstance(notification, Notification):
                raise
            return Result(outcome=Outcome.REJECTED, id=notification.id,
                          token=notification.token if isinstance(notification.token, str)
                          else None, error=str(exc))
        waiter = _Waiter()
        push = Push(prepared, waiter)
        self.outstanding += 1
        out = self._topic_out
        out[prepared.topic] = out.get(prepared.topic, 0) + 1
        try:
            await self._dispatch(push)
            await waiter.event.wait()
        except BaseException:
            self._abandon(push)
            raise
        result = waiter.result
        assert result is not None  # the event is set only with a result
        return result

    def send_many(
        self,
        notifications: Iterable[Notification | Prepared] | AsyncIterable[Notification | Prepared],
        *,
        window: int | None = None,
    ) -> AsyncIterator[Result]:
        """Stream one result per notification, in completion order.

        Input is pulled only as pushes complete; a notification that fails validation
        yields a ``rejected`` result with the problem in ``error`` and the rest go on. If
        the iterable itself raises, the pushes already sent finish and their results are
        yielded first; then its exception comes out.
        """
        return self._stream(notifications, self._convert, _window(window))

    @property
    def channels(self) -> LazyChannels:
        """Broadcast channel management for ``topic`` (:class:`fanout.channels.Channels`):
        ``await client.channels.create(storage_policy)``, ``read``, ``list``, ``delete``."""
        if not self.topic:
            raise ConfigError("channel management needs the client's topic (bundle id)")
        return self.channels_for(self.topic)

    def channels_for(self, topic: str) -> LazyChannels:
        """Channel management for the bundle id of ``topic`` (a client serving several
        apps, such as a team's in :class:`fanout.teams.Teams`), over this client's
        credentials and environment; one channel client per bundle id, closed with it."""
        bundle = bundle_of(topic)
        channels = self._channels.get(bundle)
        if channels is None:
            from .channels import Channels

            auth = self.auth
            if not isinstance(auth, TokenAuth | CertAuth):
                raise ConfigError(f"auth must be TokenAuth or CertAuth, got {type(auth).__name__}")
            channels = self._channels[bundle] = Channels(
                auth=auth, bundle_id=bundle, environment=self.environment,
                host=self._manage[0], port=self._manage[1], ca_file=self._ca_file,
                ssl_context=None, proxy=self._proxy_setting)
        return LazyChannels(channels)

    async def broadcast(self, channel_id: str, payload: Payload | dict[str, Any] | bytes, *,
                        bundle_id: str | None = None, priority: int = 10,
                        expiration: int | None = 0, apns_id: str | None = None,
                        id: object = None) -> Result:
        """One Live Activity push to every device subscribed to ``channel_id`` (iOS 18).

        ``POST /4/broadcasts/apps/<bundle id>`` with ``apns-channel-id`` through the same
        connections, limiter and metrics. ``expiration`` defaults to 0, the only value a
        No-Message-Stored (policy 0) channel accepts; pass None to let APNs store it."""
        return await self.send(prepare_broadcast(
            channel_id, payload, bundle_id=bundle_id or self.topic, priority=priority,
            expiration=expiration, apns_id=apns_id, id=id))

    def fan_out(
        self,
        payload: Payload | dict[str, Any] | bytes,
        tokens: Iterable[str] | AsyncIterable[str],
        *,
        window: int | None = None,
        push_type: PushType | str = PushType.ALERT,
        topic: str | None = None,
        priority: int | None = None,
        expiration: int | None = None,
        collapse_id: str | None = None,
        apns_id: str | uuid.UUID | None = None,
    ) -> AsyncIterator[Result]:
        """One payload to many tokens: encoded and validated once, then streamed.

        Args:
            window: pushes in flight or unconsumed at most (default ``max_in_flight``).
            topic: the push's topic, else the client's (the push type's suffix is added).
            push_type, priority, expiration, collapse_id, apns_id: as in
                :class:`~fanout.payload.Notification`, the same for every token.

        Raises ValidationError at once if the payload or an option is invalid; a bad token
        yields a ``rejected`` result and the rest go on.
        """
        template = PushTemplate(payload, push_type=push_type, topic=topic,
                                default_topic=self.topic, priority=priority,
                                expiration=expiration, collapse_id=collapse_id, apns_id=apns_id)
        return self._stream(tokens, template.for_token, _window(window))

    # ------------------------------------------------------------------ streaming

    def _convert(self, item: Notification | Prepared) -> Prepared:
        if isinstance(item, Prepared):
            return item
        if isinstance(item, Notification):
            return prepare(item, default_topic=self.topic)
        raise ValidationError("notification", f"expected a Notification, got {type(item).__name__}")

    async def _stream(self, items: Any, convert: Callable[[Any], Prepared],
                      window: int | None) -> AsyncIterator[Result]:
        if self._nursery is None:
            raise _not_entered()
        batch = _Batch(window or self.max_in_flight)
        scope = trio.CancelScope()
        self._nursery.start_soon(self._feed, items, convert, batch, scope)
        try:
            while True:
                if batch.results:
                    result = batch.results.popleft()
                    batch.outstanding -= 1
                    if batch.outstanding < batch.window:
                        batch.space.set()
                    yield result
                elif batch.done_feeding and batch.outstanding == 0:
                    # the caller's iterable failed: what was already sent has finished and
                    # been yielded above, so the caller knows exactly what went out
                    if batch.error is not None:
                        raise batch.error
                    return
                else:
                    batch.readable = trio.Event()
                    await batch.readable.wait()
        finally:
            scope.cancel()
            for push in list(batch.live):
                self._abandon(push)

    async def _feed(self, items: Any, convert: Callable[[Any], Prepared], batch: _Batch,
                    scope: trio.CancelScope) -> None:
        with scope:
            try:
                # per item: no coroutine unless it must wait (a full window, no free slot),
                # hence the loop body twice (async and plain iterables) rather than a helper
                admit, dispatch = self._admit, self._dispatch
                if hasattr(items, "__aiter__"):
                    async for item in items:
                        while batch.outstanding >= batch.window:
                            batch.space = trio.Event()
                            await batch.space.wait()
                            # woken, then the caller left: start nothing after its cleanup
                            await trio.lowlevel.checkpoint_if_cancelled()
                        push = admit(item, convert, batch)
                        if push is not None:
                            await dispatch(push)
                else:
                    for item in items:
                        while batch.outstanding >= batch.window:
                            batch.space = trio.Event()
                            await batch.space.wait()
                            # woken, then the caller left: start nothing after its cleanup
                            await trio.lowlevel.checkpoint_if_cancelled()
                        push = admit(item, convert, batch)
                        if push is not None:
                            await dispatch(push)
            except Exception as exc:  # the caller's iterable failed: surface it
                batch.error = exc
            finally:
                batch.done_feeding = True
                batch.readable.set()

    def _admit(self, item: Any, convert: Callable[[Any], Prepared],
               batch: _Batch) -> Push | None:
        """Take ``item`` into ``batch`` (a slot of its window is free): started at once when
        nothing needs waiting for, ended at once when it fails validation (None either way);
        else the push that :meth:`_dispatch` must send."""
        batch.outstanding += 1
        try:
            prepared = convert(item)
        except ValidationError as exc:
            token = getattr(item, "token", item if isinstance(item, str) else None)
            batch.deliver(None, Result(outcome=Outcome.REJECTED, id=getattr(item, "id", None),
                                       token=token if isinstance(token, str) else None,
                                       error=str(exc)))
            return None
        push = Push(prepared, batch)
        batch.live.add(push)
        self.outstanding += 1
        out = self._topic_out
        out[prepared.topic] = out.get(prepared.topic, 0) + 1
        # fast path: nothing to wait for, a slot is free: start without awaiting
        # (a halted pool declines too: then _dispatch ends it config_error)
        # (paced: when its tokens are there, taken now, and given back if it cannot start)
        if not self._tripped and prepared.token not in self._invalid_seen:
            limiter = self.limiter
            if limiter.try_acquire(prepared.topic):
                push.attempts = 1
                if self.pool.try_start(push):
                    return None
                push.attempts = 0
                limiter.give_back(prepared.topic)
        return push

    # ------------------------------------------------------------------ dispatch and retry

    async def _dispatch(self, push: Push) -> None:
        halted = self.pool.halt_error
        if halted is not None:
            self._finish(push, Outcome.CONFIG_ERROR, error=str(halted))
            return
        p = push.prepared
        if self._tripped:
            tripped = self._tripped.get(p.topic)
            if tripped is not None:
                self._finish(push, Outcome.CONFIG_ERROR, error=tripped)
                return
        if self._invalid_seen and not self.resend_invalid:
            known = self._invalid_seen.get(p.token)
            if known is not None and known[0] in DEAD_REASONS:
                self._finish(push, Outcome.INVALID_TOKEN, reason=known[0], timestamp=known[1],
                             error=f"not sent: APNs answered {known[0]} for this token "
                                   f"earlier (forget_invalid() once the device registers it "
                                   f"again)")
                return
        limiter = self.limiter
        if not limiter.fast_path_ok():
            if not limiter.idle:
                waited = await limiter.acquire(p.topic.decode() if p.topic else "")
                if waited:
                    self.events.limiter_wait(waited)
            wait = limiter.token_ready_in(p.token)
            if wait > 0:
                self._schedule(push, wait)
                return
        push.attempts += 1
        try:
            await self.pool.submit(push)
        except (TransportError, ConfigError) as exc:
            push.attempts -= 1
            if isinstance(exc, ConfigError):
                outcome = Outcome.CONFIG_ERROR
            elif push.maybe:  # an earlier attempt may have reached APNs
                outcome = Outcome.MAYBE_DELIVERED
            else:
                outcome = Outcome.RETRIES_EXHAUSTED
            self._finish(push, outcome, error=str(exc))
            return
        if push.maybe:
            push.resent = True

    def _schedule(self, push: Push, delay: float) -> None:
        heapq.heappush(self._retry_heap, (trio.current_time() + delay, next(self._retry_seq), push))
        self._retry_wake.set()

    async def _retry_loop(self) -> None:
        heap = self._retry_heap
        while True:
            if not heap:
                self._retry_wake = trio.Event()
                await self._retry_wake.wait()
                continue
            due = heap[0][0]
            if due > trio.current_time():
                self._retry_wake = trio.Event()
                with trio.move_on_at(due):
                    await self._retry_wake.wait()
                continue
            push = heapq.heappop(heap)[2]
            if not push.abandoned:
                await self._dispatch(push)
            # not kept while waiting for the next retry: through push.sink it would hold a
            # finished batch (and its grown tables) alive
            del push

    def _retry(self, push: Push, cause: str, delay: float = 0.0, *, status: int | None = None,
               reason: Reason | None = None, counts: bool = True) -> None:
        if counts and push.attempts >= self.max_attempts:
            self._finish(push, Outcome.RETRIES_EXHAUSTED, status=status, reason=reason,
                         error=f"gave up after {push.attempts} attempts (last: {cause})")
            return
        self.events.retry(cause)
        self._schedule(push, delay)

    def _abandon(self, push: Push) -> None:
        """The caller went away: reset the stream if it is in flight, never resend it."""
        if push.abandoned:
            return
        push.abandoned = True
        if push.conn is not None:
            push.conn.cancel(push)
        self.outstanding -= 1
        self._topic_done(push.prepared.topic)

    def _finish(self, push: Push, outcome: Outcome, *, status: int | None = None,
                reason: Reason | None = None, apns_id: bytes | None = None,
                timestamp: int | None = None, latency: float | None = None,
                error: str | None = None) -> None:
        if push.abandoned:
            return
        result = self._close(push, outcome, status=status, reason=reason, apns_id=apns_id,
                             timestamp=timestamp, latency=latency, error=error)
        push.sink.deliver(push, result)

    def _close(self, push: Push, outcome: Outcome, *, status: int | None = None,
               reason: Reason | None = None, apns_id: bytes | None = None,
               timestamp: int | None = None, latency: float | None = None,
               error: str | None = None) -> Result:
        """Mark ``push`` finished (never again) and build its result."""
        self._retire_push(push)
        p = push.prepared
        channel = p.channel_id
        result = Result(
            outcome=outcome, id=push.id, token=p.token if channel is None else None,
            channel_id=channel, status=status, reason=reason,
            apns_id=_apns_id(apns_id, push.sent_id or p.apns_id),
            timestamp=timestamp, attempts=push.attempts,
            latency_ms=latency * 1000.0 if latency is not None else None, error=error,
            resent=push.resent)
        self.events.push_finished(result, p.push_type, latency)
        return result

    def _retire_push(self, push: Push) -> None:
        """``push`` has ended (never sent nor reported again): off the counts."""
        push.abandoned = True
        self.outstanding -= 1
        topic = push.prepared.topic
        out = self._topic_out  # _topic_done's common case inlined: once per push
        left = out[topic] - 1
        if left and not self._held:
            out[topic] = left
        else:
            out[topic] = left + 1
            self._topic_done(topic)

    def _topic_done(self, topic: bytes | None) -> None:
        out = self._topic_out
        left = out[topic] - 1
        if left:
            out[topic] = left
            if self._held:
                guard = self._guards.get(topic)
                if guard is not None and guard.held and left <= len(guard.held):
                    self._settle(guard)  # only held answers left: no verdict is coming
        else:
            del out[topic]

    def abort_in_flight(self, why: str) -> list[Result]:
        """Reset every stream in flight and return their ``maybe_delivered`` results.

        For a forced stop: the results are returned here, not streamed; pushes not yet sent
        get no result (the caller did not see them go out, so it may send them again)."""
        results = []
        for conn in [*self.pool.conns, *self.pool.draining]:
            for push in list(conn.streams.values()):
                conn.cancel(push)
                if isinstance(push, Push) and not push.abandoned:
                    if isinstance(push.sink, _Batch):
                        push.sink.live.discard(push)
                    results.append(self._close(push, Outcome.MAYBE_DELIVERED, error=why))
        for guard in self._guards.values():  # answered, held by the topic guard
            held, guard.held = guard.held, []
            self._held -= len(held)
            for push, answer in held:
                if not push.abandoned:
                    if isinstance(push.sink, _Batch):
                        push.sink.live.discard(push)
                    outcome, error = self._unjudged(push, guard, answer)
                    results.append(self._close(push, outcome, error=error, **answer))
        return results

    # ------------------------------------------------------------------ connection events

    def on_response(self, conn: Connection[Push], push: Push, status: int, headers: Headers,
                    body: bytes) -> None:
        """APNs answered ``push``: classify the answer and finish, hold or retry it."""
        latency = conn.last_recv - push.sent_at  # the answer's read: trio's clock, once per read
        if status == 200:
            self._delivered(push, headers, latency)
            return
        reason, timestamp = parse_error_body(body)
        action = classify(status, reason)
        if status == 403 or reason == "TooManyProviderTokenUpdates":
            self.events.auth_failure(reason)
        apns_id = _header(headers, b"apns-id")
        if action is Action.DROP_TOKEN:
            if reason in self._guard_reasons and self.topic_guard:
                self._hold(push, dict(status=status, reason=reason, apns_id=apns_id,
                                      timestamp=timestamp, latency=latency))
                return
            self._invalidated(push.prepared.token, reason, timestamp)
            self._finish(push, Outcome.INVALID_TOKEN, status=status, reason=reason,
                         apns_id=apns_id, timestamp=timestamp, latency=latency)
        elif action in (Action.FIX, Action.CHANNEL_GONE):
            self._finish(push, Outcome.REJECTED, status=status, reason=reason, apns_id=apns_id,
                         latency=latency)
        elif action is Action.CONFIG:
            self._config_failed(status, reason)
            self._finish(push, Outcome.CONFIG_ERROR, status=status, reason=reason,
                         apns_id=apns_id, latency=latency, error=self.config_error)
        elif action is Action.RETRY_TOKEN:
            after = parse_retry_after(_header(headers, b"retry-after"))
            delay = self._backoff.delay(push.attempts, after)
            self.limiter.token_backoff(push.prepared.token, delay)
            self._retry(push, "429", delay, status=status, reason=reason)
        elif action is Action.RETRY_BACKOFF:
            after = parse_retry_after(_header(headers, b"retry-after"))
            delay = self._backoff.delay(push.attempts, after)
            self.limiter.pause(delay)
            self._retry(push, "5xx", delay, status=status, reason=reason)
        elif action is Action.REFRESH_AUTH:
            # Apple wedges a connection after ExpiredProviderToken: its later answers say
            # nothing about the token, so only the first answer on a connection may refresh
            # (and only if nobody refreshed since this push's token was minted).
            auth = self.auth
            if not conn.retiring and isinstance(auth, TokenAuth):
                current = push.auth_generation == auth.generation
                if auth.refresh(push.auth_generation):
                    # the new token goes out on new connections only: presented on a
                    # connection within 20 minutes of its last token, APNs answers 429
                    # TooManyProviderTokenUpdates
                    self.pool.retire_all("provider token refreshed")
                elif current:
                    # a token minted moments ago is called expired too: re-minting cannot
                    # fix that (TokenAuth allows one early refresh per interval)
                    self._config_failed(status, reason, hint=(
                        f"a provider token minted {auth.age():.0f} s ago was refused as "
                        f"expired: is this machine's clock right?"))
                    self._finish(push, Outcome.CONFIG_ERROR, status=status, reason=reason,
                                 apns_id=apns_id, latency=latency, error=self.config_error)
                    return
            conn.retire(f"APNs answered {reason}")
            self._retry(push, "auth", 0.0, status=status, reason=reason)
        elif action is Action.RECONNECT:
            conn.retire(f"APNs answered {reason}")
            self._retry(push, "reconnect", 0.0, status=status, reason=reason)
        else:  # pragma: no cover - classify() is total
            self._finish(push, Outcome.REJECTED, status=status, reason=reason, latency=latency)

    def _delivered(self, push: Push, headers: Headers, latency: float) -> None:
        """The 200 path of :meth:`on_response`, with :meth:`_close` inlined (once per push):
        the result carries only the fields that differ from their defaults."""
        p = push.prepared
        topic = p.topic
        guard = self._guards.get(topic)
        if guard is None:  # the topic's first delivery: it is confirmed
            guard = self._guards[topic] = _TopicGuard()
        if guard.run or not guard.confirmed:
            guard.confirmed = True
            guard.run = 0
            if guard.held:
                self._release(guard)
        if push.abandoned:
            return
        self._retire_push(push)
        answered = request_id = None
        for name, value in headers:  # apns-id, else apns-request-id: one pass
            if name == b"apns-id":
                answered = value
                break
            if name == b"apns-request-id" and request_id is None:
                request_id = value
        apns_id = _apns_id(answered or request_id, push.sent_id or p.apns_id)
        channel = p.channel_id
        if channel is None:
            result = Result(outcome=_DELIVERED, id=push.id, token=p.token, status=200,
                            apns_id=apns_id, attempts=push.attempts,
                            latency_ms=latency * 1000.0, resent=push.resent)
        else:
            result = Result(outcome=_DELIVERED, id=push.id, channel_id=channel, status=200,
                            apns_id=apns_id, attempts=push.attempts,
                            latency_ms=latency * 1000.0, resent=push.resent)
        self.events.push_finished(result, p.push_type, latency)
        push.sink.deliver(push, result)

    def on_unprocessed(self, conn: Connection[Push], push: Push, why: str) -> None:
        """APNs never saw ``push``: resend it, not counted as an attempt."""
        push.attempts -= 1  # the server never saw it
        push.resends += 1
        if push.resends > MAX_RESENDS:
            self._finish(push, Outcome.RETRIES_EXHAUSTED, error=f"resent {MAX_RESENDS} times: {why}")
            return
        self._retry(push, "unprocessed", 0.0, counts=False)

    def on_lost(self, conn: Connection[Push], push: Push, why: str) -> None:
        """The stream broke after ``push`` was sent: it may have been delivered."""
        self._maybe(push, f"connection lost: {why}", "lost")

    def on_timeout(self, conn: Connection[Push], push: Push) -> None:
        """No answer by the deadline: resend elsewhere, or report it maybe delivered."""
        push.avoid = conn  # never sent again where it timed out, if another connection is up
        self._maybe(push, f"no answer within {conn.timeout:g} s", "timeout")

    def _maybe(self, push: Push, why: str, cause: str) -> None:
        push.maybe = True
        if self.delivery == "at_most_once":
            self._finish(push, Outcome.MAYBE_DELIVERED, error=why)
        elif push.attempts >= self.max_attempts:
            self._finish(push, Outcome.MAYBE_DELIVERED, error=f"{why}; gave up after "
                                                              f"{push.attempts} attempts")
        else:
            self._retry(push, cause, self._backoff.delay(push.attempts) if cause == "lost" else 0.0)

    def _config_failed(self, status: int, reason: Reason | None, hint: str = "") -> None:
        if self.pool.halt_error is not None:
            return
        who = ""
        if isinstance(self.auth, TokenAuth):
            who = f" (key id {self.auth.key_id}, team {self.auth.team_id})"
        if not hint and reason is not None:  # what the reason says to check (outcome.py)
            info = REASONS.get(reason)
            hint = info.description if info is not None else ""
        hint = f": {hint}" if hint else ""
        error = (f"APNs refused the credentials or topic: {status} {reason}{who}{hint}; "
                 f"sending stopped")
        self.pool.halt(ConfigError(error))
        if self.log_config_errors:
            log.error("%s", error)

    def _invalidated(self, token: str, reason: Reason | None, timestamp: int | None) -> None:
        seen = self._invalid_seen
        if token in seen:
            return
        seen[token] = (reason, timestamp)
        if len(seen) > INVALID_MEMORY:
            seen.popitem(last=False)
        self.events.invalid_token(token, reason, timestamp)
        if self._on_invalid is not None:
            try:
                self._on_invalid(token, reason, timestamp)
            except Exception:  # a sink's bug must not lose the push's result
                log.exception("on_invalid_token callback failed for %s", redact(token))

    def _hold(self, push: Push, answer: dict[str, Any]) -> None:
        topic = push.prepared.topic
        if topic in self._tripped:
            self._finish(push, Outcome.CONFIG_ERROR, error=self._tripped[topic], **answer)
            return
        guard = self._guards.get(topic)
        if guard is None:
            guard = self._guards[topic] = _TopicGuard()
        guard.held.append((push, answer))
        self._held += 1
        guard.run += 1
        if guard.run >= self.topic_guard:
            self._trip(topic, guard)
        elif self._topic_out[topic] == len(guard.held):
            self._settle(guard)

    def _release(self, guard: _TopicGuard) -> None:
        """The topic is confirmed good: the held tokens are dead."""
        held, guard.held = guard.held, []
        self._held -= len(held)
        for push, answer in held:
            if not push.abandoned:
                self._invalidated(push.prepared.token, answer["reason"], answer["timestamp"])
                self._finish(push, Outcome.INVALID_TOKEN, **answer)

    def _settle(self, guard: _TopicGuard) -> None:
        """No verdict is coming (nothing else of the topic in flight): end what waits."""
        if guard.confirmed:
            self._release(guard)
            return
        held, guard.held = guard.held, []
        self._held -= len(held)
        for push, answer in held:
            if not push.abandoned:
                outcome, error = self._unjudged(push, guard, answer)
                self._finish(push, outcome, error=error, **answer)

    def _unjudged(self, push: Push, guard: _TopicGuard,
                  answer: dict[str, Any]) -> tuple[Outcome, str | None]:
        """The outcome of a held answer that ends before any verdict (settled, or a forced
        stop): dead on a confirmed topic, else rejected and not called dead."""
        if guard.confirmed:
            self._invalidated(push.prepared.token, answer["reason"], answer["timestamp"])
            return Outcome.INVALID_TOKEN, None
        topic = push.prepared.topic
        name = topic.decode(errors="replace") if topic else "broadcasts"
        return Outcome.REJECTED, (
            f"not confirmed dead: APNs answered {answer['reason']}, but no push to {name} in "
            f"{self.environment} has been delivered yet, and a wrong topic or environment "
            f"gets this answer for every token; not reported as an invalid token (send it "
            f"again once pushes to {name} are delivered)")

    def _trip(self, topic: bytes | None, guard: _TopicGuard) -> None:
        held, guard.held = guard.held, []
        self._held -= len(held)
        reasons = sorted({answer["reason"] for _, answer in held})
        name = topic.decode(errors="replace") if topic else "broadcasts"
        why = (f"every token refused for topic {name} in {self.environment}: "
               f"{guard.run} answers {' / '.join(reasons) or 'of the same kind'} in a row and "
               f"none delivered; is the topic (bundle id) and the environment right? Sending "
               f"to {name} stopped, no token reported invalid")
        self._tripped[topic] = why
        log.error("%s", why)
        for push, answer in held:
            self._finish(push, Outcome.CONFIG_ERROR, error=why, **answer)

    def reset_topic_guard(self, topic: str | None = None) -> None:
        """Send to a topic the guard stopped (all topics if None) once the cause is fixed."""
        if topic is None:
            self._tripped.clear()
            for guard in self._guards.values():
                guard.run = 0
        else:
            self._tripped.pop(topic.encode(), None)
            found = self._guards.get(topic.encode())
            if found is not None:
                found.run = 0

    def forget_invalid(self, token: str) -> None:
        """Send to ``token`` again: the device registered it anew after APNs called it
        invalid (and ``on_invalid_token`` will hear of it again if it is still dead)."""
        self._invalid_seen.pop(token, None)

    def reset_config_error(self) -> None:
        """Resume sending after the operator fixed the credentials."""
        self.pool.halt(None)


__all__ = ["Client", "prepare_broadcast"]
