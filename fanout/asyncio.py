"""fanout from asyncio (FastAPI, aiohttp, Django's async views): the asyncio door.

``async with fanout.asyncio.Client(...) as client`` inside a running asyncio loop (uvloop
too) takes the keyword arguments of :class:`fanout.Client` and offers its API as asyncio
coroutines and async iterators, with the same arguments, the same :class:`~fanout.Result`
and the same exceptions::

    async with fanout.asyncio.Client(auth=auth, topic="com.example.app") as client:
        result = await client.send(Notification(token=token, payload=payload))
        async for result in client.fan_out(payload, tokens):
            ...

The trio engine runs in one thread per process (:mod:`fanout._bridge` says why not guest
mode). Cancelling the asyncio task that awaits a push cancels it in the engine: its stream
is reset and its slot freed, and it is never resent. Callbacks (``on_invalid_token``,
``events``) run on the engine thread: keep them short, and hand work to the loop with
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Unpack

import outcome
import trio

from ._bridge import (
    BroadcastOptions,
    ClientOptions,
    Engine,
    FanOutOptions,
    Hosted,
    Mailbox,
    Stream,
    engine,
)
from .client import Client as TrioClient
from .liveactivity import LiveActivities as TrioLiveActivities
from .outcome import Result
from .payload import Notification, Payload, Prepared

if TYPE_CHECKING:

    from .channels import Channel

__all__ = ["Channels", "Client", "ClientOptions", "LiveActivities"]

T = TypeVar("T")
_CHUNK = 256  # items of a plain iterable handed over at once (and the loop's turn between)
_TURN = 64    # results yielded between two turns of the loop (as trio checkpoints each one)


def _settle(fut: asyncio.Future[outcome.Outcome[Any]], result: outcome.Outcome[Any]) -> None:
    if not fut.done():
        fut.set_result(result)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Client:
    """The asyncio door to :class:`fanout.Client`: same arguments, same results.

    ``close_timeout``: seconds closing waits for pushes still out before they end with
    :class:`~fanout.errors.ClosedError`. ``switch_interval``: the process's GIL switch
    interval is lowered to this (seconds; None leaves it) when the client opens, so the
    loop waits at most that long for the GIL while the engine thread works (Python's 5 ms
    default put the loop's lag at 9 ms p99 during a fan-out, 1 ms at 5.2 ms; docs/doors.md).
    Everything else is :class:`fanout.Client`'s.
    """

    def __init__(self, *, close_timeout: float = 10.0, switch_interval: float | None = 0.0005,
                 **options: Unpack[ClientOptions]) -> None:
        self._client = TrioClient(**options)  # ConfigError here, as in the trio API
        self.close_timeout = close_timeout
        self.switch_interval = switch_interval
        self._engine: Engine | None = None
        self._hosted: Hosted | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replies: Mailbox | None = None
        self._channels: Channels | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        """Start the engine thread if need be and open the connections in it."""
        if self._hosted is not None:
            raise RuntimeError("this fanout.asyncio.Client is already open")
        loop = self._loop = asyncio.get_running_loop()
        if self.switch_interval is not None and sys.getswitchinterval() > self.switch_interval:
            sys.setswitchinterval(self.switch_interval)
        self._replies = Mailbox(loop.call_soon_threadsafe)
        opened: asyncio.Future[outcome.Outcome[Any]] = loop.create_future()
        self._engine = eng = engine()
        self._hosted = eng.host(self._client, self.close_timeout,
                                functools.partial(self._post, _settle, opened))
        try:
            (await asyncio.shield(opened)).unwrap()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close: pushes still out get ``close_timeout`` seconds to end, then the
        connections close (and the engine thread, if no other client uses it)."""
        hosted, self._hosted = self._hosted, None
        if hosted is None:
            return
        eng = hosted.engine
        try:
            eng.post(hosted.close)
        except RuntimeError:
            return  # the engine is gone already
        # the engine thread ends by itself once its last client closed; wait off the loop
        closed = asyncio.Event()
        hosted.on_closed(lambda: self._post(closed.set))
        await closed.wait()

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            assert self._replies is not None
            self._replies.post(fn, *args)
        except RuntimeError:  # the loop closed: nobody waits for this any more
            pass

    def _require(self) -> Hosted:
        hosted = self._hosted
        if hosted is None:
            raise RuntimeError("use the client inside 'async with fanout.asyncio.Client(...)'")
        return hosted

    # ------------------------------------------------------------------ state

    @property
    def trio_client(self) -> TrioClient:
        """The trio client in the engine thread: read its settings; call it only from
        the engine (``events`` hooks run there)."""
        return self._client

    @property
    def config_error(self) -> str | None:
        """As :attr:`fanout.Client.config_error`."""
        return self._client.config_error

    @property
    def in_flight(self) -> int:
        """As :attr:`fanout.Client.in_flight`."""
        return self._client.in_flight

    @property
    def last_error(self) -> BaseException | None:
        """As :attr:`fanout.Client.last_error`."""
        return self._client.last_error

    def reset_topic_guard(self, topic: str | None = None) -> None:
        """As :meth:`fanout.Client.reset_topic_guard` (done in the engine, soon)."""
        self._require().engine.post(self._client.reset_topic_guard, topic)

    def forget_invalid(self, token: str) -> None:
        """As :meth:`fanout.Client.forget_invalid` (done in the engine, soon)."""
        self._require().engine.post(self._client.forget_invalid, token)

    def reset_config_error(self) -> None:
        """As :meth:`fanout.Client.reset_config_error` (done in the engine, soon)."""
        self._require().engine.post(self._client.reset_config_error)

    # ------------------------------------------------------------------ calls

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Await ``fn(*args)``, a trio coroutine function, in the engine: its value or its
        exception; cancelling the awaiting task cancels it there."""
        hosted = self._require()
        assert self._loop is not None and self._replies is not None
        fut: asyncio.Future[outcome.Outcome[Any]] = self._loop.create_future()
        scope = trio.CancelScope()
        hosted.engine.post(hosted.call, fn, args, functools.partial(self._post, _settle, fut),
                           scope)
        try:
            result = await fut
        except asyncio.CancelledError:
            try:
                hosted.engine.post(scope.cancel)
            except RuntimeError:
                pass
            raise
        return result.unwrap()

    async def send(self, notification: Notification | Prepared) -> Result:
        """As :meth:`fanout.Client.send`."""
        result: Result = await self.call(self._client.send, notification)
        return result

    async def broadcast(self, channel_id: str, payload: Payload | dict[str, Any] | bytes,
                        **options: Unpack[BroadcastOptions]) -> Result:
        """As :meth:`fanout.Client.broadcast`."""
        result: Result = await self.call(
            lambda: self._client.broadcast(channel_id, payload, **options))
        return result

    def send_many(
        self,
        notifications: Iterable[Notification | Prepared] | AsyncIterable[Notification | Prepared],
        *,
        window: int | None = None,
    ) -> AsyncIterator[Result]:
        """As :meth:`fanout.Client.send_many`: results in completion order; an async
        iterable is read on this loop, as the engine asks for more."""
        hosted = self._require()
        stream, results = hosted.send_many(window)
        return self._drive(hosted, stream, results, notifications)

    def fan_out(self, payload: Payload | dict[str, Any] | bytes,
                tokens: Iterable[str] | AsyncIterable[str], *, window: int | None = None,
                **options: Unpack[FanOutOptions]) -> AsyncIterator[Result]:
        """As :meth:`fanout.Client.fan_out`: ValidationError at once for a bad payload."""
        hosted = self._require()
        stream, results = hosted.fan_out(payload, window, options)
        return self._drive(hosted, stream, results, tokens)

    async def _drive(self, hosted: Hosted, stream: Stream[T], results: AsyncIterator[Result],
                     items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[Result]:
        loop = self._loop
        assert loop is not None
        hosted.engine.post(hosted.call, stream.run, (results,), stream.settle)
        feeder = loop.create_task(self._feed(stream, items))
        try:
            while True:
                batch, ended = stream.take()
                if batch:
                    for i, result in enumerate(batch, 1):
                        yield result
                        if not i % _TURN:
                            await asyncio.sleep(0)  # results keep coming: the loop's turn
                    await asyncio.sleep(0)
                elif ended:
                    if stream.error is not None:
                        raise stream.error
                    return
                else:
                    fut: asyncio.Future[None] = loop.create_future()
                    if stream.wait_read(functools.partial(self._post, _wake, fut)):
                        await fut
        finally:
            feeder.cancel()
            stream.cancel()

    async def _feed(self, stream: Stream[T], items: Iterable[T] | AsyncIterable[T]) -> None:
        try:
            if isinstance(items, AsyncIterable):
                async for item in items:  # handed over one by one: the next may be slow
                    stream.feed((item,))
                    await self._room(stream)
            else:
                chunk: list[T] = []
                for item in items:
                    chunk.append(item)
                    if len(chunk) >= _CHUNK:
                        stream.feed(chunk)
                        chunk = []
                        await self._room(stream)
                        await asyncio.sleep(0)  # a long list must not hold the loop
                stream.feed(chunk)
        except Exception as exc:  # the caller's iterable failed: it ends the stream
            stream.end_items(exc)
        else:
            stream.end_items()

    async def _room(self, stream: Stream[T]) -> None:
        assert self._loop is not None
        while not stream.room():
            fut: asyncio.Future[None] = self._loop.create_future()
            if not stream.wait_feed(functools.partial(self._post, _wake, fut)):
                return
            await fut

    # ------------------------------------------------------------------ features

    @property
    def channels(self) -> Channels:
        """Broadcast channel management, as :attr:`fanout.Client.channels`."""
        if self._channels is None:
            self._channels = Channels(self)
        return self._channels

    def live_activities(self, bundle_id: str, *, budget_per_hour: int = 50,
                        over_budget: Literal["lower", "wait"] = "lower") -> LiveActivities:
        """Live Activities through this client, as :class:`fanout.liveactivity.LiveActivities`."""
        return LiveActivities(self, TrioLiveActivities(self._client, bundle_id,
                                                       budget_per_hour=budget_per_hour,
                                                       over_budget=over_budget))


class Channels:
    """:attr:`fanout.Client.channels` as asyncio coroutines."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def create(self, storage_policy: int = 0) -> Channel:
        """Create a channel; ``storage_policy`` 0 = No Message Stored, 1 = Most Recent."""
        return await self._client.call(lambda: self._client.trio_client.channels.create(storage_policy))  # type: ignore[no-any-return]

    async def read(self, channel_id: str) -> Channel:
        """The channel's settings."""
        return await self._client.call(lambda: self._client.trio_client.channels.read(channel_id))  # type: ignore[no-any-return]

    async def list(self) -> list[str]:
        """Ids of every channel of the bundle id in this environment."""
        return await self._client.call(lambda: self._client.trio_client.channels.list())  # type: ignore[no-any-return]

    async def delete(self, channel_id: str) -> None:
        """Delete a channel (irreversible)."""
        await self._client.call(lambda: self._client.trio_client.channels.delete(channel_id))


class LiveActivities:
    """:class:`fanout.liveactivity.LiveActivities` as asyncio coroutines (the budget and
    ordering are kept in the engine)."""

    def __init__(self, client: Client, inner: TrioLiveActivities) -> None:
        self._client = client
        self.inner: TrioLiveActivities = inner

    async def start(self, token: str, *, activity_id: str, **kw: Any) -> Result:
        """As :meth:`fanout.liveactivity.LiveActivities.start`."""
        return await self._client.call(lambda: self.inner.start(token, activity_id=activity_id, **kw))  # type: ignore[no-any-return]

    async def update(self, token: str, content_state: dict[str, Any], *, activity_id: str,
                     **kw: Any) -> Result:
        """As :meth:`fanout.liveactivity.LiveActivities.update`."""
        return await self._client.call(  # type: ignore[no-any-return]
            lambda: self.inner.update(token, content_state, activity_id=activity_id, **kw))

    async def end(self, token: str, content_state: dict[str, Any] | None = None, *,
                  activity_id: str, **kw: Any) -> Result:
        """As :meth:`fanout.liveactivity.LiveActivities.end`."""
        return await self._client.call(  # type: ignore[no-any-return]
            lambda: self.inner.end(token, content_state, activity_id=activity_id, **kw))

