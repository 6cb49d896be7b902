"""deploy/ (issue 18, "Running it as a service"): the example config, the systemd units, the
logrotate file and the Prometheus scrape config, each checked by the tool that will read it.

- ``deploy/fanout.toml`` is loaded by the real loaders (every key, active or commented out,
  must be known: a typo is exit 2), and ``fanout check`` / ``fanout serve`` run with it
  against ``fanout mock`` started as a process.
- The units pass ``systemd-analyze verify`` (which needs no running systemd: this runs in a
  container) and ``systemd-analyze security --offline=yes`` under a threshold; a copy with a
  typo must fail verify, so the check is not one that cannot fail.
- The unit's own ``ExecStart=`` (its paths mapped into a temporary directory) runs as a
  real daemon against a real mock, and the logrotate file (``logrotate -f``, its postrotate
  rewritten to the ``kill -HUP`` that ``ExecReload=`` sends) rotates its results twice while
  it runs: every result lands once, before a rotation in the rotated file and after it in a
  fresh file at the path.
- The daemon and ``fanout serve`` run under a seccomp filter doing what systemd 252's
  ``MemoryDenyWriteExecute=yes`` does (x86_64), so the unit's MDWE is known not to break
  CPython, cryptography, OpenSSL or msgspec.
- ``promtool check config deploy/prometheus.yml`` (with the alert rules it loads).

Missing Debian binaries (systemd-analyze: package ``systemd``; logrotate: ``logrotate``;
promtool: ``prometheus``) skip the test locally and fail it under ``CI=true``.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fanout._exits import EXIT_CONFIG, EXIT_FAILED, EXIT_USAGE
from fanout._serve.keys import hash_key
from fanout._serve.options import BY_NAME, OPTIONS, resolve
from fanout.config import ConfigError, Settings, TeamSpec, load_settings
from fanout.testing.devcerts import make_signing_key

from .prometheus_harness import free_port, require_binary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONFIG = DEPLOY / "fanout.toml"
UNIT = DEPLOY / "fanout.service"
SERVE_UNIT = DEPLOY / "fanout-serve.service"
LOGROTATE = DEPLOY / "logrotate.conf"
PROMETHEUS = DEPLOY / "prometheus.yml"
ALERTS = ROOT / "grafana" / "alerts.yml"

SHIPPED_FANOUT = "/opt/fanout/venv/bin/fanout"  # what the units run; docs/operations.md installs it
TOPIC = "com.example.app"
KEY_ID, TEAM_ID = "ABC123DEFG", "TEAM123456"  # the example's (placeholder) ids
START_TIMEOUT = 30.0  # a process coming up on 2 busy cores
FACT_TIMEOUT = 20.0


# --------------------------------------------------------------------------- helpers


def require(name: str, package: str, *paths: str) -> str:
    """A Debian binary: its path; skip locally, fail under CI, when it is not installed."""
    found = shutil.which(name) or next((p for p in paths if os.access(p, os.X_OK)), None)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed: .ci/run must install the Debian package {package}")
    pytest.skip(f"{name} not installed (apt-get install {package})")


def wait_for(fact: Callable[[], Any], what: str, *procs: subprocess.Popen[bytes],
             logs: tuple[Path, ...] = (), timeout: float = FACT_TIMEOUT) -> Any:
    """Poll ``fact()`` until it is truthy; fail when a process in ``procs`` exits first or
    the deadline passes (with the logs)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fact()
        if value:
            return value
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            text = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                             for log in logs if log.exists())
            why = f"exit code {dead[0].returncode}" if dead else f"not within {timeout:.0f} s"
            pytest.fail(f"{what}: {why}\n{text}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM ``proc`` (what systemd's KillSignal= sends) and wait for its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"{proc.args!r} did not exit within {timeout:.0f} s of SIGTERM")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without APNS_*/FANOUT_* settings or proxies, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APNS_", "FANOUT_")) and k.lower() not in
           ("https_proxy", "http_proxy", "all_proxy")}
    env.update(extra)
    return env


def http_get(url: str, key: str | None = None) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with opener.open(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def tokens(n: int, prefix: str) -> list[str]:
    return [f"{prefix}{i:0{64 - len(prefix)}x}" for i in range(n)]


# --------------------------------------------------------------------------- unit files


def logical_lines(path: Path) -> list[str]:
    """A systemd unit's lines with backslash continuations joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        out.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: a continuation line at the end"
    return out


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> its values in order (a key may be given more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in logical_lines(path):
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None and "=" in line, f"{path.name}: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(path: Path, key: str) -> str:
    values = unit(path)["Service"][key]
    assert len(values) == 1, f"{path.name}: {key}= given {len(values)} times"
    return values[0]


def exec_start(path: Path) -> list[str]:
    return shlex.split(service(path, "ExecStart"))


def fanout_script() -> str:
    """The installed ``fanout`` entry point, for copies of the units (verify checks that
    ExecStart's binary exists)."""
    beside = Path(sys.executable).parent / "fanout"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("fanout")
    assert found, "no fanout script installed (pip install -e .)"
    return found


def runnable_copy(path: Path, directory: Path, edit: Callable[[str], str] = lambda t: t) -> Path:
    """``path`` in ``directory`` with ExecStart= naming the installed fanout script."""
    text = path.read_text()
    assert SHIPPED_FANOUT in text, f"{path.name} does not run {SHIPPED_FANOUT}"
    copy = directory / path.name
    copy.write_text(edit(text.replace(SHIPPED_FANOUT, fanout_script())))
    return copy


def analyze() -> str:
    return require("systemd-analyze", "systemd", "/usr/bin/systemd-analyze")


def verify(copy: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` as it works without a running systemd: no man pages
    looked up for Documentation=, no errors from the units it pulls in (network-online
    .target, multi-user.target: the host's, not ours)."""
    return subprocess.run(
        [analyze(), "verify", "--man=no", "--recursive-errors=no", str(copy)],
        capture_output=True, text=True, timeout=60, cwd=copy.parent,
        env=clean_env(SYSTEMD_LOG_LEVEL="notice", SYSTEMD_LOG_COLOR="0"))


UNITS = [UNIT, SERVE_UNIT]


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(path: Path, tmp_path: Path) -> None:
    proc = verify(runnable_copy(path, tmp_path))
    # systemd 252 exits 1 on an unknown key or a bad value; older ones only warn on
    # stderr, so any line at all fails the test
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), (
        f"systemd-analyze verify {path.name}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")


@pytest.mark.parametrize("typo", [
    ("ProtectSystem=strict", "ProtectSytem=strict"),          # an unknown key
    ("MemoryDenyWriteExecute=yes", "MemoryDenyWriteExecute=ja"),  # a bad boolean
    ("RestartPreventExitStatus=2 3", "RestartPreventExitStatus=2 three"),
    ("[Service]", "[Servce]"),                                # a misspelt section
], ids=["key", "boolean", "status", "section"])
def test_verify_fails_on_a_typo_in_the_unit(typo: tuple[str, str], tmp_path: Path) -> None:
    """The verify test above can fail: the same check on a copy with one typo does."""
    old, new = typo
    assert old in UNIT.read_text()
    proc = verify(runnable_copy(UNIT, tmp_path, lambda t: t.replace(old, new, 1)))
    assert proc.returncode != 0 or proc.stderr.strip(), f"a typo passed verify: {new}"


SECURITY_THRESHOLD = 2.0  # systemd-analyze's "OK" band; the units score 1.1


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_exposure_score(path: Path, tmp_path: Path) -> None:
    copy = runnable_copy(path, tmp_path)
    proc = subprocess.run(
        [analyze(), "security", "--offline=yes", f"--threshold={int(SECURITY_THRESHOLD * 10)}",
         "--no-pager", str(copy)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=clean_env(SYSTEMD_LOG_COLOR="0", SYSTEMD_COLORS="0"))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert found, f"no exposure level in:\n{proc.stdout}{proc.stderr}"
    score = float(found.group(1))
    print(f"{path.name}: exposure {score} {found.group(2)}")
    assert proc.returncode == 0 and score <= SECURITY_THRESHOLD, (
        f"{path.name}: exposure {score} > {SECURITY_THRESHOLD} (exit {proc.returncode})\n"
        + "\n".join(line for line in proc.stdout.splitlines() if "✗" in line))


def test_unit_restart_reload_and_stop_policy() -> None:
    """What docs/operations.md promises of the unit, read from the unit."""
    svc = unit(UNIT)["Service"]
    prevented = {int(code) for code in service(UNIT, "RestartPreventExitStatus").split()}
    assert prevented == {EXIT_USAGE, EXIT_CONFIG}
    assert service(UNIT, "Restart") == "on-failure"
    assert service(UNIT, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert service(UNIT, "KillSignal") == "SIGTERM"
    assert service(UNIT, "KillMode") == "mixed"  # --workers: the coordinator stops them
    args = exec_start(UNIT)
    drain = float(args[args.index("--drain-timeout") + 1])
    assert float(service(UNIT, "TimeoutStopSec")) >= drain + 10
    serve_drain = float(tomllib.loads(CONFIG.read_text())["serve"]["drain_timeout"])
    assert float(service(SERVE_UNIT, "TimeoutStopSec")) >= serve_drain + 10
    assert "ExecReload" not in unit(SERVE_UNIT)["Service"]  # SIGHUP would end fanout serve
    for key in ("NoNewPrivileges", "MemoryDenyWriteExecute", "LockPersonality",
                "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert svc[key] == ["yes"], key
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["CapabilityBoundingSet"] == [""]


def test_unit_writes_only_where_it_may() -> None:
    """Under ProtectSystem=strict only the unit's State/Logs directories are writable:
    every file the daemon writes (checkpoint, results, dead tokens) must be in one."""
    svc = unit(UNIT)["Service"]
    writable = [f"/var/lib/{svc['StateDirectory'][0]}", f"/var/log/{svc['LogsDirectory'][0]}"]
    config_dir = f"/etc/{svc['ConfigurationDirectory'][0]}"
    args = exec_start(UNIT)
    assert args[:2] == [SHIPPED_FANOUT, "run"] and "--follow" in args
    for flag in ("--checkpoint", "--results", "--invalid-tokens"):
        path = args[args.index(flag) + 1]
        assert any(path.startswith(d + "/") for d in writable), f"{flag} {path}: read-only"
    assert args[args.index("--config") + 1].startswith(config_dir + "/")
    assert args[args.index("--log-format") + 1] == "json"
    assert service(UNIT, "WorkingDirectory") in writable


# --------------------------------------------------------------------------- the example config


COMMENTED_SETTING = re.compile(r'^# ((?:[a-z_]+|"[^"]+") = \S.*)$')
COMMENTED_TABLE = re.compile(r"^# (\[\[?[a-z_.]+\]\]?)\s*(?:#.*)?$")


def uncommented(text: str) -> str:
    """The example with every commented-out setting and table header switched on."""
    lines = []
    for line in text.splitlines():
        m = COMMENTED_SETTING.match(line) or COMMENTED_TABLE.match(line)
        lines.append(m.group(1) if m else line)
    return "\n".join(lines) + "\n"


def load(path: Path) -> tuple[Settings, argparse.Namespace]:
    """Both loaders, as fanout run/check and fanout serve call them, no environment."""
    args = argparse.Namespace(config=str(path))
    settings = load_settings(args, environ={})
    resolve(args, environ={})
    return settings, args


def test_example_config_loads_and_shows_the_defaults() -> None:
    settings, args = load(CONFIG)
    defaults = Settings()
    changed = {f for f in Settings.__struct_fields__ if getattr(settings, f) != getattr(defaults, f)}
    assert changed == {"key_path", "key_id", "team_id", "topic"}, changed
    assert settings.key_path == str(DEPLOY / f"AuthKey_{KEY_ID}.p8")
    assert (settings.key_id, settings.team_id, settings.topic) == (KEY_ID, TEAM_ID, TOPIC)
    serve_changed = {o.name for o in OPTIONS if getattr(args, o.name) != o.default}
    assert serve_changed == {"api_keys"}, serve_changed


def test_example_config_names_every_setting() -> None:
    """Every setting of fanout.config and every [serve] option is in the file, set to its
    default or commented out with an example; the [[team]] example names real keys."""
    text = uncommented(CONFIG.read_text())
    data = tomllib.loads(text)
    top = set(Settings.__struct_fields__) - {"team"}
    assert top <= set(data), f"missing from deploy/fanout.toml: {sorted(top - set(data))}"
    assert set(BY_NAME) == set(data["serve"]), \
        f"[serve] differs from fanout serve's options: {set(BY_NAME) ^ set(data['serve'])}"
    assert data["team"] and set(data["team"][0]) <= set(TeamSpec.__struct_fields__)


def test_every_commented_setting_is_accepted(tmp_path: Path) -> None:
    """Switching on every commented-out line still loads: a typo in a commented example is
    caught too (tomllib would refuse a key given twice)."""
    copy = tmp_path / "fanout.toml"
    copy.write_text(uncommented(CONFIG.read_text()))
    settings, args = load(copy)
    # the switch really switched: the optional settings now have their example values
    assert settings.cert and settings.rate and settings.proxy and settings.host
    assert settings.topic_rates == {TOPIC: 1000.0}
    assert [t.name for t in settings.team] == ["acme"]
    assert args.tls_cert and args.to


@pytest.mark.parametrize("typo", [("connections = 2", "conections = 2"),
                                  ("max_tokens = 100000", "max_token = 100000")],
                         ids=["apns", "serve"])
def test_a_typo_in_the_example_is_refused(typo: tuple[str, str], tmp_path: Path) -> None:
    old, new = typo
    copy = tmp_path / "fanout.toml"
    copy.write_text(CONFIG.read_text().replace(old, new, 1))
    with pytest.raises(ConfigError, match=new.split()[0]):
        load(copy)


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """/etc/fanout as the docs install it: the example config, a throwaway key at the
    path it names, an API keys file where [serve] looks for it."""
    directory = tmp_path / "etc"
    directory.mkdir()
    shutil.copy(CONFIG, directory / "fanout.toml")
    key = make_signing_key(directory, key_id=KEY_ID, team_id=TEAM_ID)
    assert key.path == directory / tomllib.loads(CONFIG.read_text())["key_path"]
    (directory / "api-keys").write_text(hash_key(API_KEY) + " name=deploy-test\n")
    return directory


API_KEY = "deploy-test-key-0123456789"


class Mock:
    """``fanout mock`` as a process, trusting the example's key id and team."""

    def __init__(self, directory: Path, key_path: Path, dead: list[str]) -> None:
        directory.mkdir()
        port_file, self.log = directory / "port", directory / "mock.log"
        self.ca = directory / "pki" / "ca.pem"
        (directory / "dead.txt").write_text("".join(t + "\n" for t in dead))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fanout", "mock", "--port", "0",
                 "--port-file", str(port_file), "--pki-dir", str(directory / "pki"),
                 "--topics", TOPIC, "--key-path", str(key_path), "--key-id", KEY_ID,
                 "--team-id", TEAM_ID, "--unregistered-tokens", str(directory / "dead.txt")],
                stdout=log, stderr=subprocess.STDOUT, env=clean_env())
        self.port = int(wait_for(lambda: port_file.exists() and port_file.read_text().strip(),
                                 "the mock's port file", self.proc, logs=(self.log,),
                                 timeout=START_TIMEOUT))

    def env(self) -> dict[str, str]:
        """Point the example config at this mock (APNS_* beat the file)."""
        return clean_env(APNS_HOST="localhost", APNS_PORT=str(self.port),
                         APNS_CA_FILE=str(self.ca))


@pytest.fixture
def start_mock(tmp_path: Path) -> Iterator[Callable[..., Mock]]:
    started: list[Mock] = []

    def start(key_path: Path, dead: list[str] | None = None) -> Mock:
        mock = Mock(tmp_path / f"mock{len(started)}", key_path, dead or [])
        started.append(mock)
        return mock

    yield start
    for mock in started:
        if mock.proc.poll() is None:
            mock.proc.kill()
            mock.proc.wait(10)


def test_fanout_check_with_the_example_config_against_the_mock(
        etc: Path, start_mock: Callable[..., Mock]) -> None:
    mock = start_mock(etc / f"AuthKey_{KEY_ID}.p8")
    proc = subprocess.run([sys.executable, "-m", "fanout", "check", "--config",
                           str(etc / "fanout.toml")],
                          capture_output=True, text=True, timeout=60, env=mock.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert (report["environment"], report["auth"], report["key_id"], report["team_id"],
            report["topic"]) == ("production", "token", KEY_ID, TEAM_ID, TOPIC)
    assert report["answer"]["status"] == 200


# --------------------------------------------------------------------------- MDWE


# What systemd 252 installs for MemoryDenyWriteExecute=yes (src/shared/seccomp-util.c,
# seccomp_memory_deny_write_execute), as a classic BPF seccomp filter for x86_64: mmap()
# asking for PROT_WRITE|PROT_EXEC, mprotect()/pkey_mprotect() adding PROT_EXEC, shmat()
# with SHM_EXEC fail with EPERM. Set with no_new_privs (NoNewPrivileges=yes), then exec.
MDWE = r"""
import ctypes, os, struct, sys
LD, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
prog = [  # (label, code, jump if true, jump if false, k)
    (None, LD, None, None, 4),                         # seccomp_data.arch
    (None, JEQ, None, "allow", 0xC000003E),            # AUDIT_ARCH_X86_64
    (None, LD, None, None, 0),                         # seccomp_data.nr
    (None, JEQ, "mmap", None, 9),
    (None, JEQ, "mprotect", None, 10),
    (None, JEQ, "mprotect", None, 329),                # pkey_mprotect
    (None, JEQ, "shmat", None, 30),
    (None, RET, None, None, ALLOW),
    ("mmap", LD, None, None, 32),                      # args[2] (prot), low half
    (None, AND, None, None, 6),                        # PROT_WRITE | PROT_EXEC
    (None, JEQ, "deny", "allow", 6),
    ("mprotect", LD, None, None, 32),
    (None, JSET, "deny", "allow", 4),                  # PROT_EXEC
    ("shmat", LD, None, None, 32),
    (None, JSET, "deny", "allow", 0o100000),           # SHM_EXEC
    ("deny", RET, None, None, EPERM),
    ("allow", RET, None, None, ALLOW),
]
at = {p[0]: i for i, p in enumerate(prog) if p[0]}
raw = b"".join(struct.pack("=HBBI", code, at[t] - i - 1 if t else 0, at[f] - i - 1 if f else 0, k)
               for i, (_, code, t, f, k) in enumerate(prog))
buf = ctypes.create_string_buffer(raw, len(raw))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(Prog(len(prog), ctypes.addressof(buf))), 0, 0):
    raise OSError(ctypes.get_errno(), "seccomp")
os.execv(sys.argv[1], sys.argv[1:])
"""


@functools.cache
def mdwe_available() -> bool:
    """Whether the filter can be installed here: x86_64 Linux, seccomp allowed (a
    container's own seccomp profile may refuse it)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    probe = subprocess.run([sys.executable, "-c", MDWE, "/bin/true"], capture_output=True,
                           timeout=30)
    return probe.returncode == 0


def under_mdwe(cmd: list[str]) -> list[str]:
    """``cmd`` under the MemoryDenyWriteExecute filter where it can be installed, else
    ``cmd`` as it is."""
    return [sys.executable, "-c", MDWE, *cmd] if mdwe_available() else cmd


def test_the_mdwe_filter_bites() -> None:
    """The filter the daemon runs under below is on: a W+X mapping is refused in it, and
    allowed without it."""
    if not mdwe_available():
        pytest.skip("the MemoryDenyWriteExecute filter needs x86_64 Linux and seccomp")
    probe = ("import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
             "    print('allowed')\nexcept PermissionError:\n    print('refused')\n")
    inside = subprocess.run(under_mdwe([sys.executable, "-c", probe]), capture_output=True,
                            text=True, timeout=30)
    outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=30)
    assert (inside.stdout.strip(), outside.stdout.strip()) == ("refused", "allowed"), \
        inside.stderr + outside.stderr


# --------------------------------------------------------------------------- the service


class Layout:
    """The unit's directories in a temporary root; its ExecStart= with its paths mapped."""

    def __init__(self, root: Path, etc: Path) -> None:
        self.spool, self.state, self.logs = root / "spool", root / "state", root / "logs"
        for d in (self.spool, self.state, self.logs):
            d.mkdir(parents=True)
        self.metrics_port = free_port()
        self.map = {"/etc/fanout/": f"{etc}/", "/var/spool/fanout/": f"{self.spool}/",
                    "/var/lib/fanout/": f"{self.state}/", "/var/log/fanout/": f"{self.logs}/",
                    "127.0.0.1:9464": f"127.0.0.1:{self.metrics_port}"}

    def path(self, text: str) -> str:
        for old, new in self.map.items():
            text = text.replace(old, new)
        return text

    def command(self, unit_file: Path) -> list[str]:
        args = exec_start(unit_file)
        assert args[0] == SHIPPED_FANOUT
        mapped = [self.path(a) for a in args[1:]]
        for a in args[1:]:  # every path the unit names is one the test maps
            assert not a.startswith(("/etc", "/var", "/opt")) or self.path(a) != a, a
        return [sys.executable, "-m", "fanout", *mapped]

    def arg(self, flag: str) -> Path:
        args = exec_start(UNIT)
        return Path(self.path(args[args.index(flag) + 1]))


def result_ids(path: Path) -> list[str]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line)["id"] for line in data.decode().splitlines()]


def dead_tokens(path: Path) -> list[str]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line)["token"] for line in data.decode().splitlines()]


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_unit_exit_codes_are_the_ones_it_does_not_restart(etc: Path, tmp_path: Path) -> None:
    """fanout run, as the unit starts it, exits 3 on a typo in the config file and 2 on a
    bad flag: both are in RestartPreventExitStatus=."""
    layout = Layout(tmp_path / "root", etc)
    prevented = {int(c) for c in service(UNIT, "RestartPreventExitStatus").split()}
    config = etc / "fanout.toml"
    config.write_text(config.read_text().replace("connections = 2", "conections = 2", 1))
    typo = subprocess.run(layout.command(UNIT), capture_output=True, text=True, timeout=60,
                          env=clean_env(), stdin=subprocess.DEVNULL)
    assert typo.returncode == EXIT_CONFIG and "conections" in typo.stderr, typo.stderr
    flag = subprocess.run([*layout.command(UNIT), "--no-such-flag"], capture_output=True,
                          text=True, timeout=60, env=clean_env(), stdin=subprocess.DEVNULL)
    assert flag.returncode == EXIT_USAGE, flag.stderr
    assert {typo.returncode, flag.returncode} <= prevented


def start_daemon(layout: Layout, mock: Mock, log: Path) -> subprocess.Popen[bytes]:
    """The unit's ExecStart= (paths mapped), pointed at ``mock``, under the MDWE filter."""
    with log.open("wb") as err:
        return subprocess.Popen(under_mdwe(layout.command(UNIT)), env=mock.env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, cwd=layout.state)


def test_a_drained_stop_after_failed_pushes_is_a_success_for_systemd(
        etc: Path, tmp_path: Path, start_mock: Callable[..., Mock]) -> None:
    """At SIGTERM fanout run exits 1 when a push of its lifetime failed (here a token that
    is not hex: rejected). The unit counts 1 as a success (SuccessExitStatus=1): the results
    name the push, and a stop after one bad push must not leave the unit failed."""
    mock = start_mock(etc / f"AuthKey_{KEY_ID}.p8")
    layout = Layout(tmp_path / "root", etc)
    spool, results = Path(layout.path(exec_start(UNIT)[2])), layout.arg("--results")
    spool.write_text(json.dumps({"id": "x", "tokens": [tokens(1, "ab")[0], "zz"],
                                 "payload": {"aps": {"alert": "hi"}}}) + "\n")
    log = tmp_path / "daemon.log"
    daemon = start_daemon(layout, mock, log)
    try:
        wait_for(lambda: lines_in(results) == 2, "both results", daemon, logs=(log, mock.log),
                 timeout=START_TIMEOUT)
        code = stop(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    outcomes = sorted(json.loads(line)["outcome"] for line in results.read_text().splitlines())
    assert outcomes == ["delivered", "rejected"]
    assert code == EXIT_FAILED, log.read_text()
    assert code in {int(c) for c in service(UNIT, "SuccessExitStatus").split()}
    assert code not in {int(c) for c in service(UNIT, "RestartPreventExitStatus").split()}


def rotate_config(layout: Layout, directory: Path, pid: int) -> Path:
    """deploy/logrotate.conf with the unit's log directory mapped and its postrotate
    replaced by what `systemctl reload fanout.service` does: ExecReload=, kill -HUP."""
    text = LOGROTATE.read_text()
    reload = service(UNIT, "ExecReload").replace("$MAINPID", str(pid))
    script = re.compile(r"(postrotate\n)(.*?)(\n\s*endscript)", re.S)
    body = script.search(text)
    assert body and "systemctl reload fanout.service" in body.group(2)
    text = script.sub(lambda m: f"{m.group(1)}        {reload}{m.group(3)}", text)
    copy = directory / "logrotate.conf"
    copy.write_text(layout.path(text))
    copy.chmod(0o644)
    return copy


def test_logrotate_file_parses_and_names_the_units_paths(tmp_path: Path) -> None:
    logrotate = require("logrotate", "logrotate", "/usr/sbin/logrotate")
    dry = subprocess.run([logrotate, "-d", "-s", str(tmp_path / "state"), str(LOGROTATE)],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "error" not in dry.stdout + dry.stderr, dry.stderr
    text = LOGROTATE.read_text()
    postrotate = re.search(r"postrotate\n(.*?)\n\s*endscript", text, re.S)
    assert postrotate, "no postrotate script"
    syntax = subprocess.run(["sh", "-n", "-c", postrotate.group(1)], capture_output=True,
                            text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    args = exec_start(UNIT)
    header = re.search(r"^(/\S+(?: /\S+)*) \{$", text, re.M)
    assert header, "no log file list in deploy/logrotate.conf"
    assert header.group(1).split() == [args[args.index("--results") + 1],
                                       args[args.index("--invalid-tokens") + 1]]
    for directive in ("compress", "delaycompress", "missingok", "notifempty", "sharedscripts",
                      "nocreate"):
        assert re.search(rf"^\s+{directive}$", text, re.M), directive
    assert "copytruncate" not in re.sub(r"#.*", "", text)


def test_service_rotates_its_results_without_losing_or_doubling_one(
        etc: Path, tmp_path: Path, start_mock: Callable[..., Mock]) -> None:
    logrotate = require("logrotate", "logrotate", "/usr/sbin/logrotate")
    batches = [tokens(12, f"b{n}") for n in range(3)]
    dead = [batch[i] for batch in batches for i in (2, 7)]  # two dead tokens per batch
    mock = start_mock(etc / f"AuthKey_{KEY_ID}.p8", dead)
    layout = Layout(tmp_path / "root", etc)
    spool = Path(layout.path(exec_start(UNIT)[2]))  # the input: fanout run INPUT --follow
    results, invalid = layout.arg("--results"), layout.arg("--invalid-tokens")
    checkpoint = layout.arg("--checkpoint")
    log = tmp_path / "daemon.log"
    daemon = start_daemon(layout, mock, log)
    logs = (log, mock.log)
    try:
        health = f"http://127.0.0.1:{layout.metrics_port}"
        wait_for(lambda: http_get(f"{health}/healthz")[0] == 200, "/healthz 200", daemon,
                 logs=logs, timeout=START_TIMEOUT)
        state = tmp_path / "logrotate.state"
        config = rotate_config(layout, tmp_path, daemon.pid)

        def feed(batch: int) -> None:
            with spool.open("a") as f:
                for i, token in enumerate(batches[batch]):
                    f.write(json.dumps({"id": f"b{batch}-{i}", "token": token,
                                        "payload": {"aps": {"alert": "hi"}}}) + "\n")
            # every result written, and the checkpoint past it: nothing more is written
            # (or fsynced) until the next batch, so the rotation meets a quiet daemon
            wait_for(lambda: lines_in(results) == len(batches[batch]),
                     f"the results of batch {batch}", daemon, logs=logs)
            wait_for(lambda: checkpoint.exists() and
                     json.loads(checkpoint.read_text())["offset"] == spool.stat().st_size,
                     f"the checkpoint past batch {batch}", daemon, logs=logs)

        def rotate() -> None:
            before = results.stat().st_ino, invalid.stat().st_ino
            proc = subprocess.run([logrotate, "-f", "-s", str(state), str(config)],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            # the SIGHUP reopened both paths: new files, not the rotated ones
            wait_for(lambda: results.exists() and invalid.exists()
                     and results.stat().st_ino != before[0]
                     and invalid.stat().st_ino != before[1],
                     "the daemon reopening its outputs", daemon, logs=logs)

        feed(0)
        assert wait_for(lambda: http_get(f"{health}/readyz")[0] == 200, "/readyz 200", daemon,
                        logs=logs)
        rotate()
        feed(1)
        rotate()
        feed(2)
        assert stop(daemon) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)

    ids = [[f"b{n}-{i}" for i in range(len(batch))] for n, batch in enumerate(batches)]
    rotated = (results.with_name(results.name + ".2.gz"), results.with_name(results.name + ".1"))
    # each exactly once (sorted: results are written in the order APNs answered)
    assert sorted(result_ids(rotated[0])) == sorted(ids[0])  # compressed at the 2nd rotation
    assert sorted(result_ids(rotated[1])) == sorted(ids[1])  # delaycompress: newest stays plain
    assert sorted(result_ids(results)) == sorted(ids[2])
    assert sorted(p.name for p in results.parent.iterdir()) == sorted(
        [results.name, rotated[0].name, rotated[1].name,
         invalid.name, invalid.name + ".1", invalid.name + ".2.gz"])
    assert sorted(dead_tokens(invalid.with_name(invalid.name + ".2.gz"))) == sorted(dead[0:2])
    assert sorted(dead_tokens(invalid.with_name(invalid.name + ".1"))) == sorted(dead[2:4])
    assert sorted(dead_tokens(invalid)) == sorted(dead[4:6])
    text = log.read_text()
    assert text.count("reopening output files") == 2, text
    # the SIGHUP did the reopening, not the daemon's fallback for a rotation without one
    assert "moved away" not in text
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert events and all({"event", "ts", "level"} <= set(e) for e in events), text[:2000]


def test_serve_unit_with_the_example_config(
        etc: Path, tmp_path: Path, start_mock: Callable[..., Mock]) -> None:
    """fanout serve as fanout-serve.service starts it, [serve] from the example (listen
    moved to a free port by its FANOUT_LISTEN variable), under the MDWE filter."""
    mock = start_mock(etc / f"AuthKey_{KEY_ID}.p8")
    layout = Layout(tmp_path / "root", etc)
    port_file, log = tmp_path / "serve.port", tmp_path / "serve.log"
    env = {**mock.env(), "FANOUT_LISTEN": "127.0.0.1:0"}
    with log.open("wb") as err:
        proc = subprocess.Popen(
            under_mdwe([*layout.command(SERVE_UNIT), "--port-file", str(port_file)]),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        port = int(wait_for(lambda: port_file.exists() and port_file.read_text().strip(),
                            "serve's port file", proc, logs=(log, mock.log),
                            timeout=START_TIMEOUT))
        base = f"http://127.0.0.1:{port}"
        assert http_get(f"{base}/healthz")[0] == 200  # no key needed
        assert http_get(f"{base}/readyz")[0] == 401  # serve's /readyz needs one
        wait_for(lambda: http_get(f"{base}/readyz", API_KEY)[0] == 200, "serve /readyz 200",
                 proc, logs=(log, mock.log))
        with httpx.Client(base_url=base, timeout=20, trust_env=False) as http:
            r = http.post("/v1/push", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"token": tokens(1, "5e")[0],
                                "payload": {"aps": {"alert": "hi"}}})
            assert r.status_code == 200, r.text
            assert r.json()["outcome"] == "delivered"
            assert http.post("/v1/push", json={"token": tokens(1, "5e")[0]}).status_code == 401
        assert stop(proc) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_config_checks_and_scrapes_the_units_port() -> None:
    import yaml

    promtool = require_binary("promtool")
    proc = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True,
                          text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 rule files found" in out and "rules found" in out, out
    config = yaml.safe_load(PROMETHEUS.read_text())
    [rules] = config["rule_files"]
    assert (PROMETHEUS.parent / rules).resolve() == ALERTS.resolve()
    [job] = config["scrape_configs"]
    assert job["job_name"] == "fanout"
    assert 'job="fanout"' in ALERTS.read_text()  # what FanoutMetricsDown selects
    args = exec_start(UNIT)
    assert job["static_configs"][0]["targets"] == [args[args.index("--metrics") + 1]]
