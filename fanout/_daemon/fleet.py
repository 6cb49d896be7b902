"""``fanout run --source redis://HOST:PORT/STREAM``: one daemon of a fleet sharing a Redis
Stream through a consumer group.

Each stream entry carries one push job in its ``push`` field (the same JSON as an NDJSON
input line). The daemon reads new entries (XREADGROUP ``>``), sends them through the same
engine as the file daemon, writes their results (``--results`` file or stdout, and/or
``--results-stream``), and only then acknowledges them (XACK, and XDEL unless
``--keep-acked``: the stream then holds only work not yet done, which is what
``fanout enqueue`` waits on). At-least-once: an entry is acked after its results are
written, so a daemon that dies leaves its entries pending; the live daemons take them
over once idle for ``--claim-idle`` seconds (XAUTOCLAIM) and their results say
``resent``. A daemon touches the entries it is still working on (XCLAIM to itself) so that
slow pushes are not taken from a live daemon. A poison entry (no ``push`` field, bad JSON)
gets a ``malformed`` result and is acked like any other: never retried forever.

Redis restarts and outages: commands fail fast, the reader retries every half second, and
a lost consumer group is created again. Acks and results that could not be written are
kept and retried; nothing is acked before its results are out.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from ..errors import ConfigError
from .core import Daemon
from .lines import ResultLine, result_encoder
from .output import Outputs
from .reader import InputLine
from .seams import Engine, LineHandler
from .state import InputState, LineState

if TYPE_CHECKING:
    from ..metrics import DaemonMetrics

log = logging.getLogger("fanout.fleet")

READ_COUNT = 256          # entries per XREADGROUP
BLOCK_MS = 1000           # XREADGROUP BLOCK: how long a read waits for new entries
RETRY = 0.5               # seconds between attempts while Redis is unreachable
FIELD = "push"            # the entry field that holds the push job's JSON


def parse_source(url: str) -> tuple[str, int, int, str]:
    """``redis://host:port[/db]/stream`` -> (host, port, db, stream)."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError(f"--source must look like redis://HOST:PORT/STREAM, not {url!r}")
    path = [p for p in parts.path.split("/") if p]
    db = 0
    if len(path) == 2 and path[0].isdigit():
        db = int(path.pop(0))
    if len(path) != 1:
        raise ConfigError(f"--source {url!r}: name one stream after the host, "
                          "redis://HOST:PORT/STREAM")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(f"--source {url!r}: bad port") from None
    return parts.hostname, port, db, path[0]


def connect(url: str) -> tuple[Any, str]:
    """An unentered coredis client for ``url`` and the stream name."""
    try:
        import coredis
    except ImportError:
        raise ConfigError("--source redis:// needs coredis: pip install 'fanout[redis]'") \
            from None
    host, port, db, stream = parse_source(url)
    # bytes, not str: an entry that is not UTF-8 must reach the daemon as a malformed line,
    # not fail inside the client on every read
    client = coredis.Redis(host=host, port=port, db=db, decode_responses=False,
                           connect_timeout=5.0, stream_timeout=BLOCK_MS / 1000 + 10)
    return client, stream


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _redis_errors() -> tuple[type[BaseException], ...]:
    from coredis.exceptions import ConnectionError as RedisConnectionError
    from coredis.exceptions import RedisError

    return (RedisConnectionError, RedisError, TimeoutError, OSError)


async def run_group(settings: Any, args: argparse.Namespace,
                    make_engine: Callable[..., Engine]) -> int:
    """``fanout run --source redis://...``: a daemon whose source and sink are one
    :class:`RedisGroup`; after it ends, the last results and acks go out (for up to 10 s
    while Redis is unreachable)."""
    out = Outputs.for_args(args.results, args.invalid_tokens,
                           getattr(args, "output_buffer", 8.0))
    group = RedisGroup(args, out)
    daemon = Daemon(settings, args, group, group, make_engine)
    try:
        async with group.redis:
            code = await daemon.run()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                while group.uncommitted:  # the last ones
                    if not await group.commit_now():
                        await trio.sleep(RETRY)
    except BaseExceptionGroup as exc:  # coredis's pool wraps what passes through it
        if len(exc.exceptions) == 1:
            raise exc.exceptions[0] from None
        raise
    if group.unacked:
        log.error("%d entries done but not acked (Redis unreachable): they will be "
                  "taken over and resent", group.unacked)
    return code


class RedisGroup:
    """A Redis Stream consumer group as a daemon's source (XREADGROUP, XAUTOCLAIM of what
    dead consumers left) and sink (results to ``--results`` and/or ``--results-stream``,
    then XACK, and XDEL unless ``--keep-acked``, of the entries they cover)."""

    def __init__(self, args: argparse.Namespace, out: Outputs) -> None:
        if not args.group:
            raise ConfigError("--source needs --group (the consumer group to read in)")
        self.args = args
        self.out = out
        self.redis, self.stream = connect(args.source)
        self.group = args.group
        self.consumer = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.results_stream = args.results_stream
        self._entry_of: dict[int, str] = {}    # local line number -> entry id (in flight)
        self._acks: list[str] = []             # entries whose results are all written
        self._pending_results: list[bytes] = []  # for --results-stream, not yet added
        self._number = 0
        self.claimed = 0
        self.lag = self.pending = 0
        self.state = InputState(self.stream, None, None)
        self.state.on_done = self._entry_done
        self.states = [self.state]

    @property
    def uncommitted(self) -> bool:
        """Acks or stream results not yet out."""
        return bool(self._acks or self._pending_results)

    @property
    def unacked(self) -> int:
        """Entries whose results are written and that are not acked yet."""
        return len(self._acks)

    async def _ensure_group(self) -> None:
        from coredis.exceptions import StreamDuplicateConsumerGroupError

        try:  # "0": a group made now (or again, after Redis lost it) takes every entry
            await self.redis.xgroup_create(self.stream, self.group, identifier="0",
                                           mkstream=True)
        except StreamDuplicateConsumerGroupError:
            pass

    # ----------------------------------------------------------------- the source

    async def read(self, handle: LineHandler, nursery: trio.Nursery) -> None:
        """New entries (and those taken over) until reading is cancelled; keeping the
        entries in flight claimed and watching the group go on until the run ends."""
        from coredis.exceptions import StreamConsumerGroupError

        stream_key = self.stream.encode()
        next_claim = 0.0

        async def read_once() -> None:
            nonlocal next_claim
            try:
                if trio.current_time() >= next_claim:
                    next_claim = trio.current_time() + max(0.5, self.args.claim_idle / 2)
                    await self._claim(handle)
                res = await self.redis.xreadgroup(
                    self.group, self.consumer, streams={self.stream: ">"},
                    count=READ_COUNT, block=BLOCK_MS)
            except StreamConsumerGroupError:  # NOGROUP: Redis restarted empty
                log.warning("consumer group %s is gone from %s: creating it again",
                            self.group, self.stream)
                await self._retry(self._ensure_group)
                return
            for entry in (res or {}).get(stream_key, ()):
                await self._entry(entry, False, handle)

        await self._retry(self._ensure_group)
        nursery.start_soon(self._keep_claimed)
        nursery.start_soon(self._watch_group)
        while True:
            await self._retry(read_once)

    async def _watch_group(self) -> None:
        """The group's lag and pending count, for the metrics and the status line."""
        errors = _redis_errors()
        while True:
            try:
                for info in await self.redis.xinfo_groups(self.stream):
                    info = {_text(k): v for k, v in info.items()}
                    if _text(info.get("name")) == self.group:
                        self.lag = int(info.get("lag") or 0)
                        self.pending = int(info.get("pending") or 0)
            except errors:
                pass
            await trio.sleep(1.0)

    def sample(self, metrics: DaemonMetrics) -> None:
        """The group's lag and pending count, as last seen."""
        metrics.stream_lag.set(self.lag)
        metrics.stream_pending.set(self.pending)

    async def _retry(self, fn: Callable[[], Awaitable[None]]) -> None:
        errors = _redis_errors()
        warned = False
        while True:
            try:
                await fn()
                return
            except errors as exc:
                if not warned:
                    log.warning("Redis: %s; retrying every %g s", exc, RETRY)
                    warned = True
                await trio.sleep(RETRY)

    async def _claim(self, handle: LineHandler) -> None:
        """Take over entries idle for --claim-idle seconds in any consumer's pending list
        (a consumer that died): they may have been sent, so their results say resent."""
        start = "0-0"
        mine = set(self._entry_of.values())
        while True:
            start, entries, _deleted = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer,
                min_idle_time=int(self.args.claim_idle * 1000), start=start, count=READ_COUNT)
            for entry in entries:
                if _text(entry.identifier) in mine:  # ours, still in flight: no takeover
                    continue
                self.claimed += 1
                await self._entry(entry, True, handle)
            if _text(start) == "0-0":
                return

    async def _keep_claimed(self) -> None:
        """Reset the idle time of the entries still in flight here, so that another
        daemon does not take them over while a slow push is under way."""
        errors = _redis_errors()
        while True:
            await trio.sleep(max(0.2, self.args.claim_idle / 3))
            ids = list(self._entry_of.values())
            if not ids:
                continue
            try:
                await self.redis.xclaim(self.stream, self.group, self.consumer,
                                        min_idle_time=0, identifiers=ids, justid=True)
            except errors:
                pass

    async def _entry(self, entry: Any, claimed: bool, handle: LineHandler) -> None:
        self._number += 1
        number = self._number
        ident = _text(entry.identifier)
        self._entry_of[number] = ident
        self.state.resend_until = number if claimed else 0
        data = (entry.field_values or {}).get(FIELD.encode())
        if data is None:
            line = InputLine(number, 0, 0, b"", f"entry {ident} has no {FIELD!r} field")
        else:
            line = InputLine(number, 0, 0, bytes(data))
        await handle(self.state, line)

    def _entry_done(self, number: int) -> None:
        entry = self._entry_of.pop(number, None)
        if entry is not None:
            self._acks.append(entry)

    def report(self, final: bool) -> None:
        """The group's lag and pending count; at the end, the entries taken over."""
        if not final:
            log.info("stream %s group %s: lag %d, pending %d", self.stream, self.group,
                     self.lag, self.pending)
        if final and self.claimed:
            log.warning("took over %d entries from other consumers", self.claimed)

    # ----------------------------------------------------------------- the sink

    def write(self, record: ResultLine, state: LineState) -> None:
        """To the file or stdout (unless only ``--results-stream`` is given), and/or held
        for the results stream, with the entry's id."""
        record.entry = self._entry_of.get(state.number)
        data = result_encoder.encode(record)
        if self.results_stream is None or self.args.results:
            self.out.results.write(data + b"\n")
        if self.results_stream is not None:
            self._pending_results.append(data)

    async def commit(self, states: Sequence[InputState]) -> None:
        """:meth:`commit_now` (what Redis does not take now is kept for the next one)."""
        await self.commit_now()

    def close(self, states: Sequence[InputState], complete: bool) -> None:
        """Close the outputs (the last acks go out after the daemon, :func:`run_group`)."""
        self.out.close()

    async def commit_now(self) -> bool:
        """Results out first (file flushed, stream entries added), then ack (and delete)
        the entries they cover. False when Redis could not be reached (kept for later)."""
        acks, self._acks = self._acks, []
        results, self._pending_results = self._pending_results, []
        if not self.out.results.closed:
            await self.out.results.sync()
        try:
            if results:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for data in results:
                        pipe.xadd(self.results_stream, {"result": data.decode()})
                results = []
            if acks:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xack(self.stream, self.group, acks)
                    if not self.args.keep_acked:
                        pipe.xdel(self.stream, acks)
        except _redis_errors() as exc:
            log.warning("Redis: %s; %d acks and %d results kept for the next try", exc,
                        len(acks), len(results))
            self._acks[:0] = acks
            self._pending_results[:0] = results
            return False
        except BaseException:  # cancelled mid-way: keep them for the final commit
            self._acks[:0] = acks
            self._pending_results[:0] = results
            raise
        return True


# --------------------------------------------------------------------------- enqueue

async def enqueue_main(args: argparse.Namespace) -> int:
    """Add each input line as one entry (field ``push``), in pipelined batches; wait while
    the stream's backlog is over --max-backlog (back-pressure: it never grows unbounded
    and nothing is trimmed away unread). Lines too long are reported and skipped."""
    import sys

    from .reader import expand_inputs, read_lines

    if args.batch < 1 or args.max_backlog < args.batch:
        raise ConfigError("--batch must be >= 1 and --max-backlog >= --batch")
    redis, stream = connect(args.to)
    added = skipped = waits = 0
    try:
        async with redis:
            batch: list[bytes] = []

            async def flush() -> None:
                nonlocal added, waits
                while await redis.xlen(stream) + len(batch) > args.max_backlog:
                    waits += 1
                    await trio.sleep(0.2)
                async with redis.pipeline(transaction=False) as pipe:
                    for data in batch:
                        pipe.xadd(stream, {FIELD: data})
                added += len(batch)
                batch.clear()

            for path in expand_inputs(args.inputs or ["-"]):
                async for line in read_lines(None if path == "-" else path,
                                             max_line_bytes=args.max_line_bytes):
                    if line.error:
                        skipped += 1
                        print(f"fanout enqueue: {path} line {line.number}: {line.error}; "
                              "skipped", file=sys.stderr)
                        continue
                    batch.append(line.data)
                    if len(batch) >= args.batch:
                        await flush()
            if batch:
                await flush()
    except BaseExceptionGroup as group:  # coredis's pool wraps what passes through it
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    print(f"fanout enqueue: {added} entries added to {stream}"
          + (f", {skipped} lines skipped" if skipped else "")
          + (f"; waited {waits * 0.2:.1f} s for the backlog" if waits else ""),
          file=sys.stderr)
    return 0
