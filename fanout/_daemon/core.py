"""One daemon: a **source** of lines, the **engine** that sends their pushes, and a
**sink** that writes the results and commits what they cover.

Every input line is accounted for exactly once: one result per push (a fan-out line yields
one per token), one ``malformed`` result for a line that cannot be understood. For a file
input, a checkpoint records the byte offset up to which every line has its result written
and flushed; after a kill -9 a restart resumes there, and lines that may already have been
sent (up to the recorded high-water line) come out marked ``resent``.

The sources: :class:`FileSource` (files or stdin), a ``--workers`` child's blocks
(``workers.BlockSource``), a Redis consumer group (``fleet.RedisGroup``). The sinks:
:class:`FileSink` (a results file or stdout, or a child's frames, and the checkpoint), the
Redis group (a results stream, then XACK). :class:`Control` is what every daemon and the
``--workers`` coordinator share: the books, the stop (drain, then force), signals, status.

Tasks (one nursery): a reader turns lines into prepared pushes and feeds them through a
small channel to the engine's ``send_many`` (input is read only as fast as pushes
complete); the main task writes each result; a checkpointer commits (results flushed
first, then the checkpoint); a signal task handles SIGTERM/SIGINT (drain, then force) and
SIGHUP (reopen output files); a status task reports progress.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .._exits import EXIT_CONFIG, EXIT_FORCED, exit_code, is_unreachable
from .._flow import drain, put
from ..errors import ConfigError, FanoutError, ValidationError
from ..outcome import Result
from ..payload import Payload, Prepared, PushTemplate, bundle_of
from . import checkpoint as ckpt
from .lines import LineError, LiveActivityLine, PushLine, ResultLine, decode_line, result_encoder
from .output import OutputError, Outputs
from .reader import InputBlock, InputLine

if TYPE_CHECKING:
    from ..metrics import DaemonMetrics, Metrics

log = logging.getLogger("fanout.daemon")

HIGH_WATER_STEP = 1024    # lines: how far ahead the "may have been sent" mark is moved
CHANNEL_SIZE = 256
METRICS_INTERVAL = 1.0    # seconds between samples of the metrics' gauges and line counts
FORCED_FLUSH_S = 2.0      # after a forced stop: how long the last results may take to write
STAMP_MARKER = b'"timestamp":4102444800'  # liveactivity's send-time marker: to be stamped


# --------------------------------------------------------------------------- bookkeeping

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

    __slots__ = ("line", "id")

    def __init__(self, line: LineState, id: Any) -> None:
        self.line = line
        self.id = id


# --------------------------------------------------------------------------- the seams

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


class Connections(Protocol):
    """What a daemon reads of an engine's connections: the status line, the warning that
    APNs is unreachable."""

    @property
    def in_flight(self) -> int: ...

    @property
    def last_error(self) -> BaseException | None: ...

    def unavailable_for(self) -> float: ...


class Engine(Protocol):
    """What a daemon sends with: a :class:`fanout.client.Client`, or a
    :class:`fanout.teams.TeamsEngine` (a client per team and environment)."""

    @property
    def config_error(self) -> str | None: ...

    @property
    def pool(self) -> Connections: ...

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


# --------------------------------------------------------------------------- files

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
    except OSError as exc:
        raise ConfigError(f"input {path}: {exc.strerror}") from None
    cp = ckpt.load(cp_path)
    if cp is None:
        return state
    ckpt.check(cp, cp_path, path, (state.dev, state.ino), size)
    state.last_line, state.last_end = cp.line, cp.offset
    state.high_water = state.resend_until = cp.high_water
    state.saved = (cp.line, cp.offset, cp.high_water)
    if cp.line:
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


# --------------------------------------------------------------------------- control

class Control:
    """What every daemon and the ``--workers`` coordinator share: the books (lines read,
    results written, counts per outcome), the stop (SIGTERM/SIGINT: drain, a second one
    or the drain deadline: force), SIGHUP, the status line, the last flush and the one
    error to report."""

    def __init__(self, args: argparse.Namespace, sink: Sink, owner: Owner,
                 states: list[InputState], counts: Counter[str] | None = None) -> None:
        self.args = args
        self.sink = sink
        self.out = sink.out
        self.owner = owner
        self.states = states
        self.counts: Counter[str] = Counter() if counts is None else counts
        self.lines_read = 0
        self.results_written = 0
        self.stopping = False
        self.forced = False
        self.flushed = False        # every result written is out (the exit's sync returned)
        self.reader_scope = trio.CancelScope()
        self._exit_scope: trio.CancelScope | None = None
        self._started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._metrics_stop: Callable[[], None] | None = None

    # ----------------------------------------------------------------- the books

    def emit(self, record: ResultLine, state: LineState) -> None:
        """Write one result line and count it."""
        if state.resend:
            record.resent = True
        self.sink.write(record, state)
        self.counts[record.outcome] += 1
        self.results_written += 1

    def end_line(self, state: LineState, outcome: str, error: str, id: Any = None,
                 **fields: Any) -> None:
        """A line that sends nothing: its one result, and it is done."""
        self.emit(ResultLine(id=id, line=state.number, outcome=outcome, error=error,
                             input=state.input.label, **fields), state)
        state.closed = True
        state.done()

    def malformed(self, state: LineState, error: str) -> None:
        """A line that cannot be understood."""
        self.end_line(state, "malformed", error)

    async def checkpointer(self) -> None:
        """Commit every ``--checkpoint-interval`` seconds."""
        while True:
            await trio.sleep(self.args.checkpoint_interval)
            await self.sink.commit(self.states)

    def sample_lines(self, metrics: DaemonMetrics | None) -> None:
        """The line counters and the checkpoint lag, into ``metrics``."""
        if metrics is None:
            return
        lag = 0
        for state in self.states:
            if state.checkpoint_path is not None:
                lag += state.last_line - (state.saved[0] if state.saved else 0)
            else:  # no checkpoint: the lines whose results are not all written
                lag += state.last_line - state.prefix()[0]
        metrics.update(self.lines_read, self.counts["malformed"], self.results_written, lag)

    # ----------------------------------------------------------------- stop

    async def signals(self, nursery: trio.Nursery, child: bool = False) -> None:
        """SIGTERM/SIGINT: drain, then force; SIGHUP: reopen the outputs. A ``--workers``
        child leaves SIGINT to its coordinator, whose SIGTERM means stop now."""
        if child:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as sigs:
                async for sig in sigs:
                    if sig == signal.SIGHUP:
                        self.owner.reopen()
                    else:
                        self.force("stopped by the coordinator")
            return
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    log.info("SIGHUP: reopening output files")
                    self.owner.reopen()
                elif not self.stopping:
                    self.stopping = True
                    log.warning("%s: no more input; draining pushes in flight (up to %g s)",
                                signal.Signals(sig).name, self.args.drain_timeout)
                    self.reader_scope.cancel()
                    nursery.start_soon(self._drain_deadline)
                else:
                    self.force(f"second {signal.Signals(sig).name}")

    def force(self, why: str) -> None:
        """Stop now: no more input, what is in flight ends ``maybe_delivered``."""
        if self.forced:
            self._hurry_exit_flush(again=True)
            return
        log.warning("%s: stopping now; pushes in flight are reported maybe_delivered", why)
        self.forced = True
        self.reader_scope.cancel()
        self.owner.stop_in_flight()
        self._hurry_exit_flush()

    def _hurry_exit_flush(self, again: bool = False) -> None:
        """A forced stop while the last results are being written: give them a little
        longer, or (another signal) none at all."""
        scope = self._exit_scope
        if scope is not None:
            scope.deadline = min(scope.deadline, trio.current_time() + FORCED_FLUSH_S)
            if again:
                scope.cancel()

    async def _drain_deadline(self) -> None:
        await trio.sleep(self.args.drain_timeout)
        self.force(f"drain timeout ({self.args.drain_timeout:g} s)")

    async def flush_at_exit(self) -> None:
        """Wait until every result is written: as long as the reader of a pipe takes, but
        within the drain deadline once stopping, and briefly after a forced stop (a third
        signal gives up at once). What is not written is not covered by the checkpoint."""
        self._exit_scope = scope = trio.CancelScope()
        if self.forced:
            scope.deadline = trio.current_time() + FORCED_FLUSH_S
        with scope:
            await self.out.sync()
            self.flushed = True
        if not self.flushed and self.out.failed is None:
            log.error("%s did not take the last %d bytes of results before the stop; the "
                      "checkpoint stays before their lines, which the next run sends again "
                      "(marked resent)", self.out.results.name, self.out.results.backlog)

    @contextlib.contextmanager
    def ending(self) -> Iterator[None]:
        """Around a run: one clear error rather than a group of them, then the outputs
        closed, the final checkpoints (if every result is out), the final status."""
        try:
            yield
        except BaseExceptionGroup as group:
            one = self._one_error(group)
            if one is not None:
                raise one from None  # one clear line, not a traceback per task
            raise
        finally:
            self.owner.sample()
            self.sink.close(self.states, complete=self.flushed and self.out.failed is None)
            self.owner.status(final=True)
            self.stop_metrics()

    def _one_error(self, group: BaseExceptionGroup[BaseException]) -> BaseException | None:
        """The one error to report for ``group``: the output's failure, or a named problem
        (a checkpoint that does not match ...) when the group holds only such problems."""
        failed = self.out.failed
        if failed is not None and group.subgroup(OutputError) is not None:
            return failed
        ours = group.subgroup(FanoutError)
        if ours is not None and group.split(FanoutError)[1] is None:
            leaf: BaseException = ours
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf
        return None

    # ----------------------------------------------------------------- metrics, status

    def serve_metrics(self, listen: str, registry: Any) -> None:
        """``--metrics [HOST:]PORT``: serve ``registry`` until the run ends."""
        from ..metrics import serve

        try:
            _, self._metrics_stop = serve(listen, registry)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def stop_metrics(self) -> None:
        """Stop serving the metrics."""
        if self._metrics_stop is not None:
            self._metrics_stop()
            self._metrics_stop = None

    async def metrics_loop(self) -> None:
        """Sample the metrics every second."""
        while True:
            self.owner.sample()
            await trio.sleep(METRICS_INTERVAL)

    async def status_loop(self) -> None:
        """A status report every second on a TTY, else every ``--status-interval`` s."""
        interval = 1.0 if self.tty else self.args.status_interval
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            self.owner.status()

    def status(self, final: bool, in_flight: int, unreachable_s: float) -> None:
        """One status report: a live line on a TTY, else a log line (or JSON)."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        counts = dict(sorted(self.counts.items()))
        info = {"lines": self.lines_read, "results": self.results_written,
                "per_s": round(self.results_written / elapsed, 1), "in_flight": in_flight,
                "counts": counts, "tasks": task_count(),
                "unreachable_s": round(unreachable_s, 1),
                "max_rss_mb": round(peak_rss_mb(), 1)}
        if self.tty and not final:
            text = " ".join(f"{k}={v:,}" for k, v in counts.items())
            sys.stderr.write(f"\r{self.lines_read:,} lines  {info['per_s']:,.0f}/s  "
                             f"in flight {in_flight}  {text}\x1b[K")
            sys.stderr.flush()
            return
        if self.tty:
            sys.stderr.write("\n")
        if self.args.log_format == "json":
            print(json.dumps({"event": "final" if final else "status", **info}),
                  file=sys.stderr, flush=True)
        else:
            log.warning("%s: %s", "final" if final else "status",
                        " ".join(f"{k}={v}" for k, v in info.items()))


# --------------------------------------------------------------------------- the daemon

class Daemon:
    """One daemon: lines from ``source``, their pushes through the engine that
    ``make_engine`` builds, results and their commit to ``sink``. A ``--workers`` child
    (``child``) leaves SIGINT and the status to its coordinator."""

    def __init__(self, settings: Any, args: argparse.Namespace, source: Source, sink: Sink,
                 make_engine: Callable[..., Engine], *, child: bool = False,
                 counts: Counter[str] | None = None) -> None:
        self.settings = settings
        self.args = args
        self.source = source
        self.sink = sink
        self.out = sink.out
        self.child = child
        self._make_engine = make_engine
        self.control = Control(args, sink, self, source.states, counts)
        self.config_stopped = False
        self.unreachable = 0        # pushes that ended because APNs was unreachable
        self._unreachable_logged = False
        self.engine: Engine | None = None
        self._consume_scope = trio.CancelScope()
        from ..liveactivity import ActivityTracker

        self.tracker = ActivityTracker(args.la_budget, over_budget=args.la_over_budget)
        self.metrics: Metrics | None = None                # --metrics
        self.daemon_metrics: DaemonMetrics | None = None

    # ----------------------------------------------------------------- main

    async def run(self) -> int:
        """Run until the input ends (or a stop); the exit code (:mod:`fanout._exits`)."""
        send, recv = trio.open_memory_channel[Prepared](CHANNEL_SIZE)
        extra = self._start_metrics()
        # APNs unreachable: wait (input pauses, nothing turns into failures) unless told
        extra["on_unavailable"] = getattr(self.args, "on_unavailable", "wait")
        control = self.control
        try:
            engine = self._make_engine(self.settings, on_invalid_token=self.out.dead_token,
                                       **extra)
        except BaseException:
            control.stop_metrics()
            raise
        with control.ending():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(control.signals, nursery, self.child)
                async with engine:
                    self.engine = engine
                    # everything made so far (imports, config, connections) lives as long
                    # as the process: keep it out of full collections, 20-30 ms stalls that
                    # decide the tail latency (bench/latency.py --no-gc-freeze)
                    gc.collect()
                    gc.freeze()
                    nursery.start_soon(self._read_all, send, nursery)
                    nursery.start_soon(control.checkpointer)
                    nursery.start_soon(control.status_loop)
                    nursery.start_soon(self._watch_unreachable, engine)
                    if self.metrics is not None:
                        nursery.start_soon(control.metrics_loop)
                    with self._consume_scope:
                        async for result in engine.send_many(drain(recv)):
                            self._write(result)
                    await control.flush_at_exit()
                nursery.cancel_scope.cancel()
        if self.engine is not None and self.engine.config_error:
            print(f"fanout run: {self.engine.config_error}", file=sys.stderr)
            return EXIT_CONFIG
        if control.forced:
            return EXIT_FORCED
        return exit_code(control.counts, unreachable=self.unreachable)

    # ----------------------------------------------------------------- metrics

    def _start_metrics(self) -> dict[str, Any]:
        """--metrics: Metrics as the engine's events and the HTTP endpoint; a --workers
        child (--metrics-child) records into PROMETHEUS_MULTIPROC_DIR and serves nothing."""
        child = getattr(self.args, "metrics_child", False)
        listen = getattr(self.args, "metrics", None)
        if not (child or listen):
            return {}
        from ..metrics import Metrics

        self.metrics = Metrics(daemon=not child)
        self.daemon_metrics = self.metrics.daemon
        if listen and not child:
            self.control.serve_metrics(listen, self.metrics.registry)
        return {"events": self.metrics}

    def sample(self) -> None:
        """The metrics' gauges and line counts, now."""
        if self.metrics is not None and self.engine is not None:
            self.metrics.sample(self.engine)  # type: ignore[arg-type]  # a Client or Teams
        self.control.sample_lines(self.daemon_metrics)
        if self.daemon_metrics is not None:
            self.source.sample(self.daemon_metrics)

    # ----------------------------------------------------------------- input

    async def _read_all(self, send: trio.MemorySendChannel[Prepared],
                        nursery: trio.Nursery) -> None:
        results = self.out.results

        async def handle(state: InputState, line: InputLine) -> None:
            if results.over:  # a slow reader of the results: wait
                await results.room()
            await self._line(state, line, send)

        async with send:
            with self.control.reader_scope:
                await self.source.read(handle, nursery)

    async def _line(self, inp: InputState, line: InputLine,
                    send: trio.MemorySendChannel[Prepared]) -> None:
        control = self.control
        control.lines_read += 1
        state = inp.open_line(line, max(HIGH_WATER_STEP, self.settings.max_in_flight))
        if inp.high_water_due:
            await inp.save_high_water()
        if line.error:
            control.malformed(state, line.error)
            return
        try:
            push = decode_line(line.data)
        except LineError as exc:
            control.malformed(state, str(exc))
            return
        except Exception as exc:  # a decoder surprise must cost one line, not the daemon
            log.error("line %d: unexpected %s while decoding", line.number,
                      type(exc).__name__)
            control.malformed(state, f"could not be decoded ({type(exc).__name__})")
            return
        env = push.environment
        if env is not None and env != self.settings.environment and not self.settings.team:
            control.end_line(state, "config_error",
                             f"environment {env}: this daemon sends to "
                             f"{self.settings.environment} only (give [[team]] tables to "
                             f"send to both)", id=push.id)
            return
        if push.live_activity is not None or push.channel_id is not None:
            await self._single(state, push, send)
        else:
            await self._fan_out(state, push, send)

    async def _fan_out(self, state: LineState, push: PushLine,
                       send: trio.MemorySendChannel[Prepared]) -> None:
        """A line of one or more tokens (``token``, ``tokens``, ``tokens_file``)."""
        control = self.control
        inp, number, env = state.input, state.number, push.environment
        try:
            assert push.payload is not None  # decode_line: a payload unless live_activity
            template = PushTemplate(
                push.payload, push_type=push.push_type or "alert", topic=push.topic,
                default_topic=self.settings.topic, priority=push.priority,
                expiration=push.expiration, collapse_id=push.collapse_id, apns_id=push.apns_id)
            tokens = self._tokens(push)
        except (ValidationError, ConfigError) as exc:
            control.malformed(state, str(exc))
            return
        except (TypeError, ValueError) as exc:  # a payload of a shape nothing expected
            control.malformed(state, f"invalid push: {exc}"[:300])
            return
        try:
            for token in tokens:
                try:
                    prepared = template.for_token(token, Tag(state, push.id))
                    prepared.environment = env
                except ValidationError as exc:
                    control.emit(ResultLine(id=push.id, line=number, outcome="rejected",
                                            token=token if len(token) < 600 else None,
                                            error=str(exc), input=inp.label), state)
                    continue
                state.pending += 1
                await put(send, prepared)  # no checkpoint while the channel has room
                inp.last_sent_line = number
        except OSError as exc:  # tokens_file unreadable midway
            control.emit(ResultLine(id=push.id, line=number, outcome="malformed",
                                    error=f"tokens_file {push.tokens_file}: {exc.strerror}",
                                    input=inp.label), state)
        state.closed = True
        if not state.pending:
            state.done()

    async def _single(self, state: LineState, push: PushLine,
                      send: trio.MemorySendChannel[Prepared]) -> None:
        """A broadcast (``channel_id``) or a Live Activity push (``live_activity``)."""
        from ..payload import decode_payload

        la = push.live_activity
        priority = push.priority if push.priority is not None else 10
        try:
            if la is not None:
                payload: Payload | dict[str, Any] = _la_payload(la, push.payload)
                if la.activity_id is not None:
                    budgeted = await self._budget(state, push, la, priority)
                    if budgeted is None:
                        return
                    priority = budgeted
            else:
                assert push.payload is not None  # decode_line: a payload unless live_activity
                payload = decode_payload(push.payload) if "aps" in push.payload \
                    else push.payload
            prepared = self._prepare_single(push, payload, priority, Tag(state, push.id))
        except (ValidationError, ConfigError) as exc:
            self.control.malformed(state, str(exc))
            return
        prepared.environment = push.environment
        state.pending += 1
        await put(send, prepared)
        state.input.last_sent_line = state.number
        state.closed = True

    async def _budget(self, state: LineState, push: PushLine, la: LiveActivityLine,
                      priority: int) -> int | None:
        """The priority a Live Activity push goes at (its activity's hourly budget of
        priority 10, ``--la-budget``), after a wait (``--la-over-budget wait``); ``None``
        when it is older than the last update sent, and its line ended ``superseded``."""
        assert la.activity_id is not None
        decision = self.tracker.decide(
            la.activity_id, time.time() if la.source_time is None else la.source_time,
            priority)
        while decision.wait:
            await trio.sleep(decision.wait)
            decision = self.tracker.decide(la.activity_id, la.source_time or time.time(),
                                           priority)
        if decision.superseded:
            self.control.end_line(state, "superseded",
                                  f"older than the last update sent for {la.activity_id}",
                                  id=push.id, token=push.token, channel_id=push.channel_id)
            return None
        return decision.priority

    def _prepare_single(self, push: PushLine, payload: Payload | dict[str, Any],
                        priority: int, tag: Tag) -> Prepared:
        """The prepared push of a broadcast or of a Live Activity line."""
        from ..client import prepare_broadcast
        from ..liveactivity import Stamper, notification, prepare_stamped

        la = push.live_activity
        topic = push.topic or self.settings.topic or ""
        if push.channel_id is not None:
            body = payload.encode() if isinstance(payload, Payload) else payload
            prepared = prepare_broadcast(
                push.channel_id, body, bundle_id=bundle_of(topic) or None, priority=priority,
                expiration=0 if push.expiration is None else push.expiration,
                apns_id=push.apns_id, id=tag)
            if la is not None and STAMP_MARKER in prepared.body:
                prepared.stamp = Stamper(prepared.body)
            return prepared
        # _line: with a token (not a broadcast) this is a Live Activity, its payload built
        assert push.token is not None and la is not None and isinstance(payload, Payload)
        return prepare_stamped(notification(
            push.token, payload, topic, priority=priority, expiration=push.expiration,
            apns_id=push.apns_id, id=tag))

    @staticmethod
    def _tokens(push: PushLine) -> Iterator[str] | list[str]:
        if push.token is not None:
            return [push.token]
        if push.tokens is not None:
            return push.tokens
        path = push.tokens_file
        assert path is not None  # decode_line: exactly one of token, tokens, tokens_file
        try:
            fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"tokens_file {path}: {exc.strerror}") from None

        def lines() -> Iterator[str]:
            with fh:
                for raw in fh:
                    token = raw.strip()
                    if token:
                        yield token
        return lines()

    # ----------------------------------------------------------------- output

    def _write(self, result: Result) -> None:
        tag = result.id
        state: LineState = tag.line
        self.control.emit(ResultLine.from_result(result, id=tag.id, line=state.number,
                                                 input=state.input.label), state)
        if result.error is not None and is_unreachable(result):
            self.unreachable += 1
        elif self._unreachable_logged and result.status is not None:
            self._reachable_again()
        state.pending -= 1
        if state.closed and not state.pending:
            state.done()
        assert self.engine is not None  # results come from it
        error = self.engine.config_error
        if error and not self.config_stopped:
            self.config_stopped = True
            if self.args.on_config_error == "stop":
                log.error("stopping: %s", error)
                self.control.reader_scope.cancel()
            else:
                log.error("%s; marking the remaining lines config_error", error)

    # ----------------------------------------------------------------- control

    def stop_in_flight(self) -> None:
        """A forced stop: the pushes in flight end now (reported before ``send_many``'s
        cleanup resets them), and the results stop being consumed."""
        if self.engine is not None:
            for result in self.engine.abort_in_flight("stopped before APNs answered"):
                self._write(result)
        self._consume_scope.cancel()

    def reopen(self) -> None:
        """SIGHUP: reopen the output files."""
        self.out.reopen()

    async def _watch_unreachable(self, engine: Engine) -> None:
        """Say once when APNs becomes unreachable (input pauses: the pushes read so far wait
        for a connection, unread lines stay after the checkpoint) and when it is back."""
        timeout = self.settings.unavailable_timeout
        while True:
            await trio.sleep(min(1.0, timeout / 4))
            down = engine.pool.unavailable_for()
            if down >= timeout and not self._unreachable_logged:
                self._unreachable_logged = True
                log.warning("APNs unreachable for %.0f s (%s); input paused, unread lines stay "
                            "after the checkpoint; going on when a connection comes up",
                            down, engine.pool.last_error or "no connection")
            elif down == 0.0 and self._unreachable_logged:
                self._reachable_again()

    def _reachable_again(self) -> None:
        self._unreachable_logged = False
        log.warning("APNs reachable again: input resumed")

    def status(self, final: bool = False) -> None:
        """Report progress (a ``--workers`` child leaves that to its coordinator)."""
        if self.child:
            return
        engine = self.engine
        self.control.status(final, engine.pool.in_flight if engine is not None else 0,
                            engine.pool.unavailable_for() if engine is not None else 0.0)
        self.source.report(final)


def _la_payload(la: LiveActivityLine, given: dict[str, Any] | None) -> Payload:
    """The payload of a Live Activity line; keys of ``payload`` besides ``aps`` are kept."""
    from ..liveactivity import end_payload, start_payload, update_payload

    custom = {k: v for k, v in (given or {}).items() if k != "aps"}
    # what an event needs may be absent: it goes out without it, and APNs says what is wrong
    la_: Any = la
    if la.event == "start":
        return start_payload(
            attributes_type=la_.attributes_type, attributes=la_.attributes,
            content_state=la_.content_state, alert=la_.alert,
            input_push_token=la.input_push_token, input_push_channel=la.input_push_channel,
            stale_date=la.stale_date, relevance_score=la.relevance_score, custom=custom)
    if la.event == "update":
        return update_payload(la_.content_state, stale_date=la.stale_date,
                              relevance_score=la.relevance_score, alert=la.alert, custom=custom)
    return end_payload(la.content_state, dismissal_date=la.dismissal_date, alert=la.alert,
                       custom=custom)


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). ``ru_maxrss`` is inherited across fork and
    exec, so a daemon started by a big parent reported the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def task_count() -> int:
    """Tasks alive in this trio run (reported in the status: a leak would show)."""
    n, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n
