"""The daemon keeps its word when its own surroundings fail (issue 14): a results reader
that stalls, a disk that fills, an output file deleted or moved under it, an input file
rewritten in place, a checkpoint that does not match its input. Real processes, a real
FIFO, a real small file system (a tmpfs this test mounts, or /dev/full if it cannot)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import termios
from pathlib import Path

import pytest
import trio

from fanout._exits import EXIT_OUTPUT

from .helpers import PAYLOAD, daemon_cmd, mock_server, read_results, run_daemon, write_input

F_GETPIPE_SZ = 1032


class Stderr:
    """A daemon's stderr, read as it comes: wait for a line to appear."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.data = bytearray()
        self._changed = trio.Event()

    async def pump(self) -> None:
        while chunk := await self.stream.receive_some(65536):
            self.data += chunk
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, needle: bytes) -> None:
        while needle not in self.data:
            await self._changed.wait()

    def text(self) -> str:
        return self.data.decode(errors="replace")[-3000:]


def lines_of(results: list[dict]) -> list[int]:
    return [r["line"] for r in results]


async def test_a_stalled_fifo_reader_blocks_nothing_but_the_input(tmp_path, pki, signing_key):
    """The reader of a results FIFO stops for longer than the push timeout: SIGTERM is
    handled while it is stopped, and no answer that arrived meanwhile is taken for lost
    (the loop wrote on a blocked pipe: 9% were reset and sent twice)."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 3000)
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the reader is there first
    capacity = fcntl.fcntl(rfd, F_GETPIPE_SZ)
    reader = trio.lowlevel.FdStream(rfd)
    got = bytearray()
    async with mock_server(pki, signing_key) as mock, trio.open_nursery() as nursery:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(fifo),
                         "--output-buffer", "0.1", "--timeout", "3", "--max-in-flight", "100")
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
        err = Stderr(proc.stderr)
        nursery.start_soon(err.pump)
        with trio.fail_after(60):
            while got.count(b"\n") < 200:
                got += await reader.receive_some(4096)
            # the reader stops: wait until the pipe is full, then stay stopped longer than
            # the push timeout (the stall is the fault under test)
            while True:
                queued = fcntl.ioctl(rfd, termios.FIONREAD, b"\0\0\0\0")
                # (whole records of at most PIPE_BUF a write leave part of each page)
                if int.from_bytes(queued, "little") >= capacity * 3 // 4:
                    break
                await trio.sleep(0.05)
        await trio.sleep(5)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):  # handled while the reader is still stopped
            await err.wait_for(b"draining pushes in flight")
        with trio.fail_after(60):
            while chunk := await reader.receive_some(65536):
                got += chunk
            await proc.wait()
    assert proc.returncode == 0, err.text()
    first = [json.loads(x) for x in got.splitlines()]
    assert len(set(lines_of(first))) == len(first) < 3000
    assert all(r["outcome"] == "delivered" and r["attempts"] == 1 for r in first), \
        [r for r in first if r["attempts"] != 1][:3]
    assert not any(r.get("resent") for r in first)
    out = tmp_path / "rest.ndjson"
    async with mock_server(pki, signing_key) as mock:
        again = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                            str(out)))
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    rest = read_results(out)
    assert sorted(lines_of(first) + lines_of(rest)) == list(range(1, 3001))


async def _run_until(proc: subprocess.Popen, out: Path, n: int) -> None:
    """Wait until ``out`` holds ``n`` results (the daemon is mid-run)."""
    with trio.fail_after(60):
        while not out.exists() or out.read_bytes().count(b"\n") < n:
            assert proc.poll() is None, "the daemon ended before the fault"
            await trio.sleep(0.02)


async def _wait_exit(proc: subprocess.Popen) -> None:
    with trio.fail_after(120):
        while proc.poll() is None:
            await trio.sleep(0.05)


async def test_the_results_file_deleted_mid_run(tmp_path, pki, signing_key):
    """Deleted under the daemon: it reopens the path and writes again what the deleted
    file took since the last checkpoint; no line is marked done whose result is gone (it
    wrote on into the unlinked inode and exited 0 with 20,801 lines' results nowhere)."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 3000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--max-in-flight", "50", "--checkpoint-interval", "0.05")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await _run_until(proc, out, 300)
        held = os.open(out, os.O_RDONLY)
        out.unlink()
        deleted_at = os.fstat(held).st_size
        await _wait_exit(proc)
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err[-2000:]
    assert "was deleted while results were written" in err
    before = [json.loads(x) for x in os.pread(held, deleted_at, 0).splitlines()]
    os.close(held)
    after = read_results(out)  # the file is there again
    assert len(set(lines_of(after))) == len(after)
    assert set(lines_of(before)) | set(lines_of(after)) == set(range(1, 3001))


async def test_the_results_file_moved_away_without_sighup(tmp_path, pki, signing_key):
    """Rotated by a tool that sends no SIGHUP: new results go to a new file at the path;
    what the moved file holds stays there; every line once."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 3000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--max-in-flight", "50", "--checkpoint-interval", "0.05")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await _run_until(proc, out, 300)
        moved = tmp_path / "results.ndjson.1"
        out.rename(moved)
        await _wait_exit(proc)
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err[-2000:]
    assert "was moved away" in err
    old, new = read_results(moved), read_results(out)
    assert old and new
    assert sorted(lines_of(old) + lines_of(new)) == list(range(1, 3001))


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs mounted for the test; /dev/full (every write: ENOSPC) if mounting is
    not allowed here."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                             capture_output=True).returncode == 0
    try:
        yield where / "results.ndjson" if mounted else Path("/dev/full")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_full_disk_stops_cleanly_and_the_restart_loses_nothing(tmp_path, pki,
                                                                       signing_key, small_fs):
    inp = tmp_path / "in.ndjson"
    write_input(inp, 3000)
    async with mock_server(pki, signing_key) as mock:
        full = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(small_fs), "--checkpoint-interval", "0.05"))
        err = full.stderr.decode()
        assert full.returncode == EXIT_OUTPUT, err[-2000:]
        assert "No space left on device" in err and "Traceback" not in err
        assert err.count("error:") == 1, err[-2000:]
        checkpoint = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
        written: list[dict] = []
        if small_fs.is_file():
            # everything the checkpoint covers was written whole (the torn last line, if
            # any, is beyond it)
            data = small_fs.read_bytes()
            torn = not data.endswith(b"\n")
            written = [json.loads(x) for x in data.splitlines()[:-1 if torn else None]]
            assert set(range(1, checkpoint["line"] + 1)) <= set(lines_of(written))
            moved = tmp_path / "results.ndjson"
            moved.write_bytes(data)  # the operator moves it to a disk with room
        else:
            assert checkpoint["line"] == 0
            moved = tmp_path / "results.ndjson"
        again = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                            str(moved)))
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    results = read_results(moved)  # every line parses: the torn one was cut off
    assert set(lines_of(results)) == set(range(1, 3001))
    first, second = results[:len(written)], results[len(written):]
    assert len(set(lines_of(second))) == len(second)
    twice = set(lines_of(first)) & set(lines_of(second))
    assert all(r.get("resent") for r in second if r["line"] in twice)


def _line(i: int) -> bytes:
    return json.dumps({"id": f"x{i}", "token": f"{i:064x}", "payload": PAYLOAD}).encode() + b"\n"


async def test_follow_reads_a_file_rewritten_in_place_whole(tmp_path, pki, signing_key):
    """--follow, and new content written over the old (same inode, already longer than
    the old offset): every new line gets its result, none is skipped or cut."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 100)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key) as mock:
        proc = subprocess.Popen(daemon_cmd(mock, pki, signing_key, str(inp), "--follow",
                                           "--results", str(out), "--checkpoint-interval",
                                           "0.05"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await _run_until(proc, out, 100)
            with open(inp, "r+b") as fh:  # in place, never shorter than before
                fh.write(b"".join(_line(i) for i in range(1, 601)))
            await _run_until(proc, out, 700)
        finally:
            proc.send_signal(signal.SIGTERM)
            await _wait_exit(proc)
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err[-2000:]
    results = read_results(out)
    assert "rewritten in place" in err
    assert sorted(r["id"] for r in results) == sorted(
        [f"p{i}" for i in range(1, 101)] + [f"x{i}" for i in range(1, 601)])
    assert {r["outcome"] for r in results} == {"delivered"}


def _spoil_offset(inp: Path, cp: Path) -> str:
    data = json.loads(cp.read_text())
    data["offset"] -= 3
    cp.write_text(json.dumps(data))
    return "not the end of a line"


def _spoil_past_end(inp: Path, cp: Path) -> str:
    inp.write_bytes(inp.read_bytes()[:200])  # truncated while the daemon was down
    return "was truncated or rewritten"


def _spoil_replaced(inp: Path, cp: Path) -> str:
    copy = inp.with_name("copy")
    copy.write_bytes(inp.read_bytes())  # a copy (another inode): its lines were all sent
    copy.replace(inp)
    return "belongs to another file"


def _spoil_rewritten(inp: Path, cp: Path) -> str:
    data = bytearray(inp.read_bytes())
    offset = json.loads(cp.read_text())["offset"]
    data[offset - 10:offset - 2] = b"XXXXXXXX"  # same inode, same size
    with open(inp, "r+b") as fh:
        fh.write(bytes(data))
    return "rewritten in place"


def _spoil_garbage(inp: Path, cp: Path) -> str:
    cp.write_bytes(b"\x00\x01{not json")
    return "is corrupt"


@pytest.mark.parametrize("spoil", [_spoil_offset, _spoil_past_end, _spoil_replaced,
                                   _spoil_rewritten, _spoil_garbage])
async def test_a_checkpoint_that_does_not_match_its_input(tmp_path, pki, signing_key, spoil):
    """One line naming the checkpoint and how to go on, exit 2, nothing sent: never a
    resume in the middle of a line, of a rewritten file, or a whole file sent twice."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 100)
    cp = tmp_path / "in.ndjson.checkpoint"
    async with mock_server(pki, signing_key) as mock:
        first = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                            str(tmp_path / "first.ndjson")))
        assert first.returncode == 0
        expected = spoil(inp, cp)
        before = mock.stats.requests
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp)))
    err = proc.stderr.decode()
    assert proc.returncode == 2, err[-2000:]
    assert expected in err and "Traceback" not in err, err[-2000:]
    assert "in.ndjson.checkpoint" in err and ("move" in err or "edit" in err)
    assert mock.stats.requests == before



async def test_kill9_on_a_fifo_never_leaves_its_reader_half_a_record(tmp_path, pki,
                                                                       signing_key):
    """A results FIFO whose reader stays while the daemon is killed with SIGKILL and
    started again: the reader gets whole records only (a write cut mid-record was glued
    onto the next daemon's first one), every line accounted for, duplicates resent."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 4000)
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    hold = os.open(fifo, os.O_WRONLY)  # the reader never sees EOF between the two runs
    reader = trio.lowlevel.FdStream(rfd)
    got = bytearray()
    async with mock_server(pki, signing_key, latency=0.02) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(fifo),
                         "--max-in-flight", "200", "--checkpoint-interval", "0.05")
        with trio.fail_after(60):
            first = await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)
            while got.count(b"\n") < 1500:  # slowly: the daemon is mostly mid-write
                got += await reader.receive_some(997)
            first.kill()
            await first.wait()
            second = await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL,
                                                      stderr=subprocess.PIPE)
            async with trio.open_nursery() as nursery:
                err = Stderr(second.stderr)
                nursery.start_soon(err.pump)
                while second.returncode is None:
                    with trio.move_on_after(0.2):
                        got += await reader.receive_some(65536)
                    second.poll()
                os.close(hold)
                while chunk := await reader.receive_some(65536):
                    got += chunk
    assert second.returncode == 0, err.text()
    results = [json.loads(x) for x in got.splitlines()]  # every record whole
    seen: dict[int, list[dict]] = {}
    for r in results:
        seen.setdefault(r["line"], []).append(r)
    assert set(seen) == set(range(1, 4001))
    assert all(any(r.get("resent") for r in rs) for rs in seen.values() if len(rs) > 1)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_checkpoint_that_cannot_be_written(tmp_path, pki, signing_key, workers):
    """One line naming it and the fix, exit 5, not a traceback per task; nothing sent
    (the first checkpoint is written before the first push)."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 50)
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--checkpoint",
                                           str(tmp_path / "missing" / "cp"), "--workers",
                                           workers))
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_OUTPUT, err[-2000:]
    assert "cannot write the checkpoint" in err and "missing/cp" in err, err[-2000:]
    assert "Traceback" not in err and err.count("error:") == 1, err[-2000:]
    assert mock.stats.requests == 0


async def test_a_mismatched_checkpoint_with_workers(tmp_path, pki, signing_key):
    inp = tmp_path / "in.ndjson"
    write_input(inp, 50)
    cp = tmp_path / "in.ndjson.checkpoint"
    async with mock_server(pki, signing_key) as mock:
        first = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                            str(tmp_path / "first.ndjson")))
        assert first.returncode == 0
        _spoil_offset(inp, cp)
        before = mock.stats.requests
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--workers", "2"))
    err = proc.stderr.decode()
    assert proc.returncode == 2, err[-2000:]
    assert "not the end of a line" in err and "Traceback" not in err, err[-2000:]
    assert mock.stats.requests == before
