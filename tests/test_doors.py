"""The asyncio and sync doors (fanout.asyncio, fanout.sync) against the mock APNs.

The mock runs in its own trio run in a thread of the test process (its stats are read
from here); the doors run their engine in theirs. These tests are plain functions: they
drive asyncio (and uvloop) and threads themselves."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import fanout.asyncio as fa
import fanout.sync as fs
from fanout import ClosedError, ConfigError, Notification, TokenAuth, ValidationError
from fanout._bridge import BroadcastOptions, ClientOptions, FanOutOptions
from fanout.client import Client as TrioClient
from fanout.testing.devcerts import TestPKI, TestSigningKey
from fanout.testing.mock import MockAPNs, MockConfig

from .helpers import PAYLOAD, TOPIC, tokens

DEADLINE = 30.0


class MockThread:
    """The mock APNs in a trio run of its own thread."""

    def __init__(self, pki: TestPKI, key: TestSigningKey, **config: Any) -> None:
        config.setdefault("keys", {key.key_id: key.public_key})
        config.setdefault("team_id", key.team_id)
        self.mock = MockAPNs(MockConfig(**config), pki)
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._up = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)
        self._thread.start()
        assert self._up.wait(DEADLINE), "the mock did not start"

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.mock.serve)
                self._up.set()

    @property
    def port(self) -> int:
        return self.mock.port

    def stop(self) -> None:
        assert self._token is not None and self._scope is not None
        self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(DEADLINE)


@pytest.fixture
def mock(pki: TestPKI, signing_key: TestSigningKey) -> Iterator[MockThread]:
    m = MockThread(pki, signing_key)
    try:
        yield m
    finally:
        m.stop()


def options(mock: MockThread, pki: TestPKI, key: TestSigningKey, **kw: Any) -> dict[str, Any]:
    return {"auth": TokenAuth.from_file(key.path, key.key_id, key.team_id), "topic": TOPIC,
            "host": "127.0.0.1", "port": mock.port, "ca_file": str(pki.ca_file),
            "connections": 2, **kw}


def wait_for(fact: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not fact():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


async def await_for(fact: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not fact():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def engine_threads() -> int:
    return sum(t.name == "fanout-engine" and t.is_alive() for t in threading.enumerate())


def note(token: str, **kw: Any) -> Notification:
    return Notification(token=token, payload=PAYLOAD, **kw)


# ---------------------------------------------------------------- the surface


@pytest.mark.parametrize(("options", "method", "own"), [
    (ClientOptions, TrioClient.__init__, set()),
    (FanOutOptions, TrioClient.fan_out, {"window"}),
    (BroadcastOptions, TrioClient.broadcast, set()),
])
def test_both_doors_take_the_trio_clients_arguments(options: Any, method: Any,
                                                    own: set[str]) -> None:
    params = inspect.signature(method).parameters
    wanted = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(options.__annotations__) == wanted - own


def test_a_bad_setting_raises_config_error_at_once_in_both_doors() -> None:
    with pytest.raises(ConfigError, match="connections"):
        fa.Client(connections=0)
    with pytest.raises(ConfigError, match="connections"):
        fs.Client(connections=0)
    assert engine_threads() == 0  # nothing started for a client that cannot work


# ---------------------------------------------------------------- asyncio


def test_asyncio_send_send_many_fan_out(mock: MockThread, pki: TestPKI,
                                        signing_key: TestSigningKey) -> None:
    async def main() -> None:
        async with fa.Client(**options(mock, pki, signing_key)) as client:
            one = await client.send(note("ab" * 32, id="one"))
            notes: list[Any] = [note(t, id=i) for i, t in enumerate(tokens(50))]
            notes.insert(10, Notification(token="not hex", payload=PAYLOAD, id="bad"))
            many = [r async for r in client.send_many(notes, window=8)]
            fanned = [r async for r in client.fan_out(PAYLOAD, tokens(300, "f"), window=64)]
            return one, many, fanned

    one, many, fanned = asyncio.run(main())
    assert one.ok and one.id == "one" and one.status == 200
    assert len(many) == 51
    bad = [r for r in many if r.id == "bad"]
    assert len(bad) == 1 and bad[0].outcome == "rejected" and "token" in (bad[0].error or "")
    assert sum(r.ok for r in many) == 50
    assert len(fanned) == 300 and all(r.ok for r in fanned)
    assert len({r.token for r in fanned}) == 300
    assert mock.mock.stats.requests == 351
    assert len(mock.mock.stats.jwts) == 1
    wait_for(lambda: engine_threads() == 0, "closing the client to end the engine thread")


def test_asyncio_errors_arrive_as_the_trio_apis(mock: MockThread, pki: TestPKI,
                                                signing_key: TestSigningKey) -> None:
    class Boom(Exception):
        pass

    async def source() -> Any:
        for t in tokens(20):
            yield note(t)
        raise Boom("the caller's iterable broke")

    async def main() -> tuple[list[Any], BaseException | None]:
        async with fa.Client(**options(mock, pki, signing_key)) as client:
            with pytest.raises(ValidationError, match="payload"):
                client.fan_out({"aps": {"alert": "x" * 5000}}, tokens(3))  # at once
            bad = await client.send(Notification(token="zz", payload=PAYLOAD))
            assert bad.outcome == "rejected" and "token" in (bad.error or "")
            with pytest.raises(ConfigError, match="window"):
                client.send_many([], window=0)
            got: list[Any] = []
            error = None
            try:
                async for r in client.send_many(source()):
                    got.append(r)
            except Boom as exc:
                error = exc
            return got, error

    got, error = asyncio.run(main())
    # the pushes already sent finished and came out first, then the iterable's exception
    assert len(got) == 20 and all(r.ok for r in got)
    assert isinstance(error, Exception) and "broke" in str(error)


def test_asyncio_cancel_resets_streams_and_frees_slots(mock: MockThread, pki: TestPKI,
                                                       signing_key: TestSigningKey) -> None:
    async def main() -> tuple[int, int]:
        async with fa.Client(**options(mock, pki, signing_key)) as client:
            assert (await client.send(note("ab" * 32))).ok   # connected, limit learnt
            mock.mock.config.latency = 30.0                   # nothing answers now
            trio_client = client.trio_client
            task = asyncio.create_task(client.send(note("cd" * 32)))
            await await_for(lambda: trio_client.in_flight == 1, "the push in flight")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await await_for(lambda: trio_client.in_flight == 0 and trio_client.outstanding == 0,
                            "the cancelled push's stream reset and slot freed")

            async def fan() -> None:
                async for _ in client.fan_out(PAYLOAD, tokens(500)):
                    pass

            task = asyncio.create_task(fan())
            await await_for(lambda: trio_client.in_flight >= 100, "a fan-out in flight")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await await_for(lambda: trio_client.in_flight == 0 and trio_client.outstanding == 0,
                            "every stream of the cancelled fan-out reset")
            mock.mock.config.latency = 0.0
            after = await client.send(note("ef" * 32))
            assert after.ok and not after.resent
            return max(mock.mock.stats.seen.values()), mock.mock.stats.requests

    most, requests = asyncio.run(main())
    assert most == 1          # a cancelled push is never resent
    assert requests <= 503    # 1 + 1 + at most the 500 of the fan-out + 1
    assert mock.mock.stats.protocol_errors == []  # h2 took our RST_STREAMs


def test_asyncio_results_that_keep_coming_leave_the_loop_its_turns(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer that always finds results waiting still lets the loop's other tasks run
    (as trio checkpoints in each receive): a fan-out must not starve the app's loop."""
    import fanout._bridge as bridge

    streams: list[Any] = []
    init = bridge.Stream.__init__

    def record(self: Any, *args: Any) -> None:
        init(self, *args)
        streams.append(self)

    monkeypatch.setattr(bridge.Stream, "__init__", record)
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    async def main() -> tuple[int, int, int]:
        async with fa.Client(**options(mock, pki, signing_key)) as client:
            assert (await client.send(note("ab" * 32))).ok  # connected, limit learnt
            other = asyncio.create_task(other_task())
            await asyncio.sleep(0)
            count, first = 0, -1
            async for _ in client.fan_out(PAYLOAD, tokens(200), window=256):
                if count == 0:  # every result is waiting before the first is consumed
                    wait_for(lambda: streams[-1].ended, "every result of the fan-out")
                    first = turns
                count += 1
            last = turns
            other.cancel()
            return count, first, last

    count, first, last = asyncio.run(main())
    assert count == 200
    assert last > first  # the other task ran while the waiting results were consumed


def test_asyncio_close_ends_pushes_still_out_with_closed_error(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    mock.mock.config.latency = 30.0

    async def main() -> BaseException | None:
        client = fa.Client(close_timeout=0.2, **options(mock, pki, signing_key))
        async with client:
            task = asyncio.create_task(client.send(note("ab" * 32)))
            await await_for(lambda: client.in_flight == 1, "the push in flight")
        try:
            await task
        except ClosedError as exc:
            return exc
        return None

    error = asyncio.run(main())
    assert isinstance(error, ClosedError) and "closed" in str(error)
    wait_for(lambda: engine_threads() == 0, "the engine to stop")


def test_asyncio_channels_broadcast_and_live_activities(mock: MockThread, pki: TestPKI,
                                                        signing_key: TestSigningKey) -> None:
    async def main() -> tuple[Any, ...]:
        async with fa.Client(**options(mock, pki, signing_key)) as client:
            channel = await client.channels.create(0)
            listed = await client.channels.list()
            sent = await client.broadcast(channel.channel_id, {
                "aps": {"event": "update", "timestamp": 1, "content-state": {"score": "1-0"}}})
            la = client.live_activities(TOPIC)
            update = await la.update("aa" * 32, {"score": "1-0"}, activity_id="m1",
                                     source_time=1.0)
            stale = await la.update("aa" * 32, {"score": "0-0"}, activity_id="m1",
                                    source_time=0.5)
            await client.channels.delete(channel.channel_id)
            return channel, listed, sent, update, stale

    channel, listed, sent, update, stale = asyncio.run(main())
    assert channel.channel_id in listed
    assert sent.ok and sent.channel_id == channel.channel_id
    assert update.ok and stale.outcome == "superseded"
    assert mock.mock.stats.channels.get(TOPIC, {}) == {}


def test_asyncio_under_uvloop(mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[str, list[Any]]:
        loop_type = type(asyncio.get_running_loop()).__module__
        async with fa.Client(**options(mock, pki, signing_key)) as client:
            return loop_type, [r async for r in client.fan_out(PAYLOAD, tokens(100))]

    loop_type, results = uvloop.run(main())
    assert loop_type.startswith("uvloop")
    assert len(results) == 100 and all(r.ok for r in results)


# ---------------------------------------------------------------- sync


def test_sync_from_many_threads_one_engine_one_jwt(mock: MockThread, pki: TestPKI,
                                                   signing_key: TestSigningKey) -> None:
    opts = options(mock, pki, signing_key)
    results: list[Any] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        # a client per thread, as a view would make one: they share one engine client
        with fs.Client(**{**opts, "auth": TokenAuth.from_file(
                signing_key.path, signing_key.key_id, signing_key.team_id)}) as client:
            mine = [client.send(note(t, id=(i, t)), timeout=DEADLINE)
                    for t in tokens(5, f"{i:02x}")]
            futures = [client.submit(note(t)) for t in tokens(5, f"s{i:02x}".replace("s", "e"))]
            mine += [f.result(DEADLINE) for f in futures]
            mine += list(client.send_many([note(t) for t in tokens(5, f"d{i:02x}")]))
            mine += list(client.fan_out(PAYLOAD, tokens(5, f"c{i:02x}")))
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert len(results) == 8 * 20 and all(r.ok for r in results)
    assert len(mock.mock.stats.jwts) == 1
    assert mock.mock.stats.connections <= 2   # one engine client: its two connections
    assert engine_threads() == 1              # kept alive for the next client (keep_alive)
    fs.shutdown()
    wait_for(lambda: engine_threads() == 0, "the engine to stop")


def test_sync_per_request_clients_reuse_one_connection_set(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    for i in range(20):  # the README's sample pasted into a view: a client per request
        with fs.Client(**options(mock, pki, signing_key)) as client:
            assert client.send(note(f"{i:064x}"), timeout=DEADLINE).ok
    assert len(mock.mock.stats.jwts) == 1
    assert mock.mock.stats.connections <= 2
    fs.shutdown()
    wait_for(lambda: engine_threads() == 0, "the engine to stop")


def test_sync_keep_alive_zero_closes_with_the_last_client(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    with fs.Client(keep_alive=0, **options(mock, pki, signing_key)) as client:
        assert client.send(note("ab" * 32), timeout=DEADLINE).ok
    wait_for(lambda: engine_threads() == 0, "the engine to stop with the last client")
    with pytest.raises(ClosedError):
        client.send(note("ab" * 32))


def test_sync_timeout_cancels_the_push(mock: MockThread, pki: TestPKI,
                                       signing_key: TestSigningKey) -> None:
    with fs.Client(keep_alive=0, **options(mock, pki, signing_key)) as client:
        assert client.send(note("ab" * 32), timeout=DEADLINE).ok
        mock.mock.config.latency = 30.0
        with pytest.raises(TimeoutError, match="cancelled"):
            client.send(note("cd" * 32), timeout=0.2)
        trio_client = client.trio_client
        wait_for(lambda: trio_client.in_flight == 0 and trio_client.outstanding == 0,
                 "the timed-out push's stream reset")
        future = client.submit(note("ef" * 32))
        wait_for(lambda: trio_client.in_flight == 1, "the submitted push in flight")
        assert future.cancel()
        wait_for(lambda: trio_client.in_flight == 0, "the cancelled future's stream reset")
        # leaving a send_many early ends its stream in the engine: an endless source
        # stops being read, and what is out is reset
        mock.mock.config.latency = 0.0
        many = client.send_many((note(f"{i:064x}") for i in itertools.count()), window=10)
        got = [next(many) for _ in range(20)]
        many.close()
        hosted = client._get().hosted
        wait_for(lambda: hosted.pending == 0 and trio_client.in_flight == 0
                 and trio_client.outstanding == 0, "a closed send_many's stream ended")
        assert all(r.ok for r in got)
        assert mock.mock.stats.requests < 1000
    assert mock.mock.stats.protocol_errors == []


def test_sync_client_after_fork_starts_its_own_engine(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    client = fs.Client(keep_alive=0, **options(mock, pki, signing_key))
    assert client.send(note("ab" * 32), timeout=DEADLINE).ok
    before = mock.mock.stats.connections
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the same client object, a new engine and new sockets
        try:
            results = [client.send(note(t), timeout=DEADLINE) for t in tokens(3, "c")]
            os.write(write, json.dumps([r.outcome for r in results]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = json.loads(f.read() or "[]")
    os.waitpid(pid, 0)
    assert child == ["delivered"] * 3
    assert mock.mock.stats.connections > before           # the child dialled its own
    assert client.send(note("cd" * 32), timeout=DEADLINE).ok  # the parent's still work
    assert mock.mock.stats.protocol_errors == []
    client.close()
    wait_for(lambda: engine_threads() == 0, "the engine to stop")


def test_sync_drains_pushes_in_flight_at_interpreter_exit(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey, tmp_path: Path) -> None:
    mock.mock.config.latency = 0.3
    script = tmp_path / "script.py"
    script.write_text(f"""
import fanout.sync, fanout
auth = fanout.TokenAuth.from_file({str(signing_key.path)!r}, {signing_key.key_id!r},
                                  {signing_key.team_id!r})
client = fanout.sync.Client(auth=auth, topic={TOPIC!r}, host="127.0.0.1", port={mock.port},
                            ca_file={str(pki.ca_file)!r})
futures = [client.submit(fanout.Notification(token=f"{{i:064x}}", payload={PAYLOAD!r}))
           for i in range(40)]
print("submitted", flush=True)
# no wait, no close: the interpreter exits with the pushes in flight
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr
    assert "submitted" in proc.stdout
    assert sum(mock.mock.stats.delivered.values()) == 40


def test_sync_reports_what_the_exit_deadline_cut(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey, tmp_path: Path) -> None:
    mock.mock.config.latency = 30.0
    script = tmp_path / "script.py"
    script.write_text(f"""
import logging, fanout.sync, fanout
logging.basicConfig(level=logging.WARNING)
client = fanout.sync.Client(close_timeout=0.2, topic={TOPIC!r}, host="127.0.0.1",
                            port={mock.port}, ca_file={str(pki.ca_file)!r},
                            auth=fanout.TokenAuth.from_file({str(signing_key.path)!r},
                                {signing_key.key_id!r}, {signing_key.team_id!r}))
futures = [client.submit(fanout.Notification(token=f"{{i:064x}}", payload={PAYLOAD!r}))
           for i in range(5)]
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr
    assert "closing with 5 calls unfinished" in proc.stderr
    assert "ab" * 10 not in proc.stderr and "bearer" not in proc.stderr


def test_sync_send_many_yields_every_result_in_completion_order(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    with fs.Client(keep_alive=0, **options(mock, pki, signing_key)) as client:
        gen = (note(t, id=i) for i, t in enumerate(tokens(2000)))
        results = list(client.send_many(gen, window=100))
    assert len(results) == 2000
    assert Counter(r.outcome for r in results) == {"delivered": 2000}
    assert sorted(r.id for r in results) == list(range(2000))


def test_fork_while_another_thread_holds_the_doors_lock(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    # a thread of the parent inside _acquire/close() at fork(): the child must not
    # inherit the lock held for ever (its first push hung, past any timeout)
    client = fs.Client(keep_alive=0, **options(mock, pki, signing_key))
    held = threading.Event()

    def holder() -> None:
        with fs._lock:
            held.set()
            time.sleep(0.2)  # fork() waits for this (the fix), or forks inside it (the bug)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(DEADLINE)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, client.send(note("ab" * 32), timeout=10).outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    t.join(DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung on a lock held at fork()")
        time.sleep(0.01)
    with os.fdopen(read) as f:
        assert f.read() == "delivered"
    client.close()


def test_a_stream_of_a_client_closed_before_it_ran_ends_closed_error(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    async def main() -> BaseException | None:
        async with fa.Client(**options(mock, pki, signing_key)):  # keeps the engine up
            client = fa.Client(**options(mock, pki, signing_key))
            await client.__aenter__()
            results = client.fan_out(PAYLOAD, tokens(3))   # made while open
            await client.aclose()
            try:
                async with asyncio.timeout(DEADLINE):
                    async for _ in results:
                        pass
            except ClosedError as exc:
                return exc
            return None

    assert isinstance(asyncio.run(main()), ClosedError)  # it hung for ever before


def test_a_reply_to_a_closed_loop_loses_only_itself(
        mock: MockThread, pki: TestPKI, signing_key: TestSigningKey) -> None:
    other = fs.Client(keep_alive=0, **options(mock, pki, signing_key, topic="com.example.other"))
    assert other.send(note("cd" * 32), timeout=DEADLINE).ok
    engine_before = other._get().hosted.engine
    mock.mock.config.latency = 0.3
    abandoned = fa.Client(**options(mock, pki, signing_key))

    async def leave_a_push_out() -> None:
        await abandoned.__aenter__()  # a lifespan whose shutdown never ran
        asyncio.get_running_loop().create_task(abandoned.send(note("ab" * 32)))
        await await_for(lambda: abandoned.in_flight == 1, "the push out")

    loop = asyncio.new_event_loop()
    loop.run_until_complete(leave_a_push_out())
    loop.close()
    # its answer comes, its reply cannot reach the closed loop: that must not end the engine
    wait_for(lambda: abandoned.in_flight == 0 and abandoned.trio_client.outstanding == 0,
             "the abandoned push answered")
    mock.mock.config.latency = 0.0
    assert other.send(note("ef" * 32), timeout=DEADLINE).ok
    assert other._get().hosted.engine is engine_before and not engine_before.stopped
    hosted = abandoned._hosted
    assert hosted is not None
    hosted.engine.post(hosted.close)
    other.close()
    wait_for(lambda: engine_threads() == 0, "the engine to stop")
