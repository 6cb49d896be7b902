"""Sandbox and production side by side (issue 9): two mocks, one per environment, each
answering BadDeviceToken for the other environment's tokens as Apple does. A push goes to
the environment it names; with ``retry_wrong_environment`` a token sent to the wrong one is
reported ``wrong_environment`` (delivered by the other), never as a dead token, while a
token dead in both is reported dead exactly once."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fanout.auth import TokenAuth
from fanout.config import read_teams_file
from fanout.errors import ConfigError
from fanout.metrics import Metrics
from fanout.payload import Notification
from fanout.teams import Team, Teams
from fanout.testing.mock import MockConfig, _hash_fraction, is_sandbox_token

from .helpers import FANOUT, daemon_cmd, mock_server, read_results, run_daemon
from .test_metrics import feed_and_scrape, free_port

TOPIC = "com.example.app"
SANDBOX_SHARE = 0.3   # of tokens belong to the sandbox
DEAD_SHARE = 0.05     # of tokens are dead in both environments
MOCK_KW = dict(sandbox_token_fraction=SANDBOX_SHARE, bad_token_fraction=DEAD_SHARE)
_CFG = MockConfig(sandbox_token_fraction=SANDBOX_SHARE)


def true_env(token: str) -> str:
    return "sandbox" if is_sandbox_token(token, _CFG) else "production"


def dead(token: str) -> bool:
    return 1.0 - _hash_fraction(token) <= DEAD_SHARE


def claims(n: int, wrong_share: float = 0.2, seed: int = 4) -> list[tuple[str, str]]:
    """(token, the environment the backend claims for it): wrong for ``wrong_share``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        token = f"{i:064x}"
        env = true_env(token)
        if rng.random() < wrong_share:
            env = "production" if env == "sandbox" else "sandbox"
        out.append((token, env))
    return out


def _team(key, prod, sandbox, pki) -> Team:
    return Team("acme", TokenAuth.from_file(key.path, key.key_id, key.team_id), {TOPIC},
                client={"host": "127.0.0.1", "port": prod.port, "ca_file": str(pki.ca_file)},
                per_environment={"sandbox": {"port": sandbox.port}})


def _series(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _team_total(registry: CollectorRegistry, name: str, team: str = "acme") -> float:
    return sum(v for labels, v in _series(registry, name).items()
               if dict(labels).get("team") == team)


@pytest.mark.parametrize("retry", [True, False])
async def test_each_push_goes_to_its_environment_and_wrong_ones_are_named(
        pki, signing_key, retry):
    pushes = claims(3000)
    notes = [Notification(token=t, payload={"aps": {"alert": "x"}}, topic=TOPIC,
                          environment=env, id=i) for i, (t, env) in enumerate(pushes)]
    hooked: Counter[str] = Counter()
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    async with mock_server(pki, signing_key, environment="production", **MOCK_KW) as prod, \
            mock_server(pki, signing_key, environment="sandbox", **MOCK_KW) as sandbox:
        async with Teams([_team(signing_key, prod, sandbox, pki)],
                         retry_wrong_environment=retry, events=metrics,
                         on_invalid_token=lambda tok, reason, ts: hooked.update([tok])) \
                as router:
            with trio.fail_after(60):
                results = [r async for r in router.send_many(notes)]
            metrics.sample(router)
    assert len(results) == len(pushes) and {r.id for r in results} == set(range(len(pushes)))
    wrong = 0
    for r in results:
        token, claimed = pushes[r.id]
        assert r.team == "acme"
        if dead(token):
            assert (str(r.outcome), r.reason, r.environment) == \
                ("invalid_token", "BadDeviceToken", claimed), r
            assert not r.wrong_environment
        elif claimed == true_env(token):
            assert r.ok and r.environment == claimed and not r.wrong_environment, r
        elif retry:
            wrong += 1
            assert r.ok and r.environment == true_env(token) and r.wrong_environment, r
        else:  # without the retry a wrong environment looks like a dead token
            assert str(r.outcome) == "invalid_token" and r.environment == claimed, r
    n_dead = sum(dead(t) for t, _ in pushes)
    called_dead = {t for t, _ in pushes if dead(t)}
    if retry:
        assert wrong > 300
        # the hook heard of the dead tokens only, each once, never of a misplaced one
        assert set(hooked) == called_dead and set(hooked.values()) == {1}
        assert _team_total(registry, "fanout_wrong_environment_total") == wrong
    else:
        assert called_dead < set(hooked) and set(hooked.values()) == {1}
    # one metric count per push, whatever it took; each invalid token counted once
    assert _team_total(registry, "fanout_pushes_total") == len(pushes)
    assert _team_total(registry, "fanout_invalid_tokens_total") == len(hooked)
    if retry:
        assert _team_total(registry, "fanout_invalid_tokens_total") == n_dead
    # each mock delivered exactly its own environment's live tokens
    delivered = {"production": set(prod.stats.delivered), "sandbox": set(sandbox.stats.delivered)}
    for env, got in delivered.items():
        want = {t for t, c in pushes if not dead(t) and true_env(t) == env
                and (retry or c == env)}
        assert got == want, env


async def test_send_one_to_the_wrong_environment(pki, signing_key):
    token = next(t for t, _ in claims(200) if true_env(t) == "sandbox" and not dead(t))
    gone = next(t for t, _ in claims(400) if dead(t))
    hooked: list[str] = []

    def note(t: str) -> Notification:
        return Notification(token=t, payload={"aps": {}}, topic=TOPIC)
    async with mock_server(pki, signing_key, environment="production", **MOCK_KW) as prod, \
            mock_server(pki, signing_key, environment="sandbox", **MOCK_KW) as sandbox:
        async with Teams([_team(signing_key, prod, sandbox, pki)],
                         retry_wrong_environment=True,
                         on_invalid_token=lambda tok, *_: hooked.append(tok)) as router:
            r = await router.send(note(token))
            again = await router.send(note(token))
            dead1 = await router.send(note(gone))
            dead2 = await router.send(note(gone))
    assert r.ok and r.environment == "sandbox" and r.wrong_environment
    assert again.ok and again.wrong_environment
    assert sandbox.stats.delivered == {token: 2}
    assert prod.stats.seen[token] == 1  # once: then known there
    assert str(dead1.outcome) == str(dead2.outcome) == "invalid_token"
    assert dead1.environment == dead2.environment == "production"
    assert dead1.attempts == 1 and dead2.attempts == 0  # the second from memory
    assert hooked == [gone]  # told once


# ---------------------------------------------------------------- configuration


def _config(tmp_path, key, prod, sandbox, pki, **extra) -> str:
    lines = [f'{k} = {json.dumps(v)}' for k, v in extra.items()]
    lines += ["", "[[team]]", 'name = "acme"', f'topics = ["{TOPIC}"]',
              f'key_path = "{key.path}"', f'key_id = "{key.key_id}"',
              f'team_id = "{key.team_id}"', 'host = "127.0.0.1"', f"port = {prod.port}",
              f'sandbox_port = {sandbox.port}', f'ca_file = "{pki.ca_file}"']
    path = tmp_path / "fanout.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_team_tables_are_checked(tmp_path):
    from fanout.config import load_settings

    def settings(text: str):
        path = tmp_path / "c.toml"
        path.write_text(text)
        import argparse
        return load_settings(argparse.Namespace(config=str(path)), environ={})

    s = settings('environment = "sandbox"\n[[team]]\nname = "a"\ntopics = ["x.y"]\n'
                 'key_path = "k.p8"\nkey_id = "K"\nteam_id = "T"\n')
    assert s.team[0].key_path == str(tmp_path / "k.p8") and s.environment == "sandbox"
    s = settings('[apns]\nretry_wrong_environment = true\n[[apns.team]]\nname = "a"\n'
                 'topics = ["x.y"]\ncert = "c.pem"\n')
    assert s.retry_wrong_environment and s.team[0].cert == str(tmp_path / "c.pem")
    for text, want in [
        ('[[team]]\nname = "a"\ntopics = ["x"]\n', "team a: needs key_path"),
        ('[[team]]\nname = "a"\ntopics = []\ncert = "c"\n', "team a: topics is empty"),
        ('[[team]]\nname = "a"\ntopics = ["x"]\ncert = "c"\nenvironments = ["prod"]\n',
         "environments must be production"),
        ('[[team]]\nname = "a"\ntopics = ["x"]\ncert = "c"\ncolour = 1\n',
         "team a: Object contains unknown field `colour`"),
        ('[[team]]\nname = "a"\ntopics = ["x"]\ncert = "c"\n[[team]]\nname = "a"\n'
         'topics = ["y"]\ncert = "c"\n', "two teams are named 'a'"),
        ('team = 3\n', "'team' must be [[team]] tables"),
    ]:
        with pytest.raises(ConfigError, match=want.replace("[", r"\[").replace("]", r"\]")):
            settings(text)
    (tmp_path / "t.toml").write_text('key_id = "x"\n')
    with pytest.raises(ConfigError, match="want \\[\\[team\\]\\] tables only"):
        read_teams_file(str(tmp_path / "t.toml"))
    with pytest.raises(ConfigError, match="missing.toml not found"):  # as for --config
        read_teams_file(str(tmp_path / "missing.toml"))


# ---------------------------------------------------------------- the daemon


async def test_plain_daemon_takes_its_own_environment_only(tmp_path, pki, signing_key):
    lines = [{"id": 1, "token": "ab" * 32, "payload": {"aps": {}}, "environment": "production"},
             {"id": 2, "token": "cd" * 32, "payload": {"aps": {}}, "environment": "sandbox"},
             {"id": 3, "token": "ef" * 32, "payload": {"aps": {}}, "environment": "staging"},
             {"id": 4, "token": "01" * 32, "payload": {"aps": {}}}]
    out = tmp_path / "out.ndjson"
    async with mock_server(pki, signing_key) as mock:
        proc = await run_daemon(daemon_cmd(mock, pki, signing_key, "--results", str(out)),
                                stdin=b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]  # the other env: config_error
    by_id = {r.get("id"): r for r in read_results(out)}
    assert by_id[1]["outcome"] == by_id[4]["outcome"] == "delivered"
    assert by_id[2]["outcome"] == "config_error" and "[[team]]" in by_id[2]["error"]
    malformed = [r for r in read_results(out) if r["outcome"] == "malformed"]
    assert len(malformed) == 1 and "staging" in malformed[0]["error"]
    assert set(mock.stats.delivered) == {"ab" * 32, "01" * 32}


def _team_samples(text: str, name: str) -> dict[str, float]:
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels.get("team", "")] += s.value
    return dict(out)


async def test_daemon_with_team_tables_workers_and_metrics(tmp_path, pki, signing_key):
    """[[team]] in the --config file, lines naming their environment, --workers 2 and
    --metrics: one result per line naming team and environment, the misplaced ones
    wrong_environment, and the endpoint's pushes labelled by team."""
    pushes = claims(4000, seed=8)
    data = b"".join(json.dumps({"id": i, "token": t, "environment": env, "topic": TOPIC,
                                "payload": {"aps": {"alert": "x"}}}).encode() + b"\n"
                    for i, (t, env) in enumerate(pushes))
    out = tmp_path / "out.ndjson"
    port = free_port()
    async with mock_server(pki, signing_key, environment="production", **MOCK_KW) as prod, \
            mock_server(pki, signing_key, environment="sandbox", **MOCK_KW) as sandbox:
        config = _config(tmp_path, signing_key, prod, sandbox, pki,
                         retry_wrong_environment=True)
        cmd = [*FANOUT, "run", "--config", config, "--results", str(out),
               "--workers", "2", "--metrics", f"127.0.0.1:{port}", "--status-interval", "0"]
        _, final, text, code = await feed_and_scrape(cmd, data, port, len(pushes), out,
                                                     timeout=120)
    assert code == 0
    results = read_results(out)
    assert sorted(r["id"] for r in results) == list(range(len(pushes)))
    wrong = 0
    for r in results:
        token, claimed = pushes[r["id"]]
        assert r["team"] == "acme"
        if dead(token):
            assert (r["outcome"], r["environment"]) == ("invalid_token", claimed)
        elif claimed != true_env(token):
            wrong += 1
            assert r["outcome"] == "delivered" and r.get("wrong_environment") is True
            assert r["environment"] == true_env(token)
        else:
            assert r["outcome"] == "delivered" and "wrong_environment" not in r
    assert wrong > 400
    assert final["fanout_pushes_total"] == len(pushes)
    assert _team_samples(text, "fanout_pushes_total") == {"acme": len(pushes)}
    assert _team_samples(text, "fanout_wrong_environment_total") == {"acme": wrong}
    assert _team_samples(text, "fanout_connections_opened_total")["acme"] == \
        prod.stats.connections + sandbox.stats.connections


async def test_check_tries_every_team_in_every_environment(tmp_path, pki, signing_key):
    from fanout.testing.devcerts import make_signing_key

    async with mock_server(pki, signing_key, environment="production") as prod, \
            mock_server(pki, signing_key, environment="sandbox") as sandbox:
        config = _config(tmp_path, signing_key, prod, sandbox, pki)
        ok = await run_daemon([*FANOUT, "check", "--config", config])
        sandbox.config.keys = {signing_key.key_id: make_signing_key(
            tmp_path / "other", key_id=signing_key.key_id).public_key}  # revoked there
        bad = await run_daemon([*FANOUT, "check", "--config", config])
    assert ok.returncode == 0, ok.stderr.decode()
    reports = [json.loads(x) for x in ok.stdout.splitlines()]
    assert [(r["team"], r["environment"], r["port"], r["ok"]) for r in reports] == [
        ("acme", "production", prod.port, True), ("acme", "sandbox", sandbox.port, True)]
    assert bad.returncode == 3  # fanout._exits: APNs refused the credentials
    reports = [json.loads(x) for x in bad.stdout.splitlines()]
    assert [r["ok"] for r in reports] == [True, False]
    assert reports[1]["answer"]["reason"] == "InvalidProviderToken"
    assert b"team acme (sandbox): " in bad.stderr and b"eyJ" not in bad.stdout + bad.stderr


@pytest.mark.parametrize("command", ["send", "run"])
def test_retry_wrong_environment_without_teams_is_refused(tmp_path, signing_key, command):
    """Issue 18: it silently did nothing for a single app."""
    import os
    import subprocess
    import sys

    (tmp_path / "tokens").write_text("ab" * 32 + "\n")
    args = (["--tokens", str(tmp_path / "tokens"), "--title", "x"] if command == "send"
            else [str(tmp_path / "tokens")])
    out = subprocess.run(
        [sys.executable, "-m", "fanout", command, *args, "--retry-wrong-environment",
         "--key-path", str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
         signing_key.team_id, "--topic", "com.example.app", "--host", "127.0.0.1",
         "--port", "9"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "APNS_CONFIG": ""})
    assert out.returncode in (2, 3), out.stderr  # send: usage; run: its configuration exit
    assert "retry_wrong_environment needs [[team]] tables" in out.stderr
