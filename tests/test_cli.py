"""The real ``fanout`` executable as subprocesses: demo, mock and send, and no secret in
any byte they write."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
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
    # the mock's fast path served it (its exit line counts connections per path), and the
    # mock's own CPU is reported
    assert summary["mock_path"] == "fast" and summary["mock_cpu_us_per_push"] > 0
    assert "on its fast path" in out.stderr.decode() and "h2 path" not in out.stderr.decode()


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


# ---------------------------------------------------------------- send with [[team]] tables

_TEAM_TOPICS = {"acme": ["com.acme.app", "com.acme.pos"], "beta": ["com.beta.app", "com.beta.tv"]}


@pytest.fixture
def team_keys(tmp_path):
    from fanout.testing.devcerts import make_signing_key

    return {"acme": make_signing_key(tmp_path / "a", key_id="ACMEKEY001", team_id="ACMETEAM01"),
            "beta": make_signing_key(tmp_path / "b", key_id="BETAKEY001", team_id="BETATEAM01")}


def _team_tables(keys, ports, pki, **sandbox_ports) -> str:
    blocks = []
    for name, k in keys.items():
        lines = ["[[team]]", f'name = "{name}"', f"topics = {json.dumps(_TEAM_TOPICS[name])}",
                 f'key_path = "{k.path}"', f'key_id = "{k.key_id}"', f'team_id = "{k.team_id}"',
                 'host = "127.0.0.1"', f"port = {ports[name]}", f'ca_file = "{pki.ca_file}"']
        if name in sandbox_ports:
            lines.append(f"sandbox_port = {sandbox_ports[name]}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


async def _fanout(*args: str):
    import trio

    with trio.fail_after(90):
        return await trio.run_process([*FANOUT, *args], capture_stdout=True,
                                      capture_stderr=True, check=False,
                                      env={**os.environ, "APNS_CONFIG": ""})


async def test_send_with_team_tables_signs_each_topic_with_its_teams_key(
        tmp_path: Path, pki: Any, team_keys: Any) -> None:
    """Issue 18: `fanout send` with [[team]] tables (in --config, or --teams FILE) sends
    through the team serving --topic; a topic no team serves is a clear usage error."""
    import base64

    from .helpers import mock_server

    toks = [f"{i:064x}" for i in range(300)]
    (tmp_path / "tokens").write_text("\n".join(toks) + "\n")
    channel = base64.b64encode(bytes(range(16))).decode()
    payload = tmp_path / "la.json"
    payload.write_text(json.dumps({"aps": {"event": "update", "timestamp": 1,
                                           "content-state": {"score": "1-0"}}}))

    def mock_kw(name):
        k = team_keys[name]
        return dict(keys={k.key_id: k.public_key}, team_id=k.team_id,
                    topics=set(_TEAM_TOPICS[name]))
    async with mock_server(pki, team_keys["acme"], **mock_kw("acme")) as acme, \
            mock_server(pki, team_keys["beta"], **mock_kw("beta")) as beta:
        tables = _team_tables(team_keys, {"acme": acme.port, "beta": beta.port}, pki)
        config = tmp_path / "fanout.toml"  # [[team]] tables and no top-level key
        config.write_text("timeout = 5.0\n\n" + tables)
        teams = tmp_path / "teams.toml"
        teams.write_text(tables)
        a = await _fanout("send", "--config", str(config), "--topic", "com.acme.pos",
                          "--tokens", str(tmp_path / "tokens"), "--title", "hi")
        assert a.returncode == 0, a.stderr.decode()[-2000:]
        acme_after_a, beta_after_a = acme.stats.requests, beta.stats.requests
        b = await _fanout("send", "--teams", str(teams), "--topic", "com.beta.tv",
                          "--tokens", str(tmp_path / "tokens"), "--title", "hi")
        assert b.returncode == 0, b.stderr.decode()[-2000:]
        acme.stats.channels["com.acme.app"] = {channel: 0}  # the mock's channel registry
        bc = await _fanout("send", "--config", str(config), "--topic", "com.acme.app",
                           "--channel", channel, "--payload", str(payload))
        assert bc.returncode == 0, bc.stderr.decode()[-2000:]
        requests = acme.stats.requests, beta.stats.requests
        nobody = await _fanout("send", "--config", str(config), "--topic", "com.nobody.app",
                               "--tokens", str(tmp_path / "tokens"), "--title", "hi")
        no_topic = await _fanout("send", "--teams", str(teams), "--tokens",
                                 str(tmp_path / "tokens"), "--title", "hi")
        assert (acme.stats.requests, beta.stats.requests) == requests  # nothing sent
    for out, team in ((a, "acme"), (b, "beta")):
        summary = json.loads(out.stdout.decode().splitlines()[-1])
        assert summary["pushes"] == 300 and summary["counts"] == {"delivered": 300}
        assert summary["team"] == team and summary["environment"] == "production"
    # each mock takes only its own team's key id, team id (JWT iss) and bundle ids, and
    # checks the signature: 200s on each prove each team's pushes carried its own JWT
    assert (acme_after_a, beta_after_a) == (300, 0)
    assert set(acme.stats.delivered) == set(beta.stats.delivered) == set(toks)
    assert acme.stats.by_status == {200: 300 + 1} and beta.stats.by_status == {200: 300}
    # and what each JWT seen was (key id, issuer, signature checked against that key):
    # one per process (acme: the fan-out and the broadcast), none of the other team's
    for mock, name, n in ((acme, "acme", 2), (beta, "beta", 1)):
        seen = list(mock._token_cache._cache.values())
        assert len(mock.stats.jwts) == len(seen) == n
        key = team_keys[name]
        assert {(i.kid, i.iss, i.valid) for i in seen} == {(key.key_id, key.team_id, True)}
    assert acme.stats.broadcasts == {channel: 1} and not beta.stats.broadcasts
    assert json.loads(bc.stdout.decode().splitlines()[-1])["counts"] == {"delivered": 1}
    for out, needle in ((nobody, b"com.nobody.app"), (no_topic, b"--topic")):
        assert out.returncode == 2, out.stderr.decode()
        assert needle in out.stderr and b"Traceback" not in out.stderr
        assert b"com.acme.app" in out.stderr and b"com.beta.tv" in out.stderr  # what is served


async def test_send_with_team_tables_retries_the_wrong_environment(
        tmp_path: Path, pki: Any, signing_key: Any) -> None:
    """Issue 18: --retry-wrong-environment with [[team]] tables is no longer refused by
    send: a sandbox token sent to production is delivered by the sandbox, not called dead."""
    from .helpers import mock_server
    from .test_environments import MOCK_KW, dead, true_env

    toks = [f"{i:064x}" for i in range(400)]
    (tmp_path / "tokens").write_text("\n".join(toks) + "\n")
    invalid = tmp_path / "invalid.ndjson"
    async with mock_server(pki, signing_key, environment="production", **MOCK_KW) as prod, \
            mock_server(pki, signing_key, environment="sandbox", **MOCK_KW) as sandbox:
        config = tmp_path / "fanout.toml"
        config.write_text(_team_tables({"acme": signing_key}, {"acme": prod.port}, pki,
                                       acme=sandbox.port))
        out = await _fanout("send", "--config", str(config), "--topic", "com.acme.app",
                            "--retry-wrong-environment", "--tokens", str(tmp_path / "tokens"),
                            "--title", "hi", "--invalid-tokens", str(invalid))
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    summary = json.loads(out.stdout.decode().splitlines()[-1])
    gone = [t for t in toks if dead(t)]
    wrong = [t for t in toks if not dead(t) and true_env(t) == "sandbox"]
    assert len(gone) > 5 and len(wrong) > 50
    assert summary["counts"] == {"delivered": 400 - len(gone), "invalid_token": len(gone)}
    assert summary["wrong_environment"] == len(wrong)
    assert set(sandbox.stats.delivered) == set(wrong)
    assert set(prod.stats.delivered) == {t for t in toks if not dead(t)} - set(wrong)
    told = [json.loads(x)["token"] for x in invalid.read_text().splitlines()]
    assert sorted(told) == sorted(gone)  # a wrong-environment token is not called dead


async def test_teams_fan_out_streams_the_tokens_and_rejects_a_bad_one(
        pki: Any, team_keys: Any) -> None:
    """What `fanout send` with [[team]] tables runs on: Teams.fan_out pulls tokens as pushes
    end (a bounded number ahead, never the whole list), a token that is not hex is one
    `rejected` result, and every push is labelled with its team."""
    import trio

    from fanout.auth import TokenAuth
    from fanout.errors import ConfigError
    from fanout.teams import QUEUE, Team, Teams

    from .helpers import mock_server

    n, window = 6000, 64
    pulled = 0

    def lines():
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield "not a token" if i == 17 else f"{i:064x}"
    k = team_keys["acme"]
    async with mock_server(pki, k, topics=set(_TEAM_TOPICS["acme"])) as acme:
        team = Team("acme", TokenAuth.from_file(k.path, k.key_id, k.team_id),
                    set(_TEAM_TOPICS["acme"]), environments=("production",),
                    client={"host": "127.0.0.1", "port": acme.port,
                            "ca_file": str(pki.ca_file)})
        async with Teams([team], max_in_flight=window) as router:
            with pytest.raises(ConfigError, match=r"com\.nobody\.app.*acme: com\.acme\.app"):
                router.fan_out({"aps": {"alert": "x"}}, lines(), topic="com.nobody.app")
            ahead = 0
            results = []
            with trio.fail_after(60):
                async for r in router.fan_out({"aps": {"alert": "x"}}, lines(),
                                              topic="com.acme.pos"):
                    results.append(r)
                    ahead = max(ahead, pulled - len(results))
    assert len(results) == n and pulled == n
    outcomes = Counter(str(r.outcome) for r in results)
    assert outcomes == {"delivered": n - 1, "rejected": 1}
    bad, = (r for r in results if str(r.outcome) == "rejected")
    assert "token" in bad.error and bad.team == "acme"
    assert all(r.team == "acme" and r.environment == "production" for r in results)
    assert len(acme.stats.delivered) == n - 1
    assert ahead <= window + 3 * QUEUE  # in flight + the router's queues, not all n
