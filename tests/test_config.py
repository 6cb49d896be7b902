"""fanout.config: precedence (flag > APNS_* env > --config TOML > default), precise errors,
auth and client construction, and ``fanout check`` as a subprocess against a mock process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fanout.auth import CertAuth, TokenAuth
from fanout.config import (
    ENV,
    FLAGS,
    Settings,
    add_settings_args,
    load_settings,
    make_auth,
    make_client,
)
from fanout.errors import ConfigError, KeyFileError

FANOUT = [sys.executable, "-m", "fanout"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_args(parser)
    return parser.parse_args(list(argv))


def load(*argv: str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(parse(*argv), env or {})


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- precedence


def test_defaults_when_nothing_is_given():
    assert load() == Settings()
    assert Settings().environment == "production" and Settings().port == 443
    assert Settings().connections == 2 and Settings().topic_rates == {}


def test_every_flag_defaults_to_none_and_every_field_has_a_flag_and_an_env_var():
    args = parse()
    for name in Settings.__struct_fields__:
        if name == "team":  # [[team]] tables: in the file (or --teams FILE) only
            assert name not in FLAGS and name not in ENV
            continue
        assert getattr(args, name) is None, name
        assert name in FLAGS and ENV[name].startswith("APNS_")
    assert args.config is None
    for name, var in {"key_path": "APNS_KEY_PATH", "key_id": "APNS_KEY_ID",
                      "team_id": "APNS_TEAM_ID", "topic": "APNS_TOPIC",
                      "environment": "APNS_ENVIRONMENT", "host": "APNS_HOST",
                      "port": "APNS_PORT", "ca_file": "APNS_CA_FILE",
                      "connections": "APNS_CONNECTIONS", "cert": "APNS_CERT",
                      "cert_key": "APNS_CERT_KEY"}.items():
        assert ENV[name] == var


def test_flag_beats_env_beats_file_beats_default(tmp_path):
    cfg = write(tmp_path / "fanout.toml", """
topic = "file.topic"
port = 1001
connections = 3
timeout = 4
host = "file.example"
delivery = "at_most_once"
""")
    env = {"APNS_TOPIC": "env.topic", "APNS_PORT": "2002", "APNS_HOST": "env.example",
           "APNS_RATE": "50"}
    s = load("--config", cfg, "--topic", "flag.topic", "--rate", "7.5", env=env)
    assert s.topic == "flag.topic"          # flag > env > file
    assert s.rate == 7.5                    # flag > env
    assert s.port == 2002                   # env > file
    assert s.host == "env.example"          # env > file
    assert s.connections == 3               # file > default
    assert s.timeout == 4.0 and isinstance(s.timeout, float)
    assert s.delivery == "at_most_once"     # file > default
    assert s.max_attempts == 5              # default
    assert s.environment == "production"


def test_empty_env_var_counts_as_unset(tmp_path):
    cfg = write(tmp_path / "f.toml", 'topic = "file.topic"\nconnections = 4\n')
    s = load("--config", cfg, env={"APNS_TOPIC": "", "APNS_CONNECTIONS": "", "APNS_PORT": ""})
    assert (s.topic, s.connections, s.port) == ("file.topic", 4, 443)


def test_a_flag_overrides_a_bad_env_var_without_parsing_it():
    assert load("--port", "8443", env={"APNS_PORT": "abc"}).port == 8443
    assert load("--environment", "sandbox", env={"APNS_ENVIRONMENT": "x"}).environment == "sandbox"


def test_env_values_are_converted_from_strings():
    env = {"APNS_PORT": "8443", "APNS_CONNECTIONS": "6", "APNS_TIMEOUT": "2.5",
           "APNS_MAX_IN_FLIGHT": "100", "APNS_ENVIRONMENT": "sandbox", "APNS_KEY_ID": "1234567890",
           "APNS_REFRESH_AFTER": "1800"}
    s = load(env=env)
    assert (s.port, s.connections, s.timeout, s.max_in_flight) == (8443, 6, 2.5, 100)
    assert s.environment == "sandbox" and s.key_id == "1234567890" and s.refresh_after == 1800.0


def test_config_file_from_apns_config_env_and_flag_wins(tmp_path):
    a = write(tmp_path / "a.toml", "connections = 7\n")
    b = write(tmp_path / "b.toml", "connections = 9\n")
    assert load(env={"APNS_CONFIG": a}).connections == 7
    assert load("--config", b, env={"APNS_CONFIG": a}).connections == 9


def test_apns_table_form(tmp_path):
    cfg = write(tmp_path / "f.toml", """
[apns]
topic = "com.example.app"
environment = "sandbox"
connections = 5

[apns.topic_rates]
"com.example.app" = 100
"com.example.other" = 2.5
""")
    s = load("--config", cfg)
    assert s.topic == "com.example.app" and s.environment == "sandbox" and s.connections == 5
    assert s.topic_rates == {"com.example.app": 100.0, "com.example.other": 2.5}


def test_top_level_and_apns_table_together_is_an_error(tmp_path):
    cfg = write(tmp_path / "f.toml", 'topic = "a"\n[apns]\nport = 1\n')
    with pytest.raises(ConfigError, match="both at top level"):
        load("--config", cfg)


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path):
    (tmp_path / "etc").mkdir()
    cfg = write(tmp_path / "etc" / "f.toml", 'key_path = "AuthKey.p8"\nca_file = "/abs/ca.pem"\n')
    s = load("--config", cfg)
    assert s.key_path == str(tmp_path / "etc" / "AuthKey.p8")
    assert s.ca_file == "/abs/ca.pem"
    # flags and env are taken as given (relative to the working directory)
    assert load("--config", cfg, "--key-path", "k.p8").key_path == "k.p8"


# --------------------------------------------------------------------------- topic rates


def test_topic_rate_flags_env_and_file(tmp_path):
    s = load("--topic-rate", "com.a=100", "--topic-rate", "com.b.voip=2.5")
    assert s.topic_rates == {"com.a": 100.0, "com.b.voip": 2.5}
    s = load(env={"APNS_TOPIC_RATES": "com.a=1, com.b=2"})
    assert s.topic_rates == {"com.a": 1.0, "com.b": 2.0}
    cfg = write(tmp_path / "f.toml", '[topic_rates]\n"com.f" = 3\n')
    assert load("--config", cfg).topic_rates == {"com.f": 3.0}
    # per-field precedence: the flag's table replaces the env's and the file's
    s = load("--config", cfg, "--topic-rate", "com.x=9", env={"APNS_TOPIC_RATES": "com.e=1"})
    assert s.topic_rates == {"com.x": 9.0}


@pytest.mark.parametrize("value, needle", [
    ("com.a", "expected TOPIC=RATE"),
    ("=5", "expected TOPIC=RATE"),
    ("com.a=fast", "rate of topic 'com.a' must be a number, got 'fast'"),
    ("com.a=0", "must be a positive number"),
    ("com.a=-3", "must be a positive number"),
])
def test_bad_topic_rate_flag(value, needle):
    with pytest.raises(ConfigError, match="--topic-rate") as err:
        load("--topic-rate", value)
    assert needle in str(err.value)


def test_bad_topic_rate_in_file_and_env(tmp_path):
    cfg = write(tmp_path / "f.toml", '[topic_rates]\n"com.a" = "fast"\n')
    with pytest.raises(ConfigError, match=r"f\.toml: topic_rates: every rate must be a number"):
        load("--config", cfg)
    with pytest.raises(ConfigError, match="APNS_TOPIC_RATES: expected TOPIC=RATE"):
        load(env={"APNS_TOPIC_RATES": "com.a"})


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    cfg = write(tmp_path / "fanout.toml", "conections = 3\n")
    with pytest.raises(ConfigError) as err:
        load("--config", cfg)
    msg = str(err.value)
    assert msg.startswith(f"config file {cfg}: unknown key 'conections'")
    assert "did you mean 'connections'" in msg and "known: key_path" in msg


def test_unknown_key_under_apns_table(tmp_path):
    cfg = write(tmp_path / "fanout.toml", "[apns]\nprot = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'prot'"):
        load("--config", cfg)
    cfg = write(tmp_path / "fanout.toml", "[apns]\nport = 3\n[other]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'other'"):
        load("--config", cfg)


def test_invalid_toml_names_the_file(tmp_path):
    cfg = write(tmp_path / "broken.toml", "port = \n")
    with pytest.raises(ConfigError) as err:
        load("--config", cfg)
    assert str(err.value).startswith(f"config file {cfg}: not valid TOML: ")
    assert "line 1" in str(err.value)


def test_wrong_type_in_file(tmp_path):
    cfg = write(tmp_path / "f.toml", 'port = "443"\n')
    with pytest.raises(ConfigError, match=r"f\.toml: port: expected an integer, got '443'"):
        load("--config", cfg)


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=f"config file {missing} not found"):
        load("--config", missing)
    with pytest.raises(ConfigError, match="is a directory"):
        load("--config", str(tmp_path))


@pytest.mark.parametrize("var, value, message", [
    ("APNS_PORT", "abc", "APNS_PORT: expected an integer, got 'abc'"),
    ("APNS_CONNECTIONS", "2.5", "APNS_CONNECTIONS: expected an integer, got '2.5'"),
    ("APNS_TIMEOUT", "soon", "APNS_TIMEOUT: expected a number, got 'soon'"),
])
def test_env_var_with_a_bad_value(var, value, message):
    with pytest.raises(ConfigError) as err:
        load(env={var: value})
    assert str(err.value) == message


def test_bad_environment_and_delivery_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load("--environment", "prod")
    assert str(err.value).startswith("environment must be production or sandbox, got 'prod'")
    assert "--environment" in str(err.value)
    with pytest.raises(ConfigError, match=r"got 'dev' \(from APNS_ENVIRONMENT\)"):
        load(env={"APNS_ENVIRONMENT": "dev"})
    cfg = write(tmp_path / "f.toml", 'delivery = "exactly_once"\n')
    with pytest.raises(ConfigError, match="delivery must be at_least_once or at_most_once"):
        load("--config", cfg)
    with pytest.raises(ConfigError, match="delivery must be at_least_once or at_most_once"):
        load("--delivery", "maybe")


@pytest.mark.parametrize("argv, needle", [
    (["--connections", "0"], "connections must be >= 1"),
    (["--max-attempts", "0"], "max_attempts must be >= 1"),
    (["--max-in-flight", "0"], "max_in_flight must be >= 1"),
    (["--port", "0"], "port must be within 1..65535"),
    (["--timeout", "0"], "timeout must be a positive number"),
    (["--connect-timeout", "-1"], "connect_timeout must be a positive number"),
    (["--rate", "0"], "rate must be a positive number"),
    (["--rate", "nan"], "rate must be a positive number"),
    (["--cert-key", "k.pem"], "certificate auth needs --cert"),
])
def test_range_checks(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        load(*argv)


# --------------------------------------------------------------------------- auth, client


def test_make_auth_token_from_settings(signing_key):
    s = load("--key-path", str(signing_key.path), "--key-id", signing_key.key_id,
             "--team-id", signing_key.team_id, "--refresh-after", "1800")
    auth = make_auth(s)
    assert isinstance(auth, TokenAuth)
    assert (auth.key_id, auth.team_id, auth.refresh_after) == (signing_key.key_id,
                                                               signing_key.team_id, 1800.0)


def test_make_auth_missing_key_file_names_the_path(tmp_path):
    path = str(tmp_path / "missing" / "AuthKey.p8")
    with pytest.raises(KeyFileError, match="missing/AuthKey.p8"):
        make_auth(Settings(key_path=path, key_id="ABC123DEFG", team_id="TEAM123456"))


def test_make_auth_names_what_is_missing():
    with pytest.raises(ConfigError) as err:
        make_auth(Settings(key_id="ABC123DEFG"))
    msg = str(err.value)
    assert "--key-path" in msg and "--team-id" in msg and "APNS_KEY_PATH" in msg
    assert "--key-id" not in msg and "--cert" in msg


def test_make_auth_certificate(pki, tmp_path):
    both = tmp_path / "client.pem"
    both.write_bytes(Path(pki.cert_file).read_bytes() + Path(pki.key_file).read_bytes())
    auth = make_auth(Settings(cert=str(both), key_path="/ignored.p8"))
    assert isinstance(auth, CertAuth)
    auth = make_auth(Settings(cert=str(pki.cert_file), cert_key=str(pki.key_file)))
    assert isinstance(auth, CertAuth) and auth.key_file == str(pki.key_file)
    with pytest.raises(KeyFileError, match="nope.pem"):
        make_auth(Settings(cert=str(tmp_path / "nope.pem")))


def test_make_client_passes_every_setting(signing_key, monkeypatch):
    import fanout.client

    s = Settings(key_path=str(signing_key.path), key_id=signing_key.key_id,
                 team_id=signing_key.team_id, topic="com.example.app", environment="sandbox",
                 host="h.example", port=8443, ca_file="/ca.pem", connections=3, timeout=2.0,
                 connect_timeout=1.5, rate=10.0, topic_rates={"com.example.app": 5.0},
                 max_attempts=2, delivery="at_most_once", max_in_flight=64,
                 proxy="http://proxy.example:3128", unavailable_timeout=7.0,
                 ping_timeout=2.5, topic_guard=40)
    captured = {}
    monkeypatch.setattr(fanout.client, "Client", lambda **kw: captured.update(kw) or "client")

    def sink(*a):
        return None

    assert make_client(s, on_invalid_token=sink) == "client"
    auth = captured.pop("auth")
    assert isinstance(auth, TokenAuth) and auth.key_id == signing_key.key_id
    assert captured == {
        "topic": "com.example.app", "environment": "sandbox", "host": "h.example", "port": 8443,
        "ca_file": "/ca.pem", "connections": 3, "timeout": 2.0, "connect_timeout": 1.5,
        "unavailable_timeout": 7.0, "ping_timeout": 2.5, "topic_guard": 40,
        "rate": 10.0, "topic_rates": {"com.example.app": 5.0}, "max_attempts": 2,
        "delivery": "at_most_once", "max_in_flight": 64, "insecure": False,
        "proxy": "http://proxy.example:3128", "on_invalid_token": sink}
    # extra kwargs override the settings
    captured.clear()
    make_client(s, connections=1, auth="given")
    assert captured["connections"] == 1 and captured["auth"] == "given"


async def test_make_client_builds_a_real_client(signing_key):
    s = Settings(key_path=str(signing_key.path), key_id=signing_key.key_id,
                 team_id=signing_key.team_id, environment="sandbox", max_attempts=3)
    client = make_client(s)
    assert client.host == "api.sandbox.push.apple.com" and client.port == 443
    assert client.max_attempts == 3 and client.pool.size == 2


# --------------------------------------------------------------------------- fanout check


def _run(args, env_extra=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("APNS_")}
    env.update(env_extra or {})
    return subprocess.run(FANOUT + args, capture_output=True, timeout=timeout, env=env)


def _assert_no_secret(written: bytes, signing_key) -> None:
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    assert auth.header().split()[1][:60] not in written  # any JWT with this kid starts alike
    assert b"eyJ" not in written                           # nor any other JWT
    key_body = b"".join(Path(signing_key.path).read_bytes().splitlines()[1:-1])
    assert key_body[:40] not in written


def test_check_ok_against_mock_process(mock_process, signing_key, tmp_path):
    port, ca = mock_process
    # the whole chain: key settings from an [apns] file, topic from env, host/port from flags
    cfg = write(tmp_path / "fanout.toml", f"""
[apns]
key_path = "{signing_key.path}"
key_id = "{signing_key.key_id}"
team_id = "{signing_key.team_id}"
ca_file = "{ca}"
connections = 4
""")
    out = _run(["check", "--config", cfg, "--host", "127.0.0.1", "--port", str(port)],
               {"APNS_TOPIC": "com.example.app"})
    assert out.returncode == 0, out.stderr.decode()
    lines = out.stdout.decode().strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["ok"] is True and report["error"] is None
    assert report["answer"]["status"] == 200
    assert report["stream_limit"] == 1000
    assert report["auth"] == "token"
    assert report["key_id"] == signing_key.key_id and report["team_id"] == signing_key.team_id
    assert (report["host"], report["port"], report["environment"]) == ("127.0.0.1", port,
                                                                       "production")
    assert 0 <= report["jwt_age_s"] < 30
    _assert_no_secret(out.stdout + out.stderr, signing_key)


def test_check_with_a_wrong_key_is_not_ok(mock_process, signing_key, tmp_path):
    from fanout.testing.devcerts import make_signing_key

    port, ca = mock_process
    other = make_signing_key(tmp_path / "other", key_id=signing_key.key_id,
                             team_id=signing_key.team_id)
    out = _run(["check", "--host", "127.0.0.1", "--port", str(port), "--ca-file", str(ca),
                "--key-path", str(other.path), "--key-id", other.key_id, "--team-id",
                other.team_id, "--topic", "com.example.app", "-v"])
    assert out.returncode == 3, out.stderr.decode()  # APNs refused the credentials
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert report["ok"] is False
    assert report["answer"]["reason"] == "InvalidProviderToken"
    assert "InvalidProviderToken" in report["error"]
    assert b"InvalidProviderToken" in out.stderr
    assert b"Traceback" not in out.stderr
    _assert_no_secret(out.stdout + out.stderr, signing_key)
    _assert_no_secret(out.stdout + out.stderr, other)


def test_check_without_topic_or_with_bad_config(tmp_path, signing_key):
    base = ["check", "--host", "127.0.0.1", "--port", "1", "--key-path", str(signing_key.path),
            "--key-id", signing_key.key_id, "--team-id", signing_key.team_id]
    out = _run(base)
    assert out.returncode == 2
    assert json.loads(out.stdout)["error"].startswith("check needs a topic: --topic")
    assert b"--topic" in out.stderr
    out = _run(base[:3] + ["--topic", "com.example.app"] + base[5:], {"APNS_PORT": "abc"})
    assert out.returncode == 2
    assert b"APNS_PORT: expected an integer, got 'abc'" in out.stderr
    assert b"Traceback" not in out.stderr
    out = _run(["check", "--config", str(tmp_path / "missing.toml")])
    assert out.returncode == 2 and b"missing.toml not found" in out.stderr


def test_check_cannot_connect_is_not_ok(signing_key, pki):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _run(["check", "--host", "127.0.0.1", "--port", str(port), "--ca-file",
                str(pki.ca_file), "--key-path", str(signing_key.path), "--key-id",
                signing_key.key_id, "--team-id", signing_key.team_id, "--topic",
                "com.example.app", "--connect-timeout", "1"])
    assert out.returncode == 4  # fanout._exits: APNs unreachable
    report = json.loads(out.stdout)
    assert report["ok"] is False and f"127.0.0.1:{port}" in report["error"]
    assert report["answer"]["status"] is None


def test_send_still_reads_the_config_file(tmp_path):
    # send goes through the same layer: a bad file is reported, not a traceback
    (tmp_path / "t.txt").write_text("ab" * 32 + "\n")
    cfg = write(tmp_path / "fanout.toml", "conections = 2\n")
    out = _run(["send", "--tokens", str(tmp_path / "t.txt"), "--title", "x", "--config", cfg])
    assert out.returncode == 2
    assert b"unknown key 'conections'" in out.stderr and b"Traceback" not in out.stderr


def test_run_hook_registers_the_daemon_and_dispatches_to_run_main(monkeypatch, capsys):
    import types

    from fanout import _cli as cli

    seen = {}

    async def run_main(args):
        seen["settings"] = load_settings(args, {})
        if args.fail:
            raise ConfigError("bad daemon config")
        return 7

    def add_run_parser(sub, *, settings_args):
        run = sub.add_parser("run")
        settings_args(run)
        run.add_argument("--fail", action="store_true")
        run.set_defaults(run_main=run_main)

    fake = types.ModuleType("fanout._daemon.command")
    fake.add_run_parser = add_run_parser
    monkeypatch.setitem(sys.modules, "fanout._daemon.command", fake)
    assert cli.main(["run", "--connections", "3"]) == 7
    assert seen["settings"].connections == 3
    assert cli.main(["run", "--fail"]) == 2
    assert "fanout run: error: bad daemon config" in capsys.readouterr().err
