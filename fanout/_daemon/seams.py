"""The seams of a daemon: what it needs of its :class:`Source`, :class:`Sink`,
:class:`Engine` and :class:`Owner` (typing only, no behaviour)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import trio

from ..outcome import Result
from ..payload import Prepared
from .lines import ResultLine
from .output import Outputs
from .reader import InputLine
from .state import InputState, LineState

if TYPE_CHECKING:
    from ..metrics import DaemonMetrics

LineHandler = Callable[[InputState, InputLine], Awaitable[None]]
"""What a source hands each line to, with the input it belongs to."""


class Source(Protocol):
    """Where a daemon's lines come from."""

    states: list[InputState]
    """The inputs opened so far; their checkpoints are committed by the sink."""

    async def read(self, handle: LineHandler, nursery: trio.Nursery) -> None:
        """Hand every line to ``handle`` until the input ends (or reading is cancelled).
        Tasks that must outlive the reading (until the last results are in) go into
        ``nursery``."""
        ...

    def report(self, final: bool) -> None:
        """Add the source's own lines to a status report."""
        ...

    def sample(self, metrics: DaemonMetrics) -> None:
        """Set the source's own gauges."""
        ...


class Sink(Protocol):
    """Where results go, and the commit that marks their lines done."""

    out: Outputs
    """The outputs written to (back-pressure, flush at exit, SIGHUP, dead tokens)."""

    def write(self, record: ResultLine, state: LineState) -> None:
        """Write one result line of the line ``state``."""
        ...

    async def commit(self, states: Sequence[InputState]) -> None:
        """Results out first, then what covers them (checkpoints, acks)."""
        ...

    def close(self, states: Sequence[InputState], complete: bool) -> None:
        """No more results. ``complete``: every result written is out, so the final
        positions of ``states`` may be recorded."""
        ...


class Engine(Protocol):
    """What a daemon sends with: a :class:`fanout.client.Client`, or a
    :class:`fanout.teams.TeamsEngine` (a client per team and environment)."""

    @property
    def config_error(self) -> str | None: ...

    @property
    def in_flight(self) -> int:
        """Pushes sent and not answered yet (the status line)."""
        ...

    @property
    def last_error(self) -> BaseException | None:
        """Why the last connection attempt failed (the "APNs unreachable" warning)."""
        ...

    def unavailable_for(self) -> float:
        """Seconds without a usable connection (0.0: one is usable)."""
        ...

    def send_many(self, notifications: AsyncIterable[Prepared], /) -> AsyncIterator[Result]:
        """One result per push, in completion order."""
        ...

    def abort_in_flight(self, why: str) -> list[Result]:
        """End every push in flight now (a forced stop)."""
        ...

    async def __aenter__(self) -> object: ...

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None, /) -> object: ...


class Owner(Protocol):
    """What :class:`Control` asks of the daemon (or coordinator) it steers."""

    def stop_in_flight(self) -> None:
        """A forced stop: end what is in flight now."""
        ...

    def reopen(self) -> None:
        """SIGHUP: reopen the output files."""
        ...

    def status(self, final: bool = False) -> None:
        """Report progress (``final``: the last report)."""
        ...

    def sample(self) -> None:
        """Set the metrics' gauges and line counts now."""
        ...


def engine_ready(engine: Engine | None) -> tuple[bool, str]:
    """``/readyz`` of a daemon or ``fanout serve``: the engine is up, has no configuration
    error, and APNs is reachable now; else why not."""
    if engine is None:
        return False, "starting"
    if engine.config_error:
        return False, f"configuration error: {engine.config_error}"
    down = engine.unavailable_for()
    if down > 0:
        return False, f"APNs unreachable for {down:.0f} s"
    return True, "ready"
