"""A strict HTTP/2 server built on h2 (validation on), used to check our hand-written framer.

Every request is recorded with its decoded headers and body. Any h2 ProtocolError the
client causes is recorded in ``errors`` (tests assert it stays empty). Settings can be
changed live to exercise the client's handling of stream limits, windows and HPACK sizes.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio


@dataclass
class Recorded:
    headers: list[tuple[bytes, bytes]]
    body: bytes
    stream_id: int


@dataclass
class StrictH2Server:
    ssl_context: ssl.SSLContext
    settings: dict[int, int] = field(default_factory=dict)
    status: int = 200
    requests: list[Recorded] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: list[h2.connection.H2Connection] = field(default_factory=list)
    max_open: int = 0
    answer_delay: float = 0.0
    response_headers: list = field(default_factory=list)
    port: int = 0
    misbehave: Any = None
    """``(connection number, stream id) -> bytes | None``: raw bytes written instead of
    the answer (a malformed frame, a huge header block ...), when it returns some."""
    _wakes: list = field(default_factory=list)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def update_settings(self, settings: dict[int, int]) -> None:
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
        headers: dict[int, list] = {}
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
            except h2.exceptions.StreamClosedError:
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
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await raw.aclose()
