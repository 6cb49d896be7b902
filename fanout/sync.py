"""fanout from plain threads (Django, Flask, Celery, cron scripts): the sync door.

``fanout.sync.Client(...)`` takes the keyword arguments of :class:`fanout.Client`. Any
thread may call it: :meth:`Client.send` blocks until the result, :meth:`Client.send_many`
and :meth:`Client.fan_out` yield results, :meth:`Client.submit` returns a
``concurrent.futures.Future``::

    push = fanout.sync.Client(auth=auth, topic="com.example.app")   # e.g. at import

    def view(request):
        result = push.send(Notification(token=token, payload=payload), timeout=10)

One trio engine per process serves every thread, and clients built with the same settings
share one set of connections (and, like every ``TokenAuth`` of a key, one JWT), so a
client made per request costs no handshake and mints no token: the connections stay up
``keep_alive`` seconds after the last such client closes.

Forks are normal here (Celery prefork, gunicorn, uWSGI): nothing starts until first use,
and a client used in a child after ``fork()`` starts the child's own engine, never touching
the parent's sockets. At interpreter exit pushes still out get ``close_timeout`` seconds
to end; what is left is logged and ends with :class:`~fanout.errors.ClosedError`.

Callbacks (``on_invalid_token``, ``events``, and a Future's done-callbacks) run on the
engine thread: keep them short.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Unpack

import outcome
import trio

from ._bridge import (
    BroadcastOptions,
    ClientOptions,
    FanOutOptions,
    Hosted,
    Stream,
    engine,
    settings_key,
)
from .client import Client as TrioClient
from .errors import ClosedError
from .liveactivity import LiveActivities as TrioLiveActivities
from .outcome import Result
from .payload import Notification, Payload, Prepared

if TYPE_CHECKING:

    from .channels import Channel

__all__ = ["Channels", "Client", "ClientOptions", "LiveActivities", "shutdown"]

log: logging.Logger = logging.getLogger("fanout")
T = TypeVar("T")
_CHUNK = 256  # items of the caller's iterable handed over at once


class _Shared:
    """One hosted trio client and the sync clients holding it (module lock)."""

    def __init__(self, key: tuple[Any, ...], options: ClientOptions, close_timeout: float,
                 keep_alive: float) -> None:
        self.key = key
        self.options = options  # keeps what settings_key counted by identity alive
        self.pid = os.getpid()
        self.users = 0
        self.generation = 0  # bumped on every release, so an old idle timer is void
        self.close_timeout = close_timeout
        self.keep_alive = keep_alive
        self.client = TrioClient(**options)
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.hosted: Hosted = engine().host(self.client, close_timeout,
                                            lambda res: _resolve(opened, res))
        opened.result()  # ConfigError and the like, raised in the caller's thread

    def release(self) -> None:
        """A user let go (module lock held): the last one starts the idle timer."""
        self.users -= 1
        self.generation += 1
        if self.users == 0:
            try:
                self.hosted.engine.post(self.hosted.client.start_soon, self._idle,
                                        self.generation)
            except RuntimeError:
                pass

    def usable(self) -> bool:
        """Of this process, and neither closing nor closed."""
        return self.pid == os.getpid() and self.hosted.open

    async def _idle(self, generation: int) -> None:
        await trio.sleep(self.keep_alive)
        with _lock:
            if self.users or self.generation != generation:
                return
            if _shared.get(self.key) is self:
                del _shared[self.key]
        self.hosted.close()


_lock = threading.Lock()
_shared: dict[tuple[Any, ...], _Shared] = {}
_opening: dict[tuple[Any, ...], threading.Event] = {}  # settings a thread is opening now


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _opening.clear()  # the threads opening them are not in this process


if hasattr(os, "register_at_fork"):
    # held across fork(), so a child never inherits it locked by a thread it does not have
    os.register_at_fork(before=lambda: _lock.acquire(), after_in_parent=lambda: _lock.release(),
                        after_in_child=_after_fork_in_child)


def _resolve(fut: concurrent.futures.Future[Any], result: outcome.Outcome[Any]) -> None:
    try:
        if isinstance(result, outcome.Value):
            fut.set_result(result.value)
        elif isinstance(result, outcome.Error):
            fut.set_exception(result.error)
    except concurrent.futures.InvalidStateError:  # cancelled by its caller meanwhile
        pass


def _acquire(options: ClientOptions, close_timeout: float, keep_alive: float) -> _Shared:
    """The shared engine client for these settings, opened by the first thread that asks
    (single flight: the others wait for it, so no thread opens connections it then drops)."""
    key = settings_key(dict(options), close_timeout, keep_alive)
    while True:
        with _lock:
            shared = _shared.get(key)
            if shared is not None and shared.usable():
                shared.users += 1
                return shared
            opening = _opening.get(key)
            if opening is None:
                opening = _opening[key] = threading.Event()
                break
        opening.wait()  # another thread is opening these settings: then use theirs
    try:
        _register_exit()
        # opening blocks until the connections' task is up: not under the lock
        fresh = _Shared(key, options, close_timeout, keep_alive)
        with _lock:
            _shared[key] = fresh
            fresh.users += 1
        return fresh
    finally:
        with _lock:
            if _opening.get(key) is opening:
                del _opening[key]
        opening.set()


class Client:
    """The sync door to :class:`fanout.Client`, for any thread.

    ``close_timeout``: seconds :meth:`close` (and interpreter exit) wait for pushes still
    out. ``keep_alive``: seconds the connections stay up once no client with these
    settings is open (the next one reuses them). Everything else is :class:`fanout.Client`'s;
    a bad setting raises ConfigError here.
    """

    def __init__(self, *, close_timeout: float = 10.0, keep_alive: float = 60.0,
                 **options: Unpack[ClientOptions]) -> None:
        TrioClient(**options)  # checks every setting now (no I/O, no thread)
        self._options = options
        self.close_timeout = close_timeout
        self.keep_alive = keep_alive
        self._shared: _Shared | None = None
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._channels: Channels | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Client:
        self._get()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the engine: the connections close ``keep_alive`` seconds after the
        last client with these settings closed (at once with ``keep_alive=0``... after
        the pushes out have had ``close_timeout`` seconds)."""
        with self._lock:
            self._closed = True
            shared, self._shared = self._shared, None
        if shared is not None and shared.pid == os.getpid():
            with _lock:
                shared.release()

    def _get(self) -> _Shared:
        """The shared engine client for this process (opened, or reopened after fork)."""
        shared = self._shared
        if shared is not None and shared.usable():
            return shared
        if self._pid != os.getpid():  # a child after fork(): the lock may be held for ever
            self._pid, self._lock = os.getpid(), threading.Lock()
        with self._lock:
            if self._closed:
                raise ClosedError("this fanout.sync.Client is closed")
            shared = self._shared
            if shared is None or not shared.usable():
                # a child after fork() (or an engine that stopped): open our own here
                shared = self._shared = _acquire(self._options, self.close_timeout,
                                                 self.keep_alive)
            return shared

    @property
    def trio_client(self) -> TrioClient:
        """The trio client in the engine thread (read its state; call it only there)."""
        return self._get().client

    @property
    def config_error(self) -> str | None:
        """As :attr:`fanout.Client.config_error`."""
        return self._get().client.config_error

    # ------------------------------------------------------------------ calls

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args)``, a trio coroutine function, in the engine; cancelling the
        Future cancels it there."""
        shared = self._get()
        hosted = shared.hosted
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        scope = trio.CancelScope()

        def cancelled(f: concurrent.futures.Future[Any]) -> None:
            if f.cancelled():
                try:
                    hosted.engine.post(scope.cancel)
                except RuntimeError:
                    pass

        fut.add_done_callback(cancelled)
        hosted.engine.post(hosted.call, fn, args, lambda res: _resolve(fut, res), scope)
        return fut

    def submit(self, notification: Notification | Prepared) -> concurrent.futures.Future[Result]:
        """Start one push; its Future gets the :class:`~fanout.Result` (or the exception
        :meth:`fanout.Client.send` would raise). ``future.cancel()`` resets it in flight."""
        return self.call(self._get().client.send, notification)

    def send(self, notification: Notification | Prepared, *, timeout: float | None = None) -> Result:
        """Send one push and block until its result. The engine bounds every push (its
        ``timeout`` per attempt, ``max_attempts``, ``unavailable_timeout``); ``timeout``
        here also bounds the wait: then the push is cancelled and TimeoutError raised."""
        return _wait(self.submit(notification), timeout)

    def broadcast(self, channel_id: str, payload: Payload | dict[str, Any] | bytes, *,
                  timeout: float | None = None, **options: Unpack[BroadcastOptions]) -> Result:
        """As :meth:`fanout.Client.broadcast`, blocking (``timeout`` as in :meth:`send`)."""
        client = self._get().client
        result: Result = _wait(self.call(lambda: client.broadcast(channel_id, payload,
                                                                  **options)), timeout)
        return result

    def send_many(
        self,
        notifications: Iterable[Notification | Prepared],
        *,
        window: int | None = None,
    ) -> Iterator[Result]:
        """As :meth:`fanout.Client.send_many`: results in completion order. The iterable
        is read in the calling thread as the engine asks for more; leaving the loop early
        (or closing the iterator) cancels what is still out."""
        hosted = self._get().hosted
        stream, results = hosted.send_many(window)
        return _drive(hosted, stream, results, notifications)

    def fan_out(self, payload: Payload | dict[str, Any] | bytes, tokens: Iterable[str], *,
                window: int | None = None,
                **options: Unpack[FanOutOptions]) -> Iterator[Result]:
        """As :meth:`fanout.Client.fan_out`: ValidationError at once for a bad payload."""
        hosted = self._get().hosted
        stream, results = hosted.fan_out(payload, window, options)
        return _drive(hosted, stream, results, tokens)

    # ------------------------------------------------------------------ features

    @property
    def channels(self) -> Channels:
        """Broadcast channel management, as :attr:`fanout.Client.channels`, blocking."""
        if self._channels is None:
            self._channels = Channels(self)
        return self._channels

    def live_activities(self, bundle_id: str, *, budget_per_hour: int = 50,
                        over_budget: Literal["lower", "wait"] = "lower") -> LiveActivities:
        """Live Activities through this client, blocking."""
        return LiveActivities(self, TrioLiveActivities(self._get().client, bundle_id,
                                                       budget_per_hour=budget_per_hour,
                                                       over_budget=over_budget))


def _wait(fut: concurrent.futures.Future[T], timeout: float | None) -> T:
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise TimeoutError(f"no result within {timeout} s; the push was cancelled") from None


def _drive(hosted: Hosted, stream: Stream[T], results: Any, items: Iterable[T]) -> Iterator[Result]:
    hosted.engine.post(hosted.call, stream.run, (results,), stream.settle)
    wake = threading.Event()
    source: Iterator[T] | None = iter(items)
    try:
        while True:
            batch, ended = stream.take()
            if batch:
                yield from batch
                continue
            if ended:
                if stream.error is not None:
                    raise stream.error
                return
            if source is not None:
                source = _feed(stream, source)
            wake.clear()
            if stream.wait_read(wake.set) and (source is None or stream.wait_feed(wake.set)):
                wake.wait()
    finally:
        stream.cancel()


def _feed(stream: Stream[T], source: Iterator[T]) -> Iterator[T] | None:
    """Hand items over while there is room; None once the source is spent."""
    try:
        while stream.room():
            chunk = [item for _, item in zip(range(_CHUNK), source, strict=False)]
            stream.feed(chunk)
            if len(chunk) < _CHUNK:
                stream.end_items()
                return None
    except Exception as exc:  # the caller's iterable failed: it ends the stream
        stream.end_items(exc)
        return None
    return source


class Channels:
    """:attr:`fanout.Client.channels`, blocking."""

    def __init__(self, client: Client, timeout: float | None = 60.0) -> None:
        self._client = client
        self.timeout = timeout

    def _run(self, fn: Callable[..., Any]) -> Any:
        return _wait(self._client.call(fn), self.timeout)

    def create(self, storage_policy: int = 0) -> Channel:
        """Create a channel; ``storage_policy`` 0 = No Message Stored, 1 = Most Recent."""
        return self._run(lambda: self._client.trio_client.channels.create(storage_policy))  # type: ignore[no-any-return]

    def read(self, channel_id: str) -> Channel:
        """The channel's settings."""
        return self._run(lambda: self._client.trio_client.channels.read(channel_id))  # type: ignore[no-any-return]

    def list(self) -> list[str]:
        """Ids of every channel of the bundle id in this environment."""
        return self._run(lambda: self._client.trio_client.channels.list())  # type: ignore[no-any-return]

    def delete(self, channel_id: str) -> None:
        """Delete a channel (irreversible)."""
        self._run(lambda: self._client.trio_client.channels.delete(channel_id))


class LiveActivities:
    """:class:`fanout.liveactivity.LiveActivities`, blocking (budget and ordering are
    kept in the engine)."""

    def __init__(self, client: Client, inner: TrioLiveActivities) -> None:
        self._client = client
        self.inner: TrioLiveActivities = inner

    def start(self, token: str, *, activity_id: str, **kw: Any) -> Result:
        """As :meth:`fanout.liveactivity.LiveActivities.start`."""
        return _wait(self._client.call(  # type: ignore[no-any-return]
            lambda: self.inner.start(token, activity_id=activity_id, **kw)), None)

    def update(self, token: str, content_state: dict[str, Any], *, activity_id: str,
               **kw: Any) -> Result:
        """As :meth:`fanout.liveactivity.LiveActivities.update`."""
        return _wait(self._client.call(  # type: ignore[no-any-return]
            lambda: self.inner.update(token, content_state, activity_id=activity_id, **kw)), None)

    def end(self, token: str, content_state: dict[str, Any] | None = None, *,
            activity_id: str, **kw: Any) -> Result:
        """As :meth:`fanout.liveactivity.LiveActivities.end`."""
        return _wait(self._client.call(  # type: ignore[no-any-return]
            lambda: self.inner.end(token, content_state, activity_id=activity_id, **kw)), None)


def shutdown() -> None:
    """Close every sync client of this process now, blocking: pushes still out get their
    client's ``close_timeout`` to end (what is left is logged and ends ClosedError).

    Runs by itself at interpreter exit and at the end of a ``multiprocessing`` child. Call
    it where a process ends some other way, e.g. Celery's ``worker_process_shutdown``
    signal (billiard's workers leave with ``os._exit``). Clients stay usable: the next
    call opens a new engine."""
    with _lock:
        mine = [s for s in _shared.values() if s.pid == os.getpid()]
        _shared.clear()
    closed: list[threading.Event] = []
    for shared in mine:
        done = threading.Event()
        try:
            shared.hosted.engine.post(shared.hosted.close)
        except RuntimeError:
            continue
        shared.hosted.on_closed(done.set)
        closed.append(done)
    for shared, done in zip(mine, closed, strict=False):
        if not done.wait(shared.close_timeout + 5.0):
            log.warning("fanout: the engine did not close within %.0f s at exit",
                        shared.close_timeout + 5.0)


atexit.register(shutdown)
_exit_registered_in = os.getpid()


def _register_exit() -> None:
    """A multiprocessing child ends with ``os._exit``, past atexit: drain there through
    multiprocessing's own exit hooks (registered after its fork-time reset, at first use)."""
    global _exit_registered_in
    if _exit_registered_in == os.getpid():
        return
    _exit_registered_in = os.getpid()
    import multiprocessing
    import multiprocessing.util

    if multiprocessing.parent_process() is not None:
        multiprocessing.util.Finalize(None, shutdown, exitpriority=100)
