"""The file source and sink: lines from files or stdin (:class:`FileSource`), results
to a file or stdout and the checkpoint (:class:`FileSink`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from ..errors import ConfigError
from . import checkpoint as ckpt
from .lines import ResultLine, result_encoder
from .output import Outputs
from .reader import InputBlock, InputLine
from .seams import LineHandler
from .state import InputState, LineState

if TYPE_CHECKING:
    from ..metrics import DaemonMetrics

log = logging.getLogger("fanout.daemon")


def open_input(path: str, label: str | None, args: argparse.Namespace) -> InputState:
    """The state of the input ``path`` (``-``: stdin): where its checkpoint is, and where
    the previous run left off (:mod:`fanout._daemon.checkpoint`)."""
    from .reader import input_identity

    if path == "-" or args.no_checkpoint:
        return InputState(path, label, None)
    cp_path = args.checkpoint or ckpt.default_path(path)
    state = InputState(path, label, cp_path)
    try:
        state.dev, state.ino = input_identity(path)
        size = os.path.getsize(path)
    except FileNotFoundError:
        if not getattr(args, "follow", False):
            raise ConfigError(f"input {path}: No such file or directory") from None
        # --follow waits for it (tail -F): read from its start when it appears; a
        # checkpoint left at this path was another file's
        if os.path.exists(cp_path):
            log.warning("%s: not there; its checkpoint %s is for a file that is gone: "
                        "reading the new one from its start", path, cp_path)
        return state
    except OSError as exc:
        raise ConfigError(f"input {path}: {exc.strerror}") from None
    cp = ckpt.load(cp_path)
    if cp is None:
        return state
    ckpt.check(cp, cp_path, path, (state.dev, state.ino), size)
    state.last_line, state.last_end = cp.line, cp.offset
    state.high_water = state.resend_until = cp.high_water
    state.saved = (cp.line, cp.offset, cp.high_water)
    if cp.line and cp.offset >= size and not getattr(args, "follow", False):
        log.warning("%s: already done up to line %d (its checkpoint %s): nothing to send; "
                    "--no-checkpoint to send it again", path, cp.line, cp_path)
    elif cp.line:
        log.info("%s: resuming after line %d (byte %d); lines up to %d may be resent",
                 path, cp.line, cp.offset, cp.high_water)
    return state


def note_identity(state: InputState, unit: InputLine | InputBlock) -> None:
    """Follow mode: the input was rotated when a unit comes from another file."""
    if unit.identity and unit.identity != (state.dev, state.ino):
        state.dev, state.ino = unit.identity


def end_identity(state: InputState) -> None:
    """At the end of a file: the identity its checkpoint records."""
    from .reader import input_identity

    if state.path != "-":
        with contextlib.suppress(OSError):
            state.dev, state.ino = input_identity(state.path)


class FileSource:
    """NDJSON files (or stdin) read in turn, each from where its checkpoint left off."""

    def __init__(self, inputs: list[str], args: argparse.Namespace) -> None:
        self.inputs = inputs
        self.args = args
        self.states: list[InputState] = []

    async def read(self, handle: LineHandler, nursery: trio.Nursery) -> None:
        """Every line of every input, in order."""
        from .reader import read_lines

        labelled = len(self.inputs) > 1
        for path in self.inputs:
            state = open_input(path, path if labelled else None, self.args)
            self.states.append(state)
            async for line in read_lines(
                    None if path == "-" else path, start_offset=state.last_end,
                    start_line=state.last_line, follow=self.args.follow,
                    max_line_bytes=self.args.max_line_bytes):
                note_identity(state, line)
                assert isinstance(line, InputLine)  # not blocks=True
                await handle(state, line)
            end_identity(state)

    def report(self, final: bool) -> None:
        """Nothing beyond the daemon's own status."""

    def sample(self, metrics: DaemonMetrics) -> None:
        """No gauges of its own."""


class FileSink:
    """Results to a file or stdout (or a worker's frames to its coordinator); the commit
    flushes them (and the dead tokens), then records each input's checkpoint."""

    def __init__(self, out: Outputs) -> None:
        self.out = out

    def write(self, record: ResultLine, state: LineState) -> None:
        """One NDJSON result line."""
        self.out.results.write(result_encoder.encode(record) + b"\n")

    async def commit(self, states: Sequence[InputState]) -> None:
        """Flush the results, then save the checkpoints that cover them."""
        snapshot = [(s, s.prefix()) for s in states if s.checkpoint_path]
        await self.out.sync()    # results first ...
        for state, (line, offset) in snapshot:   # ... then the checkpoint that covers them
            await state.save(line, offset)

    def close(self, states: Sequence[InputState], complete: bool) -> None:
        """Close the outputs; then, if every result is out, record the checkpoints."""
        self.out.close()
        if not complete:  # results were lost: the checkpoint stays where the last write left it
            return
        for state in states:
            # nothing past the last line handed to the engine can have been sent
            line, offset = state.prefix()
            state.high_water = max(line, min(state.high_water, state.last_sent_line))
            state.record(line, offset)
