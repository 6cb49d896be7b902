"""Acceptance tests of the engine against the mock APNs, over real TLS with real ES256 JWTs.

Each test proves exactly-once from both sides: the client's results and the mock's counts.
"""

from __future__ import annotations

import gc
import time

import pytest
import trio

from fanout.auth import TokenAuth
from fanout.client import Client
from fanout.errors import ValidationError
from fanout.payload import Notification, PushType
from fanout.testing.devcerts import TestPKI, TestSigningKey, make_signing_key
from fanout.testing.mock import MockAPNs, MockConfig

from .helpers import SteppedClock, collect, running, tokens, wait_until

TOPIC = "com.example.app"
PAYLOAD = {"aps": {"alert": {"title": "t", "body": "hello"}}}


def by_outcome(results) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return counts


async def test_20k_pushes_two_connections_exactly_once(pki, signing_key):
    toks = tokens(20_000)
    async with running(pki, signing_key, latency=0.25) as (mock, client):
        results = await collect(client.fan_out(PAYLOAD, toks))
    assert by_outcome(results) == {"delivered": 20_000}
    assert sorted(r.token for r in results) == sorted(toks)
    assert set(mock.stats.delivered.values()) == {1} and len(mock.stats.delivered) == 20_000
    assert mock.stats.protocol_errors == []
    assert mock.stats.connections == 2
    # many streams at once per connection (not one after another); the margin holds on a
    # loaded machine: 100 in flight needs only 400 pushes/s against the 0.25 s latency
    assert max(mock.stats.max_concurrent) > 100
    assert len(mock.stats.jwts) == 1  # one JWT shared by both connections


async def test_stream_limit_one_then_raised_then_dropped_on_rejection(pki, signing_key,
                                                                     monkeypatch):
    """1 until the first valid token, ~1000 after, 1 after each rejection, back up after."""
    notes = []
    for i in range(3000):
        bad = i % 500 == 250  # a rejected push every 500: the mock drops the limit to 1
        # raw bytes are only size-checked by the client: the mock answers 400 BadRequestPayload
        notes.append(Notification(token=f"{i:064x}", payload=b"[1, 2]" if bad else PAYLOAD,
                                  id=i, priority=10, push_type=PushType.ALERT))
    from fanout._engine.connection import Connection

    history: list[int] = []
    original = Connection._on_settings

    def record(self, settings):
        original(self, settings)
        history.append(self.remote_max_streams)
    monkeypatch.setattr(Connection, "_on_settings", record)
    async with running(pki, signing_key, topics={TOPIC}, latency=0.01) as (mock, client):
        results = await collect(client.send_many(notes))
    counts = by_outcome(results)
    assert counts == {"delivered": 3000 - 6, "rejected": 6}
    assert {r.reason for r in results if r.outcome == "rejected"} == {"BadRequestPayload"}
    # per connection: 1 at connect, 1000 after auth; 1 after each rejection, 1000 again
    assert history[:2] == [1, 1]
    drops = sum(1 for a, b in zip(history, history[1:], strict=False) if a == 1000 and b == 1)
    assert drops == 6 and history[-1] == 1000
    assert mock.stats.protocol_errors == []
    assert mock.stats.by_status[200] == 3000 - 6
    assert max(mock.stats.max_concurrent) > 100


async def test_goaway_and_abrupt_close_lose_nothing(pki, signing_key):
    toks = tokens(6000)
    async with running(pki, signing_key, goaway_after=1000, goaway_last_stream_low=True,
                       close_after=1500, latency=0.002) as (mock, client):
        results = await collect(client.fan_out(PAYLOAD, toks))
    assert len(results) == 6000
    assert sorted(r.token for r in results) == sorted(toks)
    assert by_outcome(results) == {"delivered": 6000}
    assert all(mock.stats.delivered[t] >= 1 for t in toks)
    assert mock.stats.goaways_sent >= 2
    assert mock.stats.streams_after_goaway == 0
    assert mock.stats.protocol_errors == []
    resent = [r for r in results if r.attempts > 1]
    # only pushes in flight when a connection died abruptly may be sent twice
    assert sum(mock.stats.delivered.values()) - 6000 <= len(resent)


async def test_unregistered_tokens_typed_with_timestamp_and_sink_hears_each_once(pki, signing_key):
    heard = []
    toks = tokens(3000)
    async with running(pki, signing_key, unregistered_fraction=0.10,
                       client_kw={"on_invalid_token": lambda t, r, ts: heard.append((t, r, ts))}) \
            as (mock, client):
        results = await collect(client.fan_out(PAYLOAD, toks))
        # sending the dead ones again: the sink must not hear them twice
        dead = [r.token for r in results if r.outcome == "invalid_token"]
        again = await collect(client.fan_out(PAYLOAD, dead))
    counts = by_outcome(results)
    assert 200 < counts["invalid_token"] < 400
    assert counts["delivered"] == 3000 - counts["invalid_token"]
    for r in results:
        if r.outcome == "invalid_token":
            assert r.status == 410 and r.reason == "Unregistered" and r.timestamp > 1e12
    assert all(r.outcome == "invalid_token" for r in again)
    assert len(heard) == counts["invalid_token"] == len({t for t, _, _ in heard})
    assert mock.stats.protocol_errors == []


async def test_jwt_rotation_at_configured_age(pki: TestPKI, signing_key: TestSigningKey) -> None:
    """One JWT per age: the token stays while younger than refresh_after (however long a
    round takes), a new one is made once it is older, and both connections share it."""
    clock = SteppedClock(time.time())
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id,
                               refresh_after=60, min_refresh_interval=0.0, clock=clock)
    async with running(pki, signing_key, auth=auth) as (mock, client):
        for _ in range(3):
            results = await collect(client.fan_out(PAYLOAD, tokens(200)))
            assert by_outcome(results) == {"delivered": 200}
            clock.now += 61  # older than refresh_after (the mock allows 300 s of skew)
    assert len(mock.stats.jwts) == 3
    assert auth.rotations == 3


async def test_expired_provider_token_recovers(pki: TestPKI, signing_key: TestSigningKey) -> None:
    """A token the mock calls expired wedges its connection: the client refreshes the JWT,
    moves to a new connection, delivers everything. Time passing is modelled: the token is
    made 100 s in the past, then the mock's limit drops below its age and the client's
    clock catches up with the real one."""
    clock = SteppedClock(time.time() - 100)
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id,
                               refresh_after=3000, min_refresh_interval=0.0, clock=clock)
    async with running(pki, signing_key, auth=auth, token_max_age=3600,
                       expired_token_wedge=True) as (mock, client):
        first = await collect(client.fan_out(PAYLOAD, tokens(500)))
        mock.config.token_max_age = 50   # the token (100 s old) is now expired ...
        clock.now = time.time()          # ... and the client's clock says it is 100 s old
        second = await collect(client.fan_out(PAYLOAD, tokens(500, "b")))
    assert by_outcome(first) == {"delivered": 500}
    assert by_outcome(second) == {"delivered": 500}
    assert mock.stats.by_reason["ExpiredProviderToken"] >= 1
    # one refresh: a rejection of the old token on the other connection refreshes nothing
    assert auth.forced_refreshes == 1
    assert mock.stats.connections >= 3


async def test_wrong_key_stops_the_flood_with_a_clear_error(pki, signing_key, tmp_path, caplog):
    other = make_signing_key(tmp_path, key_id=signing_key.key_id, team_id=signing_key.team_id)
    auth = TokenAuth.from_file(other.path, other.key_id, other.team_id)
    async with running(pki, signing_key, auth=auth) as (mock, client):
        results = await collect(client.fan_out(PAYLOAD, tokens(2000)))
        error = client.config_error
    assert by_outcome(results) == {"config_error": 2000}
    assert mock.stats.requests <= 2  # stream limit 1 before auth: the flood never started
    assert "InvalidProviderToken" in error and signing_key.key_id in error
    jwt_text = auth.header().decode().split()[1]
    everything = caplog.text + error + "".join(str(r) for r in results)
    assert jwt_text not in everything
    assert "PRIVATE KEY" not in everything


async def test_wrong_team_is_a_config_error(pki, signing_key):
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, "OTHERTEAM1")
    async with running(pki, signing_key, auth=auth) as (mock, client):
        result = await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
    assert result.outcome == "config_error" and result.reason == "InvalidProviderToken"


def _task_count(client) -> int:
    def walk(task):
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)
    return sum(walk(t) for t in client._nursery.child_tasks)


async def test_cancellation_mid_flight_frees_every_slot_and_task(pki, signing_key):
    async with running(pki, signing_key, latency=30.0) as (mock, client):
        await trio.sleep(0.05)
        with trio.move_on_after(0.5):  # warm-up: the first answer would take 30 s
            await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
        baseline = _task_count(client)
        mock.config.latency = 30.0
        with trio.move_on_after(0.5) as scope:
            async for _ in client.fan_out(PAYLOAD, tokens(5000)):
                pass
        assert scope.cancelled_caught
        await wait_until(lambda: sum(len(c.streams) for c in client.pool.conns) == 0
                         and client.outstanding == 0 and _task_count(client) == baseline,
                         10, "every cancelled stream freed, every task gone")
        assert client._retry_heap == []
        assert _task_count(client) == baseline
        # single sends too
        with trio.move_on_after(0.2):
            await client.send(Notification(token="cd" * 32, payload=PAYLOAD))
        assert sum(len(c.streams) for c in client.pool.conns) == 0
        assert client.outstanding == 0
        await trio.sleep(0.05)
    assert mock.stats.protocol_errors == []  # h2 accepted our RST_STREAM frames


class _CountingLot:
    """A pool's ParkingLot with its parks counted (trio's class is final)."""

    def __init__(self, lot: trio.lowlevel.ParkingLot) -> None:
        self.lot, self.parks = lot, 0

    async def park(self) -> None:
        self.parks += 1
        await self.lot.park()

    def unpark(self, *, count: int = 1) -> list[trio.lowlevel.Task]:
        return self.lot.unpark(count=count)

    def unpark_all(self) -> list[trio.lowlevel.Task]:
        return self.lot.unpark_all()

    def __len__(self) -> int:
        return len(self.lot)

    def __bool__(self) -> bool:
        return bool(self.lot)


async def test_a_backlog_of_sends_wakes_one_waiter_per_free_slot(pki, signing_key):
    """2,000 concurrent send() calls on 2 x 25 streams. Every completion used to wake as
    many parked senders as its connection had free slots, counting again the slots it had
    promised to senders woken before and not yet run: 34,100 parks for 2,000 sends on one
    connection (a woken sender that found no slot parked again, at the back), and an open
    loop past the client's rate collapsed to ~700 pushes/s (bench/serve.py). Now each
    sender parks at most once, and newcomers queue behind the senders already waiting."""
    n = 2000
    async with running(pki, signing_key, max_streams=25, initial_max_streams=25) \
            as (mock, client):
        await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
        await wait_until(lambda: len(client.pool.conns) == 2, 10, "both connections up")
        lot = _CountingLot(client.pool._lot)
        client.pool._lot = lot  # type: ignore[assignment]
        results = []

        async def one(token: str) -> None:
            results.append(await client.send(Notification(token=token, payload=PAYLOAD)))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for token in tokens(n):
                    nursery.start_soon(one, token)
        assert by_outcome(results) == {"delivered": n}
        assert lot.parks <= n, f"{lot.parks} parks for {n} sends"
        assert client.pool._woken == 0 and client.pool.waiting == 0


async def test_a_sender_cancelled_after_its_wake_up_starts_nothing(pki, signing_key):
    """A send() parked for a slot is woken (a slot freed) and cancelled before it runs:
    its wake-up had already come, so park() returned normally and the push was started
    (HEADERS and DATA on the wire, then a reset): a push the caller had given up on
    reached the server. Now a job whose waiter was cancelled meanwhile starts nothing and
    the slot goes to the next waiter."""
    async with running(pki, signing_key, max_streams=2, initial_max_streams=2,
                       client_kw={"connections": 1}) as (mock, client):
        await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
        mock.config.latency = 30.0  # nothing answers now
        toks = tokens(4)
        scopes = [trio.CancelScope() for _ in toks]

        async def one(i: int) -> None:
            with scopes[i]:
                await client.send(Notification(token=toks[i], payload=PAYLOAD))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
            await wait_until(lambda: client.pool.in_flight == 2 and client.pool.waiting == 1,
                             10, "two in flight, one parked")
            nursery.start_soon(one, 3)
            await wait_until(lambda: client.pool.waiting == 2, 10, "two parked")
            seen = set(mock.stats.seen)
            parked = next(i for i in range(3) if toks[i] not in seen)
            conn = client.pool.conns[0]
            first = next(iter(conn.streams.values()))
            conn.cancel(first)      # a slot frees: the first parked sender is woken ...
            scopes[parked].cancel()  # ... and its caller gives up before it runs
            await wait_until(lambda: toks[3] in mock.stats.seen, 10,
                             "the slot passed to the next sender")
            assert toks[parked] not in mock.stats.seen
            nursery.cancel_scope.cancel()
        await wait_until(lambda: client.pool.in_flight == 0 and client.outstanding == 0, 10,
                         "every stream reset")
        assert client.pool._woken == 0


async def test_a_fan_out_closed_as_its_window_frees_starts_nothing_more(pki, signing_key):
    """window=2: taking a result wakes the feeder for the freed place; the caller then
    closes the stream before the feeder runs. The feeder's wake-up had already come, so it
    went on and started the next push after the stream's cleanup had abandoned the rest:
    a push nobody would hear of, on the wire. Now it starts nothing more."""
    async with running(pki, signing_key, client_kw={"connections": 1}) as (mock, client):
        await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
        toks = tokens(50)
        stream = client.fan_out(PAYLOAD, toks, window=2)
        await stream.__anext__()
        await stream.aclose()
        anchor = await client.send(Notification(token="cd" * 32, payload=PAYLOAD))
        assert anchor.ok  # one connection: what the feeder sent is ahead of it
        assert toks[2] not in mock.stats.seen


async def test_per_push_deadline_on_a_server_that_answers_nothing(pki, signing_key):
    # nothing answered on the connection since the stream was sent: the connection is
    # wedged and closed (no RST per stream); the push is resent on a new one, and says so
    async with running(pki, signing_key, never_answer=1.0,
                       client_kw={"timeout": 0.3, "max_attempts": 2,
                                  "delivery": "at_least_once"}) as (mock, client):
        result = await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
        assert sum(len(c.streams) for c in client.pool.conns) == 0
    assert result.outcome == "maybe_delivered"
    assert result.attempts == 2 and result.resent
    assert "wedged: no stream answered" in result.error


async def test_at_most_once_reports_maybe_delivered(pki, signing_key):
    async with running(pki, signing_key, never_answer=1.0,
                       client_kw={"timeout": 0.2, "delivery": "at_most_once"}) as (mock, client):
        result = await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
    assert result.outcome == "maybe_delivered" and result.attempts == 1
    assert mock.stats.requests == 1


@pytest.mark.parametrize("note, field", [
    (Notification(token="xyz", payload=PAYLOAD), "token"),
    (Notification(token="abc", payload=PAYLOAD), "token"),
    (Notification(token="ab" * 32, payload={"aps": {"alert": "x" * 5000}}), "payload"),
    (Notification(token="ab" * 32, payload={"aps": {"alert": "x"}}, collapse_id="c" * 65),
     "collapse_id"),
    (Notification(token="ab" * 32, payload={"aps": {"content-available": 1}},
                  push_type=PushType.BACKGROUND, priority=10), "priority"),
    (Notification(token="ab" * 32, payload=PAYLOAD, topic="com.x.voip"), "topic"),
    (Notification(token="ab" * 32, payload=PAYLOAD, apns_id="not-a-uuid"), "apns_id"),
    (Notification(token="ab" * 32, payload=b""), "payload"),
])
async def test_validation_rejects_before_any_network_io(pki, signing_key, note, field):
    async with running(pki, signing_key) as (mock, client):
        one = await client.send(note)
        results = await collect(client.send_many([note]))
    # send and send_many agree (issue 18): rejected, the field named, before any I/O
    assert one.outcome == "rejected" and (one.error or "").startswith(field)
    assert results[0].outcome == "rejected" and results[0].error.startswith(field)
    assert mock.stats.requests == 0


async def test_429_and_5xx_are_retried_with_backoff(pki, signing_key):
    from fanout import Backoff

    async with running(pki, signing_key, p429=0.1, p503=0.05, retry_after=0, seed=3,
                       client_kw={"backoff": Backoff(base=0.01, cap=0.05),
                                  "max_attempts": 8}) as (mock, client):
        results = await collect(client.fan_out(PAYLOAD, tokens(1000)))
    assert by_outcome(results) == {"delivered": 1000}
    assert mock.stats.by_status[429] > 0 and mock.stats.by_status[503] > 0
    assert any(r.attempts > 1 for r in results)


async def test_stream_ids_near_the_limit_roll_to_a_new_connection(pki, signing_key):
    async with running(pki, signing_key,
                       client_kw={"first_stream_id": 2**31 - 1 - 1200,
                                  "connections": 1}) as (mock, client):
        results = await collect(client.fan_out(PAYLOAD, tokens(1000)))
    assert by_outcome(results) == {"delivered": 1000}
    assert mock.stats.connections >= 2
    assert mock.stats.protocol_errors == []


async def test_no_alpn_h2_is_a_clear_config_error(pki, signing_key):
    async with running(pki, signing_key, alpn=False,
                       client_kw={"unavailable_timeout": 2.0}) as (mock, client):
        result = await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
    assert result.outcome == "config_error"
    assert "ALPN" in result.error


async def test_memory_is_released_after_a_run(pki, signing_key):
    async with running(pki, signing_key) as (mock, client):
        await collect(client.fan_out(PAYLOAD, tokens(2000)))
        gc.collect()
        from fanout.client import Push
        live = [o for o in gc.get_objects() if isinstance(o, Push)]
    assert live == []


async def test_server_restarted_on_the_same_port_sending_resumes(pki, signing_key):
    config = dict(keys={signing_key.key_id: signing_key.public_key}, team_id=signing_key.team_id)
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    async with trio.open_nursery() as nursery:
        first = MockAPNs(MockConfig(**config), pki)
        scope = trio.CancelScope()

        async def serve_first(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await first.serve(task_status=task_status)
        port = await nursery.start(serve_first)
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file), connections=2) as client:
            before = await collect(client.fan_out(PAYLOAD, tokens(300)))
            scope.cancel()  # the server dies, its connections with it
            await wait_until(lambda: not any(c.ready for c in client.pool.conns), 10,
                             "the client saw its connections die")
            second = MockAPNs(MockConfig(**config), pki)
            await nursery.start(second.serve, "127.0.0.1", port)
            after = await collect(client.fan_out(PAYLOAD, tokens(300, "b")))
        nursery.cancel_scope.cancel()
    assert by_outcome(before) == {"delivered": 300}
    assert by_outcome(after) == {"delivered": 300}
    assert second.stats.connections >= 1 and len(second.stats.delivered) == 300


async def test_idle_connection_is_pinged_and_kept(pki, signing_key):
    async with running(pki, signing_key, client_kw={"ping_interval": 0.1}) as (mock, client):
        await collect(client.fan_out(PAYLOAD, tokens(10)))
        conns = list(client.pool.conns)
        await wait_until(lambda: all(c.pings_sent >= 2 for c in conns), 10, "two pings each")
        assert client.pool.conns == conns
        result = await client.send(Notification(token="ab" * 32, payload=PAYLOAD))
    assert result.ok and mock.stats.connections == 2
    assert mock.stats.protocol_errors == []


async def test_callers_exception_comes_back_unwrapped(pki, signing_key):
    class Boom(Exception):
        pass

    mock = MockAPNs(MockConfig(), pki)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mock.serve)
        with pytest.raises(Boom):
            async with Client(topic=TOPIC, host="127.0.0.1", port=port,
                              ca_file=str(pki.ca_file)):
                raise Boom()
        with pytest.raises(ValidationError):
            async with Client(topic=TOPIC, host="127.0.0.1", port=port,
                              ca_file=str(pki.ca_file)) as client:
                await client.send(None)  # type: ignore[arg-type]  # not a push: raises
        nursery.cancel_scope.cancel()
