"""A strict HTTP/2 server built on h2 (validation on), used to check our hand-written framer,
and a minimal h2 client, to speak raw HTTP/2 to a server (the mock) frame by frame.

Every request is recorded with its decoded headers and body. Any h2 ProtocolError the
client causes is recorded in ``errors`` (tests assert it stays empty). Settings can be
changed live to exercise the client's handling of stream limits, windows and HPACK sizes.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import jwt
import trio

from fanout.testing.devcerts import TestPKI, TestSigningKey, client_ssl_context

TOPIC = "com.example.app"
TOKEN = "ab" * 32
BODY = b'{"aps":{"alert":"hi"}}'


@dataclass
class Recorded:
    headers: list[tuple[bytes, bytes]]
    body: bytes
    stream_id: int


@dataclass
class StrictH2Server:
    ssl_context: ssl.SSLContext
    settings: dict[h2.settings.SettingCodes, int] = field(default_factory=dict)
    status: int = 200
    requests: list[Recorded] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: list[h2.connection.H2Connection] = field(default_factory=list)
    max_open: int = 0
    answer_delay: float = 0.0
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    port: int = 0
    misbehave: Callable[[int, int], bytes | None] | None = None
    """``(connection number, stream id) -> bytes | None``: raw bytes written instead of
    the answer (a malformed frame, a huge header block ...), when it returns some."""
    _wakes: list[Callable[[], None]] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1 (a free port, handed to ``task_status``) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def update_settings(self, settings: dict[int, int]) -> None:
        """Send new SETTINGS on every connection now."""
        for conn, wake in zip(self.connections, self._wakes, strict=False):
            conn.update_settings(settings)
            wake()

    async def _handle(self, raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, self.ssl_context, server_side=True)
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=True)
        conn = h2.connection.H2Connection(config)
        conn.local_settings = h2.settings.Settings(client=False, initial_values=self.settings)
        if h2.settings.SettingCodes.HEADER_TABLE_SIZE in self.settings:
            conn.decoder.max_allowed_table_size = self.settings[
                h2.settings.SettingCodes.HEADER_TABLE_SIZE]
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            return
        conn.initiate_connection()
        bodies: dict[int, bytearray] = {}
        headers: dict[int, list[tuple[bytes, bytes]]] = {}
        send_lock = trio.Lock()
        pending = trio.Event()

        async def flush() -> None:
            async with send_lock:
                data = conn.data_to_send()
                if data:
                    try:
                        await stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the client went away (an answer task may still write)

        def wake() -> None:
            pending.set()

        self.connections.append(conn)
        self._wakes.append(wake)
        number = len(self.connections) - 1

        async def answer(sid: int) -> None:
            if self.answer_delay:
                await trio.sleep(self.answer_delay)
            raw_bytes = self.misbehave(number, sid) if self.misbehave else None
            if raw_bytes is not None:
                async with send_lock:  # h2's state no longer matches the wire: stop using it
                    try:
                        await stream.send_all(conn.data_to_send() + raw_bytes)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                return
            try:
                conn.send_headers(sid, [(b":status", str(self.status).encode()),
                                        (b"apns-id", b"00000000-0000-0000-0000-%012d" % sid)]
                                  + self.response_headers, end_stream=True)
            except h2.exceptions.ProtocolError:
                # the stream was reset, or the connection has ended (the client's GOAWAY
                # came while this answer waited): nothing left to answer
                return
            await flush()

        try:
            await flush()
            async with trio.open_nursery() as nursery:
                async def flusher() -> None:
                    nonlocal pending
                    while True:
                        await pending.wait()
                        pending = trio.Event()
                        await flush()
                nursery.start_soon(flusher)
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if not data:
                        break
                    try:
                        events = conn.receive_data(data)
                    except h2.exceptions.ProtocolError as exc:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                        await flush()
                        break
                    for ev in events:
                        if isinstance(ev, h2.events.RequestReceived):
                            headers[ev.stream_id] = ev.headers
                            bodies[ev.stream_id] = bytearray()
                            self.max_open = max(self.max_open, conn.open_inbound_streams)
                        elif isinstance(ev, h2.events.DataReceived):
                            bodies[ev.stream_id] += ev.data
                            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        elif isinstance(ev, h2.events.StreamEnded):
                            self.requests.append(Recorded(headers.pop(ev.stream_id),
                                                          bytes(bodies.pop(ev.stream_id)),
                                                          ev.stream_id))
                            nursery.start_soon(answer, ev.stream_id)
                    await flush()
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; from a child task it comes inside an ExceptionGroup
        finally:
            await raw.aclose()


# ---------------------------------------------------------------- a raw h2 client


def make_jwt(key: TestSigningKey, iat: float | None = None) -> str:
    """A provider token signed by ``key``, issued at ``iat`` (default: now)."""
    return jwt.encode(
        {"iss": key.team_id, "iat": int(time.time() if iat is None else iat)},
        key.path.read_bytes(),
        algorithm="ES256",
        headers={"kid": key.key_id},
    )


class H2Client:
    """A minimal h2 client over trio TLS that records every event it gets."""

    def __init__(self, stream: trio.SSLStream[Any]) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []
        self.responses: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.eof = False

    @classmethod
    async def connect(cls, pki: TestPKI, port: int) -> H2Client:
        """Connect over TLS to 127.0.0.1:``port`` and send the preface."""
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=client_ssl_context(pki.ca_file)
        )
        await stream.do_handshake()
        client = cls(stream)
        client.conn.initiate_connection()
        await client.flush()
        return client

    def of(self, kind: type) -> list[Any]:
        """The events of type ``kind`` received so far."""
        return [e for e in self.events if isinstance(e, kind)]

    async def flush(self) -> None:
        """Send what h2 has queued."""
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def request(self, key: TestSigningKey, body: bytes | None = BODY, jwt_: str | None = None,
                end: bool = True) -> int:
        """Open a stream: a push to TOKEN for TOPIC signed by ``key`` (or ``jwt_``); the
        body and the end of the stream unless told otherwise. Returns the stream id."""
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"127.0.0.1"),
            (b":path", f"/3/device/{TOKEN}".encode()),
            (b"authorization", f"bearer {jwt_ or make_jwt(key)}".encode()),
            (b"apns-topic", TOPIC.encode()), (b"apns-push-type", b"alert"),
        ]
        self.conn.send_headers(sid, headers, end_stream=body is None and end)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        return sid

    def status(self, sid: int) -> int:
        """The :status of stream ``sid``'s answer."""
        return int(self.responses[sid][b":status"])

    async def pump(self, until: Callable[[], bool], *, flush: bool = True,
                   timeout: float = 3.0) -> None:
        """Read (and, with ``flush``, answer: ACKs, WINDOW_UPDATEs) until ``until()``."""
        with trio.fail_after(timeout):
            while not until():
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.eof = True
                    return
                for event in self.conn.receive_data(data):
                    self.events.append(event)
                    if isinstance(event, h2.events.ResponseReceived):
                        self.responses[event.stream_id] = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        self.bodies[event.stream_id] = (
                            self.bodies.get(event.stream_id, b"") + event.data
                        )
                        self.conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        self.ended.add(event.stream_id)
                if flush:
                    await self.flush()

    async def roundtrip(self) -> None:
        """PING and wait for its ACK: everything the server sent before it has been read."""
        data = os.urandom(8)
        self.conn.ping(data)
        await self.flush()
        await self.pump(lambda: any(e.ping_data == data for e in self.of(h2.events.PingAckReceived)))
