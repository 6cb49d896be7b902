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
from typing import Any

import trio

from ..errors import UNREACHABLE, ConfigError, TransportError
from .backoff import Backoff
from .connection import Connection

log = logging.getLogger("fanout.pool")

MIN_HEALTHY_LIFETIME = 1.0  # a connection that dies sooner counts as a failed attempt


class Pool:
    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        handler: Any,
        *,
        auth: Any = None,
        size: int = 2,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
        unavailable_timeout: float = 30.0,
        on_unavailable: str = "fail",
        ping_interval: float = 60.0,
        ping_timeout: float = 5.0,
        max_streams_cap: int = 4000,
        first_stream_id: int = 1,
        backoff: Backoff | None = None,
        events: Any = None,
        proxy: Any = None,
    ) -> None:
        if size < 1:
            raise ConfigError("connections must be at least 1")
        self.host = host
        self.port = port
        self.size = size
        self._ctx = ssl_context
        self._handler = handler
        self._auth = auth
        self._events = events
        self._conn_kw = dict(auth=auth, timeout=timeout, connect_timeout=connect_timeout,
                             ping_interval=ping_interval, ping_timeout=ping_timeout,
                             max_streams_cap=max_streams_cap,
                             first_stream_id=first_stream_id, events=events, proxy=proxy)
        if on_unavailable not in ("fail", "wait"):
            raise ConfigError(f"on_unavailable must be fail or wait, not {on_unavailable!r}")
        self._unavailable_timeout = unavailable_timeout
        self.on_unavailable = on_unavailable
        self.down_since: float | None = None    # no usable connection since (trio clock)
        self._backoff = backoff or Backoff(base=0.1, cap=30.0)
        self.conns: list[Connection] = []       # ready and accepting streams
        self.draining: set[Connection] = set()  # retired, finishing their streams
        self.last_error: BaseException | None = None
        self.fatal_error: ConfigError | None = None
        self.halt_error: ConfigError | None = None  # set by the client: send nothing more
        self.opened = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.down_since = trio.current_time()
            for i in range(self.size):
                nursery.start_soon(self._supervise, i)
            task_status.started()

    def close(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def unavailable_for(self) -> float:
        """Seconds without a usable connection (0.0 while one is up)."""
        since = self.down_since
        return 0.0 if since is None or self.conns else trio.current_time() - since

    def unavailable_error(self) -> TransportError:
        return TransportError(
            f"{UNREACHABLE}: no usable connection to {self.host}:{self.port} for "
            f"{self._unavailable_timeout:g} s; last error: {self.last_error or 'none'}")

    def retire_all(self, why: str) -> None:
        """Retire every ready connection (they drain; replacements open at once)."""
        for conn in list(self.conns):
            conn.retire(why)

    @property
    def in_flight(self) -> int:
        return sum(len(c.streams) for c in self.conns) + sum(len(c.streams) for c in self.draining)

    async def _supervise(self, index: int) -> None:
        failures = 0
        while True:
            conn = Connection(self.host, self.port, self._ctx, self, index=index, **self._conn_kw)
            try:
                await self._nursery.start(conn.run)
            except (TransportError, ConfigError) as exc:
                failures += 1
                self.last_error = exc
                if isinstance(exc, ConfigError):
                    self.fatal_error = exc
                    self._lot.unpark_all()
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
            self._lot.unpark_all()
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

    def try_start(self, job: Any) -> bool:
        """Start ``job`` now if a slot is free and nobody is queued before it."""
        if self._lot or self.halt_error is not None:
            return False
        best = None
        room = 0
        for conn in self.conns:
            cap = conn.capacity
            if cap > room:
                best, room = conn, cap
        if best is None:
            return False
        best.start(job)
        return True

    async def submit(self, job: Any) -> None:
        """Start ``job`` on the connection with the most free slots, waiting for one.

        ``job.avoid`` (a connection the job timed out on) is used only when no other
        connection is up. Raises ``halt_error``, a fatal ConfigError, or, once the pool is
        unavailable and ``on_unavailable`` is ``"fail"``, :meth:`unavailable_error`."""
        avoid = job.avoid
        while True:
            if self.halt_error is not None:
                raise self.halt_error
            best = None
            room = 0
            others = False
            for conn in self.conns:
                if conn is avoid:
                    continue
                others = True
                cap = conn.capacity
                if cap > room:
                    best, room = conn, cap
            if best is None and not others and avoid is not None and avoid.capacity > 0:
                best = avoid
            if best is not None:
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
            else:
                await self._lot.park()

    # ------------------------------------------------------------ connection listener

    def on_capacity(self, conn: Connection) -> None:
        if self._lot:  # anybody waiting for a slot?
            n = conn.capacity
            if n > 0:
                self._lot.unpark(count=n)

    def on_retired(self, conn: Connection, why: str) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
            if not self.conns:
                self.down_since = trio.current_time()
                # waiters parked while a connection was up have no unavailable deadline yet
                self._lot.unpark_all()
            if not conn.closed:
                self.draining.add(conn)
        else:
            self.draining.discard(conn)
        if self._events:
            self._events.connection_retired(conn, why)
        log.info("connection %d retired: %s", conn.index, why)

    def on_closed(self, conn: Connection) -> None:
        self.draining.discard(conn)
        if conn.error is not None and conn.opened_at:
            # it died (silence, wedge, reset): its siblings prove they are alive before
            # they take the pushes it leaves behind
            for other in self.conns:
                other.probe()
        if self._events:
            self._events.connection_closed(conn)

    def on_response(self, conn: Connection, job: Any, status: int, headers: list, body: bytes) -> None:
        self._handler.on_response(conn, job, status, headers, body)

    def on_unprocessed(self, conn: Connection, job: Any, why: str) -> None:
        self._handler.on_unprocessed(conn, job, why)

    def on_lost(self, conn: Connection, job: Any, why: str) -> None:
        self._handler.on_lost(conn, job, why)

    def on_timeout(self, conn: Connection, job: Any) -> None:
        self._handler.on_timeout(conn, job)
