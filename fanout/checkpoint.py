"""The daemon's checkpoint: how far an input file is fully accounted for.

``offset``/``line``: every line up to here has its result written and flushed.
``high_water``: lines up to here may have been sent. After a crash, lines between ``line``
and ``high_water`` are read again and their results are marked ``resent``. Written
atomically (temporary file, fsync, rename), so a kill -9 leaves the old or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from .errors import FanoutError


class Checkpoint(msgspec.Struct, kw_only=True):
    input: str
    dev: int = 0
    ino: int = 0
    offset: int = 0
    line: int = 0
    high_water: int = 0
    version: int = 1


def default_path(input_path: str) -> str:
    return input_path + ".checkpoint"


class CheckpointError(FanoutError):
    """A checkpoint that cannot be used: one line naming it and the fix, exit 2."""


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, msgspec.json.encode(cp) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
