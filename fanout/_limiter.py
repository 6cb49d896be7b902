"""Pacing: token buckets, Retry-After parsing, and the push limiter.

Time comes from ``trio.current_time()`` unless a ``clock`` callable is injected (tests).

APNs policy this encodes (docs/apns.md, "Responses" and "Backoff"): 5xx means back off
globally; 429 ``TooManyRequests`` is about one device token, so only that token waits;
Apple documents no ``Retry-After`` but honouring one when present costs nothing.
"""

from __future__ import annotations

import heapq
import math
import re
import time
from collections.abc import Callable

import trio

TICK = 0.001  # seconds: a paced sender wakes at most this often (each wake costs a write)

__all__ = ["Limiter", "TokenBucket", "parse_retry_after"]

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked (starts full).

    :meth:`take` works by reservation: a caller takes its tokens at once, driving the balance
    negative if need be, and sleeps exactly until the debt it joined is repaid. Waiters are
    therefore served in arrival order (no starvation) and each wakes once at its own slot
    (no thundering herd, no overshoot). A cancelled waiter gives its tokens back.
    """

    __slots__ = ("rate", "burst", "_clock", "_tokens", "_last")

    def __init__(self, rate: float, burst: float | None = None, *, clock: Clock | None = None):
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive finite number, got {rate!r}")
        if burst is None:
            burst = max(1.0, rate)
        if not (burst > 0 and math.isfinite(burst)):
            raise ValueError(f"burst must be a positive finite number, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock: Clock = clock or trio.current_time
        self._tokens = self.burst
        self._last: float | None = None  # first refill happens on first use (clock may need trio)

    def _refill(self) -> float:
        now = self._clock()
        if self._last is None:
            self._last = now
        elif now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        return self._tokens

    def _check(self, n: float) -> None:
        if not 0 <= n <= self.burst:
            raise ValueError(f"n must be within [0, burst={self.burst:g}], got {n!r}")

    @property
    def tokens(self) -> float:
        """Current balance; negative while waiters hold reservations."""
        return self._refill()

    def try_take(self, n: float = 1) -> float:
        """Take ``n`` and return 0.0 if available now; else take nothing and return the wait.

        The wait accounts for reservations already queued by :meth:`take`.
        """
        self._check(n)
        tokens = self._refill()
        if tokens >= n:
            self._tokens = tokens - n
            return 0.0
        return (n - tokens) / self.rate

    def put_back(self, n: float = 1) -> None:
        """Return ``n`` tokens taken by :meth:`try_take` or :meth:`take` (never above
        ``burst``)."""
        self._tokens = min(self.burst, self._tokens + n)

    async def take(self, n: float = 1) -> float:
        """Take ``n`` tokens, sleeping until they are ours; returns the seconds waited.

        Not a checkpoint when the tokens are available at once (hot path).
        """
        self._check(n)
        tokens = self._refill() - n
        self._tokens = tokens
        if tokens >= 0:
            return 0.0
        wait = -tokens / self.rate
        now = self._clock()  # wake on the TICK grid: the pushes due within one tick then
        wait = math.ceil((now + wait) / TICK) * TICK - now  # go in one step and one write
        try:
            await trio.sleep(wait)
        except BaseException:
            # Give the reservation back. Later waiters keep their (now conservative) slots.
            self._refill()
            self.put_back(n)
            raise
        return wait


_DELTA_RE = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(value: bytes | str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or HTTP-date); None if absent/garbage.

    ``now`` is wall-clock epoch seconds for the HTTP-date form (default ``time.time()``).
    A date in the past gives 0.0; the result is never negative.
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    value = value.strip()
    if not value:
        return None
    if _DELTA_RE.fullmatch(value):
        return float(value)
    from datetime import UTC  # an HTTP-date is rare: its parser (email) loads only for one
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # older Pythons returned None on garbage
        return None
    if when.tzinfo is None:  # "-0000" / asctime: HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    if now is None:
        now = time.time()
    return max(0.0, when.timestamp() - now)


class Limiter:
    """Global and per-topic push rate, global pause after 5xx, per-token backoff after 429.

    ``rate`` (pushes/s, None = unlimited) applies to every push; ``per_topic`` maps an
    ``apns-topic`` to its own rate. With neither configured and no pause, :meth:`acquire`
    returns at once without a checkpoint.

    Per-token deadlines live in a dict plus a min-heap of ``(deadline, token)``; expired
    entries are dropped lazily, so memory is bounded by the tokens still backing off.
    """

    def __init__(
        self,
        rate: float | None = None,
        per_topic: dict[str, float] | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or trio.current_time
        self._global = TokenBucket(rate, clock=self._clock) if rate is not None else None
        self._topics = {t: TokenBucket(r, clock=self._clock) for t, r in (per_topic or {}).items()}
        self._limited = self._global is not None or bool(self._topics)
        self._idle = not self._limited  # fast path flag: no buckets and no pause pending
        self._paused_until = -math.inf
        self._token_until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self.waiting: int = 0

    @property
    def idle(self) -> bool:
        """No bucket and no pause: :meth:`acquire` would return at once."""
        return self._idle

    def fast_path_ok(self) -> bool:
        """Nothing would hold a push back: no bucket, no pause, no token backing off.

        The client's per-push check before it starts a stream without awaiting."""
        return self._idle and not self._token_until

    def try_acquire(self, topic: bytes | None) -> bool:
        """Take a push's tokens now if nothing would make it wait (no pause, no waiter
        queued before it, no token backing off, tokens in its buckets); else take nothing.

        The paced sender's synchronous path: a push that need not wait starts without
        a coroutine of its own. :meth:`give_back` returns what it took."""
        if self._idle:
            return not self._token_until
        if self.waiting or self._token_until or self._paused_until > self._clock():
            return False
        bucket = self._topics.get(topic.decode()) if self._topics and topic else None
        if bucket is not None and bucket.try_take():
            return False
        if self._global is not None and self._global.try_take():
            if bucket is not None:
                bucket.put_back()
            return False
        return True

    def give_back(self, topic: bytes | None) -> None:
        """Return the tokens :meth:`try_acquire` took (the push could not start)."""
        if self._idle:
            return
        bucket = self._topics.get(topic.decode()) if self._topics and topic else None
        for b in (bucket, self._global):
            if b is not None:
                b.put_back()

    async def acquire(self, topic: str) -> float:
        """Wait for the global pause, then the topic bucket, then the global bucket.

        Returns the seconds waited. The topic bucket is taken before the global one so a
        slow topic does not hold global capacity while it waits.
        """
        if self._idle:
            return 0.0
        waited = 0.0
        self.waiting += 1
        try:
            waited += await self._wait_pause()
            bucket = self._topics.get(topic)
            if bucket is not None:
                waited += await bucket.take()
            if self._global is not None:
                waited += await self._global.take()
            if waited:  # a 5xx may have paused everyone while we queued
                waited += await self._wait_pause()
        finally:
            self.waiting -= 1
        return waited

    async def _wait_pause(self) -> float:
        waited = 0.0
        while True:
            delay = self._paused_until - self._clock()
            if delay <= 0:
                if not self._limited:
                    self._idle = True
                return waited
            await trio.sleep(delay)
            waited += delay

    def pause(self, seconds: float) -> None:
        """Global backoff: nobody acquires before now+seconds (extends, never shortens)."""
        if not math.isfinite(seconds):
            raise ValueError(f"pause needs a finite number of seconds, got {seconds!r}")
        if seconds <= 0:
            return
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._idle = False

    def pause_remaining(self) -> float:
        """Seconds left in the global pause (0 if none)."""
        return max(0.0, self._paused_until - self._clock())

    def token_backoff(self, token: str, seconds: float) -> None:
        """Per-token backoff: ``token`` is not sent before now+seconds (extends, never shortens)."""
        if not math.isfinite(seconds):
            raise ValueError(f"backoff needs a finite number of seconds, got {seconds!r}")
        now = self._clock()
        self._prune(now)
        if seconds <= 0:
            return
        until = now + seconds
        if until > self._token_until.get(token, -math.inf):
            self._token_until[token] = until
            heapq.heappush(self._heap, (until, token))

    def token_ready_in(self, token: str) -> float:
        """Seconds until ``token`` may be sent again (0 if free)."""
        until = self._token_until.get(token)
        if until is None:
            return 0.0
        now = self._clock()
        self._prune(now)
        return max(0.0, until - now)

    @property
    def tracked_tokens(self) -> int:
        """Device tokens currently backing off (after dropping expired ones)."""
        self._prune(self._clock())
        return len(self._token_until)

    def _prune(self, now: float) -> None:
        # Each heap entry is pushed once and popped once: amortised O(log n) per backoff.
        heap = self._heap
        while heap and heap[0][0] <= now:
            until, token = heapq.heappop(heap)
            if self._token_until.get(token) == until:  # else superseded by a later deadline
                del self._token_until[token]
