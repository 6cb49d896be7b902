"""Tests of the fault-injection tooling: tests/relay.py's FaultRelay and the mock's
silent-connection faults (stop_reading_after, server_ping_interval, initial_window_size,
expire_token_once_after). Every wait is for a fact, bounded by trio.fail_after."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame

from fanout.auth import TokenAuth
from fanout.client import Client
from fanout.payload import Notification
from fanout.testing.devcerts import TestPKI, TestSigningKey, client_ssl_context
from fanout.testing.mock import MockConfig, open_mock

from .h2server import BODY, TOKEN, H2Client, make_jwt
from .relay import FaultRelay, open_relay

TOPIC = "com.example.app"
FILL_CAP = 64 << 20  # bytes: a kernel that never pushes back fails the test instead of hanging


# --------------------------------------------------------------------------- helpers


class Upstream:
    """A plain TCP server on 127.0.0.1 that records what each connection sent."""

    def __init__(self) -> None:
        self.port = 0
        self.streams: list[trio.SocketStream] = []
        self.received: list[bytearray] = []
        self.eof: list[bool] = []
        self._progress = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        index = len(self.streams)
        self.streams.append(stream)
        self.received.append(bytearray())
        self.eof.append(False)
        self._bump()
        try:
            while data := await stream.receive_some(65536):
                self.received[index] += data
                self._bump()
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # reset, or closed by a test
            pass
        self.eof[index] = True
        self._bump()
        await trio.aclose_forcefully(stream)

    def _bump(self) -> None:
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._progress.wait()


async def relay_and_upstream(nursery: trio.Nursery, **kw: Any) -> tuple[FaultRelay, Upstream]:
    upstream = Upstream()
    await nursery.start(upstream.serve)
    return await open_relay(nursery, upstream.port, **kw), upstream


async def connect(relay: FaultRelay) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", relay.port)


def pending(stream: trio.SocketStream) -> int:
    """Bytes waiting in the socket's receive queue (read without consuming them)."""
    buf = fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    count: int = struct.unpack("i", buf)[0]
    return count


def fill_until_blocked(stream: trio.SocketStream | trio.SSLStream[Any]) -> int:
    """Write to the TCP socket (under TLS, if any) without blocking until the kernel refuses
    more; return how many bytes it took."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
    raw.setblocking(False)
    chunk, total = b"\0" * 4096, 0
    try:
        while total < FILL_CAP:
            try:
                total += raw.send(chunk)
            except BlockingIOError:
                return total
    finally:
        raw.close()
    raise AssertionError(f"the kernel took {FILL_CAP} bytes without blocking")


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, "EOF"
        data += chunk
    return bytes(data)


def mock_config(key: TestSigningKey, **kw: Any) -> MockConfig:
    return MockConfig(team_id=key.team_id, keys={key.key_id: key.public_key}, topics={TOPIC}, **kw)


# --------------------------------------------------------------------------- FaultRelay


async def test_relay_forwards_tls_http2_to_the_mock(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, mock_config(signing_key), pki)
    relay = await open_relay(nursery, mock.port)
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    with trio.fail_after(10):
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=relay.port,
                          ca_file=str(pki.ca_file), connections=1, timeout=5.0) as client:
            results = [await client.send(Notification(token=f"{i:064x}", payload=BODY))
                       for i in range(3)]
        await relay.wait_until(lambda: relay.open == 0)  # the client's close went through
    assert [r.outcome for r in results] == ["delivered"] * 3
    assert mock.stats.delivered == {f"{i:064x}": 1 for i in range(3)}
    assert relay.accepted == 1 and mock.stats.connections == 1
    assert relay.bytes_up > 0 and relay.bytes_down > 0
    assert relay.discarded_up == relay.discarded_down == 0
    assert mock.stats.protocol_errors == []


async def test_blackhole_silences_open_connection_while_new_one_passes(
    nursery: trio.Nursery,
) -> None:
    relay, upstream = await relay_and_upstream(nursery)
    with trio.fail_after(5):
        old = await connect(relay)
        await old.send_all(b"ping")
        await upstream.wait_until(lambda: upstream.received[:1] == [b"ping"])
        await upstream.streams[0].send_all(b"pong")
        assert await receive_exactly(old, 4) == b"pong"

        relay.fault("blackhole")
        await old.send_all(b"lost")
        await relay.wait_until(lambda: relay.discarded_up == 4)
        await upstream.streams[0].send_all(b"gone")
        await relay.wait_until(lambda: relay.discarded_down == 4)
        assert pending(old) == 0  # discarded: it will never come (and neither did a FIN)

        new = await connect(relay)  # a new flow is clean
        await relay.wait_accepted(2)
        await new.send_all(b"hello")
        await upstream.wait_until(lambda: len(upstream.received) == 2
                                  and upstream.received[1] == b"hello")
        await upstream.streams[1].send_all(b"world")
        assert await receive_exactly(new, 5) == b"world"
        assert [c.mode for c in relay.connections] == ["blackhole", "none"]

        relay.fault("none")  # healing the old flow: what was discarded stays lost
        await old.send_all(b"back")
        await upstream.wait_until(lambda: upstream.received[0] == b"pingback")
        assert not relay.connections[0].closed and upstream.eof == [False, False]
    assert relay.bytes_up == 4 + 5 + 4 and relay.bytes_down == 4 + 5


async def test_fault_on_new_connections_and_one_way_blackholes(nursery: trio.Nursery) -> None:
    relay, upstream = await relay_and_upstream(nursery)
    with trio.fail_after(5):
        relay.fault("blackhole_up", new_connections=True)
        up = await connect(relay)
        await upstream.wait_until(lambda: len(upstream.streams) == 1)
        await up.send_all(b"drop")
        await relay.wait_until(lambda: relay.discarded_up == 4)
        await upstream.streams[0].send_all(b"down")  # the other way still works
        assert await receive_exactly(up, 4) == b"down"

        relay.fault("blackhole_down", new_connections=True)
        down = await connect(relay)
        await upstream.wait_until(lambda: len(upstream.streams) == 2)
        await upstream.streams[1].send_all(b"drop")
        await relay.wait_until(lambda: relay.discarded_down == 4)
        await down.send_all(b"up")
        await upstream.wait_until(lambda: upstream.received[1] == b"up")
        assert pending(down) == 0

        relay.fault("none")  # new_connections=False: later connections are clean again
        clean = await connect(relay)
        conn = await relay.wait_accepted(3)
        await clean.send_all(b"ok")
        await upstream.wait_until(lambda: len(upstream.received) == 3
                                  and upstream.received[2] == b"ok")
    assert [c.mode for c in relay.connections] == ["none", "none", "none"]
    assert conn is relay.connections[2]
    assert upstream.received[0] == b""  # the blackholed bytes never arrived
    with pytest.raises(ValueError, match="unknown fault mode"):
        relay.fault("silence")  # type: ignore[arg-type]


async def test_stop_reading_fills_the_clients_buffers(nursery: trio.Nursery) -> None:
    relay, upstream = await relay_and_upstream(nursery)
    with trio.fail_after(5):
        client = await connect(relay)
        await client.send_all(b"12345")
        await relay.wait_until(lambda: relay.bytes_up == 5)
        relay.fault("stop_reading")

        written = fill_until_blocked(client)  # the kernel pushed back: the client's writes block
        assert 0 < written < 1 << 20
        assert relay.connections[0].rcvbuf <= 2 * 4096  # Linux reports twice what was set
        await upstream.streams[0].send_all(b"still")  # server -> client still flows
        assert await receive_exactly(client, 5) == b"still"
        assert relay.bytes_up == 5 and upstream.received[0] == b"12345"  # not one more byte

        relay.fault("none")  # reading again: what was held arrives, nothing lost
        await upstream.wait_until(lambda: len(upstream.received[0]) == 5 + written)
    assert relay.bytes_up == 5 + written


async def test_stop_reading_notices_a_client_reset(nursery: trio.Nursery) -> None:
    relay, upstream = await relay_and_upstream(nursery)
    with trio.fail_after(5):
        client = await connect(relay)
        await upstream.wait_until(lambda: len(upstream.streams) == 1)
        relay.fault("stop_reading")
        fill_until_blocked(client)
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()  # RST
        await relay.wait_until(lambda: relay.open == 0)
        await upstream.wait_until(lambda: upstream.eof == [True])


async def test_drip_delivers_one_byte_at_a_time(nursery: trio.Nursery) -> None:
    interval = 0.05
    relay, upstream = await relay_and_upstream(nursery, drip_interval=interval)
    with trio.fail_after(5):
        client = await connect(relay)
        await upstream.wait_until(lambda: len(upstream.streams) == 1)
        relay.fault("drip")
        start = trio.current_time()
        await upstream.streams[0].send_all(b"abcde")
        arrivals = []
        for n in range(1, 6):
            await relay.wait_until(lambda: relay.bytes_down >= n)  # noqa: B023
            arrivals.append(trio.current_time() - start)
        assert await receive_exactly(client, 5) == b"abcde"
        assert arrivals[0] >= interval and arrivals[-1] >= 5 * interval
        await client.send_all(b"up")  # client -> server is not slowed
        await upstream.wait_until(lambda: upstream.received[0] == b"up")

    with trio.fail_after(2):  # a drip of the 200 bytes would take 10 s
        await upstream.streams[0].send_all(bytes(200))
        await relay.wait_until(lambda: relay.bytes_down >= 5 + 2)
        relay.fault("none")  # healing mid-drip: the rest goes at once
        assert await receive_exactly(client, 200) == bytes(200)


async def test_closes_pass_through_and_cancel_closes_everything(nursery: trio.Nursery) -> None:
    upstream = Upstream()
    await nursery.start(upstream.serve)
    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            relay = await open_relay(inner, upstream.port)
            first = await connect(relay)
            await upstream.wait_until(lambda: len(upstream.streams) == 1)
            await first.aclose()  # client closes -> upstream sees EOF
            await upstream.wait_until(lambda: upstream.eof == [True])
            await relay.wait_until(lambda: relay.open == 0)

            second = await connect(relay)
            await upstream.wait_until(lambda: len(upstream.streams) == 2)
            await upstream.streams[1].aclose()  # server closes -> client sees EOF
            assert await second.receive_some(10) == b""
            await second.aclose()
            await relay.wait_until(lambda: relay.open == 0)

            third = await connect(relay)
            await upstream.wait_until(lambda: len(upstream.streams) == 3)
            relay.fault("blackhole")
            inner.cancel_scope.cancel()  # stopping the relay closes its connections
        assert relay.open == 0 and all(c.closed for c in relay.connections), relay.connections
        await upstream.wait_until(lambda: upstream.eof == [True, True, True])
        assert await third.receive_some(10) == b""
    with pytest.raises(ValueError, match="loopback"):
        FaultRelay(443, "192.0.2.1")


# --------------------------------------------------------------------------- mock faults


async def test_mock_stop_reading_after(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(
        nursery, mock_config(signing_key, stop_reading_after=2, latency=0.1,
                             server_ping_interval=0.05), pki
    )
    client = await H2Client.connect(pki, mock.port)
    first = client.request(signing_key)
    await client.flush()
    await client.pump(lambda: first in client.ended and client.conn.remote_settings
                      .max_concurrent_streams == 1000)
    second, third = client.request(signing_key), client.request(signing_key)
    await client.flush()  # the third request is behind the second: never seen
    await client.pump(lambda: second in client.ended)  # answered after stopping (latency)
    written = fill_until_blocked(client.stream)  # nothing is read any more
    assert 0 < written < 16 << 20
    pings = len(client.of(h2.events.PingReceived))
    await client.pump(lambda: len(client.of(h2.events.PingReceived)) >= pings + 2, flush=False)
    assert all(e.ping_data == b"fanoutSP" for e in client.of(h2.events.PingReceived))
    assert client.status(first) == client.status(second) == 200 and third not in client.responses
    assert mock.stats.requests == 2 and mock.stats.stopped_reading == 1
    assert mock.stats.server_pings >= pings + 2
    assert mock.stats.protocol_errors == []
    await client.stream.transport_stream.aclose()  # the stopped connection notices (TCP state)
    with trio.fail_after(2):
        while mock._connections:  # no event to wait on inside the mock
            await trio.sleep(0.02)


async def test_mock_stop_reading_at_zero_reads_nothing(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, mock_config(signing_key, stop_reading_after=0), pki)
    client = await H2Client.connect(pki, mock.port)
    client.request(signing_key)
    await client.flush()
    await client.pump(lambda: bool(client.of(h2.events.RemoteSettingsChanged)), flush=False)
    quiet = await H2Client.connect(pki, mock.port)
    fill_until_blocked(client.stream)
    assert mock.stats.requests == 0 and mock.stats.stopped_reading == 2

    # without PINGs to fail on, a stopped connection still notices the client leaving
    transport = client.stream.transport_stream
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await transport.aclose()  # RST: its FIN could never pass the data the mock does not read
    await quiet.stream.transport_stream.aclose()  # FIN
    with trio.fail_after(2):
        while mock._connections:  # no event to wait on inside the mock
            await trio.sleep(0.02)


async def test_mock_server_ping_interval(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, mock_config(signing_key, server_ping_interval=0.05), pki)
    client = await H2Client.connect(pki, mock.port)
    await client.pump(lambda: len(client.of(h2.events.PingReceived)) >= 3)  # ACKs sent
    sid = client.request(signing_key)  # behind the ACKs: its answer means they were read
    await client.flush()
    await client.pump(lambda: sid in client.ended)
    assert client.status(sid) == 200
    assert mock.stats.server_ping_acks >= 3 and mock.stats.server_pings >= 3
    assert {e.ping_data for e in client.of(h2.events.PingReceived)} == {b"fanoutSP"}


def stream_window_updates(client: H2Client) -> list[h2.events.WindowUpdated]:
    return [e for e in client.of(h2.events.WindowUpdated) if e.stream_id != 0]


async def test_mock_initial_window_size_zero(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(
        nursery, mock_config(signing_key, initial_window_size=0, initial_max_streams=10), pki
    )
    client = await H2Client.connect(pki, mock.port)
    await client.pump(lambda: bool(client.of(h2.events.RemoteSettingsChanged)))
    assert client.conn.remote_settings.initial_window_size == 0  # announced
    stalled = client.request(signing_key, body=None, end=False)  # headers only
    assert client.conn.local_flow_control_window(stalled) == 0
    with pytest.raises(h2.exceptions.FlowControlError):
        client.conn.send_data(stalled, BODY)
    empty = client.request(signing_key, body=None)  # no body: can be sent, is answered
    await client.flush()
    await client.pump(lambda: empty in client.ended)
    await client.roundtrip()
    assert client.status(empty) == 400 and stalled not in client.responses
    assert stream_window_updates(client) == []  # the window never opens
    assert mock.stats.requests == 1

    # h2 on the server enforces what was announced: one forged byte is a flow-control error
    await client.stream.send_all(DataFrame(stalled, b"x").serialize())
    await client.pump(lambda: bool(client.of(h2.events.ConnectionTerminated)))
    assert client.of(h2.events.ConnectionTerminated)[0].error_code == ErrorCodes.FLOW_CONTROL_ERROR
    assert len(mock.stats.protocol_errors) == 1 and "FlowControl" in mock.stats.protocol_errors[0]


async def test_mock_small_initial_window_never_reopens(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(
        nursery, mock_config(signing_key, initial_window_size=100, initial_max_streams=10), pki
    )
    client = await H2Client.connect(pki, mock.port)
    await client.pump(lambda: bool(client.of(h2.events.RemoteSettingsChanged)))
    fits = client.request(signing_key, body=b'{"aps":{"alert":"' + b"h" * 50 + b'"}}')  # 70 bytes:
    # past half the window, which h2 would reopen if the mock acknowledged it on the stream
    big = client.request(signing_key, body=None, end=False)
    client.conn.send_data(big, b'{"x":"' + b"a" * 94)  # the 100-byte window, used up
    await client.flush()
    await client.pump(lambda: fits in client.ended)
    await client.roundtrip()
    assert client.status(fits) == 200 and big not in client.responses
    assert client.conn.local_flow_control_window(big) == 0
    assert stream_window_updates(client) == []
    assert mock.stats.requests == 1 and mock.stats.protocol_errors == []


async def test_mock_expire_token_once_after(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(
        nursery,
        mock_config(signing_key, expire_token_once_after=2, token_update_min_interval=1200),
        pki,
    )
    old, fresh = make_jwt(signing_key, iat=time.time() - 60), make_jwt(signing_key)

    def headers(token: str) -> dict[str, str]:
        return {"authorization": f"bearer {token}", "apns-topic": TOPIC, "apns-push-type": "alert"}

    http = partial(httpx.AsyncClient, http2=True, verify=client_ssl_context(pki.ca_file),
                   base_url=f"https://127.0.0.1:{mock.port}", timeout=5)
    with trio.fail_after(10):
        async with http() as client:
            async def post(token: str) -> tuple[int, str | None]:
                r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=headers(token))
                return r.status_code, (r.json()["reason"] if r.content else None)

            assert [await post(old) for _ in range(2)] == [(200, None)] * 2
            assert await post(old) == (403, "ExpiredProviderToken")  # once
            assert await post(old) == (200, None)  # validated normally again
            assert await post(fresh) == (429, "TooManyProviderTokenUpdates")  # as on APNs
        async with http() as client:  # a new connection takes the fresh token
            r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=headers(fresh))
            assert r.status_code == 200
    assert mock.stats.by_reason == {"ExpiredProviderToken": 1, "TooManyProviderTokenUpdates": 1}
    assert mock.stats.connections == 2 and mock.stats.by_status[200] == 4


def test_new_mock_fields_default_to_off() -> None:
    config = MockConfig()
    assert (config.stop_reading_after, config.server_ping_interval, config.initial_window_size,
            config.expire_token_once_after) == (None, None, None, None)
