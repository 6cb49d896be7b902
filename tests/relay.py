"""A TCP relay on trio that injects network faults, for tests of connections that go silent.

:class:`FaultRelay` listens on 127.0.0.1 (a free port) and relays raw bytes (TLS passes through
untouched) between each accepted client connection and one upstream ``host:port`` on loopback.
``relay.fault(mode)`` changes what happens to the bytes of the connections open at that moment
(``new_connections=True``: also of those accepted later; otherwise later ones pass cleanly, like a
NAT that forgot one flow):

``"none"``
    forward both directions.
``"blackhole"``
    read and discard both directions: nothing passes, no FIN, no RST.
``"blackhole_up"`` / ``"blackhole_down"``
    discard client->server / server->client only; the other direction is forwarded.
``"stop_reading"``
    do not read the client's socket at all, so its kernel buffers fill and the client's writes
    block; server->client is forwarded. The accepted sockets get a small ``SO_RCVBUF`` (set on the
    listening socket before ``listen()``, so that the window scale of the SYN-ACK matches) to make
    that happen soon. Going back to another mode reads (and forwards) what was held. Seen on
    Linux loopback: with SO_RCVBUF 4096 (the kernel reports 8192) a client's writes block after
    about 20 KB (4-6 KB queued at the relay, 16 KB in the client's send queue); with the kernel's
    default (131072, autotuned) after about 70 KB at once and 150-170 KB a moment later.
``"drip"``
    server->client bytes go one at a time, ``drip_interval`` seconds apart (before each byte);
    client->server is forwarded.

The relay faults bytes, never the closing of a connection: an endpoint's EOF is passed on as a
FIN (half-close) in every mode, and a connection is closed once both directions ended, ``linger``
seconds after the first one did, or when either side resets. (A client's EOF is not seen while
its socket is not read, in ``"stop_reading"``; a client reset is, by the socket's TCP state, on
Linux.) Cancelling :meth:`FaultRelay.serve` closes everything; no task outlives its nursery.

Typical use::

    async with trio.open_nursery() as nursery:
        mock = await open_mock(nursery, config, pki)
        relay = await open_relay(nursery, mock.port)
        ...  # connect to 127.0.0.1:relay.port
        relay.fault("blackhole")
        ...
        nursery.cancel_scope.cancel()
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Literal, get_args

import trio

__all__ = ["MODES", "FaultRelay", "Mode", "RelayConnection", "open_relay"]

Mode = Literal["none", "blackhole", "blackhole_up", "blackhole_down", "stop_reading", "drip"]
MODES: frozenset[str] = frozenset(get_args(Mode))

_CHUNK = 65_536
_DISCARD_UP = frozenset({"blackhole", "blackhole_up"})
_DISCARD_DOWN = frozenset({"blackhole", "blackhole_down"})
_GONE_POLL = 0.05  # "stop_reading": how often the TCP state of the unread client socket is checked
_TCP_ESTABLISHED = 1  # tcpi_state in Linux's struct tcp_info
_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _established(stream: trio.SocketStream) -> bool:
    """Whether the socket's TCP connection is still established, seen without reading it
    (Linux ``TCP_INFO``; elsewhere always ``True``)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return True
    try:
        return stream.socket.getsockopt(socket.IPPROTO_TCP, tcp_info, 8)[0] == _TCP_ESTABLISHED
    except OSError:
        return False


class RelayConnection:
    """One relayed connection: its mode and its own counters (the relay sums them)."""

    def __init__(self, relay: FaultRelay, index: int, client: trio.SocketStream, mode: Mode):
        self.relay = relay
        self.index = index
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.mode: Mode = mode
        self.bytes_up = 0  # client -> server, forwarded
        self.bytes_down = 0  # server -> client, forwarded
        self.discarded_up = 0
        self.discarded_down = 0
        self.closed = False
        self.rcvbuf = client.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        """Effective SO_RCVBUF of the accepted socket (Linux reports twice what was set)."""
        self._changed = trio.Event()  # set (and replaced) on every mode change
        self._up_scope: trio.CancelScope | None = None  # the pending read of the client socket
        self._scope = trio.CancelScope()  # the whole connection (may be cancelled before it runs)
        self._ended = 0  # directions that saw EOF

    def fault(self, mode: Mode) -> None:
        """Change this connection's mode (see the module docstring)."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {sorted(MODES)}")
        self.mode = mode
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        if mode == "stop_reading" and self._up_scope is not None:
            self._up_scope.cancel()  # a read not yet done takes nothing (trio's guarantee)

    def close(self) -> None:
        """Close the connection now (both sockets)."""
        self._scope.cancel()

    def __repr__(self) -> str:
        return (
            f"<RelayConnection {self.index} {self.mode} up={self.bytes_up}+{self.discarded_up}"
            f" down={self.bytes_down}+{self.discarded_down}{' closed' if self.closed else ''}>"
        )

    # ---------------------------------------------------------------- the relaying

    async def run(self) -> None:
        relay = self.relay
        try:
            with self._scope:
                try:
                    self.upstream = await trio.open_tcp_stream(
                        relay.upstream_host, relay.upstream_port
                    )
                except OSError:
                    relay.upstream_failures += 1
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_up)
                    nursery.start_soon(self._pump_down)
        finally:
            self.closed = True
            relay.open -= 1
            relay._bump()
            # shielded: when the relay is cancelled, aclose_forcefully closes but then raises
            # Cancelled, which would leave the second socket open
            with trio.CancelScope(shield=True):
                for stream in (self.client, self.upstream):
                    if stream is not None:
                        await trio.aclose_forcefully(stream)

    def _abort(self) -> None:
        self._scope.cancel()

    async def _end(self, dest: trio.SocketStream) -> None:
        """One direction saw EOF: pass it on; close the connection once both did, or after
        ``linger`` seconds."""
        try:
            await dest.send_eof()
        except _ERRORS:
            pass
        self._ended += 1
        if self._ended == 2:
            self._scope.cancel()
        else:
            self._scope.deadline = min(
                self._scope.deadline, trio.current_time() + self.relay.linger
            )

    async def _pump_up(self) -> None:
        """client -> server."""
        assert self.upstream is not None
        relay = self.relay
        try:
            while True:  # ends at EOF, on an error, or by cancellation
                if self.mode == "stop_reading":
                    if not await self._held():
                        self._abort()  # the client reset (or closed) its socket
                        return
                    continue
                data = None
                with trio.CancelScope() as self._up_scope:
                    data = await self.client.receive_some(_CHUNK)
                self._up_scope = None
                if data is None:  # cancelled by fault("stop_reading") before anything came
                    continue
                if not data:
                    await self._end(self.upstream)
                    return
                if self.mode in _DISCARD_UP:
                    self.discarded_up += len(data)
                    relay.discarded_up += len(data)
                else:
                    await self.upstream.send_all(data)
                    self.bytes_up += len(data)
                    relay.bytes_up += len(data)
                relay._bump()
        except _ERRORS:
            self._abort()

    async def _held(self) -> bool:
        """"stop_reading": wait for the next mode change; ``False`` if the client went away."""
        changed = self._changed
        while not changed.is_set():  # ends at a mode change, or when the client is gone
            if not _established(self.client):
                return False
            with trio.move_on_after(_GONE_POLL):
                await changed.wait()
        return True

    async def _pump_down(self) -> None:
        """server -> client."""
        assert self.upstream is not None
        relay = self.relay
        try:
            while True:  # ends at EOF, on an error, or by cancellation
                data = await self.upstream.receive_some(_CHUNK)
                if not data:
                    await self._end(self.client)
                    return
                pos = 0
                while pos < len(data):  # each pass delivers or discards at least one byte
                    mode = self.mode
                    if mode in _DISCARD_DOWN:
                        self.discarded_down += len(data) - pos
                        relay.discarded_down += len(data) - pos
                        pos = len(data)
                    elif mode == "drip":
                        changed = self._changed
                        with trio.move_on_after(relay.drip_interval):
                            await changed.wait()
                        if changed.is_set():
                            continue  # the mode changed: the rest goes by the new one
                        await self.client.send_all(data[pos : pos + 1])
                        pos += 1
                        self.bytes_down += 1
                        relay.bytes_down += 1
                    else:
                        await self.client.send_all(data[pos:] if pos else data)
                        self.bytes_down += len(data) - pos
                        relay.bytes_down += len(data) - pos
                        pos = len(data)
                    relay._bump()
        except _ERRORS:
            self._abort()


class FaultRelay:
    """A fault-injecting TCP relay from 127.0.0.1:``port`` to ``upstream_host:upstream_port``.

    ``drip_interval``: seconds between two bytes in ``"drip"`` (read before each byte, so it may
    be changed live). ``rcvbuf``: SO_RCVBUF of the accepted sockets (``None``: the kernel's
    default, with autotuning). ``linger``: seconds a connection stays half-open after one side's
    EOF. Counters: ``accepted``, ``open``, ``bytes_up``/``bytes_down`` (forwarded),
    ``discarded_up``/``discarded_down``, ``upstream_failures``; ``connections`` lists every
    :class:`RelayConnection` in accept order.
    """

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        drip_interval: float = 1.0,
        rcvbuf: int | None = 4096,
        linger: float = 2.0,
    ) -> None:
        try:
            loopback = ipaddress.ip_address(upstream_host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"FaultRelay relays to loopback addresses only, not {upstream_host!r}")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.drip_interval = drip_interval
        self.rcvbuf = rcvbuf
        self.linger = linger
        self.host = "127.0.0.1"
        self.port = 0
        self.new_connection_mode: Mode = "none"
        self.connections: list[RelayConnection] = []
        self.accepted = 0
        self.open = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.discarded_up = 0
        self.discarded_down = 0
        self.upstream_failures = 0
        self._progress = trio.Event()  # set (and replaced) whenever a counter changes

    def fault(self, mode: Mode, *, new_connections: bool = False) -> None:
        """Apply ``mode`` to every open connection; also to later ones if ``new_connections``
        (otherwise later connections are clean: ``"none"``)."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {sorted(MODES)}")
        self.new_connection_mode = mode if new_connections else "none"
        for connection in self.connections:
            if not connection.closed:
                connection.fault(mode)

    def close_connections(self) -> None:
        """Close every open connection now (the listener stays)."""
        for connection in self.connections:
            connection.close()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true; it is checked after every change of a counter
        (bound the wait with ``trio.fail_after``)."""
        while not predicate():  # ends when the predicate holds, or by cancellation
            await self._progress.wait()

    async def wait_accepted(self, n: int) -> RelayConnection:
        """Wait until ``n`` connections were accepted; return the ``n``-th."""
        await self.wait_until(lambda: self.accepted >= n)
        return self.connections[n - 1]

    def _bump(self) -> None:
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the port (``port = await nursery.start(relay.serve)``)."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self.rcvbuf is not None:  # before listen(): accepted sockets inherit it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            await sock.bind((self.host, 0))
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        self.port = sock.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)
                while True:  # ends by cancellation
                    stream = await listener.accept()
                    connection = RelayConnection(
                        self, len(self.connections), stream, self.new_connection_mode
                    )
                    self.connections.append(connection)
                    self.accepted += 1
                    self.open += 1
                    self._bump()
                    nursery.start_soon(connection.run)
        finally:
            await trio.aclose_forcefully(listener)


async def open_relay(nursery: trio.Nursery, upstream_port: int, **kwargs: object) -> FaultRelay:
    """Start a :class:`FaultRelay` to 127.0.0.1:``upstream_port`` in ``nursery``."""
    relay = FaultRelay(upstream_port, **kwargs)  # type: ignore[arg-type]
    await nursery.start(relay.serve)
    return relay
