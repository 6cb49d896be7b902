"""``fanout run --workers N``: N engine processes over one input.

The coordinator reads the input in blocks of whole lines, keeps the one checkpoint and
writes the one results stream; each worker is ``fanout run --child`` with its own
connections. Nothing here costs a Python step per line: a block goes to the worker with
the fewest lines outstanding as ``B FIRST RESEND_UNTIL NBYTES\n`` and its bytes; a worker
answers with ``R NBYTES COUNTS\n`` frames of finished result lines (written through
verbatim; COUNTS is ``outcome=n,...``) and ``D FIRST`` once every line of a block has its
results, which is what advances the checkpoint. A worker that dies has its unfinished
blocks sent to the others, marked resent. Workers run in their own session (a terminal's
Ctrl-C reaches the coordinator only). Drain: the coordinator closes the workers' stdin;
force: it sends them SIGTERM and they report what was in flight as maybe_delivered.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from .._exits import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_FORCED,
    EXIT_OUTPUT,
    EXIT_UNREACHABLE,
    exit_code,
    most_serious,
)
from .control import Control
from .core import HIGH_WATER_STEP, Daemon
from .files import FileSink, end_identity, note_identity, open_input
from .output import Output, OutputError, Outputs, output_limit
from .reader import InputBlock, InputLine, split_block
from .seams import Engine, LineHandler
from .state import InputState, LineState

if TYPE_CHECKING:
    from ..metrics import DaemonMetrics

log = logging.getLogger("fanout.workers")


def child_settings(settings: Any, workers: int) -> Any:
    """What each of ``workers`` engine processes is given: ``rate`` and ``topic_rates``
    are global limits, so each worker gets its share (a rate of 1,000 with two workers
    sent 2,111 pushes/s when each took the whole rate)."""
    rate = settings.rate / workers if settings.rate else settings.rate
    topic_rates = {topic: r / workers for topic, r in settings.topic_rates.items()}
    return msgspec.structs.replace(settings, rate=rate, topic_rates=topic_rates)


CHILD_SETTINGS_ENV = "FANOUT_CHILD_SETTINGS"  # a worker child's settings, as JSON
# The coordinator's cost is per wake-up of its loop, not per line: big blocks, big frames
# and wide pipes keep it at about 1 us per push (2.1 with 64 KiB blocks, 64 KiB pipes and
# 4 KiB frame writes; bench/scaling.py).
MAX_LINES_PER_WORKER = 8192   # lines handed to a worker and not yet done (>= 3 blocks)
BLOCK_BYTES = 256 * 1024      # input read (and handed on) this much at a time
FRAME_BYTES = 64 * 1024       # a worker sends its results at least this often
PIPE_BYTES = 1 << 20          # each worker's stdin and stdout, where Linux allows it
WORKER_EXIT_S = 5.0           # after a forced stop: how long a worker has to exit (then SIGKILL)


def widen_pipe(stream: object) -> None:
    """Make the pipe under ``stream`` hold ``PIPE_BYTES`` (Linux), so a whole block or
    frame goes in one write and wakes the reader once; left as it is where that is
    refused or unknown."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # type: ignore[attr-defined]  # a trio FdStream
    except (ImportError, AttributeError, OSError):
        pass


class Worker:
    """One worker process and the lines it has not finished."""

    def __init__(self, index: int, proc: trio.Process) -> None:
        self.index = index
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None  # opened with PIPE
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.alive = True
        self.outstanding = 0     # lines
        self.results = 0
        self.lock = trio.Lock()  # one block at a time on its stdin


class Sent:
    """A block handed to a worker and not yet done."""

    __slots__ = ("state", "block", "lines", "resend_until", "worker")

    def __init__(self, state: LineState, block: InputBlock | InputLine,
                 resend_until: int) -> None:
        self.state = state
        self.block = block
        self.lines = block.last - block.number + 1
        self.resend_until = resend_until
        self.worker: Worker | None = None


class Coordinator:
    """Reads the input and keeps the books like the single-process daemon (the same
    :class:`~fanout._daemon.control.Control`, inputs and sink); the sending is done by the
    workers."""

    def __init__(self, settings: Any, args: argparse.Namespace, inputs: list[str]) -> None:
        self.settings = settings
        self.args = args
        self.inputs = inputs
        self.out = Outputs.for_args(args.results, args.invalid_tokens,
                                    getattr(args, "output_buffer", 8.0))
        self.states: list[InputState] = []
        self.control = Control(args, FileSink(self.out), self, self.states)
        self.daemon_metrics: DaemonMetrics | None = None    # --metrics
        self.workers: list[Worker] = []
        # parked on: a block done, a worker gone or a forced stop (every waiter rechecks;
        # a fresh Event per waiter, as before, lost the wake-up of a waiter it replaced)
        self._changed = trio.lowlevel.ParkingLot()
        self._by_number: dict[int, Sent] = {}
        self._writes: set[trio.CancelScope] = set()  # writes to a worker's stdin, now
        self._abandoned = False  # input left unread or unfinished: no worker to take it
        self._reaping: trio.CancelScope | None = None  # waiting for the workers to exit

    async def run(self) -> int:
        """Start the workers, hand them the input, wait for them; the exit code."""
        env = dict(os.environ)
        env[CHILD_SETTINGS_ENV] = msgspec.json.encode(
            child_settings(self.settings, self.args.workers)).decode()
        cmd = [sys.executable, "-m", "fanout", "run", "--child", "--checkpoint-interval",
               "0.02", "--max-line-bytes", str(self.args.max_line_bytes),
               "--on-config-error", self.args.on_config_error,
               "--on-unavailable", self.args.on_unavailable,
               "--la-budget", str(self.args.la_budget),
               "--la-over-budget", self.args.la_over_budget]
        if self.args.invalid_tokens:
            cmd += ["--invalid-tokens", self.args.invalid_tokens]
        metrics_dir = self._start_worker_metrics(env, cmd)
        try:
            with self.control.ending():
                try:
                    await self._run(cmd, env, metrics_dir)
                finally:
                    for worker in self.workers:
                        if worker.proc.returncode is None:
                            worker.proc.kill()
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        codes = [w.proc.returncode for w in self.workers]
        if EXIT_OUTPUT in codes:  # as one process: the results or dead tokens not written
            print("fanout run: a worker could not write its output (see above)",
                  file=sys.stderr)
            return EXIT_OUTPUT
        if EXIT_CONFIG in codes:
            print("fanout run: a worker stopped on a configuration error (see above)",
                  file=sys.stderr)
            return EXIT_CONFIG
        if self.control.forced:
            return EXIT_FORCED
        if self._abandoned:
            print("fanout run: every worker stopped before the input was done; the rest "
                  "is left to the next run", file=sys.stderr)
            return EXIT_FAILED
        # the results' own code (a killed worker's -9 says nothing of what it reported)
        # and the most serious of the workers' codes (fanout._exits): unreachable, failed
        return most_serious([exit_code(self.control.counts), *(
            c for c in codes if c in (EXIT_UNREACHABLE, EXIT_FAILED))])

    async def _run(self, cmd: list[str], env: dict[str, str], metrics_dir: str | None) -> None:
        control = self.control
        async with trio.open_nursery() as nursery:
            for i in range(self.args.workers):
                proc = await trio.lowlevel.open_process(
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                    start_new_session=True)
                worker = Worker(i, proc)
                widen_pipe(worker.stdin)
                widen_pipe(worker.stdout)
                self.workers.append(worker)
                nursery.start_soon(self._collect, worker)
            nursery.start_soon(control.signals, nursery)
            nursery.start_soon(control.checkpointer)
            nursery.start_soon(control.status_loop)
            if self.daemon_metrics is not None:
                nursery.start_soon(control.metrics_loop)
            await self._distribute()
            # every block done before the workers' stdin closes: a worker that dies now
            # still has its unfinished blocks taken by the others
            await self._wait_blocks_done()
            for worker in self.workers:  # drain: no more input
                async with worker.lock:
                    await worker.stdin.aclose()
            await self._reap(metrics_dir)
            await control.flush_at_exit()
            nursery.cancel_scope.cancel()

    async def _reap(self, metrics_dir: str | None) -> None:
        """Wait for every worker to exit: as long as they take after a drain, but only
        ``WORKER_EXIT_S`` after a forced stop (a worker that does not run any more, stopped
        or wedged, would hold the run forever); then SIGKILL."""
        with trio.CancelScope(shield=True) as scope:
            self._reaping = scope
            if self.control.forced:
                scope.deadline = trio.current_time() + WORKER_EXIT_S
            for worker in self.workers:
                await worker.proc.wait()
        self._reaping = None
        for worker in self.workers:
            if worker.proc.returncode is None:
                log.error("worker %d did not exit %g s after the forced stop: killed",
                          worker.index, WORKER_EXIT_S)
                worker.proc.kill()
        with trio.CancelScope(shield=True):
            for worker in self.workers:
                await worker.proc.wait()
                self._worker_dead(worker, metrics_dir)

    # ----------------------------------------------------------------- metrics

    def _start_worker_metrics(self, env: dict[str, str], cmd: list[str]) -> str | None:
        """--metrics: the workers record into a fresh PROMETHEUS_MULTIPROC_DIR (set in
        their environment only: this process keeps ordinary in-memory values, so its own
        line counters are not counted twice); one endpoint here serves their sum plus
        the coordinator's line counters."""
        if not getattr(self.args, "metrics", None):
            return None
        import tempfile

        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from ..metrics import DaemonMetrics

        path = tempfile.mkdtemp(prefix="fanout-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = path
        cmd.append("--metrics-child")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]  # untyped upstream
        self.daemon_metrics = DaemonMetrics(registry)
        try:
            self.control.serve_metrics(self.args.metrics, registry, self._ready)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return path

    @staticmethod
    def _worker_dead(worker: Worker, metrics_dir: str | None) -> None:
        """Drop an exited worker's live gauges (its counters keep counting in the sum)."""
        if metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.proc.pid, metrics_dir)  # type: ignore[no-untyped-call]  # untyped upstream

    def _ready(self) -> tuple[bool, str]:
        """``/readyz``: every worker is running."""
        gone = [w.index for w in self.workers if w.proc.returncode is not None]
        if not self.workers or gone:
            return False, ("starting" if not self.workers else
                           f"worker(s) {', '.join(map(str, gone))} exited")
        return True, "ready"

    def sample(self) -> None:
        """The coordinator's line counters, now."""
        self.control.sample_lines(self.daemon_metrics)

    # ----------------------------------------------------------------- input

    async def _distribute(self) -> None:
        from .reader import read_lines

        control = self.control
        step = max(HIGH_WATER_STEP, MAX_LINES_PER_WORKER * len(self.workers))
        results = self.out.results
        with control.reader_scope:
            labelled = len(self.inputs) > 1
            for path in self.inputs:
                state = open_input(path, path if labelled else None, self.args)
                self.states.append(state)
                if labelled:
                    await self._wait_input_done()  # line numbers restart per input
                    for worker in self.workers:
                        await self._send(worker, b"I " + path.encode() + b"\n")
                async for unit in read_lines(
                        None if path == "-" else path, start_offset=state.last_end,
                        start_line=state.last_line, follow=self.args.follow,
                        max_line_bytes=self.args.max_line_bytes, blocks=True,
                        chunk_size=BLOCK_BYTES):
                    note_identity(state, unit)
                    if unit.error is not None:  # a line too long, spanning blocks
                        control.lines_read += 1
                        control.malformed(state.open_line(unit, step), unit.error)
                        continue  # (sends nothing: the next block saves the high water)
                    control.lines_read += unit.last - unit.number + 1
                    if results.over:  # a slow reader of the results: wait
                        await results.room()
                    sent = Sent(state.open_line(unit, step), unit, state.resend_until)
                    if state.high_water_due:
                        await state.save_high_water()
                    await self._dispatch(sent)
                    state.last_sent_line = unit.last
                end_identity(state)

    async def _wait_input_done(self) -> None:
        while self._by_number:
            await self._changed.park()

    async def _wait_blocks_done(self) -> None:
        """Until every block handed out is done, or can no longer be (a forced stop, or no
        worker left to take it)."""
        while self._by_number and not self.control.forced and any(
                w.alive for w in self.workers):
            await self._changed.park()

    async def _dispatch(self, sent: Sent) -> None:
        """Hand ``sent`` to the live worker with the fewest lines outstanding, once it has
        room (a block bigger than the window goes to an idle worker)."""
        while True:
            live = [w for w in self.workers if w.alive]
            if not live:
                log.error("every worker has stopped: no more input is read")
                self._abandoned = True
                self.control.reader_scope.cancel()
                return
            worker = min(live, key=lambda w: w.outstanding)
            if not worker.outstanding or worker.outstanding + sent.lines <= MAX_LINES_PER_WORKER:
                break
            await self._changed.park()
        worker.outstanding += sent.lines
        sent.worker = worker
        block = sent.block
        self._by_number[block.number] = sent
        await self._send(worker, b"B %d %d %d\n" % (block.number, sent.resend_until,
                                                    len(block.data)) + block.data)

    async def _send(self, worker: Worker, data: bytes) -> None:
        """Write ``data`` whole: a drain (the reader cancelled) must not leave a block
        entered in the books unsent, or half written with the next block after it; only a
        forced stop (the workers are stopping) cuts a write short."""
        with trio.CancelScope(shield=True) as scope:
            self._writes.add(scope)
            if self.control.forced:
                scope.cancel()
            try:
                async with worker.lock:
                    await worker.stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.error("worker %d stopped taking input", worker.index)
            finally:
                self._writes.discard(scope)

    # ----------------------------------------------------------------- output

    async def _collect(self, worker: Worker) -> None:
        control = self.control
        buf = bytearray()
        while True:
            data = await worker.stdout.receive_some(1 << 18)
            if not data:
                break
            buf += data
            pos = 0
            while (nl := buf.find(b"\n", pos)) >= 0:
                if buf[pos] == 0x52:  # R NBYTES COUNTS
                    _, size, counts = bytes(buf[pos:nl]).split(b" ")
                    stop = nl + 1 + int(size)
                    if len(buf) < stop:
                        break
                    self.out.results.write(bytes(buf[nl + 1:stop]))
                    for item in counts.split(b","):
                        if item:
                            outcome, sep, n = item.partition(b"=")
                            if not sep:  # "-": no counts in this frame
                                continue
                            control.counts[outcome.decode()] += int(n)
                            control.results_written += int(n)
                            worker.results += int(n)
                    pos = stop
                else:  # D FIRST
                    sent = self._by_number.pop(int(buf[pos + 2:nl]), None)
                    if sent is not None:
                        sent.state.done()
                        worker.outstanding -= sent.lines
                        self._changed.unpark_all()
                    pos = nl + 1
            del buf[:pos]
        await self._worker_exited(worker)

    async def _worker_exited(self, worker: Worker) -> None:
        """A worker closed its output: it is exiting. Blocks it left unfinished go to the
        others, marked resent (they may have been sent), unless the run is stopping."""
        with trio.CancelScope(shield=True):
            code = await worker.proc.wait()
        worker.alive = False
        orphans = [s for s in self._by_number.values() if s.worker is worker]
        self._changed.unpark_all()
        forced = self.control.forced
        if code == EXIT_CONFIG and self.args.on_config_error == "stop":
            # as one process does: sending stops, the others end what they have
            log.error("worker %d stopped on a configuration error: no more input is read",
                      worker.index)
            self.control.reader_scope.cancel()
        if not orphans and code and not forced and code != EXIT_CONFIG:
            log.error("worker %d exited (code %s) with no lines unfinished", worker.index, code)
        if not orphans:
            return
        if forced or code == EXIT_CONFIG:  # left to a restart: not done, never resent here
            for sent in orphans:
                del self._by_number[sent.block.number]
            return
        lines = sum(s.lines for s in orphans)
        log.error("worker %d exited (code %s) with %d lines unfinished: handing them to the "
                  "other workers, marked resent", worker.index, code, lines)
        for sent in orphans:
            worker.outstanding -= sent.lines
            sent.resend_until = sent.block.last
            await self._dispatch(sent)

    # ----------------------------------------------------------------- control

    def stop_in_flight(self) -> None:
        """A forced stop: the workers end what they have in flight (SIGTERM)."""
        for worker in self.workers:
            if worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGTERM)
        for scope in self._writes:
            scope.cancel()
        if self._reaping is not None:
            self._reaping.deadline = min(self._reaping.deadline,
                                         trio.current_time() + WORKER_EXIT_S)
        self._changed.unpark_all()

    def reopen(self) -> None:
        """SIGHUP: reopen the results here, and the workers' invalid-tokens files."""
        self.out.reopen()
        for worker in self.workers:  # they write the invalid-tokens file
            if worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGHUP)

    def status(self, final: bool = False) -> None:
        """The status line, and at the end the results of each worker."""
        self.control.status(final, 0, 0.0)
        if final:
            per = ", ".join(f"worker {w.index}: {w.results}" for w in self.workers)
            log.info("results per worker: %s", per)


# --------------------------------------------------------------------------- worker side

class Frames:
    """A worker's stdout, to the coordinator: result lines gathered into ``R`` frames that
    carry their outcome counts; a control line goes out after every result before it.
    Written by an :class:`~fanout._daemon.output.Output` thread: a coordinator that stops reading
    (its own output is stalled) never blocks this worker's event loop."""

    def __init__(self, counts: Counter[str]) -> None:
        self._out = Output(None, records=False)
        self._buf = bytearray()
        self._counts = counts
        self._sent: Counter[str] = Counter()

    def write(self, data: bytes) -> None:
        """Result lines, for the next ``R`` frame."""
        self._buf += data
        if len(self._buf) >= FRAME_BYTES:
            self._frame()

    def control(self, line: bytes) -> None:
        """A control line (``D FIRST``), after every result written before it."""
        self._frame()
        self._out.write(line)
        self._out.push()

    def _frame(self) -> None:
        delta = self._counts - self._sent
        if not self._buf and not delta:
            return
        self._sent = self._counts.copy()
        counts = ",".join(f"{k}={v}" for k, v in delta.items()).encode() or b"-"
        self._out.write(b"R %d %s\n" % (len(self._buf), counts) + bytes(self._buf))
        self._buf.clear()

    @property
    def name(self) -> str:
        """Who reads the frames."""
        return "the coordinator"

    @property
    def failed(self) -> OutputError | None:
        """The error of the stdout, if writing to it failed."""
        return self._out.failed

    @property
    def closed(self) -> bool:
        """No more frames."""
        return self._out.closed

    @property
    def backlog(self) -> int:
        """Bytes not yet on the descriptor."""
        return self._out.backlog + len(self._buf)

    @property
    def over(self) -> bool:
        """Too much waits for the coordinator: stop reading input."""
        return self._out.over

    async def room(self) -> None:
        """Wait until the coordinator has taken enough."""
        await self._out.room()

    async def sync(self) -> None:
        """Everything written so far is out, in frames."""
        self._frame()
        await self._out.sync()

    def reopen(self) -> None:
        """Nothing to reopen: a pipe."""

    def close(self) -> None:
        """The last frame, then no more."""
        self._frame()
        self._out.close()


class BlockSource:
    """A worker's input: blocks of lines from the coordinator on stdin (``B FIRST
    RESEND_UNTIL NBYTES`` and the bytes; ``I LABEL`` when the next input begins). Once
    every line of a block has its results, ``D FIRST`` goes back in the frames."""

    def __init__(self, frames: Frames, max_line_bytes: int) -> None:
        self.frames = frames
        self.max_line_bytes = max_line_bytes
        self.state = InputState("-", None, None)
        self.state.on_done = self._line_done
        self.states = [self.state]
        self._blocks: list[list[int]] = []  # [first, last, lines not done]

    async def read(self, handle: LineHandler, nursery: trio.Nursery) -> None:
        """Every line of every block, until the coordinator closes stdin."""
        state = self.state
        stream = trio.lowlevel.FdStream(os.dup(0))
        buf = bytearray()
        async with stream:
            while data := await stream.receive_some(1 << 18):
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    kind, _, rest = bytes(buf[:nl]).partition(b" ")
                    if kind == b"I":
                        state.label = rest.decode("utf-8", "replace") or None
                        del buf[:nl + 1]
                        continue
                    first, resend_until, size = map(int, rest.split(b" "))
                    if len(buf) < nl + 1 + size:
                        break
                    body = bytes(buf[nl + 1:nl + 1 + size])
                    del buf[:nl + 1 + size]
                    await self._block(first, resend_until, body, handle)
            if buf:
                log.warning("input ended inside a block (the coordinator stopped while "
                            "sending it): its lines are left to a restart")

    async def _block(self, first: int, resend_until: int, body: bytes,
                     handle: LineHandler) -> None:
        lines = split_block(body, self.max_line_bytes)
        self._blocks.append([first, first + len(lines) - 1, len(lines)])
        self.state.resend_until = resend_until
        for i, (data, error) in enumerate(lines):
            await handle(self.state, InputLine(first + i, 0, 0, data, error))

    def _line_done(self, number: int) -> None:
        for block in self._blocks:
            if block[0] <= number <= block[1]:
                block[2] -= 1
                if not block[2]:
                    self._blocks.remove(block)
                    self.frames.control(b"D %d\n" % block[0])
                return

    def report(self, final: bool) -> None:
        """The coordinator reports."""

    def sample(self, metrics: DaemonMetrics) -> None:
        """No gauges of its own."""


def worker_daemon(settings: Any, args: argparse.Namespace,
                  make_engine: Callable[..., Engine]) -> Daemon:
    """``fanout run --child``: the single-process daemon, fed blocks by the coordinator
    and reporting through :class:`Frames` (its own dead-token file, if any)."""
    counts: Counter[str] = Counter()
    frames = Frames(counts)
    limit = output_limit(getattr(args, "output_buffer", 8.0))
    invalid = Output(args.invalid_tokens, limit=limit) if args.invalid_tokens else None
    return Daemon(settings, args, BlockSource(frames, args.max_line_bytes),
                  FileSink(Outputs(frames, invalid)), make_engine, child=True, counts=counts)
