"""What every daemon and the ``--workers`` coordinator share (:class:`Control`): the
books, the stop (drain, then force), signals, the status line, the end of a run."""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ConfigError, FanoutError
from .lines import ResultLine
from .output import OutputError
from .seams import Owner, Sink
from .state import InputState, LineState

if TYPE_CHECKING:
    from ..metrics import DaemonMetrics

log = logging.getLogger("fanout.daemon")

METRICS_INTERVAL = 1.0    # seconds between samples of the metrics' gauges and line counts
FORCED_FLUSH_S = 2.0      # after a forced stop: how long the last results may take to write


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

    def serve_metrics(self, listen: str, registry: Any,
                      ready: Callable[[], tuple[bool, str]] | None = None) -> None:
        """``--metrics [HOST:]PORT``: serve ``registry`` (``/metrics``), ``/healthz`` and
        ``/readyz`` (``ready()``; not ready once stopping) until the run ends."""
        from ..metrics import serve

        def readiness() -> tuple[bool, str]:
            if self.stopping:
                return False, "stopping: draining the pushes in flight"
            return ready() if ready is not None else (True, "ready")

        try:
            _, self._metrics_stop = serve(listen, registry, readiness)
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
        event = "final" if final else "status"
        log.info("%s: %s", event, " ".join(f"{k}={v}" for k, v in info.items()),
                 extra={"event": event, "fields": info})


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
