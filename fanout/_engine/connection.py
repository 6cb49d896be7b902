"""One long-lived HTTP/2 connection to APNs: the hot path, top to bottom.

A connection is a state machine driven by one reader task (h2's model): it parses frames,
decodes response headers (hpackdec, checked against hpack's Decoder) and hands each
finished exchange to its :class:`StreamListener` (the client); its own lifecycle goes to a
:class:`ConnectionObserver` (the pool). Streams are started synchronously by :meth:`Connection.start`, which
encodes the request and appends its frames to an output list; a writer task encrypts all
pending frames in one TLS write per scheduler turn. There is no task per push.

Lifecycle: ``run`` connects (fresh DNS, TLS, ALPN h2), waits for the server's SETTINGS,
reports ready, then serves until it is retired (GOAWAY, stream ids exhausted, error,
close) and its remaining streams have ended.

Liveness: a connection is declared dead, closed once and its streams reported once, when
a PING goes unanswered for ``ping_timeout`` (PINGs follow ``stall_after`` seconds of
silence while streams are in flight, ``ping_interval`` when idle), when its writes cannot
drain for ``ping_timeout``, or when a stream misses its deadline and no stream was
answered since it was sent (wedged: the server may still answer PINGs).

Every stream leaves through :meth:`Connection._end_stream`, with exactly one listener
call: ``on_response``, ``on_unprocessed`` (never seen by the server: safe to resend),
``on_lost`` (may have been delivered) or ``on_timeout``; none only for a stream the caller
itself cancelled (:meth:`Connection.cancel`).
"""

from __future__ import annotations

import itertools
import logging
import os
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, Self, TypeVar

import hpack
import trio

from ..errors import ConfigError, ProtocolError, TransportError
from . import framer as fr
from .hpackdec import make_decoder
from .proxy import Proxy, open_tunnel
from .tls import TLSStream

log = logging.getLogger("fanout.connection")

MAX_HEADER_BLOCK = 64 * 1024     # a response header block larger than this is an attack
MAX_BODY = 64 * 1024             # APNs error bodies are ~50 bytes
RECV_WINDOW = 1 << 30            # we credit the server generously: bodies are tiny
STREAM_RECV_WINDOW = 1 << 20
ID_MARGIN = 1000                 # roll to a new connection this many ids before 2**31
# RST_STREAM budget per connection: a burst of resets is the HTTP/2 Rapid Reset pattern
# (CVE-2023-44487) that servers answer by closing the connection (Netty's guard: 200 per
# 30 s). Past the budget the connection is retired instead of resetting more streams.
RESET_BURST = 50
RESET_RATE = 2.0                 # resets per second that refill the budget
WRITE_CHUNK = 64 * 1024          # a write that cannot move this much in ping_timeout is stalled


class _QuietDebug:
    """hpack's module logger with ``debug`` short-circuited.

    hpack calls ``log.debug`` for every header field it decodes: about 15 calls per APNs
    response, ~10% of the hot path's CPU, even with DEBUG off. Installed only when nobody
    enabled hpack's debug output; everything but ``debug`` goes to the real logger.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def debug(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def _quiet_hpack() -> None:
    """Runs when fanout is imported, process-wide: h2, httpx and the mock share hpack's
    module logger, and all of them gain. To see hpack's debug output, enable DEBUG on the
    ``hpack`` logger before importing fanout."""
    import hpack.hpack as hpack_module

    logger = hpack_module.log
    if isinstance(logger, logging.Logger) and not logger.isEnabledFor(logging.DEBUG):
        # duck-typed: hpack only calls the logger's methods
        hpack_module.log = _QuietDebug(logger)  # type: ignore[assignment]


_quiet_hpack()


def _first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


Headers = Sequence[tuple[bytes, bytes]]


class Request(Protocol):
    """What a connection reads of a push ready to send (``fanout.payload.Prepared``)."""

    path: bytes
    body: bytes
    topic: bytes | None  # None: a broadcast, which has no apns-topic
    push_type: bytes
    priority: bytes
    expiration: bytes | None
    collapse_id: bytes | None
    apns_id: bytes | None
    extra: list[tuple[bytes, bytes]] | None
    stamp: Callable[[], bytes] | None  # rebuilds the body at send time (Live Activities)


class HeaderAuth(Protocol):
    """Credentials sent in every request's ``authorization`` header (a provider token)."""

    @property
    def generation(self) -> int:
        """Changes with every new token (a stream remembers the one it was sent with)."""
        ...

    def header(self) -> bytes:
        """The header value, ``b"bearer <jwt>"``."""
        ...


class EngineEvents(Protocol):
    """The hooks of ``fanout.events.Events`` the engine calls (it cannot import them)."""

    def stream_reset(self, conn: Connection[Any]) -> None:
        """A stream was reset, by either side."""

    def goaway(self, conn: Connection[Any], reason: str | None) -> None:
        """A GOAWAY arrived."""

    def connection_opened(self, conn: Connection[Any]) -> None:
        """A connection is ready."""

    def connection_retired(self, conn: Connection[Any], why: str) -> None:
        """A connection takes no new streams."""

    def connection_closed(self, conn: Connection[Any]) -> None:
        """A connection closed."""

    def connection_failed(self, index: int, exc: BaseException) -> None:
        """A connection attempt failed."""


class Exchange:
    """Per-stream state the connection keeps on the job object (the engine's push).

    ``__init__`` sets what lives across attempts; :meth:`Connection.start` sets the
    per-stream fields before anything reads them (a push costs no more than that)."""

    __slots__ = ("prepared", "sid", "conn", "sent_at", "window", "body_off", "status",
                 "resp_headers", "resp_body", "auth_generation", "avoid", "sent_id")

    prepared: Request
    sid: int                          # its stream id on ``conn``
    conn: Connection[Self] | None     # where it is in flight; None between attempts
    sent_at: float                    # trio clock at start
    window: int                       # the stream's send window
    body_off: int                     # body bytes sent so far
    status: int                       # 0 until the response's :status arrives
    resp_headers: Headers
    resp_body: bytearray | None
    auth_generation: int              # the provider token's generation it was sent with
    avoid: Connection[Self] | None    # timed out there: resend elsewhere if possible
    sent_id: bytes | None             # the apns-id its last attempt carried

    def __init__(self, prepared: Request) -> None:
        self.prepared = prepared
        self.sid = 0
        self.conn = None
        self.auth_generation = 0
        self.avoid = None
        self.sent_id = None


E = TypeVar("E", bound=Exchange)


class StreamListener(Protocol[E]):
    """Where each stream ends (the client): exactly one call per stream, except one the
    caller itself cancelled (:meth:`Connection.cancel`)."""

    def on_response(self, conn: Connection[E], job: E, status: int, headers: Headers,
                    body: bytes) -> None:
        """The server answered (any status)."""

    def on_unprocessed(self, conn: Connection[E], job: E, why: str) -> None:
        """The server never saw the stream (GOAWAY above last-stream-id, REFUSED_STREAM):
        safe to resend."""

    def on_lost(self, conn: Connection[E], job: E, why: str) -> None:
        """The stream broke after it was sent: it may have been delivered."""

    def on_timeout(self, conn: Connection[E], job: E) -> None:
        """No answer by the deadline; the stream was reset (it may have been delivered)."""


class ConnectionObserver(Protocol[E]):
    """The connection's lifecycle (the pool)."""

    def on_capacity(self, conn: Connection[E]) -> None:
        """A stream slot may have freed, or the connection became usable."""

    def on_retired(self, conn: Connection[E], why: str) -> None:
        """No new streams from now on; it closes once its streams have ended."""

    def on_closed(self, conn: Connection[E]) -> None:
        """Closed, every stream ended (``conn.error`` says why, if it failed)."""


# how a stream ends (_end_stream): the listener call it gets
_ANSWERED, _UNPROCESSED, _LOST, _TIMED_OUT, _CANCELLED = range(5)
_NO_RESET = -1
_NO_HEADERS: Headers = ()

#: apns-ids of pushes that came without one: a random UUID's first 24 characters (version 4,
#: variant bits) and a 48-bit counter, canonical 8-4-4-4-12 lowercase as APNs wants
_ID_PREFIX = str(uuid.uuid4())[:24].encode()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))
_APNS_ID_36 = fr.literal_never_indexed(b"apns-id", b"")[:-1] + fr.encode_int(36, 7, 0)
_PATH_PREFIX: dict[int, bytes] = {}  # :method, :scheme and the :path literal up to its value
_pack_hdr = fr._HDR.pack  # a frame header: (length >> 16, length & 0xFFFF, type, flags, sid)
_END_HEADERS_STREAM = fr.END_HEADERS | fr.END_STREAM
# what Connection._receive reads per frame, as module constants
_HDR_UNPACK = fr._HDR.unpack_from
_U32_UNPACK = fr._U32.unpack_from
_HEADERS, _WINDOW_UPDATE, _MAX_SID = fr.HEADERS, fr.WINDOW_UPDATE, fr.MAX_STREAM_ID
_END_HEADERS = fr.END_HEADERS
_HEADERS_MASK = fr.PADDED | fr.PRIORITY_FLAG | fr.END_HEADERS


class Connection(Generic[E]):
    """One HTTP/2 connection: streams of jobs of type ``E`` end at ``listener``; its
    lifecycle goes to ``observer``."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        listener: StreamListener[E],
        observer: ConnectionObserver[E],
        *,
        auth: HeaderAuth | None = None,
        index: int = 0,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
        ping_interval: float = 60.0,
        ping_timeout: float = 5.0,
        stall_after: float | None = None,
        max_streams_cap: int = 4000,
        first_stream_id: int = 1,
        authority: str | None = None,
        events: EngineEvents | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        self.host = host
        self._proxy = proxy  # an HTTP CONNECT proxy to tunnel through (fanout._engine.proxy)
        self.port = port
        self.index = index
        self._ctx = ssl_context
        self._listener = listener
        self._observer = observer
        self._auth = auth
        self._events = events  # fanout.events.Events or None: stream_reset, goaway
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        # silence with streams in flight that earns a PING (APNs answers in milliseconds)
        self._stall_after = stall_after if stall_after is not None else min(2.0, timeout / 2)
        self._cap = max_streams_cap
        self._authority = (authority or (host if port == 443 else f"{host}:{port}")).encode()

        self.streams: dict[int, E] = {}
        self.remote_max_streams: int = 0          # 0 until the server's first SETTINGS arrives
        self.limit: int = 0  # min(remote_max_streams, max_streams_cap): read at every push
        self.ready: bool = False
        self.retiring: bool = False
        self.closed: bool = False
        self.retire_reason: str = ""
        self.goaway_last_id: int | None = None
        self.goaway_reason: str | None = None
        self.streams_started: int = 0
        self.pings_sent: int = 0
        self.successes: int = 0            # streams answered 200: the connection did real work
        self.resets_withheld: int = 0      # streams dropped without RST_STREAM (budget spent)
        self.error: BaseException | None = None   # why the connection failed, if it did

        self._next_sid = first_stream_id | 1
        self._encoder = fr.RequestEncoder(4096)
        self._decoder = make_decoder(MAX_HEADER_BLOCK)  # hpackdec; FANOUT_HPACK=hpack: hpack's
        self._reader = fr.FrameReader(fr.DEFAULT_MAX_FRAME)
        self._send_window = 65535
        self._initial_window = 65535
        self._max_frame_out = fr.DEFAULT_MAX_FRAME
        self._recv_unacked = 0
        self._blocked: deque[E] = deque()
        self._cont_sid = 0
        self._cont_flags = 0
        self._cont_buf: list[bytes] = []
        self._cont_len = 0

        self._out: list[bytes] = []
        self._wake = trio.Event()
        self._wake_pending = False
        self._ready_event = trio.Event()
        self._finished = trio.Event()
        self._ping_ack = trio.Event()
        self._probe_now = trio.Event()
        self.suspect: bool = False     # probed (a sibling died): no new streams until proven alive
        self._needs_answer = False  # ... by an answered stream, not just a PING
        self._probe_acked = False   # the probe's PING was answered
        # trio.current_time without its three wrapping frames (set in run: the run's clock)
        self._now: Callable[[], float] = trio.current_time
        self.last_recv: float = 0.0  # trio clock at the latest read: an answer's arrival
        self._write_since = 0.0  # a write under way since (trio clock); 0.0: none
        self._last_complete = float("-inf")  # last_recv of the latest answered stream
        self._reset_tokens = float(RESET_BURST)
        self._reset_at = 0.0
        self._tls: TLSStream | None = None
        self.retired_event: trio.Event = trio.Event()
        self.opened_at: float = 0.0

    # ------------------------------------------------------------------ capacity

    @property
    def capacity(self) -> int:
        """Streams it can start now (0 unless ready, not retiring and not suspect)."""
        if not self.ready or self.retiring or self.suspect:
            return 0
        return self.limit - len(self.streams)

    @property
    def stream_limit(self) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS, capped by ``max_streams_cap``."""
        return self.limit

    # ------------------------------------------------------------------ sending

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        if not self._wake_pending:
            self._wake_pending = True
            self._wake.set()

    def start(self, job: E) -> None:
        """Open a stream for ``job`` and queue its frames. Requires ``capacity > 0``."""
        p = job.prepared
        sid = self._next_sid
        self._next_sid = sid + 2
        auth = self._auth
        topic = p.topic
        consts: tuple[bytes, ...]
        if auth is not None:
            token = auth.header()
            job.auth_generation = auth.generation
            if topic is not None:
                consts = (b":authority", self._authority, b"authorization", token,
                          b"apns-topic", topic, b"apns-push-type", p.push_type,
                          b"apns-priority", p.priority)
            else:  # broadcasts: no apns-topic
                consts = (b":authority", self._authority, b"authorization", token,
                          b"apns-push-type", p.push_type, b"apns-priority", p.priority)
        elif topic is not None:
            consts = (b":authority", self._authority, b"apns-topic", topic,
                      b"apns-push-type", p.push_type, b"apns-priority", p.priority)
        else:
            consts = (b":authority", self._authority, b"apns-push-type", p.push_type,
                      b"apns-priority", p.priority)
        lead, rest = self._encoder.constant(consts)
        path = p.path
        pre = _PATH_PREFIX.get(len(path))
        if pre is None:
            pre = _PATH_PREFIX[len(path)] = fr.METHOD_POST + fr.SCHEME_HTTPS \
                + fr.literal_never_indexed(b":path", b"")[:-1] + fr.encode_int(len(path), 7, 0)
        block = lead + pre + path + rest
        # every device push carries an apns-id (the caller's, or one of ours): APNs echoes
        # it, so the answer's need not be decoded (hpackdec.Encoded)
        apns_id = p.apns_id
        if apns_id is None and topic is not None:
            apns_id = _ID_PREFIX + b"%012x" % (next(_ID_COUNTER) & 0xFFFFFFFFFFFF)
        job.sent_id = apns_id
        if apns_id is not None:
            if len(apns_id) == 36:
                block += _APNS_ID_36 + apns_id
            else:
                block += fr.literal_never_indexed(b"apns-id", apns_id)
        if p.expiration is not None:
            block += fr.literal_never_indexed(b"apns-expiration", p.expiration)
        if p.collapse_id is not None:
            block += fr.literal_never_indexed(b"apns-collapse-id", p.collapse_id)
        extra = p.extra
        if extra:
            for name, value in extra:
                block += fr.literal_never_indexed(name, value)

        job.sid = sid
        job.conn = self
        job.sent_at = self._now()
        job.status = 0
        job.resp_headers = _NO_HEADERS
        job.resp_body = None
        self.streams[sid] = job
        self.streams_started += 1
        if self._next_sid > fr.MAX_STREAM_ID - ID_MARGIN:
            self.retire("stream ids exhausted")

        if p.stamp is not None:  # Live Activity: timestamp written now (a retry restamps)
            p.body = p.stamp()
        body = p.body
        n = len(body)
        k = len(block)
        if k > self._max_frame_out:
            self._send_headers_split(sid, block, end_stream=not n)
        elif n == 0:
            self._send(_pack_hdr(k >> 16, k & 0xFFFF, fr.HEADERS, _END_HEADERS_STREAM, sid)
                       + block)
            return
        else:
            hdr = _pack_hdr(k >> 16, k & 0xFFFF, fr.HEADERS, fr.END_HEADERS, sid) + block
            if n <= self._send_window and n <= self._initial_window and n <= self._max_frame_out \
                    and not self._blocked:
                self._send_window -= n
                job.window = self._initial_window - n
                job.body_off = n
                self._send(hdr + _pack_hdr(n >> 16, n & 0xFFFF, fr.DATA, fr.END_STREAM, sid)
                           + body)
                return
            self._send(hdr)
        if n:
            job.window = self._initial_window
            job.body_off = 0
            self._blocked.append(job)
            self._pump_blocked()

    def _send_headers_split(self, sid: int, block: bytes, end_stream: bool) -> None:
        size = self._max_frame_out
        chunks = [block[i:i + size] for i in range(0, len(block), size)]
        flags = fr.END_STREAM if end_stream else 0
        parts = [fr.frame(fr.HEADERS, flags | (fr.END_HEADERS if len(chunks) == 1 else 0),
                          sid, chunks[0])]
        for i, chunk in enumerate(chunks[1:], 2):
            parts.append(fr.frame(fr.CONTINUATION,
                                  fr.END_HEADERS if i == len(chunks) else 0, sid, chunk))
        self._send(b"".join(parts))

    def _pump_blocked(self) -> None:
        """Send body bytes of flow-controlled streams, oldest first, as windows allow."""
        keep: deque[E] = deque()
        blocked = self._blocked
        while blocked:
            job = blocked.popleft()
            if self.streams.get(job.sid) is not job:
                continue  # cancelled or reset meanwhile
            body = job.prepared.body
            while job.body_off < len(body):
                n = min(len(body) - job.body_off, self._send_window, job.window,
                        self._max_frame_out)
                if n <= 0:
                    break
                end = job.body_off + n
                flags = fr.END_STREAM if end == len(body) else 0
                self._send(fr.frame(fr.DATA, flags, job.sid, body[job.body_off:end]))
                job.body_off = end
                job.window -= n
                self._send_window -= n
            if job.body_off < len(body):
                keep.append(job)
                if self._send_window <= 0:
                    keep.extend(blocked)
                    break
        self._blocked = keep

    def cancel(self, job: E, code: int = fr.CANCEL) -> bool:
        """Reset ``job``'s stream (RST_STREAM) and free its slot. False if not in flight here.

        The caller decides the push's outcome: the listener hears nothing of it. Within the
        reset budget only: past it the stream is dropped without a frame and the connection
        retires (no new streams; it closes once the others have ended)."""
        if self.streams.get(job.sid) is not job:
            return False
        self._end_stream(job.sid, job, _CANCELLED, "", code)
        return True

    def _reset(self, sid: int, code: int) -> None:
        """RST_STREAM for a stream that just ended here, within the reset budget."""
        if self.closed:
            return
        if self._take_reset():
            self._send(fr.rst_stream(sid, code))
            if self._events is not None:
                self._events.stream_reset(self)
        else:
            self.resets_withheld += 1
            self.retire("too many stream resets (Rapid Reset guard)")

    def _take_reset(self) -> bool:
        now = trio.current_time()
        tokens = min(float(RESET_BURST), self._reset_tokens + (now - self._reset_at) * RESET_RATE)
        self._reset_at = now
        if tokens < 1.0:
            self._reset_tokens = tokens
            return False
        self._reset_tokens = tokens - 1.0
        return True

    def retire(self, why: str) -> None:
        """No new streams; close once the open ones have ended."""
        self._mark_retiring(why)
        if not self.streams:
            self._finished.set()

    def _mark_retiring(self, why: str) -> None:
        if not self.retiring:
            self.retiring = True
            self.retire_reason = why
            self.retired_event.set()
            self._observer.on_retired(self, why)

    def _end_stream(self, sid: int, job: E, how: int, why: str = "",
                    reset: int = _NO_RESET) -> None:
        """The one way out of a stream: it leaves ``streams``, gets its one listener call
        (none if the caller cancelled it), and its slot goes back to the pool. ``reset``:
        an RST_STREAM error code to send first."""
        del self.streams[sid]
        job.conn = None
        if how == _ANSWERED:
            self._last_complete = self.last_recv
            status = job.status
            if status == 200:
                self.successes += 1
            if self.suspect:
                self._clear_suspect()
            body = bytes(job.resp_body) if job.resp_body else b""
            self._listener.on_response(self, job, status, job.resp_headers, body)
        else:
            if reset != _NO_RESET:
                self._reset(sid, reset)
            if how == _UNPROCESSED:
                self._listener.on_unprocessed(self, job, why)
            elif how == _LOST:
                self._listener.on_lost(self, job, why)
            elif how == _TIMED_OUT:
                self._listener.on_timeout(self, job)
        if self.retiring:  # no capacity to announce
            if not self.streams:
                self._finished.set()
            return
        if self.suspect and self._probe_acked and not self.streams:
            self._clear_suspect()  # the stuck streams are gone; the PING was answered
        self._observer.on_capacity(self)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve until retired and drained. Errors before ready are raised."""
        self._now = trio.lowlevel.current_clock().current_time  # trio.current_time's source
        tls = self._tls = await self._connect()
        tls.write(fr.PREFACE + fr.settings_frame({
            fr.S_ENABLE_PUSH: 0,
            fr.S_MAX_CONCURRENT_STREAMS: 100,
            fr.S_INITIAL_WINDOW_SIZE: STREAM_RECV_WINDOW,
            fr.S_HEADER_TABLE_SIZE: 4096,
        }) + fr.window_update(0, RECV_WINDOW - 65535))
        started: list[bool] = []
        error: BaseException | None = None
        try:
            await self._serve(started, task_status)
        except Exception as exc:
            error = self._failure(exc)
        finally:
            self.closed = True
            self.ready = False
            self.error = error
            await tls.aclose()
            why = str(error) if error else "closed"
            self._mark_retiring(why)
            self._fail_all(why)
            self._observer.on_closed(self)
        if error is not None and not started:
            raise error
        if error is not None:
            log.warning("connection %d to %s:%d closed: %s", self.index, self.host, self.port,
                        error)

    async def _connect(self) -> TLSStream:
        """TCP (or a proxy's tunnel), then TLS with ALPN h2, within ``connect_timeout``."""
        try:
            with trio.fail_after(self._connect_timeout):
                if self._proxy is not None:
                    sock = await open_tunnel(self._proxy, self.host, self.port)
                else:
                    try:
                        sock = await trio.open_tcp_stream(self.host, self.port)
                    except OSError as exc:
                        # trio's "all attempts to connect failed" hides the why in __cause__
                        cause = exc.__cause__
                        leaf = _first_leaf(cause) if isinstance(cause, BaseExceptionGroup) \
                            else exc
                        why = getattr(leaf, "strerror", None) or leaf
                        raise TransportError(
                            f"connect to {self.host}:{self.port} failed: {why}") from None
                tls = TLSStream(sock, self._ctx, self.host)
                try:
                    await tls.handshake()
                    if tls.alpn != "h2":
                        raise ConfigError(
                            f"{self.host}:{self.port} did not negotiate HTTP/2 via ALPN "
                            f"(got {tls.alpn!r}); APNs requires h2")
                except BaseException:
                    await tls.aclose()
                    raise
        except trio.TooSlowError:
            raise TransportError(f"connect to {self.host}:{self.port} timed out") from None
        return tls

    async def _serve(self, started: list[bool], task_status: trio.TaskStatus[None]) -> None:
        """The connection's tasks, from the server's first SETTINGS (then ``started``) until
        it is retired and drained; a polite GOAWAY last."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop)
            nursery.start_soon(self._write_loop)
            self._wake.set()
            with trio.fail_after(self._connect_timeout):
                await self._ready_event.wait()
            started.append(True)
            self.opened_at = trio.current_time()
            task_status.started()
            nursery.start_soon(self._reaper)
            nursery.start_soon(self._watchdog)
            await self._finished.wait()
            self._send(fr.goaway(0, fr.NO_ERROR))
            with trio.move_on_after(1):
                await self._flush_now()
            nursery.cancel_scope.cancel()

    def _failure(self, exc: Exception) -> BaseException:
        """The error a connection that failed while serving reports."""
        leaf = _first_leaf(exc)
        if isinstance(leaf, trio.TooSlowError):
            return TransportError(f"{self.host}:{self.port}: no SETTINGS from the server")
        if isinstance(leaf, TransportError | ConfigError):
            return leaf
        # a bug or an unexpected library error: fail this connection, loudly
        log.error("connection %d failed unexpectedly", self.index, exc_info=exc)
        return TransportError(f"internal error: {leaf!r}")

    async def _flush_now(self) -> None:
        tls = self._tls
        assert tls is not None  # connected
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            tls.write(data)
        await tls.flush()

    def _fail_all(self, why: str) -> None:
        """The connection closed: every stream still open ends (unprocessed if above a
        GOAWAY's last-stream-id, else lost)."""
        self._blocked.clear()
        last = self.goaway_last_id
        for sid, job in list(self.streams.items()):
            if last is not None and sid > last:
                self._end_stream(sid, job, _UNPROCESSED, "GOAWAY: above last-stream-id")
            else:
                self._end_stream(sid, job, _LOST, why)

    async def _write_loop(self) -> None:
        tls = self._tls
        assert tls is not None  # started once connected
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._wake_pending = False
            if self._out:
                data = b"".join(self._out)
                self._out.clear()
                tls.write(data)
            # a server that stops reading (or a zero TCP window) blocks the send: what is
            # queued behind it would grow without bound, so the watchdog kills a connection
            # whose write has not moved a chunk for ping_timeout, like an unanswered PING
            if tls.pending():
                self._write_since = trio.current_time()
                await tls.flush_chunks(WRITE_CHUNK, self._wrote)
                self._write_since = 0.0

    def _wrote(self) -> None:
        self._write_since = trio.current_time()

    async def _reaper(self) -> None:
        """Stream deadlines (APNs sometimes never answers a stream).

        A stream past its deadline, while the connection goes on answering others (one after
        it was sent, and one within the last ``stall_after`` seconds), was dropped by the
        server: it is reset (within the reset budget) and reported. Otherwise the connection
        is wedged: it is closed and every stream on it is reported lost once; resetting them
        one by one would be a Rapid Reset burst and waste an attempt each (and a push sent
        just before the server stalled would be resent onto a sibling stalling with it)."""
        while True:
            if not self.streams:
                await trio.sleep(self._stall_after)
                continue
            now = trio.current_time()
            first = next(iter(self.streams.values()))
            due = first.sent_at + self.timeout
            if due > now:
                await trio.sleep_until(due)
                continue
            last = self._last_complete
            if last <= first.sent_at or now - last >= self._stall_after:
                quiet = self.timeout if last <= first.sent_at else now - last
                raise TransportError(f"wedged: no stream answered for {quiet:.3g} s "
                                     f"({len(self.streams)} in flight)")
            last_complete = self._last_complete
            expired = []
            for job in self.streams.values():
                if job.sent_at + self.timeout > now or job.sent_at >= last_complete:
                    break
                expired.append(job)
            for job in expired:
                if self.streams.get(job.sid) is job:
                    self._end_stream(job.sid, job, _TIMED_OUT, "", fr.CANCEL)

    async def _watchdog(self) -> None:
        """PING after ``stall_after`` s of silence while streams are in flight (a relay or
        NAT that forgot the flow looks like a slow server until a PING goes unanswered),
        after ``ping_interval`` s when idle; no answer within ``ping_timeout``: dead. Also
        dead: a write that has not moved a chunk for ``ping_timeout``."""
        stall = self._stall_after
        while True:
            # due: stall_after after the later of the last frame received and the oldest
            # stream in flight (re-checked at least every stall_after: a stream may start,
            # a write may stall)
            now = trio.current_time()
            since = self._write_since
            if since and now - since >= self._ping_timeout:
                raise TransportError(f"writes stalled: the server took nothing for "
                                     f"{now - since:.3g} s")
            if self.streams:
                oldest = next(iter(self.streams.values())).sent_at
                due = max(self.last_recv, oldest) + stall
            else:
                due = min(self.last_recv + self._ping_interval, now + stall)
            if due > now and not self._probe_now.is_set():
                with trio.move_on_at(due):
                    await self._probe_now.wait()
            if self._probe_now.is_set():  # probe(): PING now, once
                self._probe_now = trio.Event()
                if not self.suspect:
                    continue
            elif self.streams:
                oldest = next(iter(self.streams.values())).sent_at
                if trio.current_time() - max(self.last_recv, oldest) < stall:
                    continue
            elif trio.current_time() - self.last_recv < self._ping_interval:
                continue
            self._ping_ack = trio.Event()
            self.pings_sent += 1
            self._send(fr.ping(b"fanout\x00\x00"))
            with trio.move_on_after(self._ping_timeout):
                await self._ping_ack.wait()
                if self.suspect:
                    self._probe_acked = True
                    if not self._needs_answer or not self.streams:
                        self._clear_suspect()
                continue
            raise TransportError(f"no PING answer within {self._ping_timeout:g} s")

    def probe(self) -> None:
        """Another connection to the same server just died of silence or a wedge: this one
        may be going the same way. It takes no new streams until it answers a PING, or, if
        nothing was answered on it since its oldest stream in flight was sent (a window that
        never opens, a server that answers PINGs only), until it answers a stream; so the
        pushes resent from the dead one do not spend their next attempt here unseen."""
        if self.ready and not self.closed and not self.suspect:
            self.suspect = True
            self._probe_acked = False
            streams = self.streams
            self._needs_answer = bool(streams) and \
                self._last_complete <= next(iter(streams.values())).sent_at
            self._probe_now.set()

    def _clear_suspect(self) -> None:
        self.suspect = self._needs_answer = self._probe_acked = False
        self._observer.on_capacity(self)

    # ------------------------------------------------------------------ receiving

    async def _read_loop(self) -> None:
        """Receive and act on what the server sends (:meth:`_receive`), until it closes."""
        tls = self._tls
        assert tls is not None  # started once connected
        receive = self._receive
        now = self._now
        while True:
            data = await tls.receive()
            if not data:
                if self.retiring and not self.streams:
                    self._finished.set()
                    return
                raise TransportError("connection closed by the server")
            self.last_recv = now()
            receive(data)

    def _receive(self, data: bytes) -> None:
        """The server's bytes: split into frames (a frame begun here is kept for the next
        call) and act on each. The two frames every push brings (a plain HEADERS answer,
        and nginx's connection WINDOW_UPDATE per DATA frame) are handled inline; every
        other frame goes through :meth:`_handle`. Raises :class:`ProtocolError` for bytes
        that break the protocol."""
        reader = self._reader
        buf = reader.buf
        if buf:
            buf += data
            data = bytes(buf)
            del buf[:]
        handle = self._handle
        on_headers = self._on_headers
        unpack = _HDR_UNPACK
        pos, end, limit = 0, len(data), reader.max_frame_size
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            length = (hi << 16) | lo
            if length > limit:
                raise ProtocolError(f"frame of {length} bytes exceeds "
                                    f"SETTINGS_MAX_FRAME_SIZE {limit}")
            stop = pos + 9 + length
            if stop > end:
                break
            sid &= _MAX_SID
            if ftype == _HEADERS and flags & _HEADERS_MASK == _END_HEADERS and sid \
                    and not self._cont_sid:
                on_headers(sid, flags, data[pos + 9:stop])
            elif ftype == _WINDOW_UPDATE and length == 4 and not self._cont_sid:
                inc = _U32_UNPACK(data, pos + 9)[0] & _MAX_SID
                if inc == 0:
                    raise ProtocolError("WINDOW_UPDATE with zero increment")
                if not sid:
                    self._send_window += inc
                    if self._send_window > fr.MAX_WINDOW:
                        raise ProtocolError("connection flow-control window over 2**31-1")
                else:
                    job = self.streams.get(sid)
                    if job is None:
                        pos = stop
                        continue  # the stream has ended
                    job.window += inc
                if self._blocked:
                    self._pump_blocked()
            else:
                handle(ftype, flags, sid, data[pos + 9:stop])
            pos = stop
        if pos < end:
            buf += data[pos:] if pos else data

    def _handle(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._cont_sid and ftype != fr.CONTINUATION:
            raise ProtocolError("expected CONTINUATION")
        if ftype == fr.HEADERS:
            if sid == 0:
                raise ProtocolError("HEADERS on stream 0")
            payload = fr.strip_padding(flags, payload, ftype)
            if flags & fr.END_HEADERS:
                self._on_headers(sid, flags, payload)
            else:
                self._cont_sid, self._cont_flags = sid, flags
                self._cont_buf = [payload]
                self._cont_len = len(payload)
        elif ftype == fr.DATA:
            self._on_data(sid, flags, payload)
        elif ftype == fr.CONTINUATION:
            if sid != self._cont_sid or not sid:
                raise ProtocolError("unexpected CONTINUATION")
            self._cont_len += len(payload)
            if self._cont_len > MAX_HEADER_BLOCK:
                raise ProtocolError(f"header block over {MAX_HEADER_BLOCK} bytes")
            self._cont_buf.append(payload)
            if flags & fr.END_HEADERS:
                block = b"".join(self._cont_buf)
                self._cont_sid, self._cont_buf = 0, []
                self._on_headers(sid, self._cont_flags, block)
        elif ftype == fr.SETTINGS:
            if sid:
                raise ProtocolError("SETTINGS on a stream")
            if flags & fr.ACK:
                if payload:
                    raise ProtocolError("SETTINGS ACK with a payload")
                return
            self._on_settings(fr.parse_settings(payload))
        elif ftype == fr.WINDOW_UPDATE:
            inc = fr.parse_u32(payload, "WINDOW_UPDATE")
            if inc == 0:
                raise ProtocolError("WINDOW_UPDATE with zero increment")
            if sid == 0:
                self._send_window += inc
                if self._send_window > fr.MAX_WINDOW:
                    raise ProtocolError("connection flow-control window over 2**31-1")
            else:
                job = self.streams.get(sid)
                if job is None:
                    return
                job.window += inc
            if self._blocked:
                self._pump_blocked()
        elif ftype == fr.PING:
            if len(payload) != 8 or sid:
                raise ProtocolError("malformed PING")
            if flags & fr.ACK:
                self._ping_ack.set()
            else:
                self._send(fr.ping(payload, ack=True))
        elif ftype == fr.RST_STREAM:
            code = fr.parse_u32(payload, "RST_STREAM")
            job = self.streams.get(sid)
            if job is not None:
                if self._events is not None:
                    self._events.stream_reset(self)
                if code == fr.REFUSED_STREAM:
                    self._end_stream(sid, job, _UNPROCESSED, "RST_STREAM(REFUSED_STREAM)")
                else:
                    self._end_stream(sid, job, _LOST, f"RST_STREAM(code {code})")
        elif ftype == fr.GOAWAY:
            self._on_goaway(payload)
        elif ftype == fr.PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE received though push is disabled")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §4.1, §5.5)

    def _on_settings(self, settings: dict[int, int]) -> None:
        for key, value in settings.items():
            if key == fr.S_MAX_CONCURRENT_STREAMS:
                self.remote_max_streams = value
                self.limit = min(value, self._cap)
            elif key == fr.S_INITIAL_WINDOW_SIZE:
                if value > fr.MAX_WINDOW:
                    raise ProtocolError("SETTINGS_INITIAL_WINDOW_SIZE over 2**31-1")
                delta = value - self._initial_window
                self._initial_window = value
                for job in self.streams.values():
                    job.window += delta
            elif key == fr.S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE {value} out of range")
                self._max_frame_out = value
            elif key == fr.S_HEADER_TABLE_SIZE:
                self._encoder.set_max_size(value)
        if fr.S_MAX_CONCURRENT_STREAMS not in settings and not self.ready:
            self.remote_max_streams = self.limit = self._cap  # RFC default: unlimited
        self._send(fr.SETTINGS_ACK)
        if self._blocked:
            self._pump_blocked()
        if not self.ready:
            self.ready = True
            self._ready_event.set()
        self._observer.on_capacity(self)

    def _on_goaway(self, payload: bytes) -> None:
        last, code, debug = fr.parse_goaway(payload)
        self.goaway_last_id = last
        reason = None
        if debug:
            try:
                import msgspec

                reason = msgspec.json.decode(debug).get("reason")
            except Exception:  # noqa: BLE001 - debug data is free-form
                reason = debug[:100].decode("utf-8", "replace")
        self.goaway_reason = str(reason) if reason else None
        if self._events is not None:
            self._events.goaway(self, self.goaway_reason)
        # retired first: the streams handed back are never restarted here
        self.retire(f"GOAWAY (code {code}, reason {self.goaway_reason or '-'})")
        for sid in [s for s in self.streams if s > last]:
            self._end_stream(sid, self.streams[sid], _UNPROCESSED, "GOAWAY: above last-stream-id")

    def _on_headers(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers: Headers = self._decoder.decode(block)
        except hpack.HPACKError as exc:
            # hpack's messages may end with the repr of a memoryview: keep the words only
            why = str(exc).split(": <memory")[0]
            raise ProtocolError(f"HPACK decoding failed ({type(exc).__name__}): {why}") from None
        job = self.streams.get(sid)
        if job is None:
            if sid >= self._next_sid:
                raise ProtocolError(f"HEADERS on idle stream {sid}")
            return  # a stream we reset: the block still had to be decoded
        if job.status == 0:
            status = 0
            for name, value in headers:
                if name == b":status":
                    try:
                        status = int(value)
                    except ValueError:
                        raise ProtocolError("non-numeric :status") from None
                    break
            if status == 0:
                raise ProtocolError("response without :status")
            if status < 200:
                return  # informational
            job.status = status
            job.resp_headers = headers
        if flags & fr.END_STREAM:
            self._end_stream(sid, job, _ANSWERED)

    def _on_data(self, sid: int, flags: int, payload: bytes) -> None:
        self._recv_unacked += len(payload)
        if self._recv_unacked >= RECV_WINDOW // 2:
            self._send(fr.window_update(0, self._recv_unacked))
            self._recv_unacked = 0
        if sid == 0:
            raise ProtocolError("DATA on stream 0")
        job = self.streams.get(sid)
        if job is None:
            return
        if job.status == 0:
            raise ProtocolError("DATA before response HEADERS")
        data = fr.strip_padding(flags, payload, fr.DATA)
        if data:
            if job.resp_body is None:
                job.resp_body = bytearray(data)
            else:
                job.resp_body += data
            if len(job.resp_body) > MAX_BODY:
                self._end_stream(sid, job, _LOST, "response body too large", fr.CANCEL)
                return
        if flags & fr.END_STREAM:
            self._end_stream(sid, job, _ANSWERED)
