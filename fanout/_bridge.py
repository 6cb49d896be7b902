"""The engine thread behind :mod:`fanout.asyncio` and :mod:`fanout.sync`.

One trio run per process, in a daemon thread, hosts the trio :class:`~fanout.client.Client`
of every asyncio or sync door. Why a thread and not trio's guest mode on the asyncio loop:
guest mode runs the engine's CPU work (framing, TLS, answers) on the asyncio thread itself,
so a fan-out's bursts stall every other coroutine; in a thread the engine shares only the
GIL (docs/doors.md has the measurements, bench/doors.py makes them).

Crossing is batched both ways, so a fan-out of 100,000 pushes costs a few thousand wake-ups,
not 200,000:

* calls into the engine go through one :class:`Mailbox` (a deque, one ``run_sync_soon``
  per batch);
* results come back through the caller's mailbox (one ``call_soon_threadsafe`` per batch
  on an asyncio loop) or straight into a ``concurrent.futures.Future``;
* a stream (``send_many``, ``fan_out``) is a :class:`Stream`: two bounded deques under one
  lock, each side woken only when it is actually waiting.

After ``fork()`` the child sees a dead engine (its thread was not copied): the next door
used there starts a new one, and never touches the sockets the parent's engine owns.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar

import outcome
import trio

from ._engine.backoff import Backoff
from .auth import Auth, TokenAuth
from .client import Client
from .errors import ClosedError
from .events import Events
from .outcome import Result
from .payload import Environment, Notification, Payload, Prepared, PushType

if TYPE_CHECKING:
    import uuid

__all__ = ["BroadcastOptions", "ClientOptions", "FanOutOptions", "Engine", "Hosted", "Mailbox", "Stream", "engine", "settings_key"]

log: logging.Logger = logging.getLogger("fanout")
T = TypeVar("T")

Done = Callable[[outcome.Outcome[Any]], object]


class Mailbox:
    """Calls posted from any thread, run in order by one ``schedule`` per batch.

    ``schedule`` is ``TrioToken.run_sync_soon`` for the engine, or an asyncio loop's
    ``call_soon_threadsafe`` for the replies going back to it."""

    __slots__ = ("_schedule", "_lock", "_calls", "_scheduled")

    def __init__(self, schedule: Callable[[Callable[[], None]], object]) -> None:
        self._schedule = schedule
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._scheduled = False

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the mailbox's thread soon. Raises RuntimeError if that
        thread's loop is gone (the caller decides what a lost call means)."""
        with self._lock:
            self._calls.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._schedule(self._drain)
        except BaseException:
            with self._lock:
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            calls = list(self._calls)
            self._calls.clear()
            self._scheduled = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:  # a reply's own bug must not lose the others in the batch
                log.exception("fanout: a cross-thread call failed")


class Stream(Generic[T]):
    """One ``send_many``/``fan_out`` between a caller thread and the engine.

    The caller feeds items (``feed``/``end_items``) and takes results (``take``); the engine
    pulls items (:meth:`source`) and pushes results (:meth:`run`). Each deque holds at most
    about ``cap`` entries: a side that finds it full registers a wake-up and waits, and the
    other side calls that wake-up once when it makes room."""

    def __init__(self, engine: Engine, cap: int) -> None:
        self.lock = threading.Lock()
        self.cap = cap
        self._engine = engine
        self.items: deque[T] = deque()
        self.items_done = False
        self.items_error: BaseException | None = None
        self.results: deque[Result] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.scope = trio.CancelScope()
        # set by a caller about to wait; called, once, by the engine
        self.wake_reader: Callable[[], object] | None = None
        self.wake_feeder: Callable[[], object] | None = None
        # set by the engine about to wait; set, via the engine's mailbox, by the caller
        self._need_items: trio.Event | None = None
        self._need_room: trio.Event | None = None

    # ------------------------------------------------------------ the caller's side

    def room(self) -> bool:
        """Fewer than ``cap`` items wait for the engine."""
        return len(self.items) < self.cap

    def feed(self, chunk: Iterable[T]) -> None:
        """Hand items to the engine."""
        with self.lock:
            self.items.extend(chunk)
            event, self._need_items = self._need_items, None
        if event is not None:
            self._engine.post(event.set)

    def end_items(self, error: BaseException | None = None) -> None:
        """No more items; ``error``: the caller's iterable raised it (it comes out of the
        stream after the results of what was sent, as in the trio API)."""
        with self.lock:
            self.items_done = True
            self.items_error = error
            event, self._need_items = self._need_items, None
        if event is not None:
            self._engine.post(event.set)

    def take(self) -> tuple[list[Result], bool]:
        """The results so far (possibly none), and whether the stream has ended (then
        :attr:`error` is what ended it, if anything did)."""
        with self.lock:
            out = list(self.results)
            self.results.clear()
            ended = self.ended
            event, self._need_room = self._need_room, None
        if event is not None:
            self._engine.post(event.set)
        return out, ended

    def wait_read(self, wake: Callable[[], object]) -> bool:
        """Register ``wake`` for the next result or the end; False: one is already here."""
        with self.lock:
            if self.results or self.ended:
                return False
            self.wake_reader = wake
            return True

    def wait_feed(self, wake: Callable[[], object]) -> bool:
        """Register ``wake`` for when there is room to feed; False: there is room now."""
        with self.lock:
            if len(self.items) < self.cap or self.ended:
                return False
            self.wake_feeder = wake
            return True

    def cancel(self) -> None:
        """The caller went away: end the stream in the engine (its pushes in flight are
        reset, never resent)."""
        try:
            self._engine.post(self.scope.cancel)
        except RuntimeError:  # the engine is gone already
            pass

    # ------------------------------------------------------------ the engine's side

    async def source(self) -> AsyncIterator[T]:
        """The items, as the trio client pulls them."""
        while True:
            with self.lock:
                batch = list(self.items)
                self.items.clear()
                wake, self.wake_feeder = self.wake_feeder, None
                done, error = self.items_done, self.items_error
                event = None
                if not batch and not done:
                    event = self._need_items = trio.Event()
            if wake is not None:
                wake()
            if batch:
                for item in batch:
                    yield item
            elif done:
                if error is not None:
                    raise error
                return
            else:
                assert event is not None
                await event.wait()

    def settle(self, result: outcome.Outcome[Any]) -> None:
        """Engine thread: the done callback of :meth:`run`'s call. :meth:`run` ends the
        stream itself; this ends one that never ran (its client was closing)."""
        if isinstance(result, outcome.Error):
            self._end(result.error)

    def _end(self, error: BaseException | None) -> None:
        with self.lock:
            if self.ended:
                return
            self.ended = True
            if error is not None and self.error is None:
                self.error = error
            wakes = (self.wake_reader, self.wake_feeder)
            self.wake_reader = self.wake_feeder = None
        for wake in wakes:
            if wake is not None:
                wake()

    async def run(self, results: AsyncIterator[Result]) -> None:
        """Move every result of ``results`` (the trio client's stream) to the caller."""
        lock, out = self.lock, self.results
        try:
            with self.scope:
                async for result in results:
                    with lock:
                        out.append(result)
                        wake, self.wake_reader = self.wake_reader, None
                        event = None
                        if len(out) >= self.cap:
                            event = self._need_room = trio.Event()
                    if wake is not None:
                        wake()
                    if event is not None:
                        await event.wait()
        except Exception as exc:
            self._end(exc)
        finally:
            self._end(None)


def _report(done: Done, result: outcome.Outcome[Any]) -> None:
    """Hand ``result`` to its caller's callback; a callback that fails (its loop closed,
    say) loses only its own reply, never the engine."""
    try:
        done(result)
    except Exception:
        log.warning("fanout: a reply could not be delivered (its caller's loop is gone?)",
                    exc_info=True)


class Hosted:
    """A trio client running in the engine, and what its door has out on it."""

    def __init__(self, engine: Engine, client: Client, close_timeout: float) -> None:
        self.engine = engine
        self.client = client
        self.close_timeout = close_timeout
        self.pending = 0              # door calls not finished (engine thread only)
        self._idle: trio.Event | None = None
        self._close = trio.Event()
        self._closed_lock = threading.Lock()
        self._closed_callbacks: list[Callable[[], object]] | None = []

    def on_closed(self, callback: Callable[[], object]) -> None:
        """Any thread: ``callback()`` once the client has closed (at once if it has); it
        runs on the engine thread."""
        with self._closed_lock:
            callbacks = self._closed_callbacks
            if callbacks is not None:
                callbacks.append(callback)
                return
        callback()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The client's lifetime in the engine: open, serve until closed, drain, close."""
        try:
            async with self.client:
                task_status.started()
                await self._close.wait()
                if self.pending:
                    with trio.move_on_after(self.close_timeout):
                        while self.pending:
                            self._idle = trio.Event()
                            await self._idle.wait()
                    if self.pending:
                        log.warning("fanout: closing with %d calls unfinished after %.1f s; "
                                    "they end with ClosedError (a push among them may or may "
                                    "not have been delivered)", self.pending, self.close_timeout)
        finally:
            with self._closed_lock:
                callbacks, self._closed_callbacks = self._closed_callbacks or [], None
            if self.engine.release():
                # the last client: tell its door once the engine's trio run is over
                self.engine.after_stop.extend(callbacks)
            else:
                for callback in callbacks:
                    callback()

    def send_many(self, window: int | None
                  ) -> tuple[Stream[Notification | Prepared], AsyncIterator[Result]]:
        """A stream for the door's ``send_many`` and the trio client's side of it. Only
        builds the trio generator (no trio call happens until the engine iterates it), so
        a bad ``window`` raises in the caller's thread, at once, as in the trio API."""
        stream: Stream[Notification | Prepared] = Stream(
            self.engine, window or self.client.max_in_flight)
        return stream, self.client.send_many(stream.source(), window=window)

    def fan_out(self, payload: Payload | dict[str, Any] | bytes, window: int | None,
                options: FanOutOptions) -> tuple[Stream[str], AsyncIterator[Result]]:
        """As :meth:`send_many`, for ``fan_out`` (a bad payload raises ValidationError here)."""
        stream: Stream[str] = Stream(self.engine, window or self.client.max_in_flight)
        return stream, self.client.fan_out(payload, stream.source(), window=window, **options)

    @property
    def open(self) -> bool:
        """Up (or opening), and not asked to close."""
        return not self._close.is_set() and self._closed_callbacks is not None

    def close(self) -> None:
        """Engine thread: start closing (drain up to ``close_timeout``)."""
        self._close.set()

    def call(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], done: Done,
             scope: trio.CancelScope | None = None) -> None:
        """Engine thread: run ``fn(*args)`` in the client's nursery; ``done(outcome)``
        gets its value or exception (:class:`ClosedError` if the client closes first)."""
        if self._close.is_set():
            _report(done, outcome.Error(ClosedError("the client is closed")))
            return
        self.pending += 1
        self.client.start_soon(self._run_call, fn, args, done, scope or trio.CancelScope())

    async def _run_call(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                        done: Done, scope: trio.CancelScope) -> None:
        result: outcome.Outcome[Any] | None = None
        try:
            with scope:
                try:
                    result = outcome.Value(await fn(*args))
                except Exception as exc:
                    result = outcome.Error(exc)
        finally:
            if result is None:  # cancelled: by its caller (who waits no more) or by close
                result = outcome.Error(ClosedError(
                    "cancelled" if scope.cancelled_caught else
                    "the client closed before the call ended"))
            _report(done, result)
            self.pending -= 1
            if not self.pending and self._idle is not None:
                self._idle.set()


class Engine:
    """The process's engine thread: one trio run hosting every door's client."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._started = threading.Event()
        self._failed: BaseException | None = None
        self.hosted = 0  # clients opened and not released (module lock)
        self.stopped = False
        self.mailbox: Mailbox | None = None
        self.after_stop: list[Callable[[], object]] = []  # run as the thread ends
        self._thread = threading.Thread(target=self._main, name="fanout-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failed is not None:
            raise self._failed

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits
            self._failed = exc
            log.exception("fanout: the engine thread ended")
        finally:
            self.stopped = True
            self._started.set()
            for callback in self.after_stop:
                callback()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.mailbox = Mailbox(self._token.run_sync_soon)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started.set()
            await trio.sleep_forever()

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the engine thread soon (RuntimeError: the engine stopped)."""
        mailbox = self.mailbox
        if mailbox is None or self.stopped:
            raise RuntimeError("the fanout engine has stopped")
        mailbox.post(fn, *args)

    def host(self, client: Client, close_timeout: float, done: Done) -> Hosted:
        """Open ``client`` in the engine; ``done(outcome)`` once it is up (or failed)."""
        hosted = Hosted(self, client, close_timeout)
        self.post(self._open, hosted, done)
        return hosted

    def _open(self, hosted: Hosted, done: Done) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._opened, hosted, done)

    async def _opened(self, hosted: Hosted, done: Done) -> None:
        try:
            await self._nursery.start(hosted.serve)  # type: ignore[union-attr]
        except BaseException as exc:
            _report(done, outcome.Error(exc if isinstance(exc, Exception) else ClosedError(
                "the fanout engine stopped while the client opened")))
            if not isinstance(exc, Exception):
                raise
            return
        _report(done, outcome.Value(None))

    def release(self) -> bool:
        """Engine thread: a hosted client closed; the last one stops the engine (True)."""
        with _lock:
            self.hosted -= 1
            if self.hosted > 0:
                return False
            global _engine
            if _engine is self:
                _engine = None
            self.stopped = True
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return True

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after the last client closed)."""
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


_lock = threading.Lock()
_engine: Engine | None = None


def settings_key(options: dict[str, Any], *extra: object) -> tuple[Any, ...]:
    """What makes two clients' settings the same (then the sync door shares one engine
    client between them). A ``TokenAuth`` counts by its shared token, so one built per
    request matches; other objects count by identity (keep ``options`` alive with it)."""
    return (*sorted((name, _freeze(value)) for name, value in options.items()), *extra)


def _freeze(value: object) -> object:
    if isinstance(value, TokenAuth):
        return ("TokenAuth", value.signer_id)
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if value is None or isinstance(value, str | bytes | int | float):
        return value
    return ("object", id(value))


def engine() -> Engine:
    """The running engine of this process, started if need be, counted as one more
    hosted client (pair with :meth:`Engine.host`, whose client's end releases it)."""
    global _engine
    with _lock:
        current = _engine
        if current is None or current.stopped or current.pid != os.getpid():
            current = _engine = Engine()
        current.hosted += 1
        return current


def _after_fork_in_child() -> None:
    global _lock, _engine
    _lock = threading.Lock()
    _engine = None  # its thread was not copied; the parent's sockets stay the parent's


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class FanOutOptions(TypedDict, total=False):
    """:meth:`fanout.Client.fan_out`'s options after ``window``, as the doors take them."""

    push_type: PushType | str
    topic: str | None
    priority: int | None
    expiration: int | None
    collapse_id: str | None
    apns_id: str | uuid.UUID | None


class BroadcastOptions(TypedDict, total=False):
    """:meth:`fanout.Client.broadcast`'s keyword options, as the doors take them."""

    bundle_id: str | None
    priority: int
    expiration: int | None
    apns_id: str | None
    id: object


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of :class:`fanout.Client`, taken as they are by both doors
    (``tests/test_doors.py`` checks the two lists match)."""

    auth: Auth | None
    topic: str | None
    environment: Environment
    host: str | None
    port: int
    ca_file: str | None
    ssl_context: ssl.SSLContext | None
    connections: int
    timeout: float
    connect_timeout: float
    unavailable_timeout: float
    on_unavailable: Literal["fail", "wait"]
    ping_interval: float
    ping_timeout: float
    max_attempts: int
    delivery: Literal["at_least_once", "at_most_once"]
    rate: float | None
    topic_rates: dict[str, float] | None
    max_in_flight: int
    backoff: Backoff | None
    on_invalid_token: Callable[[str, str | None, int | None], object] | None
    events: Events | None
    max_streams_cap: int
    first_stream_id: int
    manage_host: str | None
    manage_port: int | None
    insecure: bool
    resend_invalid: bool
    proxy: str | None
    topic_guard: int
