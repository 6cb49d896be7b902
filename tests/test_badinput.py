"""Bad input through ``fanout run`` end to end: each bad line gets one result naming its
problem and every good line around it is delivered; a bad key file or config file stops
the daemon at once with a clear error (exit 3) and no traceback."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout._daemon.lines import LineError, decode_line

from .helpers import PAYLOAD, daemon_cmd, mock_server, read_results, run_daemon
from .test_auth import KEY_ID, TEAM_ID, key_file_cases

MAX_LINE = 12_000_000


def _push(i: int, **extra) -> bytes:
    return json.dumps({"id": f"p{i}", "token": f"{i:064x}", "payload": PAYLOAD} | extra).encode()


def _bad_lines(tmp_path) -> list[tuple[bytes, str, str]]:
    """(line, expected outcome, a piece of the expected error)."""
    spaced = tmp_path / "spaced.txt"
    spaced.write_text(f"  {'ab' * 32}  \n\n\t{'cd' * 32}\n   \n{'ef' * 32}")
    big_alert = {"aps": {"alert": "x" * (10 * 1024 * 1024)}}
    return [
        (b"this is not json", "malformed", "not JSON"),
        (b'{"token": "ab', "malformed", "not JSON"),
        (b"\xff\xfe" + _push(9001), "malformed", "not JSON"),
        (b'{"token": "' + b"ab" * 32 + b'", "payload": {"aps": {"alert": "\xff\xfe"}}}',
         "malformed", "not JSON"),
        (json.dumps({"token": "ab" * 32, "payload": big_alert}).encode(),  # 10 MB line
         "malformed", "4096"),
        (b"x" * (MAX_LINE + 1000), "malformed", f"longer than {MAX_LINE} bytes"),
        (b'{"token": "' + b"ab" * 32 + b'", "payload": {"d": ' + b"[" * 5000 + b"]" * 5000
         + b"}}", "malformed", "nested too deeply"),
        (b'{"token": 5, "payload": {}}', "malformed", "$.token"),
        (b'{"token": "' + b"ab" * 32 + b'", "payload": {"aps": {}}, "push_type": "weird"}',
         "malformed", "weird"),
        (b'{"payload": {"aps": {"alert": "x"}}}', "malformed", "missing token"),
        (json.dumps({"token": "ab" * 32, "payload": {"aps": {"alert": "y" * 5000}}}).encode(),
         "malformed", "4096"),
        (b'{"token": "' + b"zz" * 32 + b'", "payload": {"aps": {"alert": "x"}}}',
         "rejected", "token"),
        (b'{"token": "ab", "payload": {"aps": {}}, "colour": "red"}', "malformed", "colour"),
        (json.dumps({"tokens_file": str(tmp_path / "missing.txt"), "payload": PAYLOAD}).encode(),
         "malformed", "missing.txt"),
        (json.dumps({"tokens_file": str(spaced), "payload": PAYLOAD}).encode(), "spaced", ""),
        (b"", "malformed", "blank line"),
    ]


async def test_every_bad_line_gets_its_own_error_and_the_rest_goes(tmp_path, pki, signing_key):
    bad = _bad_lines(tmp_path)
    lines: list[bytes] = []
    expect: dict[int, tuple[str, str]] = {}
    good = 0
    for k, (line, outcome, needle) in enumerate(bad):
        for j in range(3):  # good lines around every bad one
            lines.append(_push(100 * k + j))
            good += 1
        lines.append(line)
        expect[len(lines)] = (outcome, needle)
    inp = tmp_path / "in.ndjson"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--results",
                                           str(out), "--max-line-bytes", str(MAX_LINE)),
                                timeout=120)
    # fanout._exits: some bad lines end rejected (exit 1); malformed ones alone would be 0
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    assert b"Traceback" not in proc.stderr
    by_line: dict[int, list[dict]] = {}
    for r in read_results(out):
        by_line.setdefault(r["line"], []).append(r)
    assert set(by_line) == set(range(1, len(lines) + 1))  # nothing lost, nothing stalled
    for number, (outcome, needle) in expect.items():
        got = by_line[number]
        if outcome == "spaced":  # blank lines and spaces in a tokens_file are skipped
            assert sorted(r["token"] for r in got) == ["ab" * 32, "cd" * 32, "ef" * 32]
            assert all(r["outcome"] == "delivered" for r in got)
            continue
        assert len(got) == 1, got
        assert got[0]["outcome"] == outcome, (number, got)
        assert needle in got[0]["error"], (number, needle, got[0]["error"])
        assert len(got[0]["error"]) < 400  # names the problem, does not echo the line
    delivered = [r for rs in by_line.values() for r in rs if r["outcome"] == "delivered"]
    assert len(delivered) == good + 3 == len(mock.stats.delivered)


@pytest.mark.parametrize("case", ["missing", "garbage", "p384", "certificate", "public"])
async def test_bad_key_file_stops_the_daemon_with_a_clear_error(tmp_path, pki, signing_key,
                                                               case):
    path, needle = key_file_cases(tmp_path)[case]
    inp = tmp_path / "in.ndjson"
    inp.write_bytes(_push(1) + b"\n")
    async with mock_server(pki, signing_key) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, str(inp), "--results", str(tmp_path / "r"))
        cmd[cmd.index("--key-path") + 1] = str(path)
        cmd[cmd.index("--key-id") + 1] = KEY_ID
        cmd[cmd.index("--team-id") + 1] = TEAM_ID
        proc = await run_daemon(cmd, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert needle in err and str(path) in err
    assert "Traceback" not in err
    assert mock.stats.requests == 0


async def test_config_file_with_an_unknown_key_names_it(tmp_path, pki, signing_key):
    cfg = tmp_path / "fanout.toml"
    cfg.write_text('topic = "com.example.app"\ncolour = "red"\n')
    inp = tmp_path / "in.ndjson"
    inp.write_bytes(_push(1) + b"\n")
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, str(inp), "--config",
                                           str(cfg)), timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert "colour" in err and str(cfg) in err and "Traceback" not in err
    assert mock.stats.requests == 0


# ---------------------------------------------------------------- decode_line properties

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["token", "tokens", "payload", "aps", "alert", "push_type", "id",
                         "priority", "channel_id", "live_activity", "event", "x"]),
        inner, max_size=5),
    max_leaves=20)


def _mutate(data: bytes, cuts: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(data)
    for pos, piece in cuts:
        pos %= len(out) + 1
        out[pos:pos + len(piece)] = piece
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(value=_json, cuts=st.lists(st.tuples(st.integers(0, 400), st.binary(max_size=3)),
                                  max_size=3),
       depth=st.sampled_from([0, 0, 50, 3000]))
def test_decode_line_gives_a_push_or_a_line_error_never_anything_else(value, cuts, depth):
    """Random JSON, mutated bytes (bad UTF-8 inside strings included) and deep nesting:
    decode_line returns a PushLine or raises LineError; any other exception would take
    the daemon down with it."""
    data = json.dumps({"token": "ab" * 32, "payload": value}).encode()
    if depth:
        data = data[:-1] + b', "d": ' + b"[" * depth + b"]" * depth + b"}"
    data = _mutate(data, cuts)
    try:
        decode_line(data)
    except LineError as exc:
        assert str(exc) and len(str(exc)) < 1000
