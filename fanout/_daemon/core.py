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
import gc
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from .._exits import EXIT_CONFIG, EXIT_FORCED, exit_code, is_unreachable
from .._flow import drain, put
from .._logging import fatal
from ..errors import ConfigError, ValidationError
from ..outcome import Result
from ..payload import Payload, Prepared, PushTemplate, bundle_of
from .control import Control
from .lines import LineError, LiveActivityLine, PushLine, ResultLine, decode_line
from .reader import InputLine
from .seams import Engine, Sink, Source, engine_ready
from .state import InputState, LineState, Tag

if TYPE_CHECKING:
    from ..metrics import DaemonMetrics, Metrics

log = logging.getLogger("fanout.daemon")

HIGH_WATER_STEP = 1024    # lines: how far ahead the "may have been sent" mark is moved
CHANNEL_SIZE = 256
STAMP_MARKER = b'"timestamp":4102444800'  # liveactivity's send-time marker: to be stamped


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
            fatal("run", self.engine.config_error)
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
            self.control.serve_metrics(listen, self.metrics.registry, self.ready)
        return {"events": self.metrics}

    def ready(self) -> tuple[bool, str]:
        """``/readyz`` on the metrics port (read from its thread): the engine is up, has no
        configuration error, and APNs is reachable now."""
        return engine_ready(self.engine)

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
            template = line_template(push, self.settings.topic)
            tokens = line_tokens(push)
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
                payload = single_payload(push)
            prepared = prepare_single(
                push, payload, priority,
                Tag(state, push.id, priority if la is not None else None), self.settings.topic)
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
        # no source-time: not ordered (issue 18: "now" made later, correctly timed
        # updates superseded)
        decision = self.tracker.decide(la.activity_id, la.source_time, priority)
        while decision.wait:
            await trio.sleep(decision.wait)
            decision = self.tracker.decide(la.activity_id, la.source_time, priority)
        if decision.superseded:
            self.control.end_line(state, "superseded",
                                  f"older than the last update sent for {la.activity_id}",
                                  id=push.id, token=push.token, channel_id=push.channel_id)
            return None
        return decision.priority

    # ----------------------------------------------------------------- output

    def _write(self, result: Result) -> None:
        tag = result.id
        state: LineState = tag.line
        record = ResultLine.from_result(result, id=tag.id, line=state.number,
                                        input=state.input.label)
        if tag.priority is not None:
            record.priority = tag.priority
        self.control.emit(record, state)
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
            down = engine.unavailable_for()
            if down >= timeout and not self._unreachable_logged:
                self._unreachable_logged = True
                log.warning("APNs unreachable for %.0f s (%s); input paused, unread lines stay "
                            "after the checkpoint; going on when a connection comes up",
                            down, engine.last_error or "no connection")
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
        self.control.status(final, engine.in_flight if engine is not None else 0,
                            engine.unavailable_for() if engine is not None else 0.0)
        self.source.report(final)


# ------------------------------------------------- a line's pushes (also fanout serve's)

def line_template(push: PushLine, default_topic: str | None) -> PushTemplate:
    """The encode-once template of a token line (``token``, ``tokens``, ``tokens_file``);
    ValidationError or ConfigError for a payload or setting that cannot go."""
    assert push.payload is not None  # decode_line: a payload unless live_activity
    return PushTemplate(
        push.payload, push_type=push.push_type or "alert", topic=push.topic,
        default_topic=default_topic, priority=push.priority, expiration=push.expiration,
        collapse_id=push.collapse_id, apns_id=push.apns_id)


def single_payload(push: PushLine) -> Payload | dict[str, Any]:
    """The payload of a broadcast or Live Activity line: built from ``live_activity`` (its
    budget is the caller's), else ``payload`` (checked when it has ``aps``)."""
    from ..payload import decode_payload

    if push.live_activity is not None:
        return _la_payload(push.live_activity, push.payload)
    assert push.payload is not None  # decode_line: a payload unless live_activity
    return decode_payload(push.payload) if "aps" in push.payload else push.payload


def prepare_single(push: PushLine, payload: Payload | dict[str, Any], priority: int,
                   tag: Any, default_topic: str | None) -> Prepared:
    """The prepared push of a broadcast or of a Live Activity line."""
    from ..client import prepare_broadcast
    from ..liveactivity import Stamper, notification, prepare_stamped

    la = push.live_activity
    topic = push.topic or default_topic or ""
    if push.channel_id is not None:
        body = payload.encode() if isinstance(payload, Payload) else payload
        prepared = prepare_broadcast(
            push.channel_id, body, bundle_id=bundle_of(topic) or None, priority=priority,
            expiration=0 if push.expiration is None else push.expiration,
            apns_id=push.apns_id, id=tag)
        if la is not None and STAMP_MARKER in prepared.body:
            prepared.stamp = Stamper(prepared.body)
        return prepared
    # decode_line: with a token (not a broadcast) this is a Live Activity, its payload built
    assert push.token is not None and la is not None and isinstance(payload, Payload)
    return prepare_stamped(notification(
        push.token, payload, topic, priority=priority, expiration=push.expiration,
        apns_id=push.apns_id, id=tag))


def line_tokens(push: PushLine) -> Iterator[str] | list[str]:
    """The tokens of a token line; ``tokens_file`` read lazily (ConfigError if it cannot
    be opened)."""
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
