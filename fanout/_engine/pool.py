"""A few long-lived connections to one APNs host, and the wait for a free stream slot.

Each connection slot has a supervisor task: it opens a connection (fresh DNS, exponential
backoff with jitter on failure), publishes it once the server's SETTINGS arrive, and opens
the replacement as soon as the connection is retired (GOAWAY, id exhaustion, error) while
the old one drains in the background. :meth:`Pool.submit` starts a job on the connection
with the most free slots, or parks until a slot frees: capacity follows each server's live
SETTINGS_MAX_CONCURRENT_STREAMS.

Unreachable APNs: once no connection has been usable for ``unavailable_timeout`` seconds
the pool is *unavailable*: every job waiting for a slot fails together, and new ones fail
at once, until a connection comes up (``on_unavailable="fail"``). With ``"wait"`` jobs
wait for as long as it takes (the daemon stops reading its input instead).

Reconnects back off (exponential, jittered) after a failed attempt and after a connection
that answered nothing successfully, however it ended: Apple reads rapid reconnects as abuse.
"""

from __future__ import annotations

import logging
import ssl
from typing import Generic, Literal

import trio

from ..errors import UNREACHABLE, ConfigError, TransportError
from .backoff import Backoff
from .connection import Connection, E, EngineEvents, HeaderAuth, StreamListener
from .proxy import Proxy

log = logging.getLogger("fanout.pool")

MIN_HEALTHY_LIFETIME = 1.0  # a connection that dies sooner counts as a failed attempt


class Pool(Generic[E]):
    """The connections to one host, and the jobs (of type ``E``) waiting for a stream slot.

    Each stream's end goes straight from its connection to ``listener`` (the client); the
    pool observes the connections' lifecycle (:class:`ConnectionObserver`)."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        listener: StreamListener[E],
        *,
        auth: HeaderAuth | None = None,
        size: int = 2,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
        unavailable_timeout: float = 30.0,
        on_unavailable: Literal["fail", "wait"] = "fail",
        ping_interval: float = 60.0,
        ping_timeout: float = 5.0,
        max_streams_cap: int = 4000,
        first_stream_id: int = 1,
        backoff: Backoff | None = None,
        events: EngineEvents | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        if size < 1:
            raise ConfigError("connections must be at least 1")
        self.host = host
        self.port = port
        self.size = size
        self._ctx = ssl_context
        self._listener = listener
        self._auth = auth
        self._events = events
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_streams_cap = max_streams_cap
        self._first_stream_id = first_stream_id
        self._proxy = proxy
        if on_unavailable not in ("fail", "wait"):
            raise ConfigError(f"on_unavailable must be fail or wait, not {on_unavailable!r}")
        self._unavailable_timeout = unavailable_timeout
        self.on_unavailable = on_unavailable
        self.down_since: float | None = None    # no usable connection since (trio clock)
        self._backoff = backoff or Backoff(base=0.1, cap=30.0)
        self.conns: list[Connection[E]] = []       # ready and accepting streams
        self.draining: set[Connection[E]] = set()  # retired, finishing their streams
        self.last_error: BaseException | None = None
        self.fatal_error: ConfigError | None = None
        self.halt_error: ConfigError | None = None  # halt(): start nothing more
        self.opened: int = 0
        self._lot = trio.lowlevel.ParkingLot()
        # jobs unparked and not yet back in submit: the slots they were woken for are
        # theirs, so a completion wakes only as many as are free beyond them (waking one
        # per free slot at every completion woke ~17 per slot under a backlog of send()s)
        self._woken = 0
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise ``size`` connection slots until :meth:`close` (or cancellation)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.down_since = trio.current_time()
            for i in range(self.size):
                nursery.start_soon(self._supervise, i)
            task_status.started()

    def close(self) -> None:
        """Stop the supervisors and their connections."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def unavailable_for(self) -> float:
        """Seconds without a usable connection (0.0 while one is up)."""
        since = self.down_since
        return 0.0 if since is None or self.conns else trio.current_time() - since

    def unavailable_error(self) -> TransportError:
        """The error of jobs that gave up waiting for an unreachable host."""
        return TransportError(
            f"{UNREACHABLE}: no usable connection to {self.host}:{self.port} for "
            f"{self._unavailable_timeout:g} s; last error: {self.last_error or 'none'}")

    def retire_all(self, why: str) -> None:
        """Retire every ready connection (they drain; replacements open at once)."""
        for conn in list(self.conns):
            conn.retire(why)

    @property
    def in_flight(self) -> int:
        """Streams open on every connection, draining ones included."""
        return sum(len(c.streams) for c in self.conns) + sum(len(c.streams) for c in self.draining)

    @property
    def waiting(self) -> int:
        """Jobs parked in :meth:`submit` for a free stream slot."""
        return len(self._lot)

    def halt(self, error: ConfigError | None) -> None:
        """Start nothing more: :meth:`submit` raises ``error`` (a job parked there, once
        it wakes) and :meth:`try_start` declines, until ``halt(None)``."""
        self.halt_error = error

    async def _supervise(self, index: int) -> None:
        nursery = self._nursery
        assert nursery is not None  # started by run()
        failures = 0
        while True:
            conn = Connection(self.host, self.port, self._ctx, self._listener, self,
                              auth=self._auth, index=index, timeout=self._timeout,
                              connect_timeout=self._connect_timeout,
                              ping_interval=self._ping_interval, ping_timeout=self._ping_timeout,
                              max_streams_cap=self._max_streams_cap,
                              first_stream_id=self._first_stream_id, events=self._events,
                              proxy=self._proxy)
            try:
                await nursery.start(conn.run)
            except (TransportError, ConfigError) as exc:
                failures += 1
                self.last_error = exc
                if isinstance(exc, ConfigError):
                    self.fatal_error = exc
                    self._wake_all()
                if self._events:
                    self._events.connection_failed(index, exc)
                delay = self._backoff.delay(failures)
                log.warning("connection %d to %s:%d failed (attempt %d, retry in %.1f s): %s",
                            index, self.host, self.port, failures, delay, exc)
                await trio.sleep(delay)
                continue
            self.opened += 1
            self.fatal_error = None
            if self._events:
                self._events.connection_opened(conn)
            self.conns.append(conn)
            self.down_since = None
            self._wake_all()
            await conn.retired_event.wait()
            # A connection that answered nothing successfully (every request refused as
            # ExpiredProviderToken, a wedge, a server that cuts at once) or that died with an
            # error within a second is a failed attempt: back off before the next one.
            # Apple treats rapid reconnects as a DoS.
            died_young = conn.error is not None and \
                trio.current_time() - conn.opened_at < MIN_HEALTHY_LIFETIME
            if conn.successes and not died_young:
                failures = 0
                continue
            if conn.error is not None:
                self.last_error = conn.error
            failures += 1
            delay = self._backoff.delay(failures)
            log.info("connection %d answered %d pushes before it ended (%s): next one in "
                     "%.1f s", index, conn.successes, conn.retire_reason, delay)
            await trio.sleep(delay)

    def _best(self, avoid: Connection[E] | None) -> Connection[E] | None:
        """The connection with the most free slots; ``avoid`` only if it is the only one up."""
        best = None
        room = 0
        others = False
        for conn in self.conns:  # Connection.capacity inlined: this runs once per push
            if conn is avoid:
                continue
            others = True
            if conn.ready and not conn.retiring and not conn.suspect:
                cap = conn.limit - len(conn.streams)
                if cap > room:
                    best, room = conn, cap
        if best is None and not others and avoid is not None and avoid.capacity > 0:
            best = avoid
        return best

    def try_start(self, job: E) -> bool:
        """Start ``job`` now if a slot is free and nobody is queued before it."""
        if self._lot or self._woken or self.halt_error is not None:
            return False
        best = self._best(job.avoid)
        if best is None:
            return False
        best.start(job)
        return True

    async def submit(self, job: E) -> None:
        """Start ``job`` on the connection with the most free slots, waiting for one.

        ``job.avoid`` (a connection the job timed out on) is used only when no other
        connection is up. Raises ``halt_error``, a fatal ConfigError, or, once the pool is
        unavailable and ``on_unavailable`` is ``"fail"``, :meth:`unavailable_error`."""
        avoid = job.avoid
        # a newcomer queues behind the jobs parked or woken before it (first come, first
        # served), unless slots are free beyond theirs
        behind = bool(self._lot or self._woken) and self._wake_spare() <= 0
        while True:
            if self.halt_error is not None:
                raise self.halt_error
            best = None if behind else self._best(avoid)
            behind = False
            if best is not None:
                try:  # a waiter cancelled while its wake-up was pending starts nothing
                    await trio.lowlevel.checkpoint_if_cancelled()
                except trio.Cancelled:
                    self._wake_spare()  # its slot goes to the next in line
                    raise
                best.start(job)
                return
            if self.fatal_error is not None and not self.conns:
                raise self.fatal_error
            if not self.conns and self.on_unavailable == "fail":
                deadline = (self.down_since or trio.current_time()) + self._unavailable_timeout
                if trio.current_time() >= deadline:
                    raise self.unavailable_error()
                with trio.move_on_at(deadline):
                    await self._lot.park()
                    self._woken -= 1
            else:
                await self._lot.park()
                self._woken -= 1

    # ------------------------------------------------------------ connection observer

    def on_capacity(self, conn: Connection[E]) -> None:
        """Wake as many parked jobs as there are free slots not yet promised to a job
        woken earlier (one that has not run since)."""
        if self._lot:  # anybody waiting for a slot?
            self._wake_spare()

    def _wake_spare(self) -> int:
        """Wake parked jobs for the free slots nobody woken has yet; the slots left."""
        spare = -self._woken
        for c in self.conns:  # Connection.capacity inlined: this runs once per completion
            if c.ready and not c.retiring and not c.suspect:
                spare += c.limit - len(c.streams)
        if spare > 0 and self._lot:
            woken = len(self._lot.unpark(count=spare))
            self._woken += woken
            spare -= woken
        return spare

    def _wake_all(self) -> None:
        self._woken += len(self._lot.unpark_all())

    def on_retired(self, conn: Connection[E], why: str) -> None:
        """Out of the ready set, into draining (its replacement opens meanwhile)."""
        if conn in self.conns:
            self.conns.remove(conn)
            if not self.conns:
                self.down_since = trio.current_time()
                # waiters parked while a connection was up have no unavailable deadline yet
                self._wake_all()
            if not conn.closed:
                self.draining.add(conn)
        else:
            self.draining.discard(conn)
        if self._events:
            self._events.connection_retired(conn, why)
        log.info("connection %d retired: %s", conn.index, why)

    def on_closed(self, conn: Connection[E]) -> None:
        """Gone; a death (not a goodbye) makes its siblings prove they are alive."""
        self.draining.discard(conn)
        if conn.error is not None and conn.opened_at:
            # it died (silence, wedge, reset): its siblings prove they are alive before
            # they take the pushes it leaves behind
            for other in self.conns:
                other.probe()
        if self._events:
            self._events.connection_closed(conn)
