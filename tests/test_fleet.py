"""A fleet of ``fanout run --source redis://...`` daemons on one Redis Stream (issue 8).

A real redis-server from Debian (started here, 127.0.0.1, a free port, AOF on so that a
restart keeps the stream), the daemons as real processes, the mock APNs in the test
process (its counts are the ground truth)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fanout.testing.devcerts import TestPKI, TestSigningKey
from fanout.testing.mock import MockAPNs
from fanout.testing.nginx import free_port

from .helpers import PAYLOAD, daemon_cmd, mock_server, stderr_of

# skipped locally without Redis; under CI=true (.ci/run installs it) a missing one fails
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None and not os.environ.get("CI"),
                                reason="redis-server not installed (apt-get install redis-server)")

STREAM = "pushes"


class Redis:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{STREAM}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
             str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--protected-mode", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis finishes its AOF and exits
            self.proc.wait(10)

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                             text=True)
        return out.stdout.strip()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    """A redis-server of its own for the test, stopped after it."""
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


def enqueue(redis: Redis, tmp_path: Path, lines: list[bytes], *extra: str) -> subprocess.Popen[bytes]:
    inp = tmp_path / f"in-{time.monotonic_ns()}.ndjson"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    return subprocess.Popen([sys.executable, "-m", "fanout", "enqueue", str(inp), "--to",
                             redis.url, *extra], stderr=subprocess.PIPE)


def pushes(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"id": i, "token": f"{i:064x}", "payload": PAYLOAD}).encode()
            for i in range(start, start + n)]


def fleet_cmd(mock: MockAPNs, pki: TestPKI, key: TestSigningKey, redis: Redis, name: str, out: Path, *extra: str) -> list[str]:
    return daemon_cmd(mock, pki, key, "--source", redis.url, "--group", "senders",
                      "--consumer", name, "--results", str(out), "--checkpoint-interval",
                      "0.1", *extra)


def results(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        if p.exists():
            whole = p.read_bytes().split(b"\n")[:-1]  # a last line may be half written
            out += [json.loads(x) for x in whole if x.strip()]
    return out


def count(paths: list[Path]) -> int:
    """Whole result lines written so far: a cheap poll. Parsing 100k results every 0.1 s
    on the mock's own event loop kept it from answering PINGs for 5 s."""
    return sum(p.read_bytes().count(b"\n") for p in paths if p.exists())


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.fail_after(timeout):  # in a thread: the mock serves on this event loop
        while not await trio.to_thread.run_sync(cond):
            await trio.sleep(0.1)


def blocked_readers(redis: Redis) -> int:
    """Clients waiting in XREADGROUP BLOCK for new entries: one per daemon ready to read
    (Redis 7.0 lists a consumer in the group only once it has been given an entry)."""
    return sum(" flags=b " in c and " cmd=xreadgroup " in c
               for c in redis.cli("CLIENT", "LIST").split("\n"))


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


@contextlib.contextmanager
def daemons(cmds: list[list[str]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in cmds]
    try:
        yield procs
    finally:
        stop_all(procs)


async def test_three_daemons_share_the_stream_each_entry_once(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey, redis: Redis,
) -> None:
    # the mock, in this process, does the work of every push: 20,000 keep the run to seconds
    # on a busy machine, and are still ~80 reads of 256 entries per daemon
    n = 20_000
    outs = [tmp_path / f"r{i}.ndjson" for i in range(3)]
    # long deadlines: a starved machine must not turn a slow answer into a resend (this
    # test is about sharing the stream; resends after a loss have tests of their own)
    slow_ok = ("--timeout", "120", "--ping-timeout", "60")
    async with mock_server(pki, signing_key) as mock:
        with daemons([fleet_cmd(mock, pki, signing_key, redis, f"d{i}", outs[i], *slow_ok)
                      for i in range(3)]) as procs:
            # all three wait on the group before the first entry: the one that starts first
            # on a loaded machine does not take the whole stream alone
            await wait_for(lambda: blocked_readers(redis) == 3
                           or any(p.poll() is not None for p in procs), 60, "three readers")
            assert all(p.poll() is None for p in procs), [stderr_of(p)[-500:]
                                                          for p in procs if p.poll() is not None]
            feeder = enqueue(redis, tmp_path, pushes(n))
            await wait_for(lambda: count(outs) >= n, 120, "every entry done")
            await wait_for(lambda: redis.cli("XLEN", STREAM) == "0", 10, "acked and deleted")
        assert feeder.wait(10) == 0, stderr_of(feeder)
        assert all(p.returncode == 0 for p in procs), [stderr_of(p)[-500:]
                                                      for p in procs]
        rs = results(outs)
    by_entry = Counter(r["entry"] for r in rs)
    assert len(by_entry) == n and set(by_entry.values()) == {1}  # no entry twice
    assert not any(r.get("resent") for r in rs)
    assert all(r["outcome"] == "delivered" for r in rs)
    assert len(mock.stats.delivered) == n and set(mock.stats.delivered.values()) == {1}
    shares = [len(results([o])) for o in outs]
    assert min(shares) > n / 3 * 0.3, shares  # every daemon took a share
    assert redis.cli("XPENDING", STREAM, "senders").split("\n")[0] == "0"


async def test_kill9_one_daemon_the_others_take_over(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey, redis: Redis,
) -> None:
    n = 12_000
    enqueue(redis, tmp_path, pushes(n)).wait(60)
    outs = [tmp_path / f"r{i}.ndjson" for i in range(3)]
    async with mock_server(pki, signing_key, latency=0.005) as mock:
        cmds = [fleet_cmd(mock, pki, signing_key, redis, f"d{i}", outs[i], "--claim-idle", "1",
                          "--max-in-flight", "200") for i in range(3)]
        with daemons(cmds) as procs:
            await wait_for(lambda: count(outs) > 2000, 60, "a start")
            procs[0].kill()  # kill -9: its pending entries wait for a takeover
            procs[0].wait()
            await wait_for(lambda: len({r["entry"] for r in results(outs)}) >= n, 120,
                           "every entry done")
        assert all(p.returncode == 0 for p in procs[1:])
        rs = results(outs)
    per_entry = defaultdict(list)
    for r in rs:
        per_entry[r["entry"]].append(r)
    assert len(per_entry) == n
    dups = [v for v in per_entry.values() if len(v) > 1]
    assert all(any(r.get("resent") for r in v) for v in dups)
    # at most what the dead daemon had read and not acked: its channel, window and a read
    assert len(dups) <= 256 + 200 + 256 + 2000
    taken = [r for r in results(outs[1:]) if r.get("resent")]
    assert taken, "the live daemons took over the dead one's entries"
    assert len(mock.stats.delivered) == n  # every token reached APNs
    assert redis.cli("XLEN", STREAM) == "0"


async def test_redis_restarted_mid_run_daemons_reconnect(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey, redis: Redis,
) -> None:
    n = 10_000
    enqueue(redis, tmp_path, pushes(n)).wait(60)
    outs = [tmp_path / f"r{i}.ndjson" for i in range(2)]
    async with mock_server(pki, signing_key, latency=0.01) as mock:
        with daemons([fleet_cmd(mock, pki, signing_key, redis, f"d{i}", outs[i],
                                "--max-in-flight", "100") for i in range(2)]) as procs:
            await wait_for(lambda: count(outs) > 1000, 60, "a start")
            redis.stop()
            await trio.sleep(1.5)
            redis.start()  # same port, the AOF brings the stream and the group back
            await wait_for(lambda: len({r["entry"] for r in results(outs)}) >= n, 120,
                           "every entry done")
            await wait_for(lambda: redis.cli("XLEN", STREAM) == "0", 10, "acked")
        errs = [stderr_of(p) for p in procs]
        assert all(p.returncode == 0 for p in procs), errs
    assert any("Redis" in e for e in errs)  # they noticed, and went on
    assert len(mock.stats.delivered) == n


async def test_poison_entries_are_acked_with_a_malformed_result(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey, redis: Redis,
) -> None:
    redis.cli("XADD", STREAM, "*", "push", "not json at all")
    redis.cli("XADD", STREAM, "*", "other", "no push field")
    redis.cli("XADD", STREAM, "*", "push", '{"token": 5}')
    enqueue(redis, tmp_path, pushes(5)).wait(30)
    out = tmp_path / "r.ndjson"
    async with mock_server(pki, signing_key) as mock:
        with daemons([fleet_cmd(mock, pki, signing_key, redis, "d0", out,
                                "--results-stream", "results")]) as procs:
            await wait_for(lambda: count([out]) >= 8, 30, "all done")
            await wait_for(lambda: redis.cli("XLEN", STREAM) == "0", 10, "acked")
        assert procs[0].returncode == 0
    rs = results([out])
    bad = sorted(r["error"] for r in rs if r["outcome"] == "malformed")
    assert len(bad) == 3 and any("no 'push' field" in e for e in bad)
    assert any("not JSON" in e for e in bad) and any("$.token" in e for e in bad)
    assert sum(r["outcome"] == "delivered" for r in rs) == 5 == len(mock.stats.delivered)
    assert redis.cli("XPENDING", STREAM, "senders").split("\n")[0] == "0"
    assert redis.cli("XLEN", "results") == "8"  # the results stream got every result too


async def test_enqueue_waits_on_the_backlog(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey, redis: Redis,
) -> None:
    feeder = enqueue(redis, tmp_path, pushes(5000), "--max-backlog", "1000", "--batch", "200")
    seen = []
    with trio.move_on_after(2):
        while True:
            seen.append(int(redis.cli("XLEN", STREAM) or 0))
            await trio.sleep(0.05)
    assert feeder.poll() is None and max(seen) <= 1000  # blocked, not growing
    out = tmp_path / "r.ndjson"
    async with mock_server(pki, signing_key) as mock:
        with daemons([fleet_cmd(mock, pki, signing_key, redis, "d0", out)]):
            await wait_for(lambda: count([out]) >= 5000, 60, "all done")
            assert feeder.wait(30) == 0
    assert len(mock.stats.delivered) == 5000
    assert "5000 entries added" in stderr_of(feeder)


async def test_consumer_lag_and_pending_on_the_metrics_endpoint(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey, redis: Redis,
) -> None:
    import urllib.request

    enqueue(redis, tmp_path, pushes(3000)).wait(30)
    port = free_port()
    out = tmp_path / "r.ndjson"

    def gauges() -> dict[str, float]:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        except OSError:
            return {}
        return {k: float(v) for k, v in (line.split() for line in body.decode().splitlines()
                                         if line.startswith("fanout_stream_"))}

    async with mock_server(pki, signing_key, latency=0.05) as mock:
        with daemons([fleet_cmd(mock, pki, signing_key, redis, "d0", out, "--metrics",
                                str(port), "--max-in-flight", "50")]):
            await wait_for(lambda: gauges().get("fanout_stream_pending_entries", 0) > 0, 20,
                           "pending seen")
            g = gauges()
            assert g["fanout_stream_lag_entries"] > 0  # a slow fleet: entries wait unread
            await wait_for(lambda: count([out]) >= 3000, 60, "all done")
            await wait_for(lambda: gauges().get("fanout_stream_lag_entries", 1) == 0
                           and gauges().get("fanout_stream_pending_entries", 1) == 0, 10,
                           "drained")
    assert len(mock.stats.delivered) == 3000
