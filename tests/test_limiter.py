"""Tests for fanout._limiter: token bucket, backoff, Retry-After parsing and the Limiter.

Time is either a FakeClock (sync tests) or trio's MockClock with autojump (async tests),
so nothing here asserts on wall-clock time.
"""

from __future__ import annotations

import random
import time
from email.utils import formatdate

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from fanout import Backoff
from fanout._limiter import Limiter, TokenBucket, parse_retry_after


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mock_clock():
    return trio.testing.MockClock(autojump_threshold=0)


# --- TokenBucket (fake clock) ----------------------------------------------------------


def test_bucket_validation():
    for rate in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            TokenBucket(rate, clock=FakeClock())
    with pytest.raises(ValueError):
        TokenBucket(1, burst=0, clock=FakeClock())
    b = TokenBucket(10, burst=5, clock=FakeClock())
    with pytest.raises(ValueError):
        b.try_take(6)
    with pytest.raises(ValueError):
        b.try_take(-1)


def test_bucket_default_burst():
    assert TokenBucket(0.5, clock=FakeClock()).burst == 1
    assert TokenBucket(100, clock=FakeClock()).burst == 100


def test_bucket_try_take_rate():
    clock = FakeClock()
    b = TokenBucket(10, burst=5, clock=clock)
    assert [b.try_take() for _ in range(5)] == [0.0] * 5
    assert b.try_take() == pytest.approx(0.1)
    assert b.try_take(2) == pytest.approx(0.2)  # takes nothing when short
    clock.now += 0.1
    assert b.try_take() == 0.0
    assert b.try_take() == pytest.approx(0.1)
    clock.now += 100  # refill is capped at burst
    assert sum(b.try_take() == 0.0 for _ in range(10)) == 5


def test_bucket_long_run_rate():
    clock = FakeClock()
    b = TokenBucket(50, burst=10, clock=clock)
    sent = 0
    for _ in range(10_000):  # 10 s in 1 ms steps
        clock.now += 0.001
        while b.try_take() == 0.0:
            sent += 1
    assert 500 <= sent <= 500 + 10


async def test_take_paces_many_waiters(mock_clock):
    b = TokenBucket(100, burst=1)
    times: list[float] = []

    async def one() -> None:
        await b.take()
        times.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(300):
            nursery.start_soon(one)
    # 1 immediately, then exactly one every 10 ms: never faster than the rate
    assert len(times) == 300
    assert trio.current_time() - start == pytest.approx(2.99)
    elapsed = [t - start for t in sorted(times)]
    for i, t in enumerate(elapsed):
        assert t == pytest.approx(i / 100, abs=1e-9)


async def test_take_is_fifo(mock_clock):
    b = TokenBucket(10, burst=1)
    order: list[int] = []

    async def one(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # take() reserves before this task first yields
        await b.take()
        order.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            await nursery.start(one, i)  # deterministic arrival order
    assert order == list(range(50))


async def test_take_returns_wait(mock_clock):
    b = TokenBucket(2, burst=2)
    assert await b.take(2) == 0.0
    assert await b.take() == pytest.approx(0.5)
    assert await b.take(2) == pytest.approx(1.0)


async def test_cancelled_waiter_returns_tokens(mock_clock):
    b = TokenBucket(1, burst=1)
    await b.take()
    with trio.move_on_after(0.5):
        await b.take()
    # the cancelled reservation is given back: next token is due at t=1, not t=2
    assert await b.take() == pytest.approx(0.5)


async def queued_take(b: TokenBucket, task_status=trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()  # take() reserves synchronously, before the parent resumes
    await b.take()


async def test_try_take_respects_queue(mock_clock):
    b = TokenBucket(10, burst=1)
    await b.take()
    async with trio.open_nursery() as nursery:
        await nursery.start(queued_take, b)
        assert b.try_take() == pytest.approx(0.2)  # cannot jump ahead of the waiter


# --- Backoff -------------------------------------------------------------------------


def test_backoff_no_jitter_schedule():
    bo = Backoff(base=0.5, cap=10, jitter=False)
    assert [bo.delay(k) for k in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert bo.delay(10_000) == 10  # no OverflowError


@given(attempt=st.integers(1, 2000), seed=st.integers(0, 2**32))
def test_backoff_jitter_bounds(attempt, seed):
    bo = Backoff(base=0.5, cap=60, rng=random.Random(seed))
    d = bo.delay(attempt)
    assert 0 <= d <= min(60, 0.5 * 2 ** min(attempt - 1, 100))


def test_backoff_jitter_spreads():
    bo = Backoff(base=1, cap=100, rng=random.Random(1))
    samples = [bo.delay(5) for _ in range(1000)]
    assert max(samples) <= 16 and min(samples) >= 0
    assert max(samples) > 12 and min(samples) < 4  # full jitter, not equal jitter


def test_backoff_retry_after_wins():
    bo = Backoff(base=0.5, cap=60, rng=random.Random(1))
    assert bo.delay(1, retry_after=30) == 30
    assert bo.delay(9, retry_after=0) == 0
    assert bo.delay(1, retry_after=3600) == 60  # capped
    assert bo.delay(1, retry_after=-5) == 0


def test_backoff_validation():
    with pytest.raises(ValueError):
        Backoff().delay(0)
    with pytest.raises(ValueError):
        Backoff(factor=0.5)


# --- parse_retry_after ---------------------------------------------------------------

NOW = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        (b"   ", None),
        ("120", 120.0),
        (b"120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),  # IMF-fixdate
        (b"Wed, 21 Oct 2015 07:29:00 GMT", 60.0),
        ("Wednesday, 21-Oct-15 07:28:10 GMT", 10.0),  # RFC 850
        ("Wed Oct 21 07:28:05 2015", 5.0),  # asctime
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # past: never negative
        ("soon", None),
        ("-5", None),
        ("12abc", None),
        ("nan", None),
        ("inf", None),
        (b"\xff\xfe", None),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_default_now():
    r = parse_retry_after(formatdate(time.time() + 100, usegmt=True))
    assert r is not None and 90 <= r <= 100


@given(st.text(max_size=40) | st.binary(max_size=40))
def test_parse_retry_after_never_raises(value):
    r = parse_retry_after(value, now=NOW)
    assert r is None or r >= 0


# --- Limiter -------------------------------------------------------------------------


async def test_unlimited_fast_path(mock_clock):
    lim = Limiter()
    start = trio.current_time()
    for _ in range(1000):
        assert await lim.acquire("com.example") == 0.0
    assert trio.current_time() == start
    assert lim.waiting == 0


async def test_global_rate(mock_clock):
    lim = Limiter(rate=100)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(300):
            nursery.start_soon(lim.acquire, f"t{i % 3}")
    # burst 100 at once, then 200 more at 100/s
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_per_topic_rate_independent(mock_clock):
    lim = Limiter(per_topic={"slow": 1, "fast": 1000})
    done: dict[str, float] = {}

    async def send(topic: str, n: int) -> None:
        for _ in range(n):
            await lim.acquire(topic)
        done[topic] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, "slow", 5)
        nursery.start_soon(send, "fast", 2000)
        nursery.start_soon(send, "other", 100_000)  # unlisted topic: unlimited
    assert done["slow"] - start == pytest.approx(4.0)
    assert done["fast"] - start == pytest.approx(1.0)
    assert done["other"] == start


async def test_waiting_metric(mock_clock):
    lim = Limiter(rate=1)
    await lim.acquire("t")
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lim.acquire, "t")
        await trio.sleep(0.1)
        assert lim.waiting == 5
        await trio.sleep(2)
        assert lim.waiting == 3
    assert lim.waiting == 0


async def test_pause_blocks_and_extends(mock_clock):
    lim = Limiter()
    start = trio.current_time()
    lim.pause(10)
    lim.pause(3)  # never shortens
    assert lim.pause_remaining() == pytest.approx(10)
    assert await lim.acquire("t") == pytest.approx(10)
    assert trio.current_time() - start == pytest.approx(10)
    assert await lim.acquire("t") == 0.0  # pause over: back on the fast path
    assert lim.pause_remaining() == 0


async def test_pause_extended_while_waiting(mock_clock):
    lim = Limiter()
    lim.pause(5)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lim.acquire, "t")
        await trio.sleep(4)
        lim.pause(10)  # now+10 = t=14
    assert trio.current_time() - start == pytest.approx(14)


async def test_pause_applies_after_bucket_wait(mock_clock):
    lim = Limiter(rate=1)
    await lim.acquire("t")
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lim.acquire, "t")  # due at +1 s
        await trio.sleep(0.5)
        lim.pause(5)  # a 5xx arrives while it queues
    assert trio.current_time() - start == pytest.approx(5.5)


def test_pause_validation():
    lim = Limiter(clock=FakeClock())
    lim.pause(0)
    lim.pause(-3)
    assert lim.pause_remaining() == 0
    with pytest.raises(ValueError):
        lim.pause(float("inf"))
    with pytest.raises(ValueError):
        lim.pause(float("nan"))


def test_token_backoff():
    clock = FakeClock()
    lim = Limiter(clock=clock)
    assert lim.token_ready_in("aa") == 0.0
    lim.token_backoff("aa", 30)
    lim.token_backoff("aa", 10)  # never shortens
    assert lim.token_ready_in("aa") == 30
    assert lim.token_ready_in("bb") == 0.0
    clock.now += 20
    assert lim.token_ready_in("aa") == 10
    lim.token_backoff("aa", 60)  # extends
    clock.now += 15
    assert lim.token_ready_in("aa") == 45
    assert lim.tracked_tokens == 1
    clock.now += 45
    assert lim.token_ready_in("aa") == 0.0
    assert lim.tracked_tokens == 0


def test_token_backoff_memory_bounded():
    clock = FakeClock()
    lim = Limiter(clock=clock)
    for i in range(100_000):
        lim.token_backoff(f"{i:064x}", 60)
        clock.now += 0.001  # 100 s in total: tokens keep expiring behind us
    # only tokens from the last 60 s remain
    assert 59_000 <= lim.tracked_tokens <= 60_001
    assert len(lim._heap) <= 60_001
    clock.now += 61
    lim.token_backoff("new", 1)
    assert lim.tracked_tokens == 1
    assert len(lim._token_until) == 1 and len(lim._heap) == 1
    clock.now += 2
    assert lim.tracked_tokens == 0 and lim._heap == []


def test_token_backoff_repeated_same_token_bounded():
    clock = FakeClock()
    lim = Limiter(clock=clock)
    for _ in range(10_000):
        lim.token_backoff("hot", 1)
        clock.now += 0.5
    assert lim.tracked_tokens == 1
    assert len(lim._heap) <= 3


def test_try_acquire_takes_only_what_is_there():
    """The paced sender's synchronous path: both buckets or neither, nothing while paused,
    queued behind a waiter or with a token backing off; give_back returns the tokens."""
    clock = FakeClock()
    lim = Limiter(rate=2, per_topic={"a.b": 1}, clock=clock)
    assert lim.try_acquire(b"a.b")           # topic 1 of 1, global 1 of 2
    assert not lim.try_acquire(b"a.b")       # the topic bucket is empty: nothing taken
    assert lim.try_acquire(b"c.d")           # the global bucket's second token
    assert not lim.try_acquire(b"c.d")
    lim.give_back(b"c.d")
    assert lim.try_acquire(b"c.d")
    clock.now += 1.0                         # both refill
    lim.pause(5)
    assert not lim.try_acquire(b"c.d")
    clock.now += 5.0
    assert lim.try_acquire(b"c.d")
    lim.token_backoff("aa", 1)
    assert not lim.try_acquire(b"c.d")
    clock.now += 1.0
    lim.token_ready_in("aa")                 # pruned once due
    lim.waiting = 1                          # someone queued in acquire() goes first
    assert not lim.try_acquire(b"c.d")
    lim.waiting = 0
    assert lim.try_acquire(b"c.d")
    unlimited = Limiter(clock=clock)
    assert unlimited.try_acquire(None) and unlimited.try_acquire(b"x")
    unlimited.token_backoff("aa", 1)
    assert not unlimited.try_acquire(b"x")
