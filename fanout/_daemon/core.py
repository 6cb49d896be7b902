"""``fanout run``: the long-running daemon fed by stdin or NDJSON files.

Every input line is accounted for exactly once: one result per push (a fan-out line yields
one per token), one ``malformed`` result for a line that cannot be understood. For a file
input, a checkpoint records the byte offset up to which every line has its result written
and flushed; after a kill -9 a restart resumes there, and lines that may already have been
sent (up to the recorded high-water line) come out marked ``resent``.

Tasks (one nursery): a reader turns lines into prepared pushes and feeds them through a
small channel to ``Client.send_many`` (input is read only as fast as pushes complete); the
main task writes each result; a checkpointer flushes results and then advances the
checkpoint; a signal task handles SIGTERM/SIGINT (drain, then force) and SIGHUP (reopen
output files); a status task reports progress.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import trio

from .._exits import (
    EXIT_CONFIG,
    EXIT_FORCED,
    EXIT_OK,
    exit_code,
    is_unreachable,
)
from .._flow import drain, put
from ..errors import ConfigError, FanoutError, ValidationError
from ..payload import Prepared, PushTemplate, bundle_of
from . import checkpoint as ckpt
from .lines import LineError, ResultLine, decode_line, result_encoder
from .output import Output, OutputError

log = logging.getLogger("fanout.daemon")

HIGH_WATER_STEP = 1024    # lines: how far ahead the "may have been sent" mark is moved
CHANNEL_SIZE = 256
METRICS_INTERVAL = 1.0    # seconds between samples of the metrics' gauges and line counts
FORCED_FLUSH_S = 2.0      # after a forced stop: how long the last results may take to write


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

    def open_line(self, line: Any, high_water_step: int) -> LineState:
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
    __slots__ = ("input", "number", "start", "pending", "closed", "resend")

    def __init__(self, inp: InputState, number: int, start: int, resend: bool) -> None:
        self.input = inp
        self.number = number
        self.start = start
        self.pending = 0
        self.closed = False
        self.resend = resend

    def done(self) -> None:
        self.input.pending.pop(self.number, None)
        if self.input.on_done is not None:
            self.input.on_done(self.number)


class Tag:
    """What a push carries as its id: the caller's id and the line it came from."""

    __slots__ = ("line", "id")

    def __init__(self, line: LineState, id: Any) -> None:
        self.line = line
        self.id = id


# --------------------------------------------------------------------------- the daemon

class Daemon:
    def __init__(self, settings: Any, args: argparse.Namespace, inputs: list[str],
                 make_client: Callable[..., Any]) -> None:
        self.settings = settings
        self.args = args
        self.inputs = inputs
        self._make_client = make_client
        buffer = getattr(args, "output_buffer", 8.0)
        if not buffer > 0:
            raise ConfigError(f"--output-buffer must be more than 0 MB, not {buffer!r}")
        limit = int(buffer * (1 << 20))
        self.results = Output(args.results, limit=limit)
        self.invalid = Output(args.invalid_tokens, limit=limit) if args.invalid_tokens \
            else None
        self.counts: Counter[str] = Counter()
        self.lines_read = 0
        self.results_written = 0
        self.states: list[InputState] = []
        self.stopping = False
        self.forced = False
        self.config_stopped = False
        self.exit_code = EXIT_OK
        self.unreachable = 0        # pushes that ended because APNs was unreachable
        self._unreachable_logged = False
        self.client: Any = None
        self._nursery: trio.Nursery | None = None
        self._reader_scope = trio.CancelScope()
        self._consume_scope = trio.CancelScope()
        self._exit_scope: trio.CancelScope | None = None
        self.flushed = False        # every result written is out (the exit's sync returned)
        self._started = time.monotonic()
        self._status_tty = sys.stderr.isatty()
        from ..liveactivity import ActivityTracker

        self.tracker = ActivityTracker(args.la_budget, over_budget=args.la_over_budget)
        self.metrics: Any = None           # fanout.metrics.Metrics (--metrics)
        self.daemon_metrics: Any = None    # fanout.metrics.DaemonMetrics
        self._metrics_stop: Callable[[], None] | None = None

    # ----------------------------------------------------------------- main

    async def run(self) -> int:
        send, recv = trio.open_memory_channel[Prepared](CHANNEL_SIZE)
        extra = self._start_metrics()
        # APNs unreachable: wait (input pauses, nothing turns into failures) unless told
        extra["on_unavailable"] = getattr(self.args, "on_unavailable", "wait")
        try:
            client = self._make_client(self.settings, on_invalid_token=self._on_invalid, **extra)
        except BaseException:
            self._stop_metrics()
            raise
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._signals)
                async with client:
                    self.client = client
                    # everything made so far (imports, config, connections) lives as long
                    # as the process: keep it out of full collections, 20-30 ms stalls that
                    # decide the tail latency (bench/latency.py --no-gc-freeze)
                    gc.collect()
                    gc.freeze()
                    nursery.start_soon(self._read_all, send)
                    nursery.start_soon(self._checkpointer)
                    nursery.start_soon(self._status_loop)
                    nursery.start_soon(self._watch_unreachable)
                    if self.metrics is not None:
                        nursery.start_soon(self._metrics_loop)
                    with self._consume_scope:
                        async for result in client.send_many(drain(recv)):
                            self._write(result)
                    await self._flush_at_exit()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            one = self._one_error(group)
            if one is not None:
                raise one from None  # one clear line, not a traceback per task
            raise
        finally:
            self._finish()
            self._stop_metrics()
        if self.client is not None and self.client.config_error:
            print(f"fanout run: {self.client.config_error}", file=sys.stderr)
            return EXIT_CONFIG
        if self.forced:
            return EXIT_FORCED
        return max(self.exit_code, exit_code(self.counts, unreachable=self.unreachable))

    def _one_error(self, group: BaseExceptionGroup) -> BaseException | None:
        """The one error to report for ``group``: the output's failure, or a named problem
        (a checkpoint that does not match ...) when the group holds only such problems."""
        failed = self._output_failed()
        if failed is not None and group.subgroup(OutputError) is not None:
            return failed
        ours = group.subgroup(FanoutError)
        if ours is not None and group.split(FanoutError)[1] is None:
            leaf: BaseException = ours
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf
        return None

    def _output_failed(self) -> OutputError | None:
        """The error of the results or dead-token output, if one failed (a --workers child
        writes frames instead: they have no such state)."""
        for out in (self.results, self.invalid):
            failed = getattr(out, "failed", None)
            if failed is not None:
                return failed
        return None

    async def _flush_at_exit(self) -> None:
        """Wait until every result is written: as long as the reader of a pipe takes, but
        within the drain deadline once stopping, and briefly after a forced stop (a third
        signal gives up at once). What is not written is not covered by the checkpoint."""
        self._exit_scope = scope = trio.CancelScope()
        if self.forced:
            scope.deadline = trio.current_time() + FORCED_FLUSH_S
        with scope:
            await self.results.sync()
            if self.invalid is not None:
                await self.invalid.sync()
            self.flushed = True
        if not self.flushed and self._output_failed() is None:
            log.error("%s did not take the last %d bytes of results before the stop; the "
                      "checkpoint stays before their lines, which the next run sends again "
                      "(marked resent)", self.results.name, self.results.backlog)

    def _finish(self) -> None:
        """Close the outputs, then record the checkpoints if every result is out."""
        self._sample_metrics()
        self.results.close()
        if self.invalid is not None:
            self.invalid.close()
        if not self.flushed or self._output_failed() is not None:
            # results were lost: the checkpoint stays where the last whole write left it
            self._status(final=True)
            return
        for state in self.states:
            # nothing past the last line handed to the engine can have been sent
            line, offset = state.prefix()
            state.high_water = max(line, min(state.high_water, state.last_sent_line))
            state.record(line, offset)
        self._status(final=True)

    # ----------------------------------------------------------------- metrics

    def _start_metrics(self) -> dict[str, Any]:
        """--metrics: Metrics as the client's events and the HTTP endpoint; a --workers
        child (--metrics-child) records into PROMETHEUS_MULTIPROC_DIR and serves nothing."""
        child = getattr(self.args, "metrics_child", False)
        listen = getattr(self.args, "metrics", None)
        if not (child or listen) or self._make_client is None:
            return {}
        from ..metrics import Metrics

        self.metrics = Metrics(daemon=not child)
        self.daemon_metrics = self.metrics.daemon
        if listen and not child:
            self._serve_metrics(listen, self.metrics.registry)
        return {"events": self.metrics}

    def _serve_metrics(self, listen: str, registry: Any) -> None:
        from ..metrics import serve

        try:
            _, self._metrics_stop = serve(listen, registry)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _stop_metrics(self) -> None:
        if self._metrics_stop is not None:
            self._metrics_stop()
            self._metrics_stop = None

    def _sample_metrics(self) -> None:
        if self.metrics is not None and self.client is not None:
            self.metrics.sample(self.client)
        if self.daemon_metrics is not None:
            lag = 0
            for state in self.states:
                if state.checkpoint_path is not None:
                    lag += state.last_line - (state.saved[0] if state.saved else 0)
                else:  # no checkpoint: the lines whose results are not all written
                    lag += state.last_line - state.prefix()[0]
            self.daemon_metrics.update(self.lines_read, self.counts["malformed"],
                                       self.results_written, lag)

    async def _metrics_loop(self) -> None:
        while True:
            self._sample_metrics()
            await trio.sleep(METRICS_INTERVAL)

    # ----------------------------------------------------------------- input

    async def _read_all(self, send: trio.MemorySendChannel[Prepared]) -> None:
        from .reader import input_identity, read_lines

        async with send:
            with self._reader_scope:
                labelled = len(self.inputs) > 1
                for path in self.inputs:
                    state = self._open_input(path, labelled)
                    if state is None:
                        continue
                    self.states.append(state)
                    start_line, start_offset = state.last_line, state.last_end
                    async for line in read_lines(
                            None if path == "-" else path, start_offset=start_offset,
                            start_line=start_line, follow=self.args.follow,
                            max_line_bytes=self.args.max_line_bytes):
                        if self.results.over:  # a slow reader of the results: wait
                            await self.results.room()
                        identity = getattr(line, "identity", None)
                        if identity and identity != (state.dev, state.ino):
                            state.dev, state.ino = identity  # rotated (follow mode)
                        await self._line(state, line, send)
                    if path != "-":
                        try:
                            state.dev, state.ino = input_identity(path)
                        except OSError:
                            pass

    def _open_input(self, path: str, labelled: bool) -> InputState | None:
        from .reader import input_identity

        label = path if labelled else None
        if path == "-" or self.args.no_checkpoint:
            return InputState(path, label, None)
        cp_path = self.args.checkpoint or ckpt.default_path(path)
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

    async def _line(self, inp: InputState, line: Any,
                    send: trio.MemorySendChannel[Prepared]) -> None:
        number = line.number
        self.lines_read += 1
        state = inp.open_line(line, max(HIGH_WATER_STEP, self.settings.max_in_flight))
        if inp.high_water_due:
            await inp.save_high_water()
        if line.error:
            self._malformed(state, line.error)
            return
        try:
            push = decode_line(line.data)
        except LineError as exc:
            self._malformed(state, str(exc))
            return
        except Exception as exc:  # a decoder surprise must cost one line, not the daemon
            log.error("line %d: unexpected %s while decoding", number, type(exc).__name__)
            self._malformed(state, f"could not be decoded ({type(exc).__name__})")
            return
        env = push.environment
        if env is not None and env != self.settings.environment and not self.settings.team:
            self._end_line(state, "config_error",
                           f"environment {env}: this daemon sends to {self.settings.environment}"
                           f" only (give [[team]] tables to send to both)", id=push.id)
            return
        if push.live_activity is not None or push.channel_id is not None:
            await self._single(state, push, send)
            return
        try:
            template = PushTemplate(
                push.payload, push_type=push.push_type or "alert", topic=push.topic,
                default_topic=self.settings.topic, priority=push.priority,
                expiration=push.expiration, collapse_id=push.collapse_id, apns_id=push.apns_id)
            tokens = self._tokens(push)
        except (ValidationError, ConfigError) as exc:
            self._malformed(state, str(exc))
            return
        except (TypeError, ValueError) as exc:  # a payload of a shape nothing expected
            self._malformed(state, f"invalid push: {exc}"[:300])
            return
        try:
            for token in tokens:
                try:
                    prepared = template.for_token(token, Tag(state, push.id))
                    prepared.environment = env
                except ValidationError as exc:
                    self._emit(ResultLine(id=push.id, line=number, outcome="rejected",
                                          token=token if len(token) < 600 else None,
                                          error=str(exc), input=inp.label), state)
                    continue
                state.pending += 1
                await put(send, prepared)  # no checkpoint while the channel has room
                inp.last_sent_line = number
        except OSError as exc:  # tokens_file unreadable midway
            self._emit(ResultLine(id=push.id, line=number, outcome="malformed",
                                  error=f"tokens_file {push.tokens_file}: {exc.strerror}",
                                  input=inp.label), state)
        state.closed = True
        if not state.pending:
            state.done()

    async def _single(self, state: LineState, push: Any,
                      send: trio.MemorySendChannel[Prepared]) -> None:
        """A broadcast (``channel_id``) or a Live Activity push (``live_activity``)."""
        from ..client import prepare_broadcast
        from ..liveactivity import (
            end_payload,
            notification,
            prepare_stamped,
            start_payload,
            update_payload,
        )
        from ..payload import Notification, Payload, decode_payload

        la = push.live_activity
        priority = push.priority if push.priority is not None else 10
        try:
            if la is not None:
                custom = {k: v for k, v in (push.payload or {}).items() if k != "aps"}
                if la.event == "start":
                    payload: Any = start_payload(
                        attributes_type=la.attributes_type, attributes=la.attributes,
                        content_state=la.content_state, alert=la.alert,
                        input_push_token=la.input_push_token,
                        input_push_channel=la.input_push_channel, stale_date=la.stale_date,
                        relevance_score=la.relevance_score, custom=custom)
                elif la.event == "update":
                    payload = update_payload(la.content_state, stale_date=la.stale_date,
                                             relevance_score=la.relevance_score,
                                             alert=la.alert, custom=custom)
                else:
                    payload = end_payload(la.content_state, dismissal_date=la.dismissal_date,
                                          alert=la.alert, custom=custom)
                if la.activity_id is not None:
                    decision = self.tracker.decide(
                        la.activity_id, time.time() if la.source_time is None
                        else la.source_time, priority)
                    while decision.wait:
                        await trio.sleep(decision.wait)
                        decision = self.tracker.decide(la.activity_id, la.source_time or
                                                       time.time(), priority)
                    if decision.superseded:
                        self._end_line(state, "superseded",
                                       f"older than the last update sent for {la.activity_id}",
                                       id=push.id, token=push.token, channel_id=push.channel_id)
                        return
                    priority = decision.priority
            else:
                payload = decode_payload(push.payload) if "aps" in push.payload \
                    else push.payload
            tag = Tag(state, push.id)
            if push.channel_id is not None:
                bundle = bundle_of(push.topic or self.settings.topic or "")
                body = payload.encode() if isinstance(payload, Payload) else payload
                prepared = prepare_broadcast(
                    push.channel_id, body, bundle_id=bundle or None, priority=priority,
                    expiration=0 if push.expiration is None else push.expiration,
                    apns_id=push.apns_id, id=tag)
                if la is not None and b'"timestamp":4102444800' in prepared.body:
                    from ..liveactivity import Stamper

                    prepared.stamp = Stamper(prepared.body)
            elif la is not None:
                prepared = prepare_stamped(
                    notification(push.token, payload, push.topic or self.settings.topic or "",
                                 priority=priority, expiration=push.expiration,
                                 apns_id=push.apns_id, id=tag))
            else:
                prepared = prepare_stamped(Notification(
                    token=push.token, payload=payload, push_type=push.push_type or "alert",
                    topic=push.topic, priority=push.priority, expiration=push.expiration,
                    collapse_id=push.collapse_id, apns_id=push.apns_id, id=tag),
                    default_topic=self.settings.topic)
        except (ValidationError, ConfigError) as exc:
            self._malformed(state, str(exc))
            return
        prepared.environment = push.environment
        state.pending += 1
        await put(send, prepared)
        state.input.last_sent_line = state.number
        state.closed = True

    @staticmethod
    def _tokens(push: Any) -> Iterator[str] | list[str]:
        if push.token is not None:
            return [push.token]
        if push.tokens is not None:
            return push.tokens
        path = push.tokens_file
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

    def _malformed(self, state: LineState, error: str) -> None:
        self._end_line(state, "malformed", error)

    def _end_line(self, state: LineState, outcome: str, error: str, id: Any = None,
                  **fields: Any) -> None:
        """A line that sends nothing: its one result, and it is done."""
        self._emit(ResultLine(id=id, line=state.number, outcome=outcome, error=error,
                              input=state.input.label, **fields), state)
        state.closed = True
        state.done()

    def _emit(self, record: ResultLine, state: LineState) -> None:
        if state.resend:
            record.resent = True
        self.results.write(result_encoder.encode(record) + b"\n")
        self.counts[record.outcome] += 1
        self.results_written += 1

    def _write(self, result: Any) -> None:
        tag = result.id
        state = tag.line
        latency = result.latency_ms
        self._emit(ResultLine(
            id=tag.id, line=state.number, outcome=str(result.outcome), token=result.token,
            channel_id=result.channel_id,
            status=result.status, reason=result.reason, apns_id=result.apns_id,
            timestamp=result.timestamp, attempts=result.attempts,
            latency_ms=round(latency, 3) if latency is not None else None, error=result.error,
            resent=result.resent,
            input=state.input.label, team=result.team, environment=result.environment,
            wrong_environment=result.wrong_environment), state)
        if result.error is not None and is_unreachable(result):
            self.unreachable += 1
        elif self._unreachable_logged and result.status is not None:
            self._reachable_again()
        state.pending -= 1
        if state.closed and not state.pending:
            state.done()
        if self.client.config_error and not self.config_stopped:
            self.config_stopped = True
            if self.args.on_config_error == "stop":
                log.error("stopping: %s", self.client.config_error)
                self._reader_scope.cancel()
            else:
                log.error("%s; marking the remaining lines config_error",
                          self.client.config_error)

    def _on_invalid(self, token: str, reason: str | None, timestamp: int | None) -> None:
        if self.invalid is not None:
            self.invalid.write(json.dumps({"token": token, "reason": reason,
                                           "timestamp": timestamp}).encode() + b"\n")

    async def _checkpointer(self) -> None:
        while True:
            await trio.sleep(self.args.checkpoint_interval)
            snapshot = [(s, s.prefix()) for s in self.states if s.checkpoint_path]
            await self.results.sync()    # results first ...
            if self.invalid is not None:
                await self.invalid.sync()
            for state, (line, offset) in snapshot:   # ... then the checkpoint that covers them
                await state.save(line, offset)

    # ----------------------------------------------------------------- control

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    log.info("SIGHUP: reopening output files")
                    self._reopen()
                elif not self.stopping:
                    self.stopping = True
                    log.warning("%s: no more input; draining pushes in flight (up to %g s)",
                                signal.Signals(sig).name, self.args.drain_timeout)
                    self._reader_scope.cancel()
                    self._nursery.start_soon(self._drain_deadline)
                else:
                    self._force(f"second {signal.Signals(sig).name}")

    def _force(self, why: str) -> None:
        if self.forced:
            self._hurry_exit_flush(again=True)
            return
        log.warning("%s: stopping now; pushes in flight are reported maybe_delivered", why)
        self.forced = True
        self._reader_scope.cancel()
        self._stop_in_flight()
        self._hurry_exit_flush()

    def _stop_in_flight(self) -> None:
        """A forced stop: end what is in flight now (the coordinator signals its workers)."""
        if self.client is not None:  # report them before send_many's cleanup resets them
            for result in self.client.abort_in_flight("stopped before APNs answered"):
                self._write(result)
        self._consume_scope.cancel()

    def _hurry_exit_flush(self, again: bool = False) -> None:
        """A forced stop while the last results are being written: give them a little
        longer, or (another signal) none at all."""
        scope = self._exit_scope
        if scope is not None:
            scope.deadline = min(scope.deadline, trio.current_time() + FORCED_FLUSH_S)
            if again:
                scope.cancel()

    def _reopen(self) -> None:
        self.results.reopen()
        if self.invalid is not None:
            self.invalid.reopen()

    async def _drain_deadline(self) -> None:
        await trio.sleep(self.args.drain_timeout)
        self._force(f"drain timeout ({self.args.drain_timeout:g} s)")

    async def _watch_unreachable(self) -> None:
        """Say once when APNs becomes unreachable (input pauses: the pushes read so far wait
        for a connection, unread lines stay after the checkpoint) and when it is back."""
        timeout = self.settings.unavailable_timeout
        while True:
            await trio.sleep(min(1.0, timeout / 4))
            down = self.client.pool.unavailable_for()
            if down >= timeout and not self._unreachable_logged:
                self._unreachable_logged = True
                log.warning("APNs unreachable for %.0f s (%s); input paused, unread lines stay "
                            "after the checkpoint; going on when a connection comes up",
                            down, self.client.pool.last_error or "no connection")
            elif down == 0.0 and self._unreachable_logged:
                self._reachable_again()

    def _reachable_again(self) -> None:
        self._unreachable_logged = False
        log.warning("APNs reachable again: input resumed")

    async def _status_loop(self) -> None:
        interval = 1.0 if self._status_tty else self.args.status_interval
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            self._status()

    def _status(self, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        in_flight = self.client.pool.in_flight if self.client is not None else 0
        info = {"lines": self.lines_read, "results": self.results_written,
                "per_s": round(self.results_written / elapsed, 1), "in_flight": in_flight,
                "counts": dict(sorted(self.counts.items())), "tasks": _task_count(),
                "unreachable_s": round(self.client.pool.unavailable_for(), 1)
                if self.client is not None else 0.0,
                "max_rss_mb": round(peak_rss_mb(), 1)}
        if self._status_tty and not final:
            counts = " ".join(f"{k}={v:,}" for k, v in info["counts"].items())
            sys.stderr.write(f"\r{info['lines']:,} lines  {info['per_s']:,.0f}/s  "
                             f"in flight {in_flight}  {counts}\x1b[K")
            sys.stderr.flush()
            return
        if self._status_tty:
            sys.stderr.write("\n")
        if self.args.log_format == "json":
            print(json.dumps({"event": "final" if final else "status", **info}),
                  file=sys.stderr, flush=True)
        else:
            log.warning("%s: %s", "final" if final else "status",
                        " ".join(f"{k}={v}" for k, v in info.items()))


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


def _task_count() -> int:
    """Tasks alive in this trio run (reported in the status: a leak would show)."""
    n, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n
