"""``fanout run`` as a real process (signals, kill -9, restarts) against the mock APNs.

The mock runs in the test process (its counts are the ground truth); the daemon runs as a
subprocess of the real executable, on the other core.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import trio

from fanout._daemon.workers import MAX_LINES_PER_WORKER
from fanout.testing.devcerts import TestPKI, TestSigningKey

from .helpers import (
    MALFORMED,
    PAYLOAD,
    count_lines,
    daemon_cmd,
    mock_server,
    read_results,
    run_daemon,
    stderr_of,
    wait_exit,
    wait_lines,
    wait_until,
    write_input,
)


async def test_100k_lines_exactly_one_result_per_push(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    inp = tmp_path / "in.ndjson"
    tokens = write_input(inp, 100_000, malformed_every=100)
    out = tmp_path / "results.ndjson"
    invalid = tmp_path / "invalid.ndjson"
    async with mock_server(pki, signing_key, unregistered_fraction=0.05) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(out), "--invalid-tokens", str(invalid)),
                                timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    results = read_results(out)
    by_line = Counter(r["line"] for r in results)
    assert len(results) == 100_000 and set(by_line.values()) == {1}
    counts = Counter(r["outcome"] for r in results)
    assert counts["malformed"] == 1000
    assert counts["invalid_token"] == mock.stats.by_status[410]
    assert counts["delivered"] == mock.stats.by_status[200] == len(mock.stats.delivered)
    assert counts["delivered"] + counts["invalid_token"] == len(tokens)
    assert 4000 < counts["invalid_token"] < 6000
    for r in results:
        if r["outcome"] == "malformed":
            assert r["error"] and r["line"] % 100 == 0
        else:
            assert r["id"] == f"p{r['line']}" and r["token"] == tokens[r["line"]]
    dead = [json.loads(x) for x in invalid.read_text().splitlines()]
    assert len(dead) == counts["invalid_token"] and all(d["timestamp"] for d in dead)
    cp = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
    assert cp["line"] == 100_000 and cp["offset"] == inp.stat().st_size
    # no secret and no whole token in the logs
    assert signing_key.path.read_bytes().splitlines()[1][:30] not in proc.stderr
    assert not any(t.encode() in proc.stderr for t in list(tokens.values())[:2000])


async def test_kill9_three_times_then_finish(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    inp = tmp_path / "in.ndjson"
    write_input(inp, 20_000)
    out = tmp_path / "results.ndjson"
    window = 200
    rng = random.Random(5)
    async with mock_server(pki, signing_key, latency=0.005) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--max-in-flight", str(window), "--checkpoint-interval", "0.05")
        for _ in range(3):
            # each run writes between 500 and 3000 results (the window caps the rate at
            # 40,000/s: the run is far from its end), then is killed
            done = count_lines(out)
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await wait_lines(out, done + rng.randint(500, 3000))
            proc.kill()  # kill -9
            assert proc.wait() == -signal.SIGKILL  # the kill landed mid-run
        final = await run_daemon(cmd, timeout=180)
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    results = read_results(out)
    per_line = defaultdict(list)
    for r in results:
        per_line[r["line"]].append(r)
    assert set(per_line) == set(range(1, 20_001))  # every line has a result
    duplicates = [rs for rs in per_line.values() if len(rs) > 1]
    # a resend is marked; at most the in-flight window (plus the high-water step) per crash
    assert all(any(r.get("resent") for r in rs[1:]) for rs in duplicates)
    assert len(duplicates) <= 3 * (window + 1024)
    # the mock saw every token, and no more resends than three crashes' windows: pushes in
    # flight at a kill reached APNs though their results died with the process
    assert len(mock.stats.delivered) == 20_000
    assert sum(mock.stats.delivered.values()) - 20_000 <= 3 * (window + 1024)


async def test_sigterm_drains_and_exits_zero_then_resumes(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    inp = tmp_path / "in.ndjson"
    write_input(inp, 5000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.3) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--max-in-flight", "300")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # results written: the signal handler is in place; 300 in flight x 0.3 s latency
        # caps the rate at 1,000/s, so the run is seconds from its end
        await wait_lines(out, 300)
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc, 30)
        stderr = stderr_of(proc)
        assert proc.returncode == 0, stderr[-2000:]
        first = read_results(out)
        cp = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
        assert 0 < len(first) < 5000
        assert sorted(r["line"] for r in first) == list(range(1, cp["line"] + 1))
        assert cp["high_water"] == cp["line"]  # nothing beyond was sent
        again = await run_daemon(cmd)
    assert again.returncode == 0
    results = read_results(out)
    assert sorted(r["line"] for r in results) == list(range(1, 5001))
    assert not any(r.get("resent") for r in results)
    assert sum(mock.stats.delivered.values()) == 5000


async def test_stdin_input_ends_cleanly_at_eof(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    inp = tmp_path / "in.ndjson"
    write_input(inp, 1000, malformed_every=50)
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key), stdin=inp.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    results = [json.loads(x) for x in proc.stdout.splitlines()]
    assert sorted(r["line"] for r in results) == list(range(1, 1001))
    assert Counter(r["outcome"] for r in results) == {"delivered": 980, "malformed": 20}
    final = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith(b"{")]
    assert final[-1]["event"] == "final" and final[-1]["results"] == 1000


async def test_fan_out_lines_and_tokens_file(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    tokfile = tmp_path / "tokens.txt"
    tokfile.write_text("\n".join(f"{i:064x}" for i in range(300)) + "\n\n  \n")
    lines = [
        {"id": "a", "tokens": [f"{i:064x}" for i in range(1000, 1100)] + ["zz"], "payload": PAYLOAD},
        {"id": "b", "tokens_file": str(tokfile), "payload": PAYLOAD, "priority": 5},
        {"id": "c", "tokens_file": str(tmp_path / "missing.txt"), "payload": PAYLOAD},
        {"id": "d", "token": "ab" * 32, "payload": {"aps": {"alert": "x" * 5000}}},
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key), stdin=data)
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]  # fanout._exits: "zz" rejected
    results = [json.loads(x) for x in proc.stdout.splitlines()]
    by_id: defaultdict[str | None, Counter[str]] = defaultdict(Counter)
    for r in results:
        by_id[r["id"]][r["outcome"]] += 1
    assert by_id["a"] == {"delivered": 100, "rejected": 1}
    assert by_id["b"] == {"delivered": 300}
    assert by_id[None] == {"malformed": 2}  # missing tokens_file, oversized payload
    errors = [r["error"] for r in results if r["outcome"] == "malformed"]
    assert any("missing.txt" in e for e in errors) and any("4096" in e for e in errors)
    assert len(mock.stats.delivered) == 400


def _max_rss_mb(stderr: bytes) -> float:
    final = [json.loads(x) for x in stderr.splitlines() if x.startswith(b'{"event": "final"')]
    rss: float = final[-1]["max_rss_mb"]
    return rss


async def test_rss_does_not_grow_with_input_length(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    small, large = tmp_path / "small.ndjson", tmp_path / "large.ndjson"
    write_input(small, 10_000)
    write_input(large, 60_000)
    async with mock_server(pki, signing_key, validate=False) as mock:
        a = await run_daemon(daemon_cmd(mock, pki, signing_key, str(small), "--results",
                                        os.devnull, "--no-checkpoint"), timeout=180)
        b = await run_daemon(daemon_cmd(mock, pki, signing_key, str(large), "--results",
                                        os.devnull, "--no-checkpoint"), timeout=180)
    assert a.returncode == 0 and b.returncode == 0, b.stderr.decode()[-2000:]
    # six times the input, the same memory: only the in-flight window is held
    assert _max_rss_mb(b.stderr) - _max_rss_mb(a.stderr) < 15


async def test_workers_2_on_100k_lines(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    inp = tmp_path / "in.ndjson"
    write_input(inp, 100_000, malformed_every=100)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, unregistered_fraction=0.05) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(out), "--workers", "2"), timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    results = read_results(out)
    assert len(results) == 100_000
    assert sorted(r["line"] for r in results) == list(range(1, 100_001))
    counts = Counter(r["outcome"] for r in results)
    assert counts["malformed"] == 1000
    assert counts["delivered"] == len(mock.stats.delivered) == mock.stats.by_status[200]
    assert counts["invalid_token"] == mock.stats.by_status[410]
    # both processes busy: 2 connections each, every connection carried a fair share
    assert mock.stats.connections == 4
    assert min(mock.stats.streams_per_connection) > 99_000 / 4 * 0.5
    cp = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
    assert cp["line"] == 100_000 and cp["offset"] == inp.stat().st_size


def _children(pid: int) -> list[int]:
    """The worker processes of coordinator ``pid`` (its other children, if any, excluded)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for kid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"--child" in cmdline.split(b"\0"):
                kids.append(int(kid))
    return kids


async def test_workers_a_worker_killed_hands_its_lines_to_the_other(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """kill -9 of one worker mid-run: the coordinator sends the blocks it left unfinished
    through the other worker, marked resent; every line ends with a result."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 20_000)
    out = tmp_path / "results.ndjson"
    # 200 in flight per worker x 0.05 s latency: at most 8,000 results/s, so ~2 s of the
    # run are left when the kill comes after 2,000 results, however fast the machine
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "200")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await wait_until(lambda: len(_children(proc.pid)) == 2 and count_lines(out) >= 2000,
                         60, "both workers up and 2,000 results written")
        victim = _children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert count_lines(out) < 20_000  # mid-run
        await wait_exit(proc, 120)
        stderr = stderr_of(proc)
    assert proc.returncode == 0, stderr[-2000:]
    assert "exited (code -9)" in stderr
    # the kill may land between two of the victim's blocks: then nothing is handed over
    assert "marked resent" in stderr or "with no lines unfinished" in stderr
    per_line = defaultdict(list)
    for r in read_results(out):
        per_line[r["line"]].append(r)
    assert set(per_line) == set(range(1, 20_001))
    assert all(r["outcome"] == "delivered" for rs in per_line.values() for r in rs)
    duplicates = [rs for rs in per_line.values() if len(rs) > 1]
    assert all(any(r.get("resent") for r in rs) for rs in duplicates)
    assert len(duplicates) <= MAX_LINES_PER_WORKER  # at most the dead worker's window
    assert len(mock.stats.delivered) == 20_000
    cp = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
    assert cp["line"] == 20_000 and cp["offset"] == inp.stat().st_size


async def test_workers_a_worker_killed_after_the_whole_input_was_handed_out(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """kill -9 of a worker once the coordinator has handed out the whole input (a small
    one: it fits in the pipes) and closed the workers' stdin: the dead worker's unfinished
    blocks still go through the other worker. They used to be lost: the survivor's stdin
    was already closed, so the hand-over went nowhere and the run exited 0 without those
    lines' results."""
    inp = tmp_path / "in.ndjson"
    lines = 800  # two 64 KiB blocks at most: one for each worker, at once
    write_input(inp, lines)
    assert inp.stat().st_size < 2 * 64 * 1024
    out = tmp_path / "results.ndjson"
    # 20 in flight per worker x 0.05 s: at most 400 results/s each, so the victim's
    # half takes about a second however fast the machine
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "20")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await wait_until(lambda: len(_children(proc.pid)) == 2 and count_lines(out) >= 60,
                         60, "both workers up and 60 results written")
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        assert count_lines(out) < lines  # mid-run
        await wait_exit(proc, 120)
        stderr = stderr_of(proc)
    assert proc.returncode == 0, stderr[-2000:]
    assert "marked resent" in stderr, stderr[-2000:]
    per_line = defaultdict(list)
    for r in read_results(out):
        per_line[r["line"]].append(r)
    assert set(range(1, lines + 1)) - set(per_line) == set(), stderr[-2000:]
    assert all(r["outcome"] == "delivered" for rs in per_line.values() for r in rs)
    assert all(any(r.get("resent") for r in rs) for rs in per_line.values() if len(rs) > 1)
    assert len(mock.stats.delivered) >= lines
    cp = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
    assert cp["line"] == lines and cp["offset"] == inp.stat().st_size


async def test_workers_sigterm_drains_then_kill9_then_finish(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """With --workers: SIGTERM drains (the checkpoint covers exactly the lines written),
    a kill -9 of the coordinator loses nothing, and a last run finishes the input."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 20_000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--workers", "2", "--max-in-flight", "200",
                         "--checkpoint-interval", "0.05")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # results written: the handler is in place; at most 8,000 results/s (2 x 200 in
        # flight x 0.05 s), so the run is far from its end
        await wait_lines(out, 1000)
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc, 30)
        assert proc.returncode == 0, stderr_of(proc)[-2000:]
        first = read_results(out)
        cp = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
        assert 0 < len(first) < 20_000
        assert sorted(r["line"] for r in first) == list(range(1, cp["line"] + 1))
        assert cp["high_water"] == cp["line"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_lines(out, len(first) + 1000)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL  # the kill landed mid-run
        final = await run_daemon(cmd, timeout=120)
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    per_line = defaultdict(list)
    for r in read_results(out):
        per_line[r["line"]].append(r)
    assert set(per_line) == set(range(1, 20_001))
    duplicates = [rs for rs in per_line.values() if len(rs) > 1]
    assert all(any(r.get("resent") for r in rs[1:]) for rs in duplicates)
    assert len(mock.stats.delivered) == 20_000


async def test_workers_bad_lines_each_get_their_error(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Malformed lines, a line over --max-line-bytes inside a block and one spanning
    blocks: one malformed result each, every good line delivered."""
    inp = tmp_path / "in.ndjson"
    good = [json.dumps({"id": i, "token": f"{i:064x}", "payload": PAYLOAD}).encode()
            for i in range(3000)]
    lines = list(good)
    lines[10:10] = MALFORMED
    lines[1500:1500] = [b'{"token":"' + b"a" * 5000 + b'"}']   # long, inside a block
    lines[2500:2500] = [b"x" * 300_000]                          # longer than a block
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(out), "--workers", "2", "--max-line-bytes",
                                           "4000"))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    results = read_results(out)
    assert sorted(r["line"] for r in results) == list(range(1, len(lines) + 1))
    bad = {r["line"]: r["error"] for r in results if r["outcome"] == "malformed"}
    assert len(bad) == len(MALFORMED) + 2
    assert bad[1501] == bad[2501] == \
        "line is longer than 4000 bytes"
    assert sum(r["outcome"] == "delivered" for r in results) == 3000 == len(mock.stats.delivered)


async def test_second_sigint_stops_at_once_with_maybe_delivered(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    inp = tmp_path / "in.ndjson"
    write_input(inp, 2000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.2) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--max-in-flight", "100", "--drain-timeout", "60")
        err = tmp_path / "stderr"
        with open(err, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh)
        await wait_lines(out, 100)  # results written: the handler is in place
        mock.config.latency = 30.0  # what is sent from now on will not be answered soon
        sent = mock.stats.requests
        # the window (100) has been sent again since: everything in flight now is slow
        await wait_until(lambda: mock.stats.requests >= sent + 100, 30, "a slow window")
        proc.send_signal(signal.SIGINT)
        # trio merges a signal that arrives before the first was read: wait for the drain
        await wait_until(lambda: b"no more input; draining" in err.read_bytes(), 30,
                         "the first SIGINT handled")
        proc.send_signal(signal.SIGINT)
        await wait_exit(proc, 20)
        assert proc.returncode == 130, err.read_text()[-2000:]
        first = read_results(out)
        maybe = [r for r in first if r["outcome"] == "maybe_delivered"]
        assert 0 < len(maybe) <= 100 and all("stopped" in r["error"] for r in maybe)
        mock.config.latency = 0.0
        again = await run_daemon(cmd)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    results = read_results(out)
    assert set(r["line"] for r in results) == set(range(1, 2001))
    # a line reported maybe_delivered is done: never sent again
    assert Counter(r["line"] for r in results).most_common(1)[0][1] == 1


async def test_sighup_reopens_the_results_file(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    inp = tmp_path / "in.ndjson"
    write_input(inp, 3000)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key, latency=0.05) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out),
                         "--max-in-flight", "50")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # results written: the handler is in place (SIGHUP's default would kill); at most
        # 1,000 results/s (50 in flight x 0.05 s), so 2,500 lines are seconds away
        await wait_lines(out, 500)
        rotated = tmp_path / "results.ndjson.1"
        out.rename(rotated)  # what logrotate does, then it sends SIGHUP
        proc.send_signal(signal.SIGHUP)
        await wait_exit(proc, 60)
    assert proc.returncode == 0
    old, new = read_results(rotated), read_results(out)
    assert old and new
    assert sorted(r["line"] for r in old + new) == list(range(1, 3001))


async def test_config_error_stops_or_drains_and_exits_nonzero(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    from fanout.testing.devcerts import make_signing_key

    other = make_signing_key(tmp_path / "other", key_id=signing_key.key_id,
                             team_id=signing_key.team_id)
    inp = tmp_path / "in.ndjson"
    write_input(inp, 3000)
    async with mock_server(pki, signing_key) as mock:
        stop = await run_daemon(daemon_cmd(mock, pki, other, str(inp), "--no-checkpoint"))
        drain = await run_daemon(daemon_cmd(mock, pki, other, str(inp), "--no-checkpoint",
                                            "--on-config-error", "drain"))
    assert stop.returncode == 3 and drain.returncode == 3
    assert b"InvalidProviderToken" in stop.stderr
    stopped = [json.loads(x) for x in stop.stdout.splitlines()]
    drained = [json.loads(x) for x in drain.stdout.splitlines()]
    assert 0 < len(stopped) < 3000
    assert len(drained) == 3000 and {r["outcome"] for r in drained} == {"config_error"}
    assert mock.stats.requests <= 4  # the flood never started


async def test_follow_picks_up_appended_lines_and_rotation(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    inp = tmp_path / "in.ndjson"
    write_input(inp, 100)
    out = tmp_path / "results.ndjson"

    def line(i: int) -> bytes:
        return json.dumps({"id": f"x{i}", "token": f"{i:064x}", "payload": PAYLOAD}).encode() \
            + b"\n"

    async def wait_results(n: int) -> list[dict[str, Any]]:
        with trio.fail_after(20):
            while True:
                rs = read_results(out) if out.exists() else []
                if len(rs) >= n:
                    return rs
                await trio.sleep(0.05)

    async with mock_server(pki, signing_key) as mock:
        proc = subprocess.Popen(daemon_cmd(mock, pki, signing_key, str(inp), "--follow",
                                           "--results", str(out), "--checkpoint-interval",
                                           "0.05"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await wait_results(100)
            with open(inp, "ab") as fh:  # a producer appends
                for i in range(101, 151):
                    fh.write(line(i))
            await wait_results(150)
            inp.rename(tmp_path / "in.ndjson.1")  # rotation, then a new file at the path
            inp.write_bytes(b"".join(line(i) for i in range(1000, 1020)))
            results = await wait_results(170)
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                while proc.poll() is None:
                    await trio.sleep(0.05)
    assert proc.returncode == 0, stderr_of(proc)[-2000:]
    assert len(results) == 170
    assert {r["id"] for r in results} == ({f"p{i}" for i in range(1, 101)}
                                          | {f"x{i}" for i in range(101, 151)}
                                          | {f"x{i}" for i in range(1000, 1020)})
    assert len(mock.stats.delivered) == 170


async def test_follow_waits_for_a_spool_file_that_does_not_exist_yet(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Issue 18: --follow behaves like tail -F from the start (it used to exit 3)."""
    inp = tmp_path / "spool" / "in.ndjson"
    inp.parent.mkdir()
    out = tmp_path / "results.ndjson"
    log = tmp_path / "daemon.log"
    async with mock_server(pki, signing_key) as mock:
        with log.open("wb") as err:
            proc = subprocess.Popen(daemon_cmd(mock, pki, signing_key, str(inp), "--follow",
                                               "--results", str(out)),
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            with trio.fail_after(20):  # it says it waits, and keeps running
                while b"waiting for it" not in log.read_bytes():
                    assert proc.poll() is None, log.read_text()[-2000:]
                    await trio.sleep(0.05)
            write_input(inp, 30)
            with trio.fail_after(20):
                while not out.exists() or len(read_results(out)) < 30:
                    await trio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                while proc.poll() is None:
                    await trio.sleep(0.05)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert len(read_results(out)) == 30 and len(mock.stats.delivered) == 30


async def test_live_activity_and_broadcast_lines(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Daemon lines with live_activity (budget, ordering, send-time timestamp) and
    channel_id (broadcast), including a deleted channel."""
    from fanout.auth import TokenAuth
    from fanout.channels import Channels

    token = "cd" * 32
    async with mock_server(pki, signing_key, record_bodies=True) as mock:
        auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
        async with Channels(auth=auth, bundle_id="com.example.app", host="127.0.0.1",
                            port=mock.port, ca_file=str(pki.ca_file)) as channels:
            live = await channels.create(0)
            dead = await channels.create(1)
            await channels.delete(dead.channel_id)
        la = {"activity-id": "job-7", "content-state": {"step": 0}}
        lines = [{"id": "start", "token": token, "live_activity": {
                    **la, "event": "start", "attributes-type": "JobAttributes",
                    "attributes": {"job": 7}, "alert": {"title": "Job queued"},
                    "input-push-channel": live.channel_id, "source-time": 1}}]
        lines += [{"id": f"u{i}", "token": token, "live_activity": {
                    **la, "event": "update", "content-state": {"step": i},
                    "source-time": 10 + i}} for i in range(1, 6)]
        lines += [{"id": "late", "token": token, "live_activity": {
                    **la, "event": "update", "source-time": 2}},
                  {"id": "bcast", "channel_id": live.channel_id, "live_activity": {
                    "event": "update", "content-state": {"step": 9}}},
                  {"id": "gone", "channel_id": dead.channel_id,
                   "payload": {"aps": {"event": "update", "timestamp": 1,
                                       "content-state": {}}}},
                  {"id": "bad", "channel_id": live.channel_id, "live_activity": {
                      "event": "start", "content-state": {}}}]
        data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, "--la-budget", "3"),
                                stdin=data)
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]  # "gone" was rejected
    results = {r["id"] if r["id"] else f"line{r['line']}": r
               for r in (json.loads(x) for x in proc.stdout.splitlines())}
    assert results["start"]["outcome"] == "delivered"
    assert all(results[f"u{i}"]["outcome"] == "delivered" for i in range(1, 6))
    assert results["late"]["outcome"] == "superseded"
    assert results["bcast"]["outcome"] == "delivered"
    assert results["bcast"]["channel_id"] == live.channel_id and "token" not in results["bcast"]
    assert results["gone"]["outcome"] == "rejected"
    assert results["gone"]["reason"] == "ChannelNotRegistered"
    assert results["line10"]["outcome"] == "malformed"  # a broadcast cannot start one
    sent = mock.stats.bodies[token]
    by_step = {json.loads(b)["aps"]["content-state"]["step"]: p for p, b in sent}
    # budget 3 per hour per activity: start, u1, u2 at priority 10; u3..u5 at 5
    assert by_step == {0: 10, 1: 10, 2: 10, 3: 5, 4: 5, 5: 5}
    aps = [json.loads(b)["aps"] for _, b in sent]
    start = next(a for a in aps if a["event"] == "start")
    assert start["input-push-channel"] == live.channel_id
    assert all(1.7e9 < a["timestamp"] < 4e9 for a in aps)  # stamped at send time
    assert mock.stats.broadcasts[live.channel_id] == 1


async def test_a_rerun_over_a_finished_file_says_so(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Issue 18: the second run over a file its checkpoint says is done sends nothing, and
    says so (it used to exit 0 in silence)."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 5)
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(out))
        first = await run_daemon(cmd)
        second = await run_daemon(cmd)
    assert first.returncode == 0 and second.returncode == 0
    assert len(read_results(out)) == 5 and len(mock.stats.delivered) == 5
    err = second.stderr.decode()
    assert "already done up to line 5" in err and "--no-checkpoint" in err
    assert "already done" not in first.stderr.decode()


async def test_live_activity_lines_without_source_time_and_their_priority(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Issue 18: a line without source-time does not make a later, correctly timed update
    superseded; each Live Activity result says the priority it went at (the budget, 1 an
    hour here, lowers 10 to 5)."""
    def la(i: int, source_time: float | None) -> str:
        line: dict[str, Any] = {"id": i, "token": "ab" * 32, "live_activity": {"event": "update", "activity-id": "m1",
                                                  "content-state": {"score": i}}}
        if source_time is not None:
            line["live_activity"]["source-time"] = source_time
        return json.dumps(line)

    inp = tmp_path / "in.ndjson"
    inp.write_text("\n".join([la(1, 1_700_000_000.0), la(2, None), la(3, 1_700_000_005.0)])
                   + "\n")
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(out), "--la-budget", "1"))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    by_id = {r["id"]: r for r in read_results(out)}
    assert [by_id[i]["outcome"] for i in (1, 2, 3)] == ["delivered"] * 3
    assert [by_id[i]["priority"] for i in (1, 2, 3)] == [10, 5, 5]


async def test_log_format_json_makes_every_line_json_and_status_is_info(
        tmp_path: Path, pki: TestPKI, signing_key: TestSigningKey,
) -> None:
    """Issue 18: with --log-format json every stderr line is JSON with event, ts, level and
    logger (warnings and errors too); in text mode the status lines are INFO, with a time."""
    inp = tmp_path / "in.ndjson"
    write_input(inp, 20, malformed_every=10)
    missing = tmp_path / "nowhere" / "in.ndjson"
    async with mock_server(pki, signing_key) as mock:
        ok = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--no-checkpoint"))
        bad = await run_daemon(daemon_cmd(mock, pki, signing_key, str(missing)))
        cmd = [x for x in daemon_cmd(mock, pki, signing_key, str(inp), "--no-checkpoint")
               if x not in ("--log-format", "json")]
        text = await run_daemon(cmd)
    for proc in (ok, bad):
        lines = proc.stderr.decode().splitlines()
        assert lines, "nothing logged"
        for line in lines:
            record = json.loads(line)  # every line
            assert {"event", "ts", "level", "logger"} <= record.keys(), record
    final = [json.loads(x) for x in ok.stderr.splitlines()][-1]
    assert final["event"] == "final" and final["level"] == "info" and final["results"] == 20
    assert bad.returncode != 0
    assert any(json.loads(x)["level"] == "error" for x in bad.stderr.splitlines())
    status = [x for x in text.stderr.decode().splitlines() if " final: " in x]
    assert status and " INFO fanout.daemon: final: lines=20" in status[-1]
