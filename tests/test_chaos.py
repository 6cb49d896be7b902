"""Nothing lost, nothing leaked (issue 7): bad output paths, TLS verification, the frame
handler against random and mutated server frames, wire faults from a server (malformed
frames, huge header blocks), DNS and TLS failures, 429 storms, 5xx bursts, a slow server,
dead tokens kept off the wire, and resources back at their baseline after each fault."""

from __future__ import annotations

import gc
import json
import ssl
from functools import partial

import hpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanout._engine import framer as fr
from fanout._engine.connection import Connection, Exchange
from fanout.errors import FanoutError, ProtocolError
from fanout.payload import Notification, PushTemplate
from fanout.testing.mock import MockConfig

from .baseline import _fds, _rss_mb, back_to_baseline
from .helpers import daemon_cmd, mock_server, read_results, run_daemon, wait_until, write_input

# ---------------------------------------------------------------- output failures

async def test_full_disk_stops_without_advancing_the_checkpoint(tmp_path, pki, signing_key):
    inp = tmp_path / "in.ndjson"
    write_input(inp, 2000)
    async with mock_server(pki, signing_key) as mock:
        full = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           "/dev/full"))
        cp = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
        assert full.returncode != 0
        assert b"cannot write to /dev/full" in full.stderr and b"No space left" in full.stderr
        assert b"Traceback" not in full.stderr
        assert cp["line"] == 0 and cp["offset"] == 0  # nothing marked done that was not written
        out = tmp_path / "results.ndjson"
        again = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                            str(out)))
    assert again.returncode == 0
    results = read_results(out)
    assert sorted(r["line"] for r in results) == list(range(1, 2001))
    # whatever reached APNs in the failed run comes back marked as a possible resend
    resent = sum(1 for r in results if r.get("resent"))
    assert sum(mock.stats.delivered.values()) - 2000 <= resent


async def test_unwritable_results_path_is_a_clear_error(tmp_path, pki, signing_key):
    inp = tmp_path / "in.ndjson"
    write_input(inp, 10)
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(tmp_path / "missing" / "r.ndjson")))
    assert proc.returncode == 3
    assert b"cannot open" in proc.stderr and b"missing/r.ndjson" in proc.stderr
    assert mock.stats.requests == 0


# ---------------------------------------------------------------- TLS verification

async def test_verification_is_on_and_off_only_with_a_warning(pki, signing_key, caplog):
    from fanout.auth import TokenAuth
    from fanout.client import Client
    from fanout.payload import Notification

    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    note = Notification(token="ab" * 32, payload={"aps": {"alert": "x"}})
    async with mock_server(pki, signing_key) as mock:
        # no CA given: the mock's certificate is not trusted
        async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                          port=mock.port, unavailable_timeout=1.0) as client:
            refused = await client.send(note)
        assert "warning" not in caplog.text.lower() or "verification is OFF" not in caplog.text
        async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                          port=mock.port, insecure=True) as client:
            ok = await client.send(note)
    assert refused.outcome == "config_error" and "certificate verification failed" in refused.error
    assert ok.ok
    assert "TLS certificate verification is OFF" in caplog.text


# ---------------------------------------------------------------- frame handler fuzzing

class _Recorder:
    """A StreamListener and ConnectionObserver that records how each stream ended."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, int]] = []  # (listener call, stream id)
        self.retired = False

    def on_response(self, conn, job, status, headers, body):
        self.ends.append(("response", job.sid))

    def on_unprocessed(self, conn, job, why):
        self.ends.append(("unprocessed", job.sid))

    def on_lost(self, conn, job, why):
        self.ends.append(("lost", job.sid))

    def on_timeout(self, conn, job):
        self.ends.append(("timeout", job.sid))

    def on_capacity(self, conn):
        pass

    def on_retired(self, conn, why):
        self.retired = True

    def on_closed(self, conn):
        pass

    @property
    def events(self) -> list[str]:
        return [how for how, _ in self.ends]


SEEDED = (1, 3, 5, 7, 9)  # the streams in flight when the server's bytes arrive
_CTX = ssl.create_default_context()  # never used to connect; one for all examples (50 ms each)


def _feed(conn: Connection, data: bytes) -> None:
    try:
        conn._receive(data)
    except FanoutError:
        pass  # a protocol error is the right answer to garbage: the connection closes


async def _serve(data: bytes) -> _Recorder:
    """Five streams started by Connection.start, then ``data`` from the server, then the
    connection's close (what its run() does on any error): every stream must have ended
    through exactly one listener call."""
    rec = _Recorder()
    conn = Connection("127.0.0.1", 1, _CTX, rec, rec)
    _feed(conn, fr.settings_frame({fr.S_MAX_CONCURRENT_STREAMS: 100}))
    template = PushTemplate({"aps": {"alert": "x"}}, topic="com.example.app")
    for sid in SEEDED:
        job = Exchange(template.for_token(f"{sid:064x}"))
        conn.start(job)
        assert job.sid == sid
    _feed(conn, data)
    conn._fail_all("closed")  # run()'s finally
    assert not conn.streams
    assert sorted(sid for _, sid in rec.ends) == list(SEEDED), rec.ends
    return rec


def _valid_server_bytes() -> bytes:
    enc = hpack.Encoder()
    ok = enc.encode([(b":status", b"200"), (b"apns-id", b"0" * 36)])
    err = enc.encode([(b":status", b"410"), (b"content-type", b"application/json")])
    body = b'{"reason":"Unregistered","timestamp":1700000000000}'
    return b"".join([
        fr.settings_frame({fr.S_MAX_CONCURRENT_STREAMS: 1000, fr.S_INITIAL_WINDOW_SIZE: 65535}),
        fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1, ok),
        fr.frame(fr.HEADERS, fr.END_HEADERS, 3, err),
        fr.frame(fr.DATA, fr.END_STREAM, 3, body),
        fr.frame(fr.HEADERS, fr.END_STREAM, 5, ok[:3]),
        fr.frame(fr.CONTINUATION, fr.END_HEADERS, 5, ok[3:]),
        fr.window_update(0, 1000), fr.window_update(7, 10), fr.ping(b"12345678"),
        fr.rst_stream(7, fr.REFUSED_STREAM), fr.goaway(9, 0, b'{"reason":"Shutdown"}'),
    ])


async def test_valid_server_frames_are_handled():
    rec = await _serve(_valid_server_bytes())
    assert rec.ends == [("response", 1), ("response", 3), ("response", 5),
                        ("unprocessed", 7), ("lost", 9)]
    assert rec.retired


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_server_frames_give_protocol_errors_never_crashes(data):
    valid = bytearray(_valid_server_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(valid) - 1)))
        if op == "flip" and valid:
            valid[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            valid[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and valid:
            del valid[pos:pos + data.draw(st.integers(1, 16))]
        elif op == "truncate":
            del valid[pos:]
    trio.run(_serve, bytes(valid))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255),
                          st.sampled_from([0, 1, 3, 5, 7, 9, 11, 13, 2**31 - 1]),
                          st.binary(max_size=64)), max_size=12))
def test_random_frames_give_protocol_errors_never_crashes(frames):
    trio.run(_serve, b"".join(fr.frame(t, f, s, p) for t, f, s, p in frames))


def test_protocol_error_is_a_fanout_error():
    assert issubclass(ProtocolError, FanoutError)


# ---------------------------------------------------------------- connection failures

async def _client_result(**kw):
    from fanout.client import Client
    from fanout.payload import Notification

    async with Client(topic="com.example.app", unavailable_timeout=1.0, connect_timeout=1.0,
                      **kw) as client:
        return await client.send(Notification(token="ab" * 32, payload={"aps": {"alert": "x"}}))


async def test_dns_failure_is_reported_not_hung():
    with trio.fail_after(10):
        result = await _client_result(host="no-such-host.invalid", port=443)
    assert result.outcome == "retries_exhausted"
    assert "no-such-host.invalid" in result.error


async def test_tls_handshake_failure_is_reported_not_hung(pki):
    async def garbage(stream):
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot tls at all")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            result = await _client_result(host="127.0.0.1", port=port, ca_file=str(pki.ca_file))
        nursery.cancel_scope.cancel()
    assert result.outcome == "retries_exhausted"
    assert "TLS" in result.error or "handshake" in result.error


_FAULTS = {
    "data_on_stream_0": lambda sid: fr.frame(fr.DATA, 0, 0, b"x"),
    "settings_of_5_bytes": lambda sid: fr.frame(fr.SETTINGS, 0, 0, b"\x00" * 5),
    "bad_hpack": lambda sid: fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, sid,
                                      b"\xff\xff\xff\xff\xff\xff"),
    "huge_header_block": lambda sid: fr.frame(fr.HEADERS, 0, sid, b"\x00" * 16000) + b"".join(
        fr.frame(fr.CONTINUATION, 0, sid, b"\x00" * 16000) for _ in range(6)),
}


@pytest.mark.parametrize("fault", sorted(_FAULTS))
async def test_server_wire_faults_end_each_push_once(server_ssl, pki, fault):
    """A server that answers with a malformed frame or a huge header block: the connection
    fails with a protocol error, its pushes are resent on a fresh one, every push ends once,
    and descriptors, tasks and memory come back to their baseline."""
    from h2.settings import SettingCodes

    from fanout.client import Client

    from .h2server import StrictH2Server

    fired: set[int] = set()

    def misbehave(conn: int, sid: int) -> bytes | None:
        if conn % 2 == 0 and conn not in fired:  # every other connection, once
            fired.add(conn)
            return _FAULTS[fault](sid)
        return None

    server = StrictH2Server(server_ssl, settings={SettingCodes.MAX_CONCURRENT_STREAMS: 50},
                            answer_delay=0.001, misbehave=misbehave)
    rss = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        for _cycle in range(3):
            async with back_to_baseline():
                async with Client(topic="com.example.app", host="127.0.0.1", port=port,
                                  ca_file=str(pki.ca_file), connections=1) as client:
                    with trio.fail_after(30):
                        results = [r async for r in client.fan_out(
                            {"aps": {"alert": "x"}}, (f"{i:064x}" for i in range(300)))]
            assert sorted(r.token for r in results) == [f"{i:064x}" for i in range(300)]
            assert all(r.ok for r in results), {r.outcome for r in results}
            rss.append(_rss_mb())
        nursery.cancel_scope.cancel()
    assert len(fired) == 3  # one faulty connection per cycle, each replaced
    assert rss[2] - rss[0] < 5, rss  # no growth from one fault cycle to the next


async def test_descriptors_return_to_baseline_after_faults(pki, signing_key):
    from fanout.auth import TokenAuth
    from fanout.client import Client

    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    async with mock_server(pki, signing_key, unregistered_fraction=0.1) as mock:
        baseline = _fds()
        for goaway, close in ((200, None), (None, 300)):
            mock.config.goaway_after, mock.config.close_after = goaway, close
            async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                              port=mock.port, ca_file=str(pki.ca_file)) as client:
                results = [r async for r in client.fan_out({"aps": {"alert": "x"}},
                                                           (f"{i:064x}" for i in range(1500)))]
            assert len(results) == 1500
        # the mock's side of the closed sockets goes too
        await wait_until(lambda: _fds() <= baseline + 2, 10, "descriptors back to baseline")
        assert mock.stats.goaways_sent > 0 and mock.stats.closes > 0


# ---------------------------------------------------------------- APNs faults

async def _fan_out(mock, pki, signing_key, n: int, **client_kw):
    from fanout import Backoff
    from fanout.auth import TokenAuth
    from fanout.client import Client

    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    client_kw.setdefault("backoff", Backoff(base=0.01, cap=0.05))
    async with back_to_baseline():  # every fault test: fds and tasks come back
        async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                          port=mock.port, ca_file=str(pki.ca_file), **client_kw) as client:
            with trio.fail_after(60):
                return [r async for r in client.fan_out({"aps": {"alert": "x"}},
                                                        (f"{i:064x}" for i in range(n)))]


@pytest.mark.parametrize("retry_after", [None, 0])
async def test_429_storm_every_push_ends_once(pki, signing_key, retry_after):
    async with mock_server(pki, signing_key, p429=0.5, retry_after=retry_after, seed=7) as mock:
        results = await _fan_out(mock, pki, signing_key, 400, max_attempts=8)
        mock.config.p429 = 0.0  # the storm clears: sending resumes by itself
        after = await _fan_out(mock, pki, signing_key, 100)
    assert len(results) == 400 and len({r.token for r in results}) == 400
    assert {r.outcome for r in results} <= {"delivered", "retries_exhausted"}
    assert sum(r.outcome == "delivered" for r in results) > 380
    assert mock.stats.by_status[429] > 300
    assert all(r.ok for r in after)


async def test_5xx_bursts_pause_then_recover(pki, signing_key):
    async with mock_server(pki, signing_key, p500=0.2, p503=0.2, seed=3) as mock:
        results = await _fan_out(mock, pki, signing_key, 300, max_attempts=10)
        mock.config.p500 = mock.config.p503 = 0.0
        after = await _fan_out(mock, pki, signing_key, 100)
    assert len({r.token for r in results}) == 300
    assert all(r.ok for r in results), {r.outcome for r in results}
    assert mock.stats.by_status[500] > 20 and mock.stats.by_status[503] > 20
    assert all(r.ok for r in after)


async def test_a_server_2s_slow_delivers_everything_without_timeouts(pki, signing_key):
    async with mock_server(pki, signing_key, latency=2.0) as mock:
        results = await _fan_out(mock, pki, signing_key, 500, timeout=10.0)
    assert [r.outcome for r in results] == ["delivered"] * 500
    assert all(r.attempts == 1 for r in results)
    assert min(r.latency_ms for r in results) >= 1900


# ---------------------------------------------------------------- known-bad tokens

async def test_tokens_apns_called_dead_are_not_sent_again(pki, signing_key):
    """Each rejection drops the connection's stream limit to 1 (here until 20 accepted
    pushes: a strict server). A token APNs called BadDeviceToken is answered from memory
    on the next send, never put on the wire to throttle the others; forget_invalid()
    sends it again."""
    from fanout.auth import TokenAuth
    from fanout.client import Client

    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    tokens = [f"{i:064x}" for i in range(2000)]
    async with mock_server(pki, signing_key, bad_token_fraction=0.05, penalty_accepts=20,
                           latency=0.002) as mock:
        async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                          port=mock.port, ca_file=str(pki.ca_file)) as client:
            with trio.fail_after(60):
                first = [r async for r in client.fan_out({"aps": {"alert": "x"}}, tokens)]
                bad = {r.token for r in first if r.outcome == "invalid_token"}
                assert 60 < len(bad) < 140
                assert {r.reason for r in first if r.token in bad} == {"BadDeviceToken"}
                rejected, requests = sum(mock.stats.rejected_per_connection), mock.stats.requests
                again = [r async for r in client.fan_out({"aps": {"alert": "x"}}, tokens)]
                assert sum(mock.stats.rejected_per_connection) == rejected  # none on the wire
                assert mock.stats.requests - requests == 2000 - len(bad)
                known = [r for r in again if r.token in bad]
                assert all(r.outcome == "invalid_token" and r.reason == "BadDeviceToken"
                           and r.attempts == 0 and r.status is None
                           and r.error.startswith("not sent") for r in known)
                assert sum(r.outcome == "delivered" for r in again) == 2000 - len(bad)
                one = sorted(bad)[0]
                client.forget_invalid(one)
                r = await client.send(Notification(token=one, payload={"aps": {"alert": "x"}}))
                assert r.status == 400 and r.attempts == 1
                assert sum(mock.stats.rejected_per_connection) == rejected + 1


async def test_resend_invalid_puts_them_on_the_wire_again(pki, signing_key):
    from fanout.auth import TokenAuth
    from fanout.client import Client

    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    tokens = [f"{i:064x}" for i in range(1000)]
    async with mock_server(pki, signing_key, bad_token_fraction=0.05) as mock:
        async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                          port=mock.port, ca_file=str(pki.ca_file),
                          resend_invalid=True) as client:
            with trio.fail_after(60):
                for _ in range(2):
                    results = [r async for r in client.fan_out({"aps": {"alert": "x"}}, tokens)]
    bad = sum(r.outcome == "invalid_token" for r in results)
    assert all(r.status == 400 for r in results if r.outcome == "invalid_token")
    assert sum(mock.stats.rejected_per_connection) == 2 * bad


_MOCK_FAULTS = {
    "goaway_low_last_stream": dict(goaway_after=150, goaway_last_stream_low=True),
    "abrupt_close": dict(close_after=200),
    "429_storm": dict(p429=0.3),
    "5xx_burst": dict(p500=0.1, p503=0.1),
    "never_answered": dict(never_answer=0.02),
    "bad_tokens": dict(bad_token_fraction=0.05, unregistered_fraction=0.05),
}


async def test_memory_does_not_grow_from_fault_cycle_to_fault_cycle(pki, signing_key):
    """Every mock fault, three cycles of fault then recovery: sending resumes by itself
    after each, descriptors and tasks return to baseline (back_to_baseline in
    _fan_out), and RSS after the third cycle is within 5 MB of the first."""
    rss = []
    async with mock_server(pki, signing_key) as mock:
        for _cycle in range(3):
            for fault in _MOCK_FAULTS.values():
                for name, value in fault.items():
                    setattr(mock.config, name, value)
                results = await _fan_out(mock, pki, signing_key, 300, max_attempts=20,
                                         timeout=0.5)
                assert len({r.token for r in results}) == 300
                for name in fault:  # the fault clears
                    setattr(mock.config, name, getattr(MockConfig(), name))
                after = await _fan_out(mock, pki, signing_key, 50, timeout=0.5)
                assert all(r.ok for r in after), {r.outcome for r in after}
            gc.collect()
            rss.append(_rss_mb())
    assert rss[2] - rss[0] < 5, rss
