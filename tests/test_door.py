"""Bad arguments are refused at the door, and an input that fails half way loses no result
(issue 14, "Inputs that fail half way")."""

from __future__ import annotations

import json
import math

import pytest
import trio

from fanout.auth import TokenAuth
from fanout.client import Client
from fanout.errors import ConfigError, ValidationError
from fanout.payload import Notification

from .baseline import back_to_baseline
from .helpers import FANOUT, mock_server, run_daemon

TOPIC = "com.example.app"
PAYLOAD = {"aps": {"alert": "hi"}}


@pytest.mark.parametrize("kw", [{"timeout": -1}, {"timeout": math.nan},
                                {"connect_timeout": 0}, {"ping_timeout": math.inf},
                                {"unavailable_timeout": "30"}, {"connections": 0},
                                {"max_in_flight": -5}])
def test_client_arguments_are_checked(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        Client(topic=TOPIC, **kw)


async def test_send_and_send_many_refuse_what_is_not_a_push(pki, signing_key):
    async with mock_server(pki, signing_key) as mock, back_to_baseline():
        async with Client(auth=TokenAuth.from_file(signing_key.path, signing_key.key_id,
                                                   signing_key.team_id),
                          topic=TOPIC, host="127.0.0.1", port=mock.port,
                          ca_file=str(pki.ca_file)) as client:
            for bad in ({"token": "ab" * 32}, None):
                with pytest.raises(ValidationError, match="expected a Notification"):
                    await client.send(bad)
            with pytest.raises(ConfigError, match="window"):
                client.send_many([], window=-1)
            with pytest.raises(ConfigError, match="window"):
                client.fan_out(PAYLOAD, [], window=0)
            nan = Notification(token="ab" * 32, payload={"aps": {}, "score": math.nan})
            one = await client.send(nan)  # the same outcome as through send_many (issue 18)
            with trio.fail_after(10):
                results = [r async for r in client.send_many([nan])]
    assert one.outcome == "rejected" and "NaN" in (one.error or "")
    assert [r.outcome for r in results] == ["rejected"] and "NaN" in results[0].error
    assert mock.stats.requests == 0


async def test_an_iterable_that_fails_half_way_loses_no_result(pki, signing_key):
    """The 100 pushes already sent are reported before the iterable's exception."""
    def notes():
        for i in range(100):
            yield Notification(token=f"{i:064x}", payload=PAYLOAD)
        raise RuntimeError("the database went away")

    async with mock_server(pki, signing_key, latency=0.05) as mock, back_to_baseline():
        async with Client(auth=TokenAuth.from_file(signing_key.path, signing_key.key_id,
                                                   signing_key.team_id),
                          topic=TOPIC, host="127.0.0.1", port=mock.port,
                          ca_file=str(pki.ca_file)) as client:
            seen = []
            with trio.fail_after(20), pytest.raises(RuntimeError, match="went away"):
                async for r in client.send_many(notes()):
                    seen.append(r)
    assert len(seen) == 100 and all(r.ok for r in seen)
    assert len(mock.stats.delivered) == 100


async def test_a_tokens_file_with_a_bad_line_is_reported_by_line(pki, signing_key, tmp_path):
    path = tmp_path / "t.txt"
    good = [f"{i:064x}" for i in range(600)]
    path.write_bytes("\n".join(good[:300]).encode() + b"\n\xff\xfe bad\n"
                     + "\n".join(good[300:]).encode() + b"\n")
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(FANOUT + [
            "send", "--tokens", str(path), "--title", "x", "--host", "127.0.0.1",
            "--port", str(mock.port), "--ca-file", str(pki.ca_file), "--key-path",
            str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
            signing_key.team_id, "--topic", TOPIC], timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"Traceback" not in proc.stderr
    assert f"{path} line 301: not UTF-8".encode() in proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["counts"] == {"delivered": 600} and summary["skipped_lines"] == 1


async def test_a_torn_results_file_is_repaired_on_open(pki, signing_key, tmp_path):
    """A run that stopped mid-write (disk full, kill -9) left half a record: the next run
    cuts it off instead of gluing its first record onto it; every line parses."""
    from .helpers import daemon_cmd, read_results, write_input

    inp = tmp_path / "in.ndjson"
    write_input(inp, 50)
    out = tmp_path / "results.ndjson"
    out.write_bytes(b'{"id":"old","line":1,"outcome":"delivered","attempts":1}\n'
                    b'{"id":"old2","line":2,"outcome":"deliv')
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(out)))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"last line was torn" in proc.stderr
    results = read_results(out)  # every line parses
    assert results[0]["id"] == "old"
    assert sorted(r["line"] for r in results[1:]) == list(range(1, 51))


async def test_a_reader_that_goes_away_is_a_clear_error_not_a_traceback(pki, signing_key,
                                                                       tmp_path):
    """fanout run | head -100: a broken pipe is one line naming it, exit 5, and the exit
    does not advance the checkpoint; the next run gives every other line its result."""
    import subprocess

    from fanout._exits import EXIT_OUTPUT

    from .helpers import daemon_cmd, read_results, write_input

    inp = tmp_path / "in.ndjson"
    write_input(inp, 3000)
    async with mock_server(pki, signing_key) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--checkpoint-interval", "600")
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
        got = b""
        with trio.fail_after(60):
            while got.count(b"\n") < 100:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk
                got += chunk
            await proc.stdout.aclose()  # the reader goes away
            err = b""
            while chunk := await proc.stderr.receive_some(65536):
                err += chunk
            await proc.wait()
        assert proc.returncode == EXIT_OUTPUT, err.decode()[-2000:]
        assert b"broken pipe" in err and b"Traceback" not in err
        first = [json.loads(x) for x in got.split(b"\n")[:100]]
        checkpoint = json.loads((tmp_path / "in.ndjson.checkpoint").read_text())
        assert checkpoint["line"] <= 100  # nothing the reader did not get is marked done
        out = tmp_path / "again.ndjson"
        again = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                            str(out)))
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    lines = {r["line"] for r in first} | {r["line"] for r in read_results(out)}
    assert lines == set(range(1, 3001))  # every line accounted for


def test_workers_share_the_global_rate():
    from fanout._daemon.workers import child_settings
    from fanout.config import Settings

    s = Settings(rate=1000.0, topic_rates={"com.example.app": 300.0})
    child = child_settings(s, 2)
    assert child.rate == 500.0 and child.topic_rates == {"com.example.app": 150.0}
    assert child_settings(Settings(), 2).rate is None


def test_the_status_reports_this_process_peak_rss():
    """A parent that peaked at 300 MB execs the daemon's code: ru_maxrss says 300, the
    status's figure must be the process's own."""
    import subprocess
    import sys

    child = ("from fanout._daemon.control import peak_rss_mb; import resource; "
             "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    parent = ("import os, sys; b = bytearray(300 << 20); b[::4096] = b'x' * len(range(0, "
              f"len(b), 4096)); os.execv(sys.executable, [sys.executable, '-c', {child!r}])")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", parent], check=True,
                                               capture_output=True, text=True,
                                               timeout=60).stdout.split())
    assert inherited > 300 and own < 200, (own, inherited)


async def test_a_corrupt_checkpoint_is_one_line_and_exit_2(pki, signing_key, tmp_path):
    from .helpers import daemon_cmd, write_input

    inp = tmp_path / "in.ndjson"
    write_input(inp, 5)
    (tmp_path / "in.ndjson.checkpoint").write_text("garbage{")
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp)))
    assert proc.returncode == 2, proc.stderr.decode()[-2000:]
    assert b"Traceback" not in proc.stderr
    assert b"in.ndjson.checkpoint is corrupt" in proc.stderr and b"move it away" in proc.stderr
    assert mock.stats.requests == 0
