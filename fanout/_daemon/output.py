"""The daemon's append-only outputs (results, dead tokens), written by a thread of their own.

A write on the event loop's thread blocks the whole daemon when the reader of a pipe or a
FIFO stops reading, or a disk stalls on fsync: answers sat unread in the socket, the reaper
then took them for lost streams and sent them again, and signals were handled 20 s late.
Here the loop only appends bytes to a buffer; a writer thread hands them to the file
descriptor. The buffer is bounded by back-pressure, not by blocking: the daemon stops
reading input while more than ``limit`` bytes wait (:attr:`Output.over`,
:meth:`Output.room`), and the pushes already in flight still end and are written.

:meth:`Output.sync` returns once everything written so far is on the file descriptor (and
fsynced, for a regular file): the daemon advances a checkpoint only after it. At each sync
the path is checked against the file being written: a file moved away (rotation without
SIGHUP) is reopened at the path; a file deleted under the daemon is reopened and the
results written since the last sync, which the deleted file took with it, are written
again, so no line is marked done whose result exists nowhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import stat
import sys
import threading
from collections import deque
from typing import Any, Protocol

import trio

from ..errors import ConfigError, FanoutError

log = logging.getLogger("fanout.daemon")

CHUNK = 64 * 1024          # bytes gathered on the loop before they go to the writer
LIMIT = 8 * 1024 * 1024    # bytes waiting to be written before input stops being read
PIPE_BUF = select.PIPE_BUF


class OutputError(FanoutError):
    """The results (or dead tokens) could not be written: exit 5, checkpoint not advanced."""


class ResultsOut(Protocol):
    """Where result lines go: an :class:`Output`, or a worker's frames to its coordinator."""

    @property
    def name(self) -> str: ...
    @property
    def failed(self) -> OutputError | None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def backlog(self) -> int: ...
    @property
    def over(self) -> bool: ...
    def write(self, data: bytes) -> None: ...
    async def room(self) -> None: ...
    async def sync(self) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...


def output_limit(buffer: float) -> int:
    """``--output-buffer`` (MB) in bytes."""
    if not buffer > 0:
        raise ConfigError(f"--output-buffer must be more than 0 MB, not {buffer!r}")
    return int(buffer * (1 << 20))


class Outputs:
    """A daemon's outputs as one: the results (``results``) and the dead tokens
    (``invalid``, optional). Back-pressure comes from the results; a failure of either is
    the run's output failure."""

    def __init__(self, results: ResultsOut, invalid: Output | None) -> None:
        self.results = results
        self.invalid = invalid

    @classmethod
    def for_args(cls, results: str | None, invalid: str | None, buffer: float) -> Outputs:
        """``--results``, ``--invalid-tokens`` and ``--output-buffer`` (MB)."""
        limit = output_limit(buffer)
        return cls(Output(results, limit=limit),
                   Output(invalid, limit=limit) if invalid else None)

    @property
    def failed(self) -> OutputError | None:
        """The error of the results or the dead-token output, if one failed."""
        if self.results.failed is not None:
            return self.results.failed
        return self.invalid.failed if self.invalid is not None else None

    def dead_token(self, token: str, reason: str | None, timestamp: int | None) -> None:
        """One line for a token APNs said is dead (``--invalid-tokens``)."""
        if self.invalid is not None:
            self.invalid.write(json.dumps({"token": token, "reason": reason,
                                           "timestamp": timestamp}).encode() + b"\n")

    async def sync(self) -> None:
        """Everything written so far is out (see :meth:`Output.sync`)."""
        await self.results.sync()
        if self.invalid is not None:
            await self.invalid.sync()

    def reopen(self) -> None:
        """SIGHUP: reopen both files at their paths."""
        self.results.reopen()
        if self.invalid is not None:
            self.invalid.reopen()

    def close(self) -> None:
        """No more writes to either."""
        self.results.close()
        if self.invalid is not None:
            self.invalid.close()


_REOPEN = object()  # a queue item: reopen the path (SIGHUP), in order with the data


class Output:
    """An append-only NDJSON output: stdout (``None`` or ``"-"``) or a file.

    On a pipe or FIFO the writes are whole records of at most ``PIPE_BUF`` bytes (see
    :meth:`_write_all`); ``records=False`` writes each chunk at once instead, for a pipe
    whose one reader parses length-prefixed frames and drops a partial one (a worker's
    frames: 4 KiB writes woke its coordinator 16 times per 64 KiB)."""

    def __init__(self, path: str | None, *, limit: int = LIMIT, records: bool = True) -> None:
        self.path = None if path in (None, "-") else path
        self.name = self.path or "stdout"
        self.limit = limit
        self.failed: OutputError | None = None
        self.closed = False
        self._buf: list[bytes] = []     # on the loop, not yet handed to the writer
        self._size = 0
        self._handed = 0                # bytes handed to the writer, ever
        self._written = 0               # bytes the writer has put on the descriptor
        self._synced = 0                # ... of which were fsynced and checked
        self._want_sync = 0
        self._queue: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._waiters: list[trio.Event] = []  # under _cond: wake them after a batch
        self._batches = 0               # batches the writer has finished (under _cond)
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._since_sync: list[bytes] = []  # what a deleted file took with it
        self._fd = self._open()
        self._regular = self._is_regular()
        self._records = records and not self._regular

    # ----------------------------------------------------------------- on the event loop

    def write(self, data: bytes) -> None:
        if self.failed is not None:
            raise self.failed
        self._buf.append(data)
        self._size += len(data)
        if self._size >= CHUNK:
            self._handoff()

    @property
    def backlog(self) -> int:
        """Bytes written by the daemon and not yet on the descriptor."""
        return self._handed - self._written + self._size

    @property
    def over(self) -> bool:
        """More than ``limit`` bytes wait: stop taking input until :meth:`room`."""
        return self._handed - self._written + self._size >= self.limit

    async def room(self) -> None:
        """Wait until the backlog is down to half the limit (or the output failed)."""
        while True:
            seen = self._batches
            if self.backlog <= self.limit // 2:
                return
            if self.failed is not None:
                raise self.failed
            await self._progress(seen)

    async def sync(self) -> None:
        """Return once everything written so far is on the descriptor, fsynced if it is a
        regular file whose path still names it. Raises :class:`OutputError` if it failed."""
        if self.failed is not None:
            raise self.failed
        self._handoff(sync=True)
        target = self._handed
        while True:
            seen = self._batches
            if self._synced >= target:
                return
            if self.failed is not None:
                raise self.failed
            await self._progress(seen)

    def push(self) -> None:
        """Hand what is gathered to the writer now (a pipe whose reader waits for it)."""
        if self._size:
            self._handoff()

    def reopen(self) -> None:
        """SIGHUP: reopen the path after what was written so far (logrotate moved it)."""
        if self.path is None or self.failed is not None:
            return
        self._handoff(item=_REOPEN)

    def close(self) -> None:
        """No more writes. Whatever the writer has not written yet is given up on (the
        caller has :meth:`sync`-ed what it counts on)."""
        if self.closed:
            return
        self.closed = True
        if self.failed is None and self._size:
            self._handoff()
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is None:
            self._close_fd()
        elif self.failed is None and self.backlog == 0:
            self._thread.join(timeout=5)

    def _handoff(self, *, sync: bool = False, item: Any = None) -> None:
        if self._thread is None:
            self._start()
        with self._cond:
            if self._buf:
                self._queue.append(b"".join(self._buf) if len(self._buf) > 1 else self._buf[0])
                self._handed += self._size
                self._buf, self._size = [], 0
            if item is not None:
                self._queue.append(item)
            if sync:
                self._want_sync = self._handed
            self._cond.notify()

    def _start(self) -> None:
        try:
            self._token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            self._token = None
        self._thread = threading.Thread(target=self._run, name=f"fanout-output {self.name}",
                                        daemon=True)
        self._thread.start()

    async def _progress(self, seen: int) -> None:
        """Wait for the writer's next batch after batch number ``seen`` (read before the
        caller looked at what it waits for: a batch ending in between returns at once)."""
        event = trio.Event()
        with self._cond:
            if self._batches != seen:
                return
            self._waiters.append(event)
        await event.wait()

    def _wake(self) -> None:
        with self._cond:
            waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    # ----------------------------------------------------------------- the writer thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self._want_sync <= self._synced \
                        and not self._closing:
                    self._cond.wait()
                items = list(self._queue)
                self._queue.clear()
                want_sync = self._want_sync
                closing = self._closing and not items
            if self.failed is None:
                try:
                    for item in items:
                        if item is _REOPEN:
                            self._reopen()
                        else:
                            self._write_all(item)
                            self._written += len(item)
                    if want_sync > self._synced and self._written >= want_sync:
                        self._sync()
                        self._synced = self._written
                except OSError as exc:
                    self.failed = self._error(exc)
            else:
                self._written += sum(len(i) for i in items if i is not _REOPEN)
            with self._cond:
                self._batches += 1
                waited = bool(self._waiters)
            if waited:  # a wake-up of the loop per batch cost ~50 us even with no waiter
                self._notify()
            if closing:
                self._close_fd()
                return

    def _notify(self) -> None:
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._wake)

    def _write_all(self, data: bytes) -> None:
        if not self._records:
            self._write(memoryview(data))
            if self._regular and self.path is not None:
                self._since_sync.append(data)
            return
        # a pipe or FIFO: in whole records of at most PIPE_BUF bytes, writes the kernel
        # makes atomic, so a writer killed mid-batch never leaves its reader half a
        # record to glue the next writer's first one onto
        start, end = 0, len(data)
        while start < end:
            stop = data.rfind(b"\n", start, start + PIPE_BUF) + 1
            if stop <= start:  # one record longer than PIPE_BUF: whole, not atomic
                stop = data.find(b"\n", start) + 1 or end
            self._write(memoryview(data)[start:stop])
            start = stop

    def _write(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:  # a descriptor someone made non-blocking
                select.select([], [self._fd], [])
                continue
            view = view[n:]

    def _sync(self) -> None:
        if not self._regular:
            return
        os.fsync(self._fd)
        if self.path is not None:
            self._check_identity(self.path)
        self._since_sync.clear()

    def _check_identity(self, path: str) -> None:
        """``path`` must still name the file being written."""
        mine = os.fstat(self._fd)
        try:
            named = os.stat(path)
            same = (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same and mine.st_nlink:
            return
        if mine.st_nlink == 0:  # deleted: the results in it are gone
            lost = self._since_sync[:]
            count = sum(chunk.count(b"\n") for chunk in lost)
            self._reopen()
            for chunk in lost:
                self._write_all(chunk)
            os.fsync(self._fd)
            log.warning("%s was deleted while results were written to it: reopened it and "
                        "wrote again the %d results written since the last checkpoint "
                        "(results before that went with the deleted file)", self.path, count)
        else:  # moved away: what it holds stays there
            self._reopen()
            log.warning("%s was moved away while results were written to it (rotated "
                        "without a SIGHUP?): results so far stay in the moved file, new ones "
                        "go to a new %s", self.path, self.path)

    def _reopen(self) -> None:
        old = self._fd
        try:
            self._fd = self._open()
        except ConfigError as exc:
            raise OSError(errno.EIO, str(exc)) from None
        self._regular = self._is_regular()
        with contextlib.suppress(OSError):
            os.close(old)

    def _close_fd(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _error(self, exc: OSError) -> OutputError:
        # the checkpoint is never advanced past results that could not be written
        if exc.errno == errno.EPIPE:
            why = ("broken pipe: the reader went away; what it read but did not process is "
                   "lost to it, and lines written since the last checkpoint are sent again "
                   "by the next run")
            if self.path is None:  # nothing more can go there, not even at exit
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        else:
            why = exc.strerror or str(exc)
        return OutputError(f"cannot write to {self.name}: {why}; the checkpoint was not "
                           f"advanced")

    # ----------------------------------------------------------------- opening

    def _is_regular(self) -> bool:
        # fsync only regular files (a pipe, a tty or /dev/null cannot be synced)
        try:
            return stat.S_ISREG(os.fstat(self._fd).st_mode)
        except OSError:
            return False

    def _open(self) -> int:
        if self.path is None:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            return sys.stdout.fileno()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open {self.path} for writing: {exc.strerror}") from None
        try:
            self._repair(fd, self.path)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot repair {self.path}: {exc.strerror}") from None
        return fd

    def _repair(self, fd: int, path: str) -> None:
        """A file whose last line is torn (a run stopped mid-write: disk full, kill -9) is
        cut back to its last newline, or the next record would be glued onto the half one.
        Nothing is lost: the checkpoint never covers a result that was not written whole,
        so the torn record's line is sent again."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return
        with open(path, "rb") as r:
            r.seek(st.st_size - 1)
            if r.read(1) == b"\n":
                return
            end = st.st_size
            keep = 0
            while end > 0:  # the last newline, reading back in 64 KiB steps
                start = max(0, end - (1 << 16))
                r.seek(start)
                at = r.read(end - start).rfind(b"\n")
                if at >= 0:
                    keep = start + at + 1
                    break
                end = start
        os.ftruncate(fd, keep)
        log.warning("%s: its last line was torn (%d bytes without a newline, from a run "
                    "that stopped mid-write); cut back to the last whole line, whose "
                    "successor is sent again", self.path, st.st_size - keep)
