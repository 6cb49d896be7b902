"""The daemon's checkpoint: how far an input file is fully accounted for.

``offset``/``line``: every line up to here has its result written and flushed.
``high_water``: lines up to here may have been sent. After a crash, lines between ``line``
and ``high_water`` are read again and their results are marked ``resent``. Written
atomically (temporary file, fsync, rename), so a kill -9 leaves the old or the new one.
``dev``/``ino`` and ``tail`` (a digest of the bytes just before ``offset``) tell whether the
input is still the file the checkpoint was made for: :func:`check` refuses one that is not
rather than resume in the middle of a line or of another file's lines.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec

from ..errors import FanoutError
from .output import OutputError


class Checkpoint(msgspec.Struct, kw_only=True):
    input: str
    dev: int = 0
    ino: int = 0
    offset: int = 0
    line: int = 0
    high_water: int = 0
    tail: str | None = None
    version: int = 1


TAIL_BYTES = 64


def default_path(input_path: str) -> str:
    return input_path + ".checkpoint"


class CheckpointError(FanoutError):
    """A checkpoint that cannot be used: one line naming it and the fix, exit 2."""


class CheckpointWriteError(OutputError):
    """A checkpoint that cannot be written (a missing or read-only directory, a full
    disk): one line naming it, exit 5; nothing after the last one written is marked done."""


def load(path: str | os.PathLike[str]) -> Checkpoint | None:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data, type=Checkpoint)
    except msgspec.MsgspecError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({exc}); move it away to start "
                              f"over (or run with --no-checkpoint)") from None


def save(path: str | os.PathLike[str], cp: Checkpoint) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, msgspec.json.encode(cp) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointWriteError(
            f"cannot write the checkpoint {path}: {exc.strerror or exc}; lines after the "
            f"last checkpoint written are not marked done (make its directory writable, "
            f"or give --checkpoint PATH or --no-checkpoint)") from None


def tail_of(path: str, offset: int, identity: tuple[int, int]) -> str | None:
    """The digest of the bytes before ``offset`` in ``path`` if it still is ``identity``
    (None when it cannot be told: moved, shorter, unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != identity:
            return None
        n = min(TAIL_BYTES, offset)
        data = os.pread(fd, n, offset - n)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != n:
        return None
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def check(cp: Checkpoint, cp_path: str, input_path: str, identity: tuple[int, int],
          size: int) -> None:
    """Raise :class:`CheckpointError` unless ``cp`` matches the input as it is now."""
    fix = (f"if {input_path} is to be sent from its first line, move {cp_path} away (or "
           f"run with --no-checkpoint)")
    if cp.input != input_path and (cp.dev, cp.ino) != identity:
        raise CheckpointError(f"checkpoint {cp_path} was made for {cp.input}, not "
                              f"{input_path}; {fix}")
    if (cp.dev, cp.ino) != identity:
        raise CheckpointError(f"checkpoint {cp_path} belongs to another file than "
                              f"{input_path} now (it was replaced: inode {cp.ino}, now "
                              f"{identity[1]}); its lines may have been sent already; {fix}")
    if cp.offset > size:
        raise CheckpointError(f"checkpoint {cp_path} is at byte {cp.offset:,} but {input_path}"
                              f" has {size:,} bytes: it was truncated or rewritten; {fix}")
    if cp.offset:
        try:
            with open(input_path, "rb") as fh:
                fh.seek(cp.offset - 1)
                boundary = fh.read(1) == b"\n"
        except OSError as exc:
            raise CheckpointError(f"input {input_path}: {exc.strerror}") from None
        if not boundary:
            raise CheckpointError(f"checkpoint {cp_path} is at byte {cp.offset:,} of "
                                  f"{input_path}, which is not the end of a line: the file "
                                  f"was rewritten, or the checkpoint edited; {fix}")
    if cp.tail is not None and tail_of(input_path, cp.offset, identity) != cp.tail:
        raise CheckpointError(f"checkpoint {cp_path}: the bytes of {input_path} before byte "
                              f"{cp.offset:,} are not the ones it was made after: the file "
                              f"was rewritten in place; {fix}")
