"""Tests for fanout._daemon.reader: exact offsets, resume, over-long lines, stdin, tail -F behaviour.

Every check compares against a tiny reference splitter or hand-written expectations, and
every follow test runs under ``trio.fail_after`` with a short poll interval; nothing asserts
on wall-clock time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from contextlib import aclosing
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanout._daemon.reader import (
    InputBlock,
    InputLine,
    expand_inputs,
    input_identity,
    read_lines,
    split_block,
)
from fanout.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
POLL = 0.02
BIG = 16 * 1024 * 1024


def reference(
    content: bytes, max_line_bytes: int = BIG, start: int = 0, number: int = 0
) -> list[tuple[int, int, int, bytes, str | None]]:
    """Obvious (slow) splitter: (number, start, end, data, error) per line."""
    out = []
    pos = start
    while pos < len(content):
        nl = content.find(b"\n", pos)
        end = len(content) if nl == -1 else nl + 1
        raw = content[pos:end].removesuffix(b"\n").removesuffix(b"\r")
        number += 1
        if len(raw) > max_line_bytes:
            out.append((number, pos, end, b"", f"line is longer than {max_line_bytes} bytes"))
        else:
            out.append((number, pos, end, raw, None))
        pos = end
    return out


def tup(line: InputLine) -> tuple[int, int, int, bytes, str | None]:
    return (line.number, line.start, line.end, line.data, line.error)


async def collect(path: str | None, **kw: object) -> list[InputLine]:
    with trio.fail_after(30):
        async with aclosing(read_lines(path, **kw)) as lines:  # type: ignore[arg-type]
            return [line async for line in lines]


def write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


CASES = {
    "empty": b"",
    "ordinary": b'{"a":1}\n{"b":2}\nx\n',
    "crlf": b"one\r\ntwo\r\n\r\nthree\r\n",
    "no_final_newline": b"a\nbb\nlast",
    "final_cr_only": b"a\nb\r",
    "blank_lines": b"\n  \n\t\n\r\n \r\n\n",
    "utf8": "é€😀\n日本語\nñ".encode(),
    "invalid_utf8": b"\xff\xfe\x80\n\xc3\n\xed\xa0\x80\r\n\x00\x01\n",
    "lone_cr_inside": b"a\rb\nc\r\rd\n",
}


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 256 * 1024])
@pytest.mark.parametrize("name", sorted(CASES))
async def test_offsets_exact(tmp_path: Path, name: str, chunk_size: int) -> None:
    content = CASES[name]
    path = write(tmp_path / "in.ndjson", content)
    lines = await collect(path, chunk_size=chunk_size)
    assert [tup(x) for x in lines] == reference(content)
    assert b"".join(content[x.start : x.end] for x in lines) == content
    for x in lines:
        assert content[x.start : x.end].rstrip(b"\n").removesuffix(b"\r") == x.data
        assert x.identity == input_identity(path)


async def test_hand_written_expectations(tmp_path: Path) -> None:
    content = b'{"a":1}\r\n\n  \n\xff\xc3\xa9\nend'
    lines = await collect(write(tmp_path / "f", content))
    assert [tup(x) for x in lines] == [
        (1, 0, 9, b'{"a":1}', None),
        (2, 9, 10, b"", None),
        (3, 10, 13, b"  ", None),
        (4, 13, 17, b"\xff\xc3\xa9", None),
        (5, 17, 20, b"end", None),
    ]
    assert await collect(write(tmp_path / "e", b"")) == []


async def test_resume_equals_tail_of_full_read(tmp_path: Path) -> None:
    content = b"".join(b"line %d %s\n" % (i, b"x" * (i % 13)) for i in range(200)) + b"tail"
    path = write(tmp_path / "f", content)
    full = await collect(path, chunk_size=64)
    assert len(full) == 201
    for k in [0, 1, 2, 50, 199, 200]:
        prev = full[k - 1] if k else None
        rest = await collect(
            path,
            chunk_size=64,
            start_offset=prev.end if prev else 0,
            start_line=prev.number if prev else 0,
        )
        assert rest == full[k:]


async def test_start_offset_past_end_reads_from_zero(tmp_path: Path) -> None:
    """A file shorter than the checkpoint was truncated or replaced: read it all."""
    path = write(tmp_path / "f", b"a\nb\n")
    lines = await collect(path, start_offset=100, start_line=7)
    assert [tup(x) for x in lines] == [(8, 0, 2, b"a", None), (9, 2, 4, b"b", None)]


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 4096])
async def test_max_line_bytes_boundary(tmp_path: Path, chunk_size: int) -> None:
    limit = 10
    content = b"".join(
        [
            b"a" * 10 + b"\n",  # exactly the limit: fine
            b"b" * 10 + b"\r\n",  # limit + CR: the CR is not data, fine
            b"c" * 11 + b"\n",  # one over: error
            b"d" * 11 + b"\r\n",  # one over, with CR: error
            b"ok\n",
            b"e" * 30,  # over-long final line without newline
        ]
    )
    path = write(tmp_path / "f", content)
    lines = await collect(path, max_line_bytes=limit, chunk_size=chunk_size)
    assert [tup(x) for x in lines] == reference(content, limit)
    assert [x.error is None for x in lines] == [True, True, False, False, True, False]
    assert lines[2].error == "line is longer than 10 bytes"
    assert lines[2].data == b""


async def test_huge_line_skipped_without_buffering(tmp_path: Path) -> None:
    huge = 10 * 1024 * 1024
    path = tmp_path / "f"
    with path.open("wb") as f:
        f.write(b'{"first":1}\n')
        block = b"z" * (1024 * 1024)
        for _ in range(huge // len(block)):
            f.write(block)
        f.write(b'\n{"next":2}\n')
    tracemalloc.start()
    try:
        lines = await collect(str(path), max_line_bytes=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * 1024 * 1024, peak
    assert [tup(x) for x in lines] == [
        (1, 0, 12, b'{"first":1}', None),
        (2, 12, 12 + huge + 1, b"", "line is longer than 1000 bytes"),
        (3, 12 + huge + 1, 12 + huge + 12, b'{"next":2}', None),
    ]


def _collect_kw(path: str, kw: dict[str, object]):  # trio.run passes no keywords
    return collect(path, **kw)


_pieces = st.sampled_from([b"a", b"bc", b"\n", b"\n", b"\r", b"\r\n", b" ", b"\xff", b"\xc3\xa9"])


def _chunked_files(test):
    """File contents of awkward pieces, read in chunks of every small size, with every
    line cap, resumed after any line: the reader's property tests."""
    return settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])(given(
        content=st.lists(_pieces, max_size=120).map(b"".join),
        chunk_size=st.sampled_from([7, 1, 2, 3, 64]),
        max_line_bytes=st.sampled_from([BIG, 1, 4, 9]),
        resume_at=st.integers(0, 200),
    )(test))


@_chunked_files
def test_property_chunk_boundaries(
    content: bytes, chunk_size: int, max_line_bytes: int, resume_at: int
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "f", content)
        kw = {"chunk_size": chunk_size, "max_line_bytes": max_line_bytes}
        lines = trio.run(_collect_kw, path, kw)
        assert [tup(x) for x in lines] == reference(content, max_line_bytes)
        # contiguous, numbered 1.., covering every byte exactly once
        assert [x.number for x in lines] == list(range(1, len(lines) + 1))
        assert all(a.end == b.start for a, b in zip(lines, lines[1:], strict=False))
        assert b"".join(content[x.start : x.end] for x in lines) == content
        if b"\r" not in content and max_line_bytes == BIG:
            joined = b"".join(x.data + b"\n" for x in lines)
            assert joined == (
                content if content.endswith(b"\n") or not content else content + b"\n"
            )
        # resuming after any line gives the tail of the full read
        k = min(resume_at, len(lines))
        start = (lines[k - 1].end, lines[k - 1].number) if k else (0, 0)
        kw |= {"start_offset": start[0], "start_line": start[1]}
        assert trio.run(_collect_kw, path, kw) == lines[k:]


def expand(units: list[InputLine | InputBlock], max_line_bytes: int,
           content: bytes) -> list[tuple[int, int, int, bytes, str | None]]:
    """Blocks back into per-line tuples (offsets recovered from the block's data)."""
    out = []
    for unit in units:
        if isinstance(unit, InputLine):
            out.append(tup(unit))
            continue
        assert unit.error is None and unit.last >= unit.number
        pos = unit.start
        lines = split_block(unit.data, max_line_bytes)
        assert len(lines) == unit.last - unit.number + 1
        for i, (data, error) in enumerate(lines):
            nl = content.find(b"\n", pos)
            end = len(content) if nl == -1 else nl + 1
            out.append((unit.number + i, pos, end, data, error))
            pos = end
        assert pos == unit.end
    return out


@_chunked_files
def test_property_blocks_equal_lines(
    content: bytes, chunk_size: int, max_line_bytes: int, resume_at: int
) -> None:
    """read_lines(blocks=True), expanded with split_block, is exactly the per-line read,
    from the start and resumed after any line."""
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "f", content)
        kw: dict[str, object] = {"chunk_size": chunk_size, "max_line_bytes": max_line_bytes,
                                 "blocks": True}
        units = trio.run(_collect_kw, path, kw)
        expected = reference(content, max_line_bytes)
        assert expand(units, max_line_bytes, content) == expected
        k = min(resume_at, len(expected))
        start = (expected[k - 1][2], expected[k - 1][0]) if k else (0, 0)
        kw |= {"start_offset": start[0], "start_line": start[1]}
        assert expand(trio.run(_collect_kw, path, kw), max_line_bytes, content) == expected[k:]


async def test_blocks_never_hold_a_huge_line(tmp_path: Path) -> None:
    huge = 5 * 1024 * 1024
    path = write(tmp_path / "f", b'{"a":1}\n' + b"x" * huge + b'\n{"b":2}\n')
    units = await collect(path, max_line_bytes=1000, chunk_size=65536, blocks=True)
    assert all(len(u.data) <= 65536 + 1001 for u in units)
    assert expand(units, 1000, (tmp_path / "f").read_bytes()) == reference(
        (tmp_path / "f").read_bytes(), 1000)


STDIN_SCRIPT = """
import json, sys, trio
from fanout._daemon.reader import read_lines

async def main():
    kw = json.loads(sys.argv[1])
    async for x in read_lines(kw.pop("path", None), **kw):
        print(json.dumps([x.number, x.start, x.end, x.data.hex(), x.error]), flush=True)

trio.run(main)
"""


def run_stdin(stdin: bytes | Path, **kw: object) -> list[tuple[int, int, int, bytes, str | None]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-c", STDIN_SCRIPT, json.dumps(kw)]
    if isinstance(stdin, Path):
        with stdin.open("rb") as f:
            proc = subprocess.run(args, stdin=f, capture_output=True, env=env, timeout=60)
    else:
        proc = subprocess.run(args, input=stdin, capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    out = []
    for row in proc.stdout.decode().splitlines():
        n, s, e, h, err = json.loads(row)
        out.append((n, s, e, bytes.fromhex(h), err))
    return out


def test_stdin_pipe() -> None:
    content = b'{"a":1}\r\n\n\xff\xfe\n' + b"q" * 5000 + b"\nlast"
    assert run_stdin(content, chunk_size=7, max_line_bytes=100) == reference(content, 100)
    assert run_stdin(content, path="-") == reference(content)


def test_stdin_pipe_with_follow_ends_at_eof() -> None:
    assert run_stdin(b"a\nb", follow=True, poll_interval=POLL) == reference(b"a\nb")


def test_stdin_resume_pipe_and_file(tmp_path: Path) -> None:
    content = b"one\ntwo\nthree\n"
    # a pipe cannot seek: the first start_offset bytes are read and dropped
    assert run_stdin(content, start_offset=4, start_line=1) == reference(content, start=4, number=1)
    # stdin redirected from a file is seeked
    f = tmp_path / "in"
    f.write_bytes(content)
    assert run_stdin(f, start_offset=8, start_line=2) == reference(content, start=8, number=2)


def test_stdin_is_not_closed_for_the_process() -> None:
    script = (
        "import os, trio\n"
        "from fanout._daemon.reader import read_lines\n"
        "async def main():\n"
        "    async for _ in read_lines(None): pass\n"
        "trio.run(main)\n"
        "os.fstat(0)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script], input=b"x\n", capture_output=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"ok\n"


# --- follow (tail -F) ------------------------------------------------------------------------


class Follower:
    """Runs read_lines(follow=True) in a task and hands the lines over a channel."""

    def __init__(self, nursery: trio.Nursery, path: str, **kw: object) -> None:
        self.send, self.recv = trio.open_memory_channel[InputLine](1000)
        kw.setdefault("poll_interval", POLL)
        nursery.start_soon(self._run, path, kw)

    async def _run(self, path: str, kw: dict[str, object]) -> None:
        async with aclosing(read_lines(path, follow=True, **kw)) as lines:  # type: ignore[arg-type]
            async for line in lines:
                await self.send.send(line)

    async def take(self, n: int) -> list[InputLine]:
        return [await self.recv.receive() for _ in range(n)]

    async def assert_quiet(self, polls: int = 5) -> None:
        """Nothing arrives over several poll intervals (a negative check, cannot flake)."""
        await trio.sleep(polls * POLL)
        with pytest.raises(trio.WouldBlock):
            self.recv.receive_nowait()


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


async def test_follow_appended_lines_arrive(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"a\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p))
            assert [tup(x) for x in await fol.take(1)] == [(1, 0, 2, b"a", None)]
            append(p, b"bb\r\nc")
            assert [tup(x) for x in await fol.take(1)] == [(2, 2, 6, b"bb", None)]
            await fol.assert_quiet()  # "c" has no newline yet: it may be a partial write
            append(p, b"cc\n")
            assert [tup(x) for x in await fol.take(1)] == [(3, 6, 10, b"ccc", None)]
            nursery.cancel_scope.cancel()


async def test_follow_partial_line_waits_for_newline(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b'{"par')
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p), chunk_size=3)
            await fol.assert_quiet()
            append(p, b'tial":1}')
            await fol.assert_quiet()
            append(p, b"\n")
            (line,) = await fol.take(1)
            assert tup(line) == (1, 0, 14, b'{"partial":1}', None)
            nursery.cancel_scope.cancel()


async def test_follow_resume_from_offset(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"a\nb\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p), start_offset=2, start_line=1)
            append(p, b"c\n")
            assert [tup(x) for x in await fol.take(2)] == [
                (2, 2, 4, b"b", None),
                (3, 4, 6, b"c", None),
            ]
            nursery.cancel_scope.cancel()


async def test_follow_rotation(tmp_path: Path) -> None:
    p = tmp_path / "f"
    old = tmp_path / "f.1"
    p.write_bytes(b"1\n2\npar")
    old_id = input_identity(str(p))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p))
            assert [x.data for x in await fol.take(2)] == [b"1", b"2"]
            p.rename(old)
            await fol.assert_quiet()  # path missing: keep polling, nothing to yield
            # the writer still has the old file open and completes its line
            append(old, b"tial\n")
            (line,) = await fol.take(1)
            assert tup(line) == (3, 4, 12, b"partial", None)
            assert line.identity == old_id
            append(old, b"unterminated")
            await fol.assert_quiet()
            p.write_bytes(b"x\ny\n")
            new_id = input_identity(str(p))
            assert new_id != old_id
            got = await fol.take(3)
            assert [tup(x) for x in got] == [
                (4, 12, 24, b"unterminated", None),  # yielded because the file rotated away
                (5, 0, 2, b"x", None),
                (6, 2, 4, b"y", None),
            ]
            assert [x.identity for x in got] == [old_id, new_id, new_id]
            append(p, b"z\n")
            assert [tup(x) for x in await fol.take(1)] == [(7, 4, 6, b"z", None)]
            nursery.cancel_scope.cancel()


async def test_follow_rotation_drains_old_file(tmp_path: Path) -> None:
    """Data written to the old file just before the new one appears is not lost."""
    p = tmp_path / "f"
    p.write_bytes(b"a\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p), chunk_size=4)
            await fol.take(1)
            p.rename(tmp_path / "f.1")
            append(tmp_path / "f.1", b"".join(b"old%d\n" % i for i in range(50)))
            p.write_bytes(b"new\n")
            got = await fol.take(51)
            assert [x.data for x in got] == [b"old%d" % i for i in range(50)] + [b"new"]
            assert [x.number for x in got] == list(range(2, 53))
            assert got[-1].start == 0
            nursery.cancel_scope.cancel()


async def test_follow_truncation_restarts_at_zero(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"aaaa\nbbbb\nzz")
    ident = input_identity(str(p))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p))
            assert [x.data for x in await fol.take(2)] == [b"aaaa", b"bbbb"]
            with p.open("r+b") as f:  # truncate in place (same inode), then rewrite
                f.truncate(0)
            append(p, b"c\n")
            got = await fol.take(2)
            assert [tup(x) for x in got] == [
                (3, 10, 12, b"zz", None),  # the old unterminated tail, never to be completed
                (4, 0, 2, b"c", None),
            ]
            assert {x.identity for x in got} == {ident}
            append(p, b"d\n")
            assert [tup(x) for x in await fol.take(1)] == [(5, 2, 4, b"d", None)]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("truncate", [False, True])
async def test_follow_rewrite_in_place_is_read_whole(tmp_path: Path, truncate: bool) -> None:
    """New content written over the old (same inode), already longer than the old offset
    when the reader looks: its size alone never showed it (4,931 of 6,000 lines skipped)."""
    p = tmp_path / "f"
    p.write_bytes(b"".join(b"old %03d\n" % i for i in range(10)))
    new = b"".join(b"new line %04d\n" % i for i in range(60))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p))
            assert len(await fol.take(10)) == 10
            with p.open("r+b") as f:  # one write: the reader never sees it short
                if truncate:
                    f.truncate(0)
                f.write(new)
            got = await fol.take(60)
            assert [x.data for x in got] == new.splitlines()
            assert got[0].start == 0 and got[0].number == 11
            await fol.assert_quiet()
            nursery.cancel_scope.cancel()


async def test_follow_waits_for_missing_path(tmp_path: Path) -> None:
    p = tmp_path / "later"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p))
            await fol.assert_quiet()
            p.write_bytes(b"hello\n")
            (line,) = await fol.take(1)
            assert tup(line) == (1, 0, 6, b"hello", None)
            assert line.identity == input_identity(str(p))
            nursery.cancel_scope.cancel()


async def test_follow_rotation_retries_permission_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """logrotate creates the new file before fixing its mode: a transient EACCES is retried."""
    import fanout._daemon.reader as reader

    real_open = reader._open_path
    denials = []

    def flaky_open(path: str):  # type: ignore[no-untyped-def]
        if denials and len(denials) < 4:
            denials.append(path)
            raise PermissionError(13, "Permission denied", path)
        return real_open(path)

    monkeypatch.setattr(reader, "_open_path", flaky_open)
    p = tmp_path / "f"
    p.write_bytes(b"a\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fol = Follower(nursery, str(p))
            await fol.take(1)
            denials.append("armed")
            p.rename(tmp_path / "f.1")
            p.write_bytes(b"b\n")
            (line,) = await fol.take(1)
            assert tup(line) == (2, 0, 2, b"b", None)
            assert len(denials) == 4
            nursery.cancel_scope.cancel()


# --- errors and expand_inputs ----------------------------------------------------------------


async def test_missing_file_without_follow(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        await collect(str(tmp_path / "nope"))


async def test_unreadable_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fanout._daemon.reader as reader

    def denied(path: str):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(reader, "_open_path", denied)
    with pytest.raises(ConfigError, match="Permission denied"):
        await collect(write(tmp_path / "f", b"a\n"), follow=True, poll_interval=POLL)


async def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory"):
        await collect(str(tmp_path))


@pytest.mark.parametrize(
    "kw",
    [
        {"start_offset": -1},
        {"start_line": -1},
        {"max_line_bytes": 0},
        {"chunk_size": 0},
        {"poll_interval": 0},
    ],
)
async def test_bad_arguments(tmp_path: Path, kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        await collect(write(tmp_path / "f", b"a\n"), **kw)


def test_input_identity(tmp_path: Path) -> None:
    a = write(tmp_path / "a", b"")
    st = os.stat(a)
    assert input_identity(a) == (st.st_dev, st.st_ino)
    os.replace(write(tmp_path / "b", b""), a)
    assert input_identity(a) != (st.st_dev, st.st_ino)


def test_expand_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ["b.ndjson", "a.ndjson", "c.log", "x[1].ndjson"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert expand_inputs(["-"]) == ["-"]
    assert expand_inputs(["c.log", "*.ndjson", "-", "a.ndjson", "./c.log", "-"]) == [
        "c.log",
        "a.ndjson",
        "b.ndjson",
        "x[1].ndjson",
        "-",
    ]
    # a literal name that looks like a glob
    assert expand_inputs(["x[1].ndjson"]) == ["x[1].ndjson"]
    assert expand_inputs([]) == []
    with pytest.raises(ConfigError, match=r"'\*\.json' matches no file"):
        expand_inputs(["a.ndjson", "*.json"])
    with pytest.raises(ConfigError, match="missing.ndjson"):
        expand_inputs(["missing.ndjson"])
    with pytest.raises(ConfigError, match="'sub'"):
        expand_inputs(["sub"])
    with pytest.raises(ConfigError, match="sub"):
        expand_inputs(["s*"])
