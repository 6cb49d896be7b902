"""The books of a daemon's inputs (:class:`InputState`, :class:`LineState`,
:class:`Tag`): which lines are open, and the offset up to which every line is done."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from . import checkpoint as ckpt
from .reader import InputBlock, InputLine


class InputState:
    """One input: its lines still waiting for results, and its checkpoint."""

    def __init__(self, path: str, label: str | None, checkpoint_path: str | None) -> None:
        self.path = path
        self.label = label
        self.checkpoint_path = checkpoint_path
        self.pending: OrderedDict[int, LineState] = OrderedDict()
        self.last_line = 0
        self.last_end = 0
        self.dev = 0
        self.ino = 0
        self.high_water = 0        # persisted: lines up to here may have been sent
        self.resend_until = 0      # from the previous run's checkpoint
        self.last_sent_line = 0    # the last line with a push handed to the engine
        self.saved: tuple[int, int, int] | None = None
        self.on_done: Callable[[int], None] | None = None
        self.high_water_due = False  # raised, not persisted yet: persist before sending
        self._saving = trio.Lock()

    def prefix(self) -> tuple[int, int]:
        """(line, offset) up to which every line is done."""
        if self.pending:
            first = next(iter(self.pending.values()))
            return first.number - 1, first.start
        return self.last_line, self.last_end

    def record(self, line: int, offset: int) -> None:
        """Persist (line, offset) with the high-water mark. The caller has flushed the
        results of every line up to ``line`` first."""
        if self.checkpoint_path is None:
            return
        key = (line, offset, self.high_water)
        if key == self.saved:
            return
        tail = ckpt.tail_of(self.path, offset, (self.dev, self.ino)) if offset else None
        ckpt.save(self.checkpoint_path, ckpt.Checkpoint(
            input=self.path, dev=self.dev, ino=self.ino, offset=offset, line=line,
            high_water=self.high_water, tail=tail))
        self.saved = key

    async def save(self, line: int, offset: int) -> None:
        """:meth:`record`, in a thread: an fsync on a stalled disk must not stall the
        event loop (answers, the reaper, signals)."""
        async with self._saving:
            await trio.to_thread.run_sync(self.record, line, offset)

    def open_line(self, line: InputLine | InputBlock, high_water_step: int) -> LineState:
        """Start accounting for ``line`` (an InputLine, or an InputBlock of lines kept as
        one): it is pending until its results are written. Moves the high-water mark if
        the line is beyond it: ``high_water_due`` says :meth:`save_high_water` must run
        before the line is sent."""
        number = line.number
        state = LineState(self, number, line.start, number <= self.resend_until)
        self.pending[number] = state
        self.last_line, self.last_end = line.last, line.end
        if line.last > self.high_water and self.checkpoint_path is not None:
            self.high_water = line.last + high_water_step
            self.high_water_due = True
        return state

    async def save_high_water(self) -> None:
        """Lines up to ``high_water`` may be sent from now on: persist that before sending
        them (with the last recorded position: results since then may not be flushed)."""
        self.high_water_due = False
        last_line, last_offset = self.saved[:2] if self.saved else (0, 0)
        await self.save(last_line, last_offset)


class LineState:
    """One input line (or a block of lines kept as one) until its results are written:
    ``pending`` pushes in the engine, ``closed`` once every push of it is handed over."""

    __slots__ = ("input", "number", "start", "pending", "closed", "resend")

    def __init__(self, inp: InputState, number: int, start: int, resend: bool) -> None:
        self.input = inp
        self.number = number
        self.start = start
        self.pending = 0
        self.closed = False
        self.resend = resend

    def done(self) -> None:
        """Every result of the line is written."""
        self.input.pending.pop(self.number, None)
        if self.input.on_done is not None:
            self.input.on_done(self.number)


class Tag:
    """What a push carries as its id: the caller's id and the line it came from."""

    __slots__ = ("line", "id", "priority")

    def __init__(self, line: LineState, id: Any, priority: int | None = None) -> None:
        self.line = line
        self.id = id
        self.priority = priority  # a Live Activity line's, after its budget
