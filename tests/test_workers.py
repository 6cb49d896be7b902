"""``fanout run --workers N`` (fanout/_daemon/workers.py) at its edges: kills, signals,
labelled inputs, configuration errors and the frame protocol, each as a real run against
the mock APNs (the daemon a real process, its workers found by ``_children``), plus one
in-process check of the coordinator's frame parser.

Every test is bounded: small inputs, latency on the mock so that kills land mid-run, and
waiting for facts (results written, a log line, a checkpoint) rather than for a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from fanout.testing.devcerts import TestPKI, TestSigningKey

from .helpers import (
    PAYLOAD,
    TOPIC,
    count_lines,
    daemon_cmd,
    mock_server,
    read_results,
    run_daemon,
    wait_exit,
    wait_until,
    write_input,
)

PAD = "x" * 900  # a custom payload key: ~1 KiB lines, so the window (8,192 lines) >> a pipe


def _children(pid: int) -> list[int]:
    """The worker processes of coordinator ``pid``, oldest (lowest pid) first."""
    kids = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            listed = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in listed:
            try:
                cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"--child" in cmdline.split(b"\0"):
                kids.append(int(kid))
    return sorted(kids)


@contextlib.contextmanager
def coordinator(cmd: list[str], err: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` as a process (stderr to ``err``); killed with its workers (their own
    sessions) if the test ends first."""
    with open(err, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh)
    workers: set[int] = set()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            workers.update(_children(proc.pid))
            proc.kill()
            proc.wait(10)
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


async def both_workers(proc: subprocess.Popen[bytes]) -> list[int]:
    await wait_until(lambda: len(_children(proc.pid)) == 2, 30, "both workers up")
    return _children(proc.pid)


async def worker_once(proc: subprocess.Popen[bytes], out: Path, results: int) -> int:
    """A worker's pid, once both workers run and ``results`` results are written."""
    victim, _ = await both_workers(proc)
    await wait_until(lambda: count_lines(out) >= results, 30, f"{results} results")
    return victim


async def kill_mid_handover(proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
    """kill -9 of a worker mid-run; back once its blocks are being handed to the other."""
    os.kill(await worker_once(proc, out, 200), signal.SIGKILL)
    await wait_until(lambda: b"marked resent" in err.read_bytes(), 30, "the hand-over started")


def padded_input(path: Path, n: int, first: int = 1) -> None:
    """``n`` lines of ~1 KiB (a padded payload), ids p<line>."""
    payload = {**PAYLOAD, "pad": PAD}
    with open(path, "wb") as fh:
        for i in range(first, first + n):
            fh.write(json.dumps({"id": f"p{i}", "token": f"{i:064x}",
                                 "payload": payload}).encode() + b"\n")


def per_line(out: Path, key: str | None = None) -> dict[Any, list[dict[str, Any]]]:
    by: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in read_results(out):
        by[(r.get("input"), r["line"]) if key else r["line"]].append(r)
    return by


def no_silent_duplicates(by: dict[Any, list[dict[str, Any]]]) -> None:
    dup = {k: rs for k, rs in by.items() if len(rs) > 1}
    bad = [k for k, rs in dup.items() if not any(r.get("resent") for r in rs)]
    assert not bad, f"{len(bad)} lines with two results and no resent, e.g. {bad[:5]}"


def checkpoint_covers_only_results(inp: Path, by: dict[Any, list[dict[str, Any]]]) -> int:
    """Every line the checkpoint covers has a result; the checkpoint's line."""
    cp = json.loads(Path(str(inp) + ".checkpoint").read_text())
    missing = set(range(1, cp["line"] + 1)) - set(by)
    assert not missing, f"checkpoint at {cp['line']} covers lines with no result: " \
                        f"{sorted(missing)[:5]}"
    return int(cp["line"])


# ----------------------------------------------------------------- kills


async def test_both_workers_killed_the_run_does_not_exit_0(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """kill -9 of one worker, then of the other (who took its blocks): no worker is left
    and most lines never got a result, so the run must not report success (exit 0)."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 4000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20",
                         "--checkpoint-interval", "0.05")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            first, second = await both_workers(proc)
            await wait_until(lambda: count_lines(out) >= 100, 30, "100 results")
            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: b"marked resent" in err.read_bytes()
                             or b"no lines unfinished" in err.read_bytes(), 30,
                             "the first death handled")
            os.kill(second, signal.SIGKILL)
            code = await wait_exit(proc, 30)
    by = per_line(out)
    assert len(by) < 4000  # the kills landed mid-run
    checkpoint_covers_only_results(inp, by)
    no_silent_duplicates(by)
    assert code != 0, f"exit 0 with {4000 - len(by)} of 4000 lines without a result"


async def test_worker_killed_while_the_coordinator_is_blocked_writing_to_it(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """~1 KiB lines: the window is 8 MiB, a pipe 1 MiB, so the coordinator is blocked in
    the write of a block most of the time. kill -9 of a worker then: the block half
    written to it goes through the other, with every other block it left."""
    inp = tmp_path / "in.ndjson"
    lines = 4000
    padded_input(inp, lines)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            victim = await worker_once(proc, out, 200)
            os.kill(victim, signal.SIGKILL)
            assert count_lines(out) < lines
            code = await wait_exit(proc, 60)
    stderr = err.read_text()
    assert code == 0, stderr[-2000:]
    assert "marked resent" in stderr, stderr[-2000:]
    by = per_line(out)
    assert set(range(1, lines + 1)) - set(by) == set(), stderr[-2000:]
    no_silent_duplicates(by)
    assert checkpoint_covers_only_results(inp, by) == lines


async def test_a_rejected_push_of_a_worker_killed_later_still_exits_1(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Line 1 is rejected (a token that is not hex) by the worker that took block 1; that
    worker finishes its block and is then killed (nothing of it left unfinished). The
    results hold a ``rejected``, so the run exits 1, as the single-process daemon does:
    the coordinator takes the code from the workers' exit codes only, and a killed
    worker's code (-9) says nothing of what it reported."""
    inp = tmp_path / "in.ndjson"
    # block 1 (256 KiB): ~250 padded lines, quick; block 2: ~2,000 small ones, slow
    padded = tmp_path / "a"
    padded_input(padded, 300)
    small = tmp_path / "b"
    write_input(small, 2300)
    body = padded.read_bytes().splitlines(keepends=True)
    body[0] = json.dumps({"id": "p1", "token": "not-hex", "payload": PAYLOAD}).encode() + b"\n"
    tail = small.read_bytes().splitlines(keepends=True)[300:]
    inp.write_bytes(b"".join(body + tail))
    out = tmp_path / "results.ndjson"
    cp_path = Path(str(inp) + ".checkpoint")

    def block_1_done() -> bool:
        try:
            return json.loads(cp_path.read_text())["line"] > 0
        except (OSError, ValueError):
            return False

    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20",
                         "--checkpoint-interval", "0.05")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            first, _ = await both_workers(proc)  # the older one took block 1
            await wait_until(block_1_done, 30, "block 1 done (the checkpoint moved)")
            assert count_lines(out) < 2300
            os.kill(first, signal.SIGKILL)
            code = await wait_exit(proc, 60)
    stderr = err.read_text()
    by = per_line(out)
    assert set(by) == set(range(1, 2301)), stderr[-2000:]
    assert [r["outcome"] for r in by[1]] == ["rejected"]
    assert code == 1, f"exit {code} with a rejected push in the results"


# ----------------------------------------------------------------- signals


async def test_sigterm_while_a_block_write_is_blocked_drains_without_the_deadline(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """SIGTERM while the coordinator is blocked writing a block (~1 KiB lines: the pipes
    are full): the drain finishes what the workers took and exits 0. The block being
    written was entered in the books before its write, which the drain cancels: the drain
    then waits for a block no worker has (whole), until the drain deadline, and the run
    ends forced (130)."""
    inp = tmp_path / "in.ndjson"
    padded_input(inp, 8000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20",
                         "--drain-timeout", "25", "--checkpoint-interval", "0.05")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            await both_workers(proc)
            await wait_until(lambda: count_lines(out) >= 200, 30, "200 results")
            proc.send_signal(signal.SIGTERM)
            code = await wait_exit(proc, 40)
    stderr = err.read_text()
    assert "drain timeout" not in stderr, "the drain waited for its deadline"
    assert code == 0, stderr[-2000:]
    by = per_line(out)
    cp = checkpoint_covers_only_results(inp, by)
    assert sorted(by) == list(range(1, cp + 1))
    no_silent_duplicates(by)


async def test_worker_killed_during_a_sigterm_drain(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """SIGTERM, then kill -9 of a worker while the drain runs: its blocks go through the
    other (stdin still open), the drain ends, exit 0; the checkpoint covers exactly the
    lines with results."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 30_000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "50",
                         "--drain-timeout", "50", "--checkpoint-interval", "0.05")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            victim = await worker_once(proc, out, 500)
            proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: b"draining" in err.read_bytes(), 30, "the drain")
            at_term = count_lines(out)
            await wait_until(lambda: count_lines(out) >= at_term + 300, 30, "300 more")
            os.kill(victim, signal.SIGKILL)
            code = await wait_exit(proc, 55)
    stderr = err.read_text()
    assert code == 0, stderr[-2000:]
    assert "drain timeout" not in stderr
    by = per_line(out)
    assert len(by) < 30_000
    no_silent_duplicates(by)
    cp = checkpoint_covers_only_results(inp, by)
    assert sorted(by) == list(range(1, cp + 1))


async def test_sigterm_during_a_redispatch_leaves_no_wrong_results(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """kill -9 of a worker while the coordinator is blocked writing a block to the other
    (~1 KiB lines), so the dead one's blocks queue behind that write; then SIGTERM. The
    drain cancels the write half done, and the next block written (a hand-over) follows
    the half block on the same stdin: the worker reads the hand-over's header and bytes
    as the rest of the half block. Every result must still be the line's own (the input
    has no bad line: no ``malformed``, every id p<line>)."""
    inp = tmp_path / "in.ndjson"
    lines = 6000
    padded_input(inp, lines)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20",
                         "--drain-timeout", "40", "--checkpoint-interval", "0.05")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            await kill_mid_handover(proc, out, err)
            proc.send_signal(signal.SIGTERM)
            code = await wait_exit(proc, 50)
    stderr = err.read_text()
    wrong = [r for r in read_results(out)
             if r["outcome"] != "delivered" or r.get("id") != f"p{r['line']}"]
    assert not wrong, f"{len(wrong)} wrong results, e.g. {str(wrong[:2])[:600]}"
    assert code == 0, stderr[-2000:]
    by = per_line(out)
    no_silent_duplicates(by)
    cp = checkpoint_covers_only_results(inp, by)
    assert sorted(by) == list(range(1, cp + 1))


async def test_forced_stop_during_a_redispatch_then_a_rerun_finishes(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """kill -9 of a worker (its blocks being handed to the other), then SIGTERM twice:
    the run stops at once (130, no hang); a rerun finishes the input; every line has a
    result and a second result only marked resent."""
    inp = tmp_path / "in.ndjson"
    lines = 6000
    padded_input(inp, lines)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20",
                         "--drain-timeout", "50", "--checkpoint-interval", "0.05")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            await kill_mid_handover(proc, out, err)
            proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: b"draining" in err.read_bytes(), 30, "the drain")
            proc.send_signal(signal.SIGTERM)
            code = await wait_exit(proc, 20)
        assert code == 130, err.read_text()[-2000:]
        by = per_line(out)
        checkpoint_covers_only_results(inp, by)
        no_silent_duplicates(by)
        again = await run_daemon(cmd, timeout=60)
    assert again.returncode in (0, 1), again.stderr.decode()[-2000:]
    by = per_line(out)
    assert set(by) == set(range(1, lines + 1))
    no_silent_duplicates(by)


# ----------------------------------------------------------------- labelled inputs


async def test_labelled_inputs_worker_killed_during_the_first_file(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Two inputs (``I LABEL`` between them, line numbers restart): kill -9 of a worker
    while the first is being finished; its blocks go through the other, the second file
    follows; every (input, line) has a result with the right label, both checkpoints at
    the end."""
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    write_input(a, 3000)
    write_input(b, 3000, seed=2)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(a), str(b), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            victim = await worker_once(proc, out, 500)
            os.kill(victim, signal.SIGKILL)
            code = await wait_exit(proc, 60)
    stderr = err.read_text()
    assert code == 0, stderr[-2000:]
    by = per_line(out, key="input")
    want = {(str(p), i) for p in (a, b) for i in range(1, 3001)}
    assert set(by) - want == set(), sorted(set(by) - want)[:5]
    assert want - set(by) == set(), sorted(want - set(by))[:5]
    no_silent_duplicates(by)
    for p in (a, b):
        cp = json.loads(Path(str(p) + ".checkpoint").read_text())
        assert cp["line"] == 3000 and cp["offset"] == p.stat().st_size


# ----------------------------------------------------------------- configuration errors


def _topic_refused_input(path: Path, n: int) -> None:
    write_input(path, n)
    rows = path.read_bytes().splitlines(keepends=True)
    rows[2] = json.dumps({"id": "p3", "token": f"{3:064x}", "topic": "com.example.other",
                          "payload": PAYLOAD}).encode() + b"\n"
    path.write_bytes(b"".join(rows))


async def test_config_error_in_one_worker_exits_3_with_a_true_checkpoint(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Line 3's topic is refused (TopicDisallowed: a configuration error) by the worker
    that took block 1, which stops (exit 3); the other is healthy. The coordinator ends
    with 3; the checkpoint covers only lines with results; no silent duplicates."""
    inp = tmp_path / "in.ndjson"
    _topic_refused_input(inp, 4000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, topics={TOPIC}) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2")
        proc = await run_daemon(cmd, timeout=60)
    stderr = proc.stderr.decode()
    assert proc.returncode == 3, stderr[-2000:]
    assert "TopicDisallowed" in stderr
    by = per_line(out)
    checkpoint_covers_only_results(inp, by)
    no_silent_duplicates(by)


async def test_config_error_in_one_worker_stops_a_follow_run(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """As above with ``--follow``: a configuration error stops sending and the daemon
    exits 3 (docs/daemon.md, and what one process does). With workers the coordinator
    goes on feeding the healthy worker and following the file: it never ends."""
    inp = tmp_path / "in.ndjson"
    _topic_refused_input(inp, 3000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, topics={TOPIC}) as mock:
        single = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                             str(tmp_path / "single.ndjson"), "--follow",
                                             "--no-checkpoint"), timeout=30)
        assert single.returncode == 3  # one process: stops and exits 3
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--follow")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            await wait_until(lambda: b"TopicDisallowed" in err.read_bytes(), 30,
                             "the configuration error")
            with trio.move_on_after(20):
                while proc.poll() is None:
                    await trio.sleep(0.05)
            code = proc.poll()
            kids = _children(proc.pid)
    assert code == 3, (f"still running 20 s after the configuration error "
                       f"({len(kids)} worker(s) left)" if code is None else f"exit {code}")


# ----------------------------------------------------------------- the frame protocol


async def test_a_result_bigger_than_a_frame(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Lines whose results are over FRAME_BYTES (64 KiB: their ``id`` is that long). A
    worker frames such a result as soon as it is written, before its count is taken: its
    first one goes out as ``R n -`` (no counts yet), which the coordinator parsed as
    ``outcome=count`` (int(b"")): ValueError, and the whole run died."""
    inp = tmp_path / "in.ndjson"
    with open(inp, "wb") as fh:
        for i in range(1, 4):
            fh.write(json.dumps({"id": f"{i}" + "i" * 70_000, "token": f"{i:064x}",
                                 "payload": PAYLOAD}).encode() + b"\n")
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(out), "--workers", "2"), timeout=60)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr[-1500:]
    by = per_line(out)
    assert set(by) == {1, 2, 3}
    assert Counter(r["outcome"] for rs in by.values() for r in rs) == {"delivered": 3}


class _Chunks:
    """A worker's stdout: ``data`` in reads of ``size`` bytes, then EOF."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self._size = data, size

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        chunk, self._data = self._data[:self._size], self._data[self._size:]
        return chunk


async def test_a_forced_stop_ends_with_a_worker_that_no_longer_runs(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """A worker alive but no longer running (SIGSTOP here; a wedged process, a disk in D
    state alike): it stops reading its stdin. SIGTERM: the drain deadline (2 s) forces the
    stop, a further SIGTERM too. The coordinator sends the workers SIGTERM, which a
    stopped process never acts on; it waited for every worker under a shielded scope that
    nothing cancelled, and the run never ended. Now a worker has WORKER_EXIT_S to exit
    after a forced stop, then it is killed."""
    inp = tmp_path / "in.ndjson"
    padded_input(inp, 8000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20",
                         "--drain-timeout", "2", "--checkpoint-interval", "0.05")
        err = tmp_path / "stderr"
        with coordinator(cmd, err) as proc:
            victim = await worker_once(proc, out, 200)
            os.kill(victim, signal.SIGSTOP)
            proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: b"drain timeout" in err.read_bytes(), 30,
                             "the drain deadline's forced stop")
            proc.send_signal(signal.SIGTERM)  # "a second signal stops at once"
            code = await wait_exit(proc, 20)
    assert code == 130, f"exit {code}: {err.read_text()[-2000:]}"
    by = per_line(out)
    checkpoint_covers_only_results(inp, by)
    no_silent_duplicates(by)


async def test_a_worker_that_could_not_write_the_dead_tokens_fails_the_run_with_5(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """--invalid-tokens on a full disk (/dev/full): one process exits 5 (fanout._exits:
    the output could not be written). With --workers each worker writes the dead tokens
    and exits 5; the coordinator kept only 3, 4 and 1 of its workers' codes and exited 0
    (every block done before the worker failed) or 1 ("every worker stopped"): the dead
    token was written nowhere and the exit code did not say so."""
    inp = tmp_path / "in.ndjson"
    toks = write_input(inp, 40)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, unregistered={toks[40]}) as mock:
        base = daemon_cmd(mock, pki, signing_key, str(inp), "--invalid-tokens", "/dev/full",
                          "--max-in-flight", "1", "--no-checkpoint")
        single = await run_daemon(base + ["--results", str(tmp_path / "single.ndjson")],
                                  timeout=60)
        assert single.returncode == 5, single.stderr.decode()[-1500:]
        proc = await run_daemon(base + ["--results", str(out), "--workers", "2"],
                                timeout=60)
    stderr = proc.stderr.decode()
    assert "/dev/full" in stderr, stderr[-1500:]  # a worker did fail to write it
    assert proc.returncode == 5, f"exit {proc.returncode}: {stderr[-1500:]}"


async def test_frames_split_anywhere_and_a_frame_cut_by_a_kill() -> None:
    """The coordinator's parser: frames split at every possible read boundary give the
    same results and books; a frame cut at EOF (a kill mid-write) is dropped whole (its
    block has no D, so it is sent again) and the worker's exit is handled."""
    from types import SimpleNamespace

    from fanout._daemon import workers as w

    results = [b'{"line":%d,"outcome":"delivered"}\n' % i for i in range(1, 7)]
    stream = (b"R %d delivered=3\n" % len(b"".join(results[:3])) + b"".join(results[:3])
              + b"D 1\n"
              + b"R 0 delivered=1\n"
              + b"R %d delivered=3\n" % len(b"".join(results[3:])) + b"".join(results[3:]))
    cut = len(stream) - 5  # inside the last frame's body
    for size in (1, 2, 7, 64, len(stream)):
        written: list[bytes] = []
        exited: list[int] = []
        coord = w.Coordinator.__new__(w.Coordinator)
        coord.control = SimpleNamespace(counts=Counter(), results_written=0)
        coord.out = SimpleNamespace(results=SimpleNamespace(write=written.append))
        coord._changed = trio.lowlevel.ParkingLot()
        done: list[int] = []
        sent = SimpleNamespace(lines=3, state=SimpleNamespace(done=lambda done=done: done.append(1)))
        coord._by_number = {1: sent, 4: SimpleNamespace(lines=3, state=None)}

        async def _exited(worker: Any, exited: list[int] = exited) -> None:
            exited.append(worker.index)

        coord._worker_exited = _exited  # type: ignore[method-assign]
        worker = SimpleNamespace(index=0, stdout=_Chunks(stream[:cut], size),
                                 outstanding=6, results=0)
        await coord._collect(worker)  # type: ignore[arg-type]
        assert b"".join(written) == b"".join(results[:3]), size
        assert coord.control.counts == {"delivered": 4}, size
        assert done == [1] and list(coord._by_number) == [4] and worker.outstanding == 3
        assert exited == [0]
