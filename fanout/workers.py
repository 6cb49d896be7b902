"""``fanout run --workers N``: N engine processes over one input.

The coordinator reads the input, keeps the one checkpoint and writes the one results
stream; each worker is ``fanout run --child`` with its own connections. Lines go to the
worker with the fewest lines outstanding as ``NUMBER\\tRESENT\\tLINE``; workers answer
``R\\t<result json>`` per result and ``D\\tNUMBER`` when a line is complete, which is what
advances the checkpoint. Workers run in their own session (a terminal's Ctrl-C reaches the
coordinator only). Drain: the coordinator closes the workers' stdin; force: it sends them
SIGTERM and they report what was in flight as maybe_delivered.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import msgspec
import trio

from .daemon import (
    CHILD_SETTINGS_ENV,
    EXIT_CONFIG,
    EXIT_FORCED,
    EXIT_OK,
    Daemon,
    InputState,
    LineState,
)
from .lines import ResultLine

log = logging.getLogger("fanout.workers")

MAX_LINES_PER_WORKER = 4096
FLUSH_BYTES = 64 * 1024
FLUSH_INTERVAL = 0.005


class Worker:
    def __init__(self, index: int, proc: trio.Process) -> None:
        self.index = index
        self.proc = proc
        self.outstanding = 0
        self.buffer = bytearray()
        self.results = 0
        self.lock = trio.Lock()


class Coordinator(Daemon):
    """Reads input and keeps the books like the single-process daemon; the sending is
    done by the workers."""

    def __init__(self, settings: Any, args: argparse.Namespace, inputs: list[str]) -> None:
        super().__init__(settings, args, inputs, make_client=None)
        self.workers: list[Worker] = []
        self._room = trio.Event()
        self._by_number: dict[int, LineState] = {}
        self._config_errors = 0

    async def run(self) -> int:
        env = dict(os.environ)
        env[CHILD_SETTINGS_ENV] = msgspec.json.encode(self.settings).decode()
        cmd = [sys.executable, "-m", "fanout", "run", "--child", "--checkpoint-interval",
               "0.02", "--max-line-bytes", str(self.args.max_line_bytes),
               "--on-config-error", self.args.on_config_error,
               "--la-budget", str(self.args.la_budget),
               "--la-over-budget", self.args.la_over_budget]
        if self.args.invalid_tokens:
            cmd += ["--invalid-tokens", self.args.invalid_tokens]
        metrics_dir = self._start_worker_metrics(env, cmd)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for i in range(self.args.workers):
                    proc = await trio.lowlevel.open_process(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                        start_new_session=True)
                    worker = Worker(i, proc)
                    self.workers.append(worker)
                    nursery.start_soon(self._collect, worker)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._checkpointer)
                nursery.start_soon(self._status_loop)
                nursery.start_soon(self._flusher)
                if self.daemon_metrics is not None:
                    nursery.start_soon(self._metrics_loop)
                await self._distribute()
                for worker in self.workers:  # drain: no more input
                    await self._flush(worker)
                    await worker.proc.stdin.aclose()
                with trio.CancelScope(shield=True):
                    for worker in self.workers:
                        await worker.proc.wait()
                        self._worker_dead(worker, metrics_dir)
                nursery.cancel_scope.cancel()
        finally:
            for worker in self.workers:
                if worker.proc.returncode is None:
                    worker.proc.kill()
            self._finish()
            self._stop_metrics()
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        codes = [w.proc.returncode for w in self.workers]
        if EXIT_CONFIG in codes:
            print("fanout run: a worker stopped on a configuration error (see above)",
                  file=sys.stderr)
            return EXIT_CONFIG
        return EXIT_FORCED if self.forced else EXIT_OK

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

        from .metrics import DaemonMetrics

        path = tempfile.mkdtemp(prefix="fanout-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = path
        cmd.append("--metrics-child")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        self.daemon_metrics = DaemonMetrics(registry)
        try:
            self._serve_metrics(self.args.metrics, registry)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return path

    @staticmethod
    def _worker_dead(worker: Worker, metrics_dir: str | None) -> None:
        """Drop an exited worker's live gauges (its counters keep counting in the sum)."""
        if metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.proc.pid, metrics_dir)

    # ----------------------------------------------------------------- input

    async def _distribute(self) -> None:
        from .reader import read_lines

        with self._reader_scope:
            labelled = len(self.inputs) > 1
            for path in self.inputs:
                state = self._open_input(path, labelled)
                self.states.append(state)
                if labelled:
                    await self._wait_input_done()  # line numbers restart per input
                    for worker in self.workers:
                        worker.buffer += b"I\t" + path.encode() + b"\n"
                async for line in read_lines(
                        None if path == "-" else path, start_offset=state.last_end,
                        start_line=state.last_line, follow=self.args.follow,
                        max_line_bytes=self.args.max_line_bytes):
                    await self._dispatch(state, line)

    async def _wait_input_done(self) -> None:
        while self._by_number:
            self._room = trio.Event()
            await self._room.wait()

    async def _dispatch(self, inp: InputState, line: Any) -> None:
        number = line.number
        self.lines_read += 1
        state = inp.open_line(line, max(1024, MAX_LINES_PER_WORKER * len(self.workers)))
        if line.error:
            self._malformed(state, line.error)
            return
        while True:
            worker = min(self.workers, key=lambda w: w.outstanding)
            if worker.outstanding < MAX_LINES_PER_WORKER:
                break
            self._room = trio.Event()
            await self._room.wait()
        worker.outstanding += 1
        self._by_number[number] = state
        worker.buffer += b"%d\t%d\t" % (number, state.resend) + line.data + b"\n"
        inp.last_sent_line = number
        if len(worker.buffer) >= FLUSH_BYTES:
            await self._flush(worker)

    async def _flush(self, worker: Worker) -> None:
        async with worker.lock:
            if not worker.buffer:
                return
            data = bytes(worker.buffer)
            worker.buffer.clear()
            try:
                await worker.proc.stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.error("worker %d stopped taking input", worker.index)

    async def _flusher(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            for worker in self.workers:
                if worker.buffer:
                    await self._flush(worker)

    # ----------------------------------------------------------------- output

    async def _collect(self, worker: Worker) -> None:
        buf = bytearray()
        while True:
            data = await worker.proc.stdout.receive_some(1 << 16)
            if not data:
                break
            buf += data
            end = buf.rfind(b"\n")
            if end < 0:
                continue
            for rec in bytes(buf[:end]).split(b"\n"):
                kind, _, rest = rec.partition(b"\t")
                if kind == b"R":
                    self.results.write(rest + b"\n")
                    self.results_written += 1
                    worker.results += 1
                    outcome = _outcome(rest)
                    self.counts[outcome] += 1
                elif kind == b"D":
                    state = self._by_number.pop(int(rest), None)
                    if state is not None:
                        state.done()
                        worker.outstanding -= 1
                        self._room.set()
            del buf[:end + 1]

    def _malformed(self, state: LineState, error: str) -> None:
        self._emit(ResultLine(id=None, line=state.number, outcome="malformed", error=error,
                              input=state.input.label), state)
        state.done()

    # ----------------------------------------------------------------- control

    def _force(self, why: str) -> None:
        if self.forced:
            return
        log.warning("%s: stopping now; pushes in flight are reported maybe_delivered", why)
        self.forced = True
        self._reader_scope.cancel()
        for worker in self.workers:
            if worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGTERM)

    def _reopen(self) -> None:
        super()._reopen()
        for worker in self.workers:  # they write the invalid-tokens file
            if worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGHUP)

    def _status(self, final: bool = False) -> None:
        super()._status(final)
        if final:
            per = ", ".join(f"worker {w.index}: {w.results}" for w in self.workers)
            log.info("results per worker: %s", per)


_OUTCOME = b'"outcome":"'


def _outcome(record: bytes) -> str:
    i = record.find(_OUTCOME)
    if i < 0:
        return "unknown"
    j = record.find(b'"', i + len(_OUTCOME))
    return record[i + len(_OUTCOME):j].decode()
