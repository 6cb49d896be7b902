"""At the edges (issue 13): connections that go silent, token trouble, an unreachable APNs,
a wrong topic or environment, and exit codes that tell the truth.

Each fault ends with exactly one result per push, within a bound stated by the test
(``BOUND``: about the stream timeout plus the ping timeout plus a reconnect, far below
attempts x timeout), with at most two attempts spent on a dead connection, and the dead
connection replaced. Silent connections are made by a fault relay (tests/relay.py) in front
of the mock, of h2 (tests/h2server.py) and of nginx, and by the servers themselves.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from h2.settings import SettingCodes

from fanout._engine.connection import RESET_BURST
from fanout._exits import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE, exit_code
from fanout.auth import TokenAuth
from fanout.client import Client
from fanout.payload import Notification
from fanout.testing.devcerts import TestPKI, TestSigningKey
from fanout.testing.mock import MockAPNs, MockConfig

from .baseline import back_to_baseline
from .helpers import (
    FANOUT,
    PAYLOAD,
    TOPIC,
    daemon_cmd,
    local_client,
    mock_server,
    read_results,
    run_daemon,
    tokens,
)
from .relay import open_relay

# the client's clocks in these tests: a dead connection is known within stall_after
# (timeout / 2) + ping_timeout = 2.5 s, a wedged one within timeout = 3 s; generous enough
# that a slow mock on 2 busy cores is not taken for a dead one
FAST = {"timeout": 3.0, "ping_timeout": 1.0, "connect_timeout": 3.0}
BOUND = 20.0  # every push has its result by then (5 attempts x 3 s would already be 15 s+)


def edge_client(pki: TestPKI, port: int, auth: TokenAuth | TestSigningKey | None,
                **kw: Any) -> Client:
    """A Client for TOPIC on 127.0.0.1:``port`` with the FAST clocks."""
    return local_client(pki, port, auth, **FAST, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """A server on loopback: ``port``, the client's ``auth`` and, where the server counts
    them, the number of 200 answers per token (``delivered``)."""

    def __init__(self, port: int, auth=None, delivered=None, mock=None, h2=None) -> None:
        self.port, self.auth, self._delivered, self.mock, self.h2 = port, auth, delivered, mock, h2

    def delivered(self) -> Counter[str] | None:
        return self._delivered() if self._delivered else None


@contextlib.asynccontextmanager
async def upstream(kind: str, pki, key, server_ssl, tmp_path, **mock_config):
    if kind == "mock":
        async with mock_server(pki, key, **mock_config) as mock:
            yield Upstream(mock.port, TokenAuth.from_file(key.path, key.key_id, key.team_id),
                           lambda: mock.stats.delivered, mock=mock)
    elif kind == "h2":
        from .h2server import StrictH2Server

        server = StrictH2Server(server_ssl, settings={SettingCodes.MAX_CONCURRENT_STREAMS: 200})

        def delivered() -> Counter[str]:
            return Counter(dict(r.headers)[b":path"].rsplit(b"/", 1)[1].decode()
                           for r in server.requests)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            yield Upstream(port, None, delivered, h2=server)
            assert server.errors == []  # h2 found nothing wrong in what we sent
            nursery.cancel_scope.cancel()
    else:
        from .test_nginx import start_nginx

        proc, port = start_nginx(tmp_path, pki)
        try:
            yield Upstream(port)
        finally:
            proc.terminate()
            proc.wait(5)


def check_once_each(results, sent: list[str]) -> None:
    assert sorted(r.token for r in results) == sorted(sent)  # one result per push


def check_duplicates_flagged(results, up: Upstream) -> None:
    """A token that reached the server twice has a result that says so."""
    delivered = up.delivered()
    if delivered is None:
        return
    twice = {t for t, n in delivered.items() if n > 1}
    flagged = {r.token for r in results if r.resent}
    assert twice <= flagged, f"{len(twice - flagged)} duplicates not marked resent"


async def fan_out(client: Client, toks: list[str]) -> list:
    with trio.fail_after(BOUND):
        return [r async for r in client.fan_out(PAYLOAD, toks)]


# ---------------------------------------------------------------- silent connections


@pytest.mark.parametrize("server", ["mock", "h2", "nginx"])
@pytest.mark.parametrize("fault", ["blackhole", "blackhole_up", "blackhole_down",
                                   "stop_reading", "drip"])
async def test_a_connection_that_goes_silent_is_replaced(
    server: str,
    fault: str,
    pki: TestPKI,
    signing_key: TestSigningKey,
    server_ssl: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    """A relay that forgets the flow (no FIN, no RST) in either or both directions, stops
    reading, or drips the server's bytes: the two open connections die, new ones pass."""
    async with upstream(server, pki, signing_key, server_ssl, tmp_path, latency=0.02) as up, \
            trio.open_nursery() as nursery:
        relay = await open_relay(nursery, up.port, drip_interval=1.0)
        async with back_to_baseline():
            async with edge_client(pki, relay.port, up.auth, connections=2) as client:
                warm = await fan_out(client, tokens(100, "a"))
                assert all(r.ok for r in warm)
                opened = relay.accepted
                relay.fault(fault)  # the connections open now go silent
                sent = tokens(400, "b")
                results = await fan_out(client, sent)
            # a relay that stopped reading never sees the client's FIN (it waits behind the
            # unread bytes): the "network" forgets those flows, the client has closed them
            relay.close_connections()
        nursery.cancel_scope.cancel()
    check_once_each(results, sent)
    assert Counter(r.outcome for r in results) == {"delivered": 400}
    assert max(r.attempts for r in results) <= 2  # one attempt lost on the dead connection
    assert relay.accepted > opened  # replaced
    check_duplicates_flagged(results, up)
    if fault == "blackhole_down" and up.delivered() is not None:
        # the server had answered what the client never heard: sent again, and marked
        assert any(r.resent for r in results)


@pytest.mark.parametrize("server", ["mock", "h2"])
@pytest.mark.parametrize("fault", ["zero_window", "silent_pings_answered"])
async def test_a_server_that_stalls_is_left(
    server: str,
    fault: str,
    pki: TestPKI,
    signing_key: TestSigningKey,
    server_ssl: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    """The first two connections' stream windows never open, or they answer PINGs but no
    stream: each push ends once, the connections are closed, later ones deliver."""
    async with upstream(server, pki, signing_key, server_ssl, tmp_path) as up:
        if up.mock is not None:
            if fault == "zero_window":
                up.mock.config.initial_window_size = 0
            else:
                up.mock.config.never_answer = 1.0
        else:
            if fault == "zero_window":
                up.h2.settings[SettingCodes.INITIAL_WINDOW_SIZE] = 0
            else:
                up.h2.misbehave = lambda conn, sid: b"" if conn < 2 else None

        def first_two_open() -> bool:
            if up.mock is not None:
                return up.mock.stats.connections >= 2 and (
                    fault == "zero_window" or up.mock.stats.never_answered >= 2)
            return len(up.h2.connections) >= 2

        async with back_to_baseline(), \
                edge_client(pki, up.port, up.auth, connections=2) as client:
            sent = tokens(300, "c")
            results: list = []

            async def send() -> None:
                results.extend(await fan_out(client, sent))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                with trio.fail_after(BOUND):
                    while not first_two_open():
                        await trio.sleep(0.01)
                # connections from now on behave
                if up.mock is not None:
                    up.mock.config.initial_window_size = None
                    up.mock.config.never_answer = 0.0
                else:
                    up.h2.settings.pop(SettingCodes.INITIAL_WINDOW_SIZE, None)
            pings = client.pool.opened
    check_once_each(results, sent)
    assert Counter(r.outcome for r in results) == {"delivered": 300}
    assert max(r.attempts for r in results) <= 2
    assert pings >= 3  # the stalled connections were replaced
    check_duplicates_flagged(results, up)


async def test_a_server_that_stops_reading_but_pings_is_left(
        pki: TestPKI, signing_key: TestSigningKey, server_ssl: ssl.SSLContext, tmp_path: Path,
) -> None:
    """It keeps the connection "alive" with a PING every 0.2 s but reads nothing more: what
    the client queues cannot drain, so the connection is dead; nothing piles up in it."""
    async with upstream("mock", pki, signing_key, server_ssl, tmp_path,
                        stop_reading_after=20, server_ping_interval=0.2) as up:
        mock = up.mock
        async with back_to_baseline(), \
                edge_client(pki, up.port, up.auth, connections=1) as client:
            sent = tokens(1000, "d")
            results: list = []
            peak = 0

            async def send() -> None:
                results.extend(await fan_out(client, sent))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                with trio.fail_after(BOUND):  # (one connection: its replacement is clean)
                    while mock.stats.stopped_reading < 1:
                        await trio.sleep(0.01)
                mock.config.stop_reading_after = None  # later connections read
                while not results:
                    for conn in (*client.pool.conns, *client.pool.draining):
                        peak = max(peak, len(conn._out))
                    await trio.sleep(0.01)
            replaced = client.pool.opened
    check_once_each(results, sent)
    assert Counter(r.outcome for r in results) == {"delivered": 1000}
    assert max(r.attempts for r in results) <= 2
    assert replaced >= 2 and mock.stats.server_pings > 0 and mock.stats.stopped_reading == 1
    assert peak < 4000  # frames queued on a connection stay bounded by its stream slots
    check_duplicates_flagged(results, up)


async def test_a_stream_the_server_dropped_is_reset_and_sent_elsewhere(
        pki: TestPKI, signing_key: TestSigningKey, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """5% of streams are never answered while the rest are: the connection is healthy, the
    stream is reset, and its push goes out again on the other connection."""
    from fanout._engine import connection as connection_module

    starts: dict[str, list[int]] = {}
    real_start = connection_module.Connection.start

    def start(self, job):
        starts.setdefault(job.prepared.token, []).append(id(self))
        return real_start(self, job)

    monkeypatch.setattr(connection_module.Connection, "start", start)
    async with mock_server(pki, signing_key, never_answer=0.05, seed=3) as mock, \
            back_to_baseline():
        async with edge_client(pki, mock.port, signing_key, connections=2) as client:
            sent = tokens(400, "e")
            results = await fan_out(client, sent)
            resets = sum(c.resets_withheld for c in client.pool.conns)
    check_once_each(results, sent)
    assert Counter(r.outcome for r in results) == {"delivered": 400}
    again = [t for t, conns in starts.items() if len(conns) > 1]
    assert again and mock.stats.never_answered >= len(again)
    for token in again:  # never twice on the connection it timed out on
        assert len(set(starts[token])) == len(starts[token]), token
    assert resets == 0


async def test_resets_are_bounded_per_connection(pki: TestPKI, signing_key: TestSigningKey) -> None:
    """Cancelling 600 streams in flight at once must not be a Rapid Reset burst: at most
    RESET_BURST RST_STREAM frames per connection, then the connection retires instead."""
    from fanout.events import Events

    class Count(Events):
        resets = 0

        def stream_reset(self, conn) -> None:
            Count.resets += 1

    async with mock_server(pki, signing_key, never_answer=1.0, initial_max_streams=1000) \
            as mock, back_to_baseline():
        async with local_client(pki, mock.port, signing_key, timeout=30.0, connections=2, events=Count()) as client:
            conns: list = []
            with trio.CancelScope() as scope:
                async def cancel_when_all_in_flight() -> None:
                    with trio.fail_after(BOUND):
                        while mock.stats.requests < 600:
                            await trio.sleep(0.01)
                    conns.extend(client.pool.conns)
                    scope.cancel()  # the caller goes away: 600 streams to end at once

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_all_in_flight)
                    async for _ in client.fan_out(PAYLOAD, tokens(600, "f")):
                        pass
            withheld = sum(c.resets_withheld for c in conns)
            assert sum(len(c.streams) for c in conns) == 0  # every slot freed all the same
    assert Count.resets <= 2 * RESET_BURST, Count.resets
    assert withheld >= 600 - 2 * RESET_BURST
    assert mock.stats.protocol_errors == []


# ---------------------------------------------------------------- provider-token trouble


async def test_a_clock_an_hour_behind_is_a_config_error_not_a_storm(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Every request answered ExpiredProviderToken (iat an hour old), with APNs' one stream
    until a valid token: a few tokens and a few connections, then config_error."""
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id,
                               clock=lambda: time.time() - 3600)
    async with mock_server(pki, signing_key) as mock, back_to_baseline():
        async with edge_client(pki, mock.port, auth, connections=2) as client:
            results = await fan_out(client, tokens(300, "1a"))
            error = client.config_error
    assert Counter(r.outcome for r in results) == {"config_error": 300}
    assert "clock" in error and "ExpiredProviderToken" in error
    # bounded: two tokens (one early refresh), each connection retired after one answer
    assert mock.stats.requests <= 6, mock.stats.requests
    assert mock.stats.connections <= 6, mock.stats.connections
    assert len(mock.stats.jwts) == 2
    assert exit_code(Counter(r.outcome for r in results)) == EXIT_CONFIG


async def test_every_request_expired_through_fanout_send(
        pki: TestPKI, signing_key: TestSigningKey, tmp_path: Path,
) -> None:
    """The same seen as a user: fanout send exits with the configuration code, says why."""
    (tmp_path / "t.txt").write_text("\n".join(tokens(200, "1b")) + "\n")
    async with mock_server(pki, signing_key, token_max_age=-10.0) as mock:
        proc = await run_daemon(FANOUT + [
            "send", "--tokens", str(tmp_path / "t.txt"), "--title", "x", "--host", "127.0.0.1",
            "--port", str(mock.port), "--ca-file", str(pki.ca_file), "--key-path",
            str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
            signing_key.team_id, "--topic", TOPIC, "--timeout", "1"], timeout=60)
    assert proc.returncode == EXIT_CONFIG, proc.stderr.decode()[-2000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["counts"] == {"config_error": 200}
    assert "ExpiredProviderToken" in summary["config_error"]
    assert mock.stats.connections <= 6 and mock.stats.requests <= 6
    assert b"eyJ" not in proc.stdout + proc.stderr  # no JWT in anything it wrote


async def test_one_expired_token_with_the_20_minute_rule_delivers_everything(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """One ExpiredProviderToken refreshes the shared token; presenting it on the other,
    healthy connection would be 429 TooManyProviderTokenUpdates (APNs' 20-minute rule):
    new connections carry it instead, and every push is delivered."""
    async with mock_server(pki, signing_key, expire_token_once_after=300,
                           token_update_min_interval=1200.0) as mock, back_to_baseline():
        async with edge_client(pki, mock.port, signing_key, connections=2) as client:
            sent = tokens(2000, "1c")
            results = await fan_out(client, sent)
    check_once_each(results, sent)
    assert Counter(r.outcome for r in results) == {"delivered": 2000}
    assert mock.stats.by_reason["ExpiredProviderToken"] == 1
    assert mock.stats.by_reason["TooManyProviderTokenUpdates"] == 0
    assert len(mock.stats.jwts) == 2 and client.auth.forced_refreshes == 1


# ---------------------------------------------------------------- an unreachable APNs


async def test_an_unreachable_apns_fails_every_waiting_push_together(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """1,000 pushes to a closed port end in about unavailable_timeout, not 1,000 times it."""
    port = free_port()
    async with back_to_baseline():
        async with edge_client(pki, port, signing_key, unavailable_timeout=1.0) as client:
            with trio.fail_after(BOUND):  # one at a time: 1,000 s
                results = [r async for r in client.fan_out(PAYLOAD, tokens(1000, "1d"))]
    assert Counter(r.outcome for r in results) == {"retries_exhausted": 1000}
    assert all("APNs unreachable" in r.error and f"127.0.0.1:{port}" in r.error
               for r in results)
    assert "refused" in results[0].error  # the last connect error, named


async def test_pushes_waiting_for_a_slot_end_when_apns_goes_away(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """APNs vanishes (its port closes) while pushes wait for a stream slot: they must not
    wait forever for a connection that never comes."""
    from .relay import FaultRelay

    async with mock_server(pki, signing_key, latency=0.3, max_streams=5) as mock, \
            trio.open_nursery() as nursery:
        relay = FaultRelay(mock.port)
        relay_scope = trio.CancelScope()

        async def serve_relay(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with relay_scope:
                await relay.serve(task_status=task_status)

        await nursery.start(serve_relay)
        async with back_to_baseline():
            async with edge_client(pki, relay.port, signing_key, unavailable_timeout=1.0) as client:
                results: list = []

                async def send() -> None:
                    results.extend(await fan_out(client, tokens(200, "4a")))

                async with trio.open_nursery() as senders:
                    senders.start_soon(send)
                    with trio.fail_after(BOUND):
                        await relay.wait_until(lambda: mock.stats.requests >= 10)
                    relay_scope.cancel()  # the relay's port and connections are gone
    assert sorted(r.token for r in results) == sorted(tokens(200, "4a"))
    counts = Counter(r.outcome for r in results)
    assert set(counts) <= {"delivered", "maybe_delivered", "retries_exhausted"}, counts
    assert counts["retries_exhausted"] > 0
    assert all("APNs unreachable" in r.error for r in results
               if r.outcome != "delivered")


async def test_fanout_send_to_an_unreachable_apns_exits_4(
        pki: TestPKI, signing_key: TestSigningKey, tmp_path: Path,
) -> None:
    (tmp_path / "t.txt").write_text("\n".join(tokens(1000, "1e")) + "\n")
    proc = await run_daemon(FANOUT + [
        "send", "--tokens", str(tmp_path / "t.txt"), "--title", "x", "--host", "127.0.0.1",
        "--port", str(free_port()), "--ca-file", str(pki.ca_file), "--key-path",
        str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
        signing_key.team_id, "--topic", TOPIC, "--unavailable-timeout", "1",
        "--connect-timeout", "1"], timeout=60)
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr.decode()[-2000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["counts"] == {"retries_exhausted": 1000}
    reason = [x for x in proc.stderr.decode().splitlines() if x.startswith("fanout send:")]
    assert len(reason) == 1 and "APNs unreachable" in reason[0]


async def test_the_daemon_waits_for_an_unreachable_apns_then_goes_on(
        pki: TestPKI, signing_key: TestSigningKey, tmp_path: Path,
) -> None:
    """fanout run does not turn its input into failures: it pauses, says so, and delivers
    everything once APNs is back on the same port."""
    port = free_port()
    inp = tmp_path / "in.ndjson"
    inp.write_text("".join(json.dumps({"id": i, "token": t, "payload": PAYLOAD}) + "\n"
                           for i, t in enumerate(tokens(300, "1f"))))
    out = tmp_path / "results.ndjson"
    mock = MockAPNs(MockConfig(keys={signing_key.key_id: signing_key.public_key},
                               team_id=signing_key.team_id), pki)
    fake = type("M", (), {"port": port})()
    cmd = daemon_cmd(fake, pki, signing_key, str(inp), "--results", str(out),
                     "--unavailable-timeout", "0.5", "--connect-timeout", "1",
                     "--status-interval", "0.2")
    async with trio.open_nursery() as nursery:
        proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE)
        seen = b""
        with trio.fail_after(BOUND):
            while b"APNs unreachable" not in seen or b'"unreachable_s"' not in seen:
                chunk = await proc.stderr.receive_some(65536)
                assert chunk, seen.decode()[-2000:]
                seen += chunk
        assert not out.exists() or out.read_bytes() == b""  # nothing turned into a failure
        await nursery.start(mock.serve, "127.0.0.1", port)
        with trio.fail_after(60):
            while chunk := await proc.stderr.receive_some(65536):
                seen += chunk
            await proc.wait()
        nursery.cancel_scope.cancel()
    assert proc.returncode == EXIT_OK, seen.decode()[-2000:]
    assert b"APNs reachable again" in seen
    results = read_results(out)
    assert sorted(r["id"] for r in results) == list(range(300))
    assert {r["outcome"] for r in results} == {"delivered"}


async def test_the_daemon_can_fail_instead_of_waiting(
        pki: TestPKI, signing_key: TestSigningKey, tmp_path: Path,
) -> None:
    inp = tmp_path / "in.ndjson"
    inp.write_text("".join(json.dumps({"token": t, "payload": PAYLOAD}) + "\n"
                           for t in tokens(200, "2a")))
    fake = type("M", (), {"port": free_port()})()
    proc = await run_daemon(daemon_cmd(fake, pki, signing_key, str(inp), "--results",
                                       str(tmp_path / "r.ndjson"), "--on-unavailable", "fail",
                                       "--unavailable-timeout", "0.5", "--connect-timeout",
                                       "1"), timeout=60)
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr.decode()[-2000:]
    results = read_results(tmp_path / "r.ndjson")
    assert len(results) == 200 and {r["outcome"] for r in results} == {"retries_exhausted"}


# ---------------------------------------------------------------- a wrong topic or environment


async def _guarded(pki, key, n: int, **config) -> tuple[list, list, MockAPNs, Client]:
    heard: list = []
    async with mock_server(pki, key, **config) as mock, back_to_baseline():
        async with edge_client(pki, mock.port, key, connections=2, on_invalid_token=lambda *a: heard.append(a)) as client:
            results = await fan_out(client, tokens(n, "2b"))
    return results, heard, mock, client


async def test_a_wrong_topic_never_calls_the_audience_dead(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    results, heard, mock, client = await _guarded(pki, signing_key, 3000,
                                                  token_topic="com.example.other")
    assert Counter(r.outcome for r in results) == {"config_error": 3000}
    assert heard == [] and client.events is not None
    assert all("is the topic" in r.error for r in results)
    assert mock.stats.requests <= 250  # a couple of hundred reach APNs at most


# production tokens sent to the sandbox: all but a 1e-9 of them belong to production
WRONG_ENVIRONMENT = {"environment": "sandbox", "sandbox_token_fraction": 1e-9}


async def test_tokens_sent_to_the_wrong_environment_never_call_the_audience_dead(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    results, heard, mock, _ = await _guarded(pki, signing_key, 3000, **WRONG_ENVIRONMENT)
    assert Counter(r.outcome for r in results) == {"config_error": 3000}
    assert heard == [] and mock.stats.requests <= 250
    assert {r.reason for r in results if r.reason} == {"BadDeviceToken"}


async def test_five_percent_dead_tokens_do_not_trip_the_guard(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    results, heard, mock, _ = await _guarded(pki, signing_key, 3000, bad_token_fraction=0.05)
    counts = Counter(r.outcome for r in results)
    assert counts["invalid_token"] > 60 and counts["invalid_token"] + counts["delivered"] == 3000
    assert len(heard) == counts["invalid_token"]  # each dead token reported, once


async def test_a_short_run_of_refusals_ends_promptly_and_is_not_called_dead(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    # three tokens, all refused, nothing delivered: too few to trip the guard, and no
    # verdict is coming; they end at once, rejected, not confirmed dead
    results, heard, _, _ = await _guarded(pki, signing_key, 3, **WRONG_ENVIRONMENT)
    assert Counter(r.outcome for r in results) == {"rejected": 3} and heard == []
    assert all(r.reason == "BadDeviceToken" and "not confirmed dead" in r.error
               for r in results)


async def test_one_at_a_time_sends_to_a_wrong_topic_trip_the_guard(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Sequential sends (a trickle, a POS backend) never have 100 in flight: the guard
    counts the refusals in a row all the same, and calls none of the tokens dead."""
    heard: list = []
    async with mock_server(pki, signing_key, token_topic="com.example.other") as mock, \
            back_to_baseline():
        async with edge_client(pki, mock.port, signing_key, topic_guard=5, on_invalid_token=lambda *a: heard.append(a)) as client:
            with trio.fail_after(BOUND):
                results = [await client.send(Notification(token=t, payload=PAYLOAD))
                           for t in tokens(12, "5a")]
    assert [r.outcome for r in results] == ["rejected"] * 4 + ["config_error"] * 8
    assert heard == [] and mock.stats.requests == 5  # the rest never went out


async def test_one_at_a_time_dead_tokens_on_a_good_topic_are_dead(
        pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    dead = tokens(3, "6a")
    heard: list = []
    async with mock_server(pki, signing_key, sandbox_token_fraction=1e-9,
                           unregistered=None) as mock, back_to_baseline():
        mock.config.environment = "production"
        async with edge_client(pki, mock.port, signing_key, on_invalid_token=lambda *a: heard.append(a)) as client:
            with trio.fail_after(BOUND):
                first = await client.send(Notification(token="7b" * 32, payload=PAYLOAD))
                mock.config.environment = "sandbox"  # now every token is refused
                later = [await client.send(Notification(token=t, payload=PAYLOAD))
                         for t in dead]
    assert first.ok
    assert [r.outcome for r in later] == ["invalid_token"] * 3 and len(heard) == 3


WRONG = {"topic": {"token_topic": "com.example.other"}, "environment": WRONG_ENVIRONMENT}


@pytest.mark.parametrize("wrong", ["topic", "environment"])
async def test_fanout_send_with_a_wrong_topic_or_environment_writes_no_dead_tokens(
        wrong, pki, signing_key, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(tokens(1000, "2c")) + "\n")
    dead = tmp_path / "dead.ndjson"
    async with mock_server(pki, signing_key, **WRONG[wrong]) as mock:
        proc = await run_daemon(FANOUT + [
            "send", "--tokens", str(tmp_path / "t.txt"), "--title", "x", "--host", "127.0.0.1",
            "--port", str(mock.port), "--ca-file", str(pki.ca_file), "--key-path",
            str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
            signing_key.team_id, "--topic", TOPIC, "--invalid-tokens", str(dead)], timeout=60)
    assert proc.returncode == EXIT_CONFIG, proc.stderr.decode()[-2000:]
    assert not dead.exists() or dead.read_text() == ""
    assert json.loads(proc.stdout.splitlines()[-1])["counts"] == {"config_error": 1000}
    assert b"is the topic" in proc.stderr
    assert mock.stats.requests <= 250


@pytest.mark.parametrize("wrong", ["topic", "environment"])
async def test_fanout_run_with_a_wrong_topic_or_environment_writes_no_dead_tokens(
        wrong, pki, signing_key, tmp_path):
    inp = tmp_path / "in.ndjson"
    inp.write_text("".join(json.dumps({"token": t, "payload": PAYLOAD}) + "\n"
                           for t in tokens(1000, "2d")))
    dead = tmp_path / "dead.ndjson"
    async with mock_server(pki, signing_key, **WRONG[wrong]) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(tmp_path / "r.ndjson"), "--invalid-tokens",
                                           str(dead)), timeout=60)
    assert proc.returncode == EXIT_CONFIG, proc.stderr.decode()[-2000:]
    assert dead.read_text() == ""
    results = read_results(tmp_path / "r.ndjson")
    assert len(results) == 1000 and {r["outcome"] for r in results} == {"config_error"}
    assert mock.stats.requests <= 250


# ---------------------------------------------------------------- resends counted


async def test_fanout_send_counts_resends_in_its_summary(
        pki: TestPKI, signing_key: TestSigningKey, tmp_path: Path,
) -> None:
    """A relay that drops the server's answers: pushes reach APNs twice; the summary says
    how many may have, and each such result says resent."""
    (tmp_path / "t.txt").write_text("\n".join(tokens(2000, "2e")) + "\n")
    async with mock_server(pki, signing_key, latency=0.05) as mock, \
            trio.open_nursery() as nursery:
        relay = await open_relay(nursery, mock.port)

        async def drop_answers_once_busy() -> None:
            await relay.wait_until(lambda: mock.stats.requests >= 500)
            relay.fault("blackhole_down")

        nursery.start_soon(drop_answers_once_busy)
        proc = await run_daemon(FANOUT + [
            "send", "--tokens", str(tmp_path / "t.txt"), "--title", "x", "--host", "127.0.0.1",
            "--port", str(relay.port), "--ca-file", str(pki.ca_file), "--key-path",
            str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
            signing_key.team_id, "--topic", TOPIC, "--timeout", "3", "--ping-timeout", "1"],
            timeout=60)
        nursery.cancel_scope.cancel()
    assert proc.returncode == EXIT_OK, proc.stderr.decode()[-2000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["counts"] == {"delivered": 2000}
    twice = sum(1 for n in mock.stats.delivered.values() if n > 1)
    assert twice > 0 and summary["resent"] >= twice


async def test_fanout_send_to_a_server_without_h2_exits_3(
        pki: TestPKI, signing_key: TestSigningKey, tmp_path: Path,
) -> None:
    """No HTTP/2 by ALPN is a configuration problem (exit 3), not a success (it was 0)."""
    (tmp_path / "t.txt").write_text("\n".join(tokens(5, "3a")) + "\n")
    async with mock_server(pki, signing_key, alpn=False) as mock:
        proc = await run_daemon(FANOUT + [
            "send", "--tokens", str(tmp_path / "t.txt"), "--title", "x", "--host", "127.0.0.1",
            "--port", str(mock.port), "--ca-file", str(pki.ca_file), "--key-path",
            str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
            signing_key.team_id, "--topic", TOPIC], timeout=60)
    assert proc.returncode == EXIT_CONFIG, proc.stderr.decode()[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["counts"] == {"config_error": 5}
    assert b"ALPN" in proc.stderr


def test_exit_codes_follow_the_table() -> None:
    assert exit_code({"delivered": 5, "invalid_token": 2, "malformed": 1}) == EXIT_OK
    assert exit_code({"delivered": 5, "rejected": 1}) == 1
    assert exit_code({"maybe_delivered": 1, "config_error": 1}) == EXIT_CONFIG
    assert exit_code({"retries_exhausted": 3}, unreachable=3) == EXIT_UNREACHABLE
    assert exit_code({"retries_exhausted": 3}) == 1


async def test_single_send_says_resent(pki: TestPKI, signing_key: TestSigningKey) -> None:
    async with mock_server(pki, signing_key, never_answer=1.0) as mock, back_to_baseline():
        async with edge_client(pki, mock.port, signing_key, max_attempts=2) as client:
            with trio.fail_after(BOUND):
                result = await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
    assert result.outcome == "maybe_delivered" and result.resent and result.attempts == 2
