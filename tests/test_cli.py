"""The real ``fanout`` executable as subprocesses: demo, mock and send, and no secret in
any byte they write."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fanout.auth import TokenAuth

FANOUT = [sys.executable, "-m", "fanout"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(args, env_extra=None, input_=None, timeout=60):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(FANOUT + args, capture_output=True, timeout=timeout, env=env,
                          input=input_)


def test_send_command_against_mock_process(mock_process, signing_key, tmp_path):
    port, ca = mock_process
    tokens = [f"{i:064x}" for i in range(500)]
    tok_file = tmp_path / "tokens.txt"
    tok_file.write_text("\n".join(tokens[:250]) + "\n\n  " + "\n".join(tokens[250:]) + "\n")
    invalid = tmp_path / "invalid.ndjson"
    env = {"APNS_KEY_PATH": str(signing_key.path), "APNS_KEY_ID": signing_key.key_id,
           "APNS_TEAM_ID": signing_key.team_id, "APNS_TOPIC": "com.example.app"}
    out = _send(["send", "--tokens", str(tok_file), "--title", "Hi", "--body", "there",
                 "--host", "127.0.0.1", "--port", str(port), "--ca-file", str(ca),
                 "--invalid-tokens", str(invalid), "-v"], env)
    assert out.returncode == 0, out.stderr.decode()
    summary = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert summary["pushes"] == 500
    assert summary["counts"]["delivered"] + summary["counts"]["invalid_token"] == 500
    assert 20 < summary["counts"]["invalid_token"] < 90
    assert summary["pushes_per_s"] > 0 and summary["seconds"] > 0
    lines = [json.loads(x) for x in invalid.read_text().splitlines()]
    assert len(lines) == summary["counts"]["invalid_token"]
    assert all(x["reason"] == "Unregistered" and x["timestamp"] for x in lines)

    # no secret in any byte written to stdout/stderr (verbose logging on)
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    written = out.stdout + out.stderr
    key_body = b"".join(Path(signing_key.path).read_bytes().splitlines()[1:-1])
    assert key_body[:40] not in written
    assert auth.header().split()[1][:60] not in written  # any JWT of this key starts alike
    for token in tokens:
        assert token.encode() not in written


def test_send_reports_a_wrong_key_clearly_and_exits_nonzero(mock_process, signing_key, tmp_path):
    from fanout.testing.devcerts import make_signing_key

    port, ca = mock_process
    other = make_signing_key(tmp_path / "other", key_id=signing_key.key_id,
                             team_id=signing_key.team_id)
    (tmp_path / "t.txt").write_text("ab" * 32 + "\n")
    out = _send(["send", "--tokens", str(tmp_path / "t.txt"), "--title", "x", "--host",
                 "127.0.0.1", "--port", str(port), "--ca-file", str(ca), "--key-path",
                 str(other.path), "--key-id", other.key_id, "--team-id", other.team_id,
                 "--topic", "com.example.app"])
    assert out.returncode == 3  # fanout._exits: APNs refused the configuration
    summary = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert "InvalidProviderToken" in summary["config_error"]
    assert b"InvalidProviderToken" in out.stderr
    # it names what to check (issue 18)
    assert "AuthKey_" in summary["config_error"] and "team_id" in summary["config_error"]


@pytest.mark.parametrize("args, needle", [
    (["--key-path", "/nonexistent/key.p8", "--key-id", "ABC", "--team-id", "T"], b"/nonexistent/key.p8"),
    (["--key-id", "ABC", "--team-id", "T"], b"--key-path"),
])
def test_send_config_errors_name_the_problem(tmp_path, args, needle):
    (tmp_path / "t.txt").write_text("ab" * 32 + "\n")
    env = {k: "" for k in ("APNS_KEY_PATH", "APNS_KEY_ID", "APNS_TEAM_ID")}
    out = _send(["send", "--tokens", str(tmp_path / "t.txt"), "--title", "x", "--topic",
                 "com.example.app", "--host", "127.0.0.1", "--port", str(_free_port())] + args,
                env)
    assert out.returncode == 2
    assert needle in out.stderr
    assert b"Traceback" not in out.stderr


def test_demo_runs_end_to_end():
    out = _send(["demo", "--count", "3000"], timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    summary = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert summary["pushes"] == 3000
    assert summary["counts"]["delivered"] + summary["counts"].get("invalid_token", 0) == 3000
    assert summary["latency_ms_p50"] is not None and summary["latency_ms_p99"] is not None


def test_channels_commands_and_send_channel(mock_process, signing_key, tmp_path):
    port, ca = mock_process
    common = ["--host", "127.0.0.1", "--port", str(port), "--ca-file", str(ca),
              "--key-path", str(signing_key.path), "--key-id", signing_key.key_id,
              "--team-id", signing_key.team_id, "--topic", "com.example.app"]
    created = _send(["channels", "create", "--policy", "0"] + common)
    assert created.returncode == 0, created.stderr.decode()
    channel = json.loads(created.stdout)["channel_id"]
    listed = json.loads(_send(["channels", "list"] + common).stdout)
    assert channel in listed["channels"]
    shown = json.loads(_send(["channels", "show", channel] + common).stdout)
    assert shown["message_storage_policy"] == 0
    payload = tmp_path / "p.json"
    payload.write_text(json.dumps({"aps": {"event": "update", "timestamp": 1,
                                           "content-state": {"score": "1-0"}}}))
    sent = _send(["send", "--channel", channel, "--payload", str(payload)] + common)
    assert sent.returncode == 0, sent.stderr.decode()
    assert json.loads(sent.stdout.splitlines()[-1])["counts"] == {"delivered": 1}
    assert _send(["channels", "delete", channel] + common).returncode == 0
    gone = _send(["channels", "show", channel] + common)
    assert gone.returncode == 1 and b"ChannelNotRegistered" in gone.stderr
    again = _send(["send", "--channel", channel, "--payload", str(payload)] + common)
    assert b"ChannelNotRegistered" in again.stderr
    assert again.returncode == 1  # fanout._exits: a rejected broadcast is a failed push


def test_fanout_version_prints_the_packages_version() -> None:
    import subprocess
    import sys

    import fanout

    out = subprocess.run([sys.executable, "-m", "fanout", "--version"], capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"fanout {fanout.__version__}"
    from importlib.metadata import version

    assert version("fanout") == fanout.__version__  # pyproject.toml and the package agree


def _parsers() -> list[tuple[str, Any]]:
    import argparse

    from fanout._cli import build_parser

    out = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        out.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}".strip(), sub)

    walk("", build_parser())
    return out


def test_every_flag_has_help_text() -> None:
    import argparse

    missing = [(name or "fanout", a.option_strings or a.dest) for name, parser in _parsers()
               for a in parser._actions if a.help is None and a.help != argparse.SUPPRESS]
    assert not missing


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["serve", "--listn", "x"],
                                  ["channels", "list", "--nope"], ["mock", "--prot", "1"]])
def test_an_unknown_flag_prints_its_subcommands_usage(argv: list[str]) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fanout", *argv], capture_output=True,
                         text=True, timeout=60)
    command = " ".join(a for a in argv if not a.startswith("-") and a not in ("x", "1"))
    assert out.returncode == 2
    assert out.stderr.startswith(f"usage: fanout {command} "), out.stderr[:200]
    assert "unrecognized arguments" in out.stderr


async def test_send_flags_reach_the_payload_and_content_available_alone_is_background(
        tmp_path: Path, pki: Any, signing_key: Any) -> None:
    """Issue 18: --category, --thread-id, --mutable-content, --interruption-level go into
    aps; --content-available alone is a background push at priority 5 (it was an alert at
    priority 10)."""
    import trio

    from .helpers import mock_server

    tokens = tmp_path / "tokens"
    tokens.write_text("aa" * 32 + "\n")
    quiet = tmp_path / "quiet"
    quiet.write_text("bb" * 32 + "\n")
    async with mock_server(pki, signing_key, record_bodies=True) as mock:
        base = ["--host", "127.0.0.1", "--port", str(mock.port), "--ca-file", str(pki.ca_file),
                "--key-path", str(signing_key.path), "--key-id", signing_key.key_id,
                "--team-id", signing_key.team_id, "--topic", "com.example.app"]
        alert = await trio.run_process(
            [*FANOUT, "send", "--tokens", str(tokens), "--title", "Hi", "--category", "REPLY",
             "--thread-id", "chat-7", "--mutable-content", "--interruption-level",
             "time-sensitive", *base], capture_stdout=True, capture_stderr=True, check=False)
        background = await trio.run_process(
            [*FANOUT, "send", "--tokens", str(quiet), "--content-available", *base],
            capture_stdout=True, capture_stderr=True, check=False)
    assert alert.returncode == 0, alert.stderr.decode()
    assert background.returncode == 0, background.stderr.decode()
    (priority, body), = mock.stats.bodies["aa" * 32]
    aps = json.loads(body)["aps"]
    assert priority == 10 and aps["category"] == "REPLY" and aps["thread-id"] == "chat-7"
    assert aps["mutable-content"] == 1 and aps["interruption-level"] == "time-sensitive"
    (priority, body), = mock.stats.bodies["bb" * 32]
    assert priority == 5 and json.loads(body) == {"aps": {"content-available": 1}}


def test_check_prints_a_refusal_once(mock_process, signing_key, tmp_path):
    """Issue 18: the report, the engine's log line and 'not ok' said it three times."""
    from fanout.testing.devcerts import make_signing_key

    port, ca = mock_process
    other = make_signing_key(tmp_path / "other", key_id=signing_key.key_id,
                             team_id=signing_key.team_id)
    out = _send(["check", "--host", "127.0.0.1", "--port", str(port), "--ca-file", str(ca),
                 "--key-path", str(other.path), "--key-id", other.key_id, "--team-id",
                 other.team_id, "--topic", "com.example.app"])
    assert out.returncode == 3
    assert json.loads(out.stdout)["problem"] == "config"  # the report, on stdout
    assert out.stderr.count(b"InvalidProviderToken") == 1, out.stderr.decode()


def test_a_tls_verify_failure_against_a_mock_suggests_ca_file(mock_process, signing_key):
    port, _ = mock_process
    out = _send(["check", "--host", "127.0.0.1", "--port", str(port), "--key-path",
                 str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
                 signing_key.team_id, "--topic", "com.example.app", "--connect-timeout", "5"],
                {"APNS_CA_FILE": ""})
    assert out.returncode != 0
    assert b"certificate verification failed" in out.stderr and b"--ca-file" in out.stderr
