"""The examples (examples/) as real processes against ``fanout mock`` as a process (issue 16):
the FastAPI app under uvicorn and the Flask app under ``flask run``, both driven by real HTTP
requests, and the prefork worker. What they did is judged from the mock's own count
(``--stats-file``), written when it gets SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from fanout.testing.devcerts import TestSigningKey

from .helpers import tokens

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "com.example.app"
CONNECTIONS = 2
START_TIMEOUT = 30.0  # a process to come up on 2 busy cores
HTTP_TIMEOUT = 20.0


def _wait_for(fact: Callable[[], Any], what: str, proc: subprocess.Popen[bytes],
              log: Path | None = None, timeout: float = START_TIMEOUT) -> Any:
    """Poll ``fact()`` until it is truthy; fail if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = fact()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            output = log.read_text(errors="replace") if log is not None and log.exists() else ""
            pytest.fail(f"{what}: not within {timeout:.0f} s (exit code {proc.poll()})\n{output}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM ``proc`` and wait for it (SIGKILL if it will not go)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"{proc.args!r} did not exit within {timeout:.0f} s of SIGTERM")


class Mock:
    """``fanout mock`` as a process; :meth:`stop` ends it and returns its stats."""

    def __init__(self, tmp_path: Path, key: TestSigningKey, *extra: str) -> None:
        self.stats_file = tmp_path / "mock-stats.json"
        self.log = tmp_path / "mock.log"
        port_file = tmp_path / "mock-port"
        pki_dir = tmp_path / "mock-pki"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fanout", "mock", "--port", "0",
                 "--port-file", str(port_file), "--pki-dir", str(pki_dir),
                 "--key-path", str(key.path), "--key-id", key.key_id,
                 "--team-id", key.team_id, "--stats-file", str(self.stats_file), *extra],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            self.port = int(_wait_for(lambda: port_file.exists() and port_file.read_text().strip(),
                                      "the mock's port file", self.proc, self.log))
        except BaseException:
            self.proc.kill()
            self.proc.wait(10)
            raise
        self.env = {**os.environ,
                    "FANOUT_HOST": "127.0.0.1", "FANOUT_PORT": str(self.port),
                    "FANOUT_CA_FILE": str(pki_dir / "ca.pem"), "FANOUT_KEY_PATH": str(key.path),
                    "FANOUT_KEY_ID": key.key_id, "FANOUT_TEAM_ID": key.team_id,
                    "FANOUT_TOPIC": TOPIC, "FANOUT_CONNECTIONS": str(CONNECTIONS)}

    def stop(self) -> dict[str, Any]:
        """End the mock (SIGTERM: it writes its stats file) and read what it saw."""
        code = _stop(self.proc)
        assert code == 0, self.log.read_text(errors="replace")
        stats: dict[str, Any] = json.loads(self.stats_file.read_text())
        return stats

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def mock_factory(tmp_path: Path, signing_key: TestSigningKey) -> Iterator[Callable[..., Mock]]:
    """Start the mock (extra CLI arguments given); killed at the end whatever happened."""
    started: list[Mock] = []

    def start(*extra: str) -> Mock:
        mock = Mock(tmp_path, signing_key, *extra)
        started.append(mock)
        return mock

    yield start
    for mock in started:
        mock.kill()


@contextlib.contextmanager
def http_server(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run a web server ``cmd`` (asked for port 0) from the repository root; yield its base
    URL, read from the "running on http://127.0.0.1:PORT" line it logs once it listens."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = re.compile(rb"[Rr]unning on (http://127\.0\.0\.1:\d+)")
        found = _wait_for(lambda: url.search(log.read_bytes()), f"{cmd[2]} listening", proc, log)
        yield found.group(1).decode(), proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def _push(token: str) -> dict[str, str]:
    return {"token": token, "title": "Hi", "body": "there"}


def test_fastapi_app_under_uvicorn_one_client_one_jwt(mock_factory, tmp_path):
    mock = mock_factory()
    log = tmp_path / "uvicorn.log"
    cmd = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1",
           "--port", "0", "--loop", "uvloop"]
    singles, fan, parallel = tokens(1, "a1"), tokens(30, "b2"), tokens(8, "c3")
    with http_server(cmd, mock.env, log) as (url, proc):
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as http:
            first = _post(http, "/push", _push(singles[0]))
            assert first["outcome"] == "delivered" and first["status"] == 200
            assert first["apns_id"] and first["reason"] is None

            # a push fanout refuses before any I/O comes back as the app's 422
            bad = http.post("/push", json=_push("not-a-token"))
            assert bad.status_code == 422 and "token" in bad.text

            counts = _post(http, "/fanout", {"tokens": fan, "title": "All", "body": "of you"})
            assert counts == {"sent": len(fan), "by_outcome": {"delivered": len(fan)}}

            with ThreadPoolExecutor(4) as pool:  # requests in flight together on one client
                results = list(pool.map(lambda t: _post(http, "/push", _push(t)), parallel))
            assert [r["outcome"] for r in results] == ["delivered"] * len(parallel)

            update = _post(http, "/live-activity/update",
                           {"token": tokens(1, "d4")[0], "activity_id": "match-1",
                            "content_state": {"home": 1, "away": 0}})
            assert update["outcome"] == "delivered", update
        # SIGTERM: uvicorn shuts down cleanly (the lifespan closes the client), then
        # ends itself by the signal it got (uvicorn >= 0.29 re-raises it)
        assert _stop(proc) in (0, -signal.SIGTERM), log.read_text(errors="replace")
    assert b"Application shutdown complete" in log.read_bytes(), log.read_text(errors="replace")
    stats = mock.stop()
    pushes = len(singles) + len(fan) + len(parallel) + 1
    assert stats["delivered"] == stats["requests"] == pushes, stats
    assert stats["jwts"] == 1, stats
    assert 1 <= stats["connections"] <= CONNECTIONS, stats


def test_flask_app_per_request_clients_share_connections_and_jwt(mock_factory, tmp_path):
    mock = mock_factory()
    log = tmp_path / "flask.log"
    cmd = [sys.executable, "-m", "flask", "--app", "examples.flask_app", "run",
           "--host", "127.0.0.1", "--port", "0"]
    module_level, per_request = tokens(5, "e5"), tokens(20, "f6")
    with http_server(cmd, mock.env, log) as (url, proc):
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as http:
            first = _post(http, "/push", _push(module_level[0]))
            assert first["outcome"] == "delivered" and first["status"] == 200

            bad = http.post("/push", json=_push("not-a-token"))
            assert bad.status_code == 422 and "token" in bad.text
            assert http.post("/push", json={"token": 5}).status_code == 400

            # flask run serves each request in a thread: 20 clients built and closed in
            # views, some at once, beside requests on the module-level client
            jobs = [("/push-per-request", t) for t in per_request]
            jobs += [("/push", t) for t in module_level[1:]]
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda job: _post(http, job[0], _push(job[1])), jobs))
            assert [r["outcome"] for r in results] == ["delivered"] * len(jobs)
        _stop(proc)
    stats = mock.stop()
    pushes = len(module_level) + len(per_request)
    assert stats["delivered"] == stats["requests"] == pushes, stats
    assert stats["jwts"] == 1, stats
    assert 1 <= stats["connections"] <= CONNECTIONS, stats


def test_prefork_worker_children_send_and_drain_at_exit(mock_factory, tmp_path):
    """Every pool process runs one task and exits right after it: the pushes it fired
    without waiting are still out then (the mock answers after 0.5 s), and delivered."""
    mock = mock_factory("--latency", "0.5")
    workers, tasks, per_task, fire = 2, 4, 5, 2
    proc = subprocess.run(
        [sys.executable, "-m", "examples.prefork_worker", "--workers", str(workers),
         "--tasks", str(tasks), "--per-task", str(per_task), "--fire", str(fire),
         "--max-tasks-per-child", "1"],
        cwd=ROOT, env=mock.env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    summary = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    stats = mock.stop()
    pushes = tasks * per_task
    assert summary["tasks"] == tasks and summary["children"] == tasks, summary
    assert summary["waited"] == {"delivered": tasks * (per_task - fire)}, summary
    assert summary["fired"] == tasks * fire and summary["still_out_at_return"] > 0, summary
    # every push, the fired ones too, answered 200 before its process ended
    assert stats["delivered"] == stats["requests"] == pushes, stats
    # each child its own connections (the parent opened none) ...
    assert summary["children"] <= stats["connections"] <= summary["children"] * CONNECTIONS, stats
    # ... and the one JWT the parent minted when it loaded the key, inherited by all
    assert stats["jwts"] == 1, stats
