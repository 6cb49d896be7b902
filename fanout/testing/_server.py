"""The listener and the per-connection HTTP/2 driver: TLS with ALPN ``h2``, the ``h2`` state
machine fed one frame at a time, stream limits, GOAWAY, closes, and :class:`MockStats` counting.
What a request is answered is decided by :mod:`._device` and :mod:`._broadcast`; what a
connection does alike on both paths is :class:`._fast.ConnectionBase`, which it builds on."""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
from collections import Counter
from functools import partial
from typing import Literal, Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from . import _faults
from ._apple import DEVICE_PREFIX
from ._config import MockConfig, MockStats
from ._fast import (
    _BODY_CAP,
    _GOAWAY_PING,
    _LINGER,
    _MAX_FRAME_SIZE,
    _MAX_HEADER_LIST,
    STATS_PATH,
    ConnectionBase,
    _stats_answer,
    count_connection,
    serve_fast,
)
from ._http import Headers, Request, response
from ._jwt import TokenCache, TokenInfo
from .devcerts import TestPKI, server_ssl_context

log: logging.Logger = logging.getLogger("fanout.mock")

_PREFACE_LEN = 24
_FRAME_HEADER_LEN = 9
_FRAME_HEADERS = 0x1
_READ_SIZE = 65_536
_SERVER_PING = b"fanoutSP"  # server_ping_interval's PINGs
_STOPPED_POLL = 0.1  # stop_reading_after: how often a connection that stopped reading checks
# whether the client went away (the socket's TCP state; it cannot read the EOF)
_TCP_ESTABLISHED = 1  # tcpi_state in Linux's struct tcp_info
_HOLD_FALLBACK = 0.05  # goaway_last_stream_low: GOAWAY this soon if the client stops sending
_GOAWAY_HOLD = 10  # goaway_last_stream_low: at most this many streams (and at most half of
# goaway_after) are left unanswered above the last-stream-id


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Stream:
    """One request being received or waiting for its answer."""

    __slots__ = ("id", "headers", "body", "silent", "abort_after", "control")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.id = stream_id
        self.headers = headers
        self.body = bytearray()
        self.silent = False  # held back by a fault: never answered
        self.abort_after = False  # close_after: close the connection once this one is answered
        self.control = _is_stats_request(headers)  # /stats: no fault, not counted


def _is_stats_request(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b":path":
            return value == STATS_PATH
    return False



class _Connection(ConnectionBase):
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
        super().__init__(mock, index)
        self.stream = stream
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
            SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST,
        }
        # initial_window_size: stream windows are never opened; a stream's bytes are credited
        # to the connection window once it is answered (stream id -> bytes held)
        self._held_credit: dict[int, int] | None = None
        if cfg.initial_window_size is not None:
            initial_values[SettingCodes.INITIAL_WINDOW_SIZE] = cfg.initial_window_size
            self._held_credit = {}
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values=initial_values)
        self.conn.decoder.max_header_list_size = _MAX_HEADER_LIST
        self.conn.initiate_connection()

        self._inbuf = bytearray()
        self._out = bytearray()
        self._preface_done = False
        self._streams: dict[int, _Stream] = {}  # open inbound streams, as h2 counts them
        self._pending: set[int] = set()  # streams we will answer (a GOAWAY drain waits for them)
        self._count = 0  # streams opened on this connection
        self._max_sid = 0
        self._last_unheld = 0
        self._holding = False
        self._halt = False  # stop feeding frames: _dead (abort too), or stopped reading
        self._stopped = False  # stop_reading_after reached: never read the socket again
        self._completed = 0  # complete requests received on this connection

    # ---------------------------------------------------------------- lifecycle

    def _start(self, nursery: trio.Nursery) -> None:
        if self.mock.config.server_ping_interval is not None:
            nursery.start_soon(self._ping_loop)

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
        await self._stop_reader()
        if mode == "abort":
            await trio.aclose_forcefully(transport)
        else:
            with trio.move_on_after(_LINGER):
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await trio.aclose_forcefully(self.stream)

    def _close(self, mode: Literal["graceful", "abort"] = "graceful") -> None:
        if self._close_mode is not None:
            return
        self._close_mode = mode
        if mode == "abort":
            self._dead = self._halt = True
            self.mock.stats.closes += 1
        self._kick()

    # ---------------------------------------------------------------- inbound frames

    def _receive(self, data: bytes | bytearray) -> None:
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
                self._refuse_stream(stream_id, limit, self.conn.highest_inbound_stream_id)
                return False
            return True
        return self._goaway_last is None or stream_id <= self._goaway_last

    def _feed(self, frame: bytes) -> None:
        try:
            events = self.conn.receive_data(frame)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the right error code; send it and close.
            self._note_protocol_error(exc)
            self._dead = self._halt = True
            self._close("graceful")
            return
        for event in events:
            # isinstance (not ``type() is``) so that the type checker narrows; h2's event
            # classes do not subclass one another.
            if isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._on_request(event)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    self._on_complete(stream)
            elif isinstance(event, h2.events.StreamReset):
                self._on_reset(event.stream_id)
            elif isinstance(event, h2.events.PingAckReceived):
                if event.ping_data == _GOAWAY_PING:
                    self._goaway_acked = True
                elif event.ping_data == _SERVER_PING:
                    self.mock.stats.server_ping_acks += 1
            elif isinstance(event, h2.events.ConnectionTerminated):
                # The client's GOAWAY: h2 can no longer answer anything, so just close.
                self._dead = self._halt = True
                self._close("graceful")

    def _on_reset(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self._pending.discard(stream_id)
        if self._held_credit:
            self._release_credit(stream_id)
        self._check_drain()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        stream = _Stream(sid, event.headers)
        self._streams[sid] = stream
        self._opened(stream.control)
        if stream.control:
            self._pending.add(sid)
            return
        self._count = n = self._count + 1
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
        if stream.control:
            self._answer_stats(stream)
            return
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
        if _faults.never_answers(cfg, rng):
            stats.never_answered += 1
            self._pending.discard(stream.id)
            if stream.abort_after:
                self._close("abort")
            self._check_drain()
            return
        delay = _faults.answer_delay(cfg, rng)
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
                if value.startswith(DEVICE_PREFIX) and len(value) > 10:
                    return value[10:].decode("ascii", "replace")
                return None
        return None

    # ---------------------------------------------------------------- GOAWAY

    def _send_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        """Crafted by hand so that h2 keeps serving streams <= last_stream_id."""
        self._out += self.conn.data_to_send()
        self._out += GoAwayFrame(
            0, last_stream_id=last_stream_id, error_code=code, additional_data=debug
        ).serialize()
        self.conn.ping(_GOAWAY_PING)

    def _drained(self, last_stream_id: int) -> bool:
        return all(sid > last_stream_id for sid in self._pending)

    async def _goaway_if_stalled(self) -> None:
        """goaway_last_stream_low: a client that waits for held streams still gets its GOAWAY."""
        await trio.sleep(_HOLD_FALLBACK)
        if self._goaway_last is None and not self._dead:
            self._goaway(self._last_unheld)

    # ---------------------------------------------------------------- answers

    def _answer(self, stream: _Stream) -> None:
        if self._dead or self._close_mode is not None or self._streams.get(stream.id) is not stream:
            return
        answer = self._decide(Request(stream.headers, stream.body), stream.id)
        headers, body = response(answer, self.mock.config)
        sent = self._send(stream.id, headers, body)
        self._forget(stream.id)
        if self._held_credit:
            self._release_credit(stream.id)
        if not sent:
            return
        self._answered(stream.id, answer)
        if stream.abort_after:
            self._close("abort")
        self._check_drain()

    def _answer_stats(self, stream: _Stream) -> None:
        """``GET /stats`` (and ``DELETE``: then reset them); answered at once, counted nowhere."""
        if self._dead or self._close_mode is not None:
            return
        headers, body = _stats_answer(self.mock.stats, Request(stream.headers, stream.body).method)
        self._send(stream.id, headers, body)
        self._forget(stream.id)
        if self._held_credit:
            self._release_credit(stream.id)
        self._check_drain()

    def _send(self, stream_id: int, headers: Headers, body: bytes) -> bool:
        """Queue a response; ``False`` (and the stream reset) if h2 refuses it."""
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not body)
            if body:
                self.conn.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.ProtocolError as exc:  # stream gone or window exhausted
            log.debug("connection %d: cannot answer stream %d: %s", self.index, stream_id, exc)
            try:
                self.conn.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            return False
        return True

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self._pending.discard(stream_id)

    def _announce_limit(self, limit: int) -> None:
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})



class _Limited(Protocol):
    """A live connection of either path (:class:`_Connection`, ``_fast.FastConnection``)."""

    advertised_limit: int

    def retarget_limit(self) -> None: ...


class MockAPNs:
    """The mock server. Start it with :meth:`serve` (or :func:`open_mock`), read :attr:`stats`."""

    config: MockConfig
    """How the mock validates and misbehaves; may be changed while it runs."""
    pki: TestPKI
    """The test PKI whose server certificate the mock presents."""
    stats: MockStats
    """What the mock saw."""
    rng: random.Random
    """The random faults' generator, seeded with ``config.seed``."""
    host: str
    """The address it listens on (after :meth:`serve` started)."""
    port: int
    """The port it listens on (0 until :meth:`serve` bound one)."""

    def __init__(self, config: MockConfig | None = None, pki: TestPKI | None = None) -> None:
        if pki is None:
            raise ValueError("MockAPNs needs a TestPKI (see fanout.testing.devcerts.make_pki)")
        self.config = config if config is not None else MockConfig()
        self.pki = pki
        self.stats = MockStats()
        self.rng = random.Random(self.config.seed)
        self.host = "127.0.0.1"
        self.port = 0
        self._connections: set[_Limited] = set()
        self.paths: Counter[str] = Counter()
        """With ``config.path == "fast"``: connections served by each path ("fast", "h2")."""
        self._token_cache = TokenCache()
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

    def token_info(self, token: bytes) -> TokenInfo:
        """Cached parse of a JWT (the signature is checked once per key); records its digest."""
        info = self._token_cache.info(token)
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
        if self.config.path == "fast":  # fanout.testing._fast; h2 for what it lacks
            await serve_fast(self, tcp_listeners, ssl_context)
            return
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
        index = count_connection(self.stats)
        try:
            await _Connection(self, stream, index).serve()
        finally:
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
