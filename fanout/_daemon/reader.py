"""Input side of ``fanout run``: split NDJSON input into lines with exact byte offsets.

Nothing here looks at line content (JSON decoding and blank-line reporting happen in the
caller). What this module guarantees is accounting: every byte of the input belongs to
exactly one :class:`InputLine`, and ``line.end`` is the byte offset to checkpoint so that a
restart with ``start_offset=line.end, start_line=line.number`` continues with the next line.
Together with ``line.identity`` (the file's ``(st_dev, st_ino)``) the caller can tell on
restart whether the checkpointed file is still the one at the path.

Memory stays flat whatever the input size: one chunk plus at most one partial line, itself
capped at ``max_line_bytes`` (longer lines are counted, skipped and reported, never held).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import trio

from fanout.errors import ConfigError

__all__ = ["InputBlock", "InputLine", "expand_inputs", "input_identity", "read_lines"]

Identity = tuple[int, int]
_T = TypeVar("_T")

_NL = b"\n"
_CR = 13

log = logging.getLogger("fanout.reader")


class InputLine:
    """One input line and where it sits in its file.

    ``number`` is 1-based and continues across resumes, rotations and truncations.
    ``start``/``end`` are byte offsets in the file the line came from: ``end`` is just past
    the ``\\n`` (or past the last byte of a final line without one), so
    ``file[start:end]`` is the raw line. ``data`` is the line without the ``\\n`` and one
    trailing ``\\r``. ``error`` is ``None`` or a message (then ``data`` is ``b""``).
    ``identity`` is ``(st_dev, st_ino)`` of the file the line came from: store it with the
    offset, it changes when the input was rotated.
    """

    __slots__ = ("number", "start", "end", "data", "error", "identity")

    def __init__(
        self,
        number: int,
        start: int,
        end: int,
        data: bytes,
        error: str | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.number = number
        self.start = start
        self.end = end
        self.data = data
        self.error = error
        self.identity = identity

    def __repr__(self) -> str:
        data = self.data if len(self.data) <= 60 else self.data[:57] + b"..."
        return (
            f"InputLine(number={self.number}, start={self.start}, end={self.end}, "
            f"data={data!r}, error={self.error!r}, identity={self.identity!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InputLine):
            return NotImplemented
        return (
            self.number == other.number
            and self.start == other.start
            and self.end == other.end
            and self.data == other.data
            and self.error == other.error
            and self.identity == other.identity
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    @property
    def last(self) -> int:
        """The number of the last line in this unit (a line is a block of one)."""
        return self.number


class InputBlock:
    """Consecutive whole lines, numbers ``number`` to ``last``, bytes ``start`` to ``end``
    of the file (``read_lines(blocks=True)``). ``data`` holds them as read, each ending in
    ``\n`` (a final unterminated line is given one); ``\r`` and the length limit are the
    consumer's to handle, as in :func:`split_block`. ``error`` is always ``None``."""

    __slots__ = ("number", "last", "start", "end", "data", "identity")
    error = None

    def __init__(self, number: int, last: int, start: int, end: int, data: bytes,
                 identity: Identity | None) -> None:
        self.number = number
        self.last = last
        self.start = start
        self.end = end
        self.data = data
        self.identity = identity

    def __repr__(self) -> str:
        return (f"InputBlock(number={self.number}, last={self.last}, start={self.start}, "
                f"end={self.end}, {len(self.data)} bytes)")


def split_block(data: bytes, max_line_bytes: int) -> list[tuple[bytes, str | None]]:
    """The lines of an :class:`InputBlock`'s data as ``(data, error)``, exactly as
    :func:`read_lines` would give them one by one (one trailing ``\r`` dropped; a line
    longer than ``max_line_bytes`` becomes ``(b"", "line is longer than ...")``)."""
    out: list[tuple[bytes, str | None]] = []
    for raw in data.split(_NL)[:-1]:
        if raw and raw[-1] == _CR:
            raw = raw[:-1]
        if len(raw) > max_line_bytes:
            out.append((b"", f"line is longer than {max_line_bytes} bytes"))
        else:
            out.append((raw, None))
    return out


class _Splitter:
    """Incremental line splitter over a byte stream; tracks offsets and line numbers.

    ``offset`` is the stream position just past the last fed byte. A partial line is kept in
    ``pending`` until its newline arrives; once it exceeds ``max_line_bytes + 1`` (the +1
    leaves room for a ``\\r`` that is not part of the data) it is dropped and only its
    length is counted (``skipping``).
    """

    __slots__ = (
        "max_line_bytes",
        "number",
        "identity",
        "offset",
        "line_start",
        "pending",
        "pending_len",
        "skipping",
        "too_long",
    )

    def __init__(self, max_line_bytes: int, offset: int, number: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.too_long = f"line is longer than {max_line_bytes} bytes"
        self.number = number
        self.identity: Identity | None = None
        self.offset = offset
        self.line_start = offset
        self.pending = bytearray()
        self.pending_len = 0
        self.skipping = False

    def restart(self, offset: int, identity: Identity | None) -> None:
        """Continue at ``offset`` of a (possibly different) file; call after :meth:`finish`."""
        self.offset = self.line_start = offset
        self.identity = identity

    def feed(self, chunk: bytes) -> Iterator[InputLine]:
        """Yield the lines completed by ``chunk``; keep its unterminated tail.

        Must be exhausted before the next call.
        """
        pos = 0
        base = self.offset
        limit = self.max_line_bytes
        find = chunk.find
        nl = find(_NL)
        while nl != -1:
            self.number += 1
            end = base + nl + 1
            error = None
            if self.pending_len == 0:
                # fast path: the whole line is inside this chunk (one copy, no buffer)
                stop = nl - 1 if nl > pos and chunk[nl - 1] == _CR else nl
                if stop - pos > limit:
                    data, error = b"", self.too_long
                else:
                    data = chunk[pos:stop]
            elif self.skipping or self.pending_len + nl - pos > limit + 1:
                data, error = b"", self.too_long
            else:
                self.pending += memoryview(chunk)[pos:nl]
                taken = self._take_pending()
                if taken is None:
                    data, error = b"", self.too_long
                else:
                    data = taken
            yield InputLine(self.number, self.line_start, end, data, error, self.identity)
            self.line_start = end
            self._reset_pending()
            pos = nl + 1
            nl = find(_NL, pos)
        self._keep(chunk, pos)

    def _keep(self, chunk: bytes, pos: int) -> None:
        """Hold ``chunk[pos:]``, the start of a line not yet terminated (or count it only,
        once it is too long)."""
        self.offset += len(chunk)
        rest = len(chunk) - pos
        if rest:
            self.pending_len += rest
            if self.skipping:
                pass
            elif self.pending_len > self.max_line_bytes + 1:
                self.skipping = True
                self.pending = bytearray()  # release the memory, not just the length
            else:
                self.pending += memoryview(chunk)[pos:]

    def finish(self) -> InputLine | None:
        """The pending unterminated line as a final line (``end`` = current offset), if any."""
        if self.pending_len == 0:
            return None
        self.number += 1
        error = None
        data = None if self.skipping else self._take_pending()
        if data is None:
            data, error = b"", self.too_long
        line = InputLine(self.number, self.line_start, self.offset, data, error, self.identity)
        self.line_start = self.offset
        self._reset_pending()
        return line

    def _take_pending(self) -> bytes | None:
        """The pending bytes without one trailing ``\\r``; None if that is still too long."""
        pending = self.pending
        n = len(pending)
        if n and pending[-1] == _CR:
            n -= 1
        if n > self.max_line_bytes:
            return None
        return bytes(memoryview(pending)[:n])

    def _reset_pending(self) -> None:
        if self.pending_len:
            self.pending_len = 0
            self.skipping = False
            if len(self.pending) > 65536:
                self.pending = bytearray()  # do not keep a huge allocation around
            else:
                self.pending.clear()


class _BlockSplitter(_Splitter):
    """Like :class:`_Splitter`, but yields the whole lines of each chunk as one
    :class:`InputBlock` (no per-line work here); a line that runs over ``max_line_bytes``
    while spanning chunks is still reported alone as an error :class:`InputLine`."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> Iterator[InputLine | InputBlock]:  # type: ignore[override]
        base = self.offset
        pos = 0
        head = b""
        if self.pending_len:  # a line begun in an earlier chunk
            nl = chunk.find(_NL)
            if nl == -1:
                self._keep(chunk, 0)
                return
            end = base + nl + 1
            if self.skipping or self.pending_len + nl > self.max_line_bytes + 1:
                self.number += 1
                yield InputLine(self.number, self.line_start, end, b"", self.too_long,
                                self.identity)
                self.line_start = end
            else:
                self.pending += memoryview(chunk)[:nl + 1]
                head = bytes(self.pending)
            self._reset_pending()
            pos = nl + 1
        last = chunk.rfind(_NL, pos)
        stop = last + 1 if last != -1 else pos
        if stop > pos or head:
            data = head + chunk[pos:stop] if head else chunk[pos:stop]
            n = data.count(_NL)
            end = base + stop
            yield InputBlock(self.number + 1, self.number + n, self.line_start, end, data,
                             self.identity)
            self.number += n
            self.line_start = end
        self._keep(chunk, stop)

    def finish(self) -> InputLine | InputBlock | None:  # type: ignore[override]
        if self.pending_len == 0 or self.skipping:
            return super().finish()
        self.number += 1
        block = InputBlock(self.number, self.number, self.line_start, self.offset,
                           bytes(self.pending) + _NL, self.identity)
        self.line_start = self.offset
        self._reset_pending()
        return block


class _Source:
    """An open input: the fd (owned by ``stream``), its identity and kind."""

    __slots__ = ("stream", "identity", "regular", "seekable")

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.identity: Identity = (st.st_dev, st.st_ino)
        self.regular = stat.S_ISREG(st.st_mode)
        self.seekable = self.regular
        # FdStream never has to wait on a regular file (reads do not raise BlockingIOError),
        # so it is safe for files too, and for pipes/ttys it waits without blocking the loop.
        self.stream = trio.lowlevel.FdStream(fd)

    @property
    def fd(self) -> int:
        return self.stream.fileno()

    async def receive(self, max_bytes: int) -> bytes:
        try:
            return await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            # FdStream wraps the OSError (EIO, EISDIR ...): surface the real one
            if isinstance(exc.__cause__, OSError):
                raise exc.__cause__ from None
            raise

    def close(self) -> None:
        try:
            self.stream.close()
        except RuntimeError:  # finalised outside trio: close without notifying trio
            os.close(self.stream.fileno())


class _Fingerprint:
    """What a followed file looked like where it was read: its first bytes, the bytes just
    before the read offset, and its size at the last poll. A rewrite in place (the same
    inode, new content already longer than the old offset when the poll comes) changes
    one of them; a truncation seen only by its size was missed whenever the file had
    grown back by the next poll (4,931 of 6,000 new lines skipped)."""

    __slots__ = ("head", "tail", "size")
    N = 64

    def __init__(self) -> None:
        self.head = b""
        self.tail = b""
        self.size = 0

    def reset(self, fd: int, offset: int) -> None:
        n = min(self.N, offset)
        self.head = os.pread(fd, n, 0) if n else b""
        self.tail = os.pread(fd, n, offset - n) if n else b""
        self.size = offset

    def read(self, pos: int, chunk: bytes) -> None:
        if pos < self.N:
            self.head = self.head[:pos] + chunk[:self.N - pos]
        self.tail = chunk[-self.N:] if len(chunk) >= self.N else (self.tail + chunk)[-self.N:]

    def rewritten(self, fd: int, offset: int, size: int) -> bool:
        if size < offset or size < self.size:
            return True
        self.size = size
        h, t = len(self.head), len(self.tail)
        return bool((h and os.pread(fd, h, 0) != self.head)
                    or (t and os.pread(fd, t, offset - t) != self.tail))


def _open_path(path: str) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_stdin() -> tuple[int, os.stat_result]:
    # a duplicate, so closing our stream never closes the process's fd 0. FdStream makes
    # the shared open file description non-blocking until it is closed (trio issue #174).
    fd = os.dup(0)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _probe(path: str | None, fd: int) -> tuple[Identity | None, int]:
    """(identity of what ``path`` names now or None if missing, size of our open file)."""
    size = os.fstat(fd).st_size
    if path is None:
        return None, size
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, size
    return (st.st_dev, st.st_ino), size


async def _in_thread(fn: Callable[..., _T], *args: object) -> _T:
    # stat/open may hang on a network filesystem or a FIFO without writer: keep the loop free
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


async def _open_when_present(
    path: str, follow: bool, poll_interval: float, *, rotated: bool = False
) -> _Source:
    """Open ``path``; with ``follow`` wait for it to exist.

    After a rotation a permission error is retried too: ``logrotate``'s ``create`` makes
    the new file and only then sets its owner and mode.
    """
    waiting = False
    while True:
        try:
            fd, st = await _in_thread(_open_path, path)
        except FileNotFoundError as exc:
            if not follow:
                raise ConfigError(f"input {path!r} does not exist") from exc
            if not waiting and not rotated:
                waiting = True
                log.warning("input %s does not exist yet: waiting for it (--follow)", path)
        except PermissionError as exc:
            if not rotated:
                raise ConfigError(f"cannot open input {path!r}: {exc.strerror}") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"input {path!r} is a directory") from exc
        except OSError as exc:
            raise ConfigError(f"cannot open input {path!r}: {exc.strerror or exc}") from exc
        else:
            return _Source(fd, st)
        await trio.sleep(poll_interval)


async def read_lines(
    path: str | None,
    *,
    start_offset: int = 0,
    start_line: int = 0,
    follow: bool = False,
    max_line_bytes: int = 16 * 1024 * 1024,
    poll_interval: float = 0.25,
    chunk_size: int = 256 * 1024,
    blocks: bool = False,
) -> AsyncIterator[InputLine | InputBlock]:
    """Yield the lines of ``path`` (``None``/``"-"``: stdin) with exact byte offsets.

    Reading starts at ``start_offset``; line numbers continue from ``start_line`` (the number
    of the last line already handled). Offsets always count from the start of the file; for
    a non-seekable stdin the first ``start_offset`` bytes are read and discarded. If a file
    is shorter than ``start_offset`` it was truncated or replaced while we were away: it is
    read from 0 (visible as ``line.start < start_offset``).

    Without ``follow`` the iterator ends at EOF, yielding a final unterminated line. With
    ``follow`` it behaves like ``tail -F`` and ends only when cancelled: at EOF it polls
    every ``poll_interval``; an unterminated last line is held back (it may be a partial
    write) unless the file is rotated or truncated. Rotation (the path names another file)
    drains the old file then continues with the new one from offset 0 (``line.identity``
    changes); truncation below our offset restarts at 0. A missing path is waited for.
    Stdin that is a pipe or tty ends at its EOF even with ``follow`` (nothing can follow).

    With ``blocks`` the whole lines of each chunk come as one :class:`InputBlock` instead
    (and lines too long, spanning chunks, as error lines): the same accounting without a
    Python step per line, for a reader that hands lines on in bulk.

    Use ``contextlib.aclosing`` (or exhaust the iterator) so the file is closed promptly.
    Raises :class:`ConfigError` if the file cannot be opened (missing only without
    ``follow``) and ``OSError`` for read errors.
    """
    if start_offset < 0 or start_line < 0:
        raise ValueError("start_offset and start_line must be >= 0")
    if max_line_bytes < 1 or chunk_size < 1:
        raise ValueError("max_line_bytes and chunk_size must be >= 1")
    if not poll_interval > 0:
        raise ValueError("poll_interval must be > 0")
    if path == "-":
        path = None
    src = await _open_input(path, follow, poll_interval)
    sp = (_BlockSplitter if blocks else _Splitter)(max_line_bytes, start_offset, start_line)
    try:
        to_discard = _seek_start(src, sp, start_offset)
        sp.identity = src.identity
        # a stdin pipe/tty can never grow again after EOF
        tail = _Tail(path, src, sp) if follow and (path is not None or src.regular) else None
        while True:
            chunk = await src.receive(chunk_size)
            if chunk:
                if to_discard:
                    if len(chunk) <= to_discard:
                        to_discard -= len(chunk)
                        continue
                    chunk = chunk[to_discard:]
                    to_discard = 0
                if tail is not None and tail.rewritten_before(chunk):
                    # this chunk is the middle of new content: read it all from the start
                    if (last := tail.reread()) is not None:
                        yield last
                    continue
                for line in sp.feed(chunk):
                    yield line
                continue
            # EOF
            if tail is None:
                if (last := sp.finish()) is not None:
                    yield last
                return
            change = await tail.probe()
            if change is _ROTATED:
                # first drain what was written to the old file before the switch (the
                # next EOF probes again, so a still-growing old file is read to its end)
                chunk = await src.receive(chunk_size)
                if chunk:
                    for line in sp.feed(chunk):
                        yield line
                    continue
                if (last := sp.finish()) is not None:
                    yield last
                src = await tail.reopen(poll_interval)
            elif change is _REWRITTEN:
                if (last := tail.reread()) is not None:
                    yield last
            else:
                await trio.sleep(poll_interval)
    finally:
        src.close()


async def _open_input(path: str | None, follow: bool, poll_interval: float) -> _Source:
    """``path`` (``None``: stdin) opened for reading."""
    if path is not None:
        return await _open_when_present(path, follow, poll_interval)
    fd, st = await _in_thread(_open_stdin)
    src = _Source(fd, st)
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        src.seekable = False
    return src


def _seek_start(src: _Source, sp: _Splitter, start_offset: int) -> int:
    """Go to ``start_offset``; the bytes still to discard (a stdin that cannot seek). A
    file now shorter than the offset was truncated or replaced: it is read from 0."""
    if not start_offset:
        return 0
    if not src.seekable:
        return start_offset
    if os.fstat(src.fd).st_size < start_offset:
        sp.restart(0, None)
    else:
        os.lseek(src.fd, start_offset, os.SEEK_SET)
    return 0


_ROTATED = "rotated"      # the path names another file
_REWRITTEN = "rewritten"  # the same file, truncated or rewritten in place
_SAME = "same"            # nothing new yet


class _Tail:
    """``follow`` (like ``tail -F``): a file that may grow, be rotated, truncated or
    rewritten in place, and what :func:`read_lines` does about it."""

    def __init__(self, path: str | None, src: _Source, sp: _Splitter) -> None:
        self.path = path
        self.src = src
        self.sp = sp
        self.seen = _Fingerprint() if src.regular else None
        if self.seen is not None:
            self.seen.reset(src.fd, sp.offset)

    def rewritten_before(self, chunk: bytes) -> bool:
        """Whether what was read before ``chunk`` is gone (3 syscalls a chunk); if not,
        ``chunk`` is noted as read."""
        seen = self.seen
        if seen is None:
            return False
        if seen.rewritten(self.src.fd, self.sp.offset, os.fstat(self.src.fd).st_size):
            return True
        seen.read(self.sp.offset, chunk)
        return False

    async def probe(self) -> str:
        """At EOF: ``_ROTATED``, ``_REWRITTEN`` or ``_SAME``."""
        now, size = await _in_thread(_probe, self.path, self.src.fd)
        if now is not None and now != self.src.identity:
            return _ROTATED
        seen = self.seen
        if seen is not None and await _in_thread(seen.rewritten, self.src.fd, self.sp.offset,
                                                 size):
            return _REWRITTEN
        return _SAME

    async def reopen(self, poll_interval: float) -> _Source:
        """Rotated, the old file read to its end: the new file at the path, from 0."""
        self.src.close()
        assert self.path is not None  # stdin is never rotated
        self.src = await _open_when_present(self.path, True, poll_interval, rotated=True)
        self.sp.restart(0, self.src.identity)
        self.seen = _Fingerprint() if self.src.regular else None
        return self.src

    def reread(self) -> InputLine | InputBlock | None:
        """Truncated or rewritten in place: the unterminated tail (if any) will never be
        completed, and is the line returned; the new content is read whole, from its
        first line."""
        log.warning("input %s was truncated or rewritten in place: reading it again from its "
                    "first byte", self.path or "stdin")
        last = self.sp.finish()
        os.lseek(self.src.fd, 0, os.SEEK_SET)
        self.sp.restart(0, self.src.identity)
        self.seen = _Fingerprint()
        return last


def input_identity(path: str) -> Identity:
    """``(st_dev, st_ino)`` of ``path`` (``"-"``: stdin), to tell if a file was replaced."""
    st = os.fstat(0) if path == "-" else os.stat(path)
    return (st.st_dev, st.st_ino)


def expand_inputs(patterns: list[str], *, missing_ok: bool = False) -> list[str]:
    """Expand input patterns to paths: ``"-"`` stays, globs expand sorted, order kept, no dups.

    Raises :class:`ConfigError` for a pattern that matches nothing and is not an existing
    path (unless ``missing_ok`` and it is a plain name: ``--follow`` waits for it, as
    ``tail -F``), and for a directory.
    """
    out: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if pattern == "-":
            matches = ["-"]
        else:
            matches = []
            if glob.escape(pattern) != pattern:  # has glob magic
                matches = sorted(glob.glob(pattern))
            if not matches and os.path.lexists(pattern):
                matches = [pattern]  # a literal name such as "a[1].log"
            if not matches and missing_ok and glob.escape(pattern) == pattern:
                matches = [pattern]  # followed: waited for until it appears
            if not matches:
                raise ConfigError(f"input {pattern!r} matches no file")
        for path in matches:
            if path != "-" and os.path.isdir(path):
                raise ConfigError(f"input {path!r} is a directory, not a file")
            key = path if path == "-" else os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out
