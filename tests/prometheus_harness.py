"""A throwaway Prometheus (Debian's ``prometheus`` package) for tests.

``start_prometheus`` writes a prometheus.yml that scrapes one target every second and loads
the given rule files, runs ``prometheus`` on 127.0.0.1 with a free port and a temporary
TSDB, waits for ``/-/ready`` and yields a :class:`Prometheus` whose ``query`` goes through
the HTTP API. Missing binaries: ``pytest.skip`` locally, ``pytest.fail`` when ``CI`` is set
(.ci/run installs the package), as tests/test_nginx.py does for nginx.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

DEBIAN_PATHS = {"prometheus": "/usr/bin/prometheus", "promtool": "/usr/bin/promtool"}

# no proxy, whatever the environment says: everything here is on 127.0.0.1
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_binary(name: str) -> str | None:
    """``prometheus`` or ``promtool`` on PATH, else at its Debian path, else None."""
    found = shutil.which(name)
    if found:
        return found
    path = DEBIAN_PATHS.get(name)
    if path and os.access(path, os.X_OK):
        return path
    return None


def require_binary(name: str) -> str:
    """The binary's path; skips the test (fails it under CI) when it is not installed."""
    path = find_binary(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs the Debian prometheus package")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body); HTTP errors are returned, not raised (the API explains them in JSON)."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def write_config(directory: Path, target: str, *, job: str = "fanout",
                 rule_files: Sequence[Path] = (), interval: str = "1s") -> Path:
    """prometheus.yml scraping ``target`` (host:port, /metrics) every ``interval``."""
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}",
             f"  scrape_timeout: {interval}"]
    if rule_files:
        lines.append("rule_files:")
        lines += [f"  - {json.dumps(str(Path(p).resolve()))}" for p in rule_files]
    lines += ["scrape_configs:", f"  - job_name: {json.dumps(job)}", "    static_configs:",
              f"      - targets: [{json.dumps(target)}]", ""]
    path = directory / "prometheus.yml"
    path.write_text("\n".join(lines))
    return path


class Prometheus:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/<path>; the decoded JSON answer, ``status`` "success" or "error"."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{query}")
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {status}: {body[:200]!r}"}

    def query(self, expr: str) -> dict:
        """Instant query at now: ``{"status": ..., "data": {"resultType", "result"}}`` or
        ``{"status": "error", "errorType", "error"}`` (a parse error, for one)."""
        return self.api("query", query=expr)

    def result(self, expr: str) -> list:
        """The result vector of ``expr``; raises AssertionError if the query failed."""
        answer = self.query(expr)
        assert answer.get("status") == "success", f"{expr}: {answer.get('error')}"
        return answer["data"]["result"]

    def rules(self) -> list[dict]:
        return [r for g in self.api("rules")["data"]["groups"] for r in g["rules"]]

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if http_get(f"{self.url}/-/ready", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def start_prometheus(directory: Path, target: str, *, job: str = "fanout",
                     rule_files: Sequence[Path] = (), interval: str = "1s",
                     timeout: float = 20.0) -> Iterator[Prometheus]:
    """Prometheus scraping ``target`` on 127.0.0.1:<free port>; storage under ``directory``."""
    binary = require_binary("prometheus")
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, target, job=job, rule_files=rule_files, interval=interval)
    storage = directory / "data"
    log = directory / "prometheus.log"
    port = free_port()
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
            cwd=directory)
    prom = Prometheus(proc, port, log)
    try:
        prom.wait_ready(timeout)
        yield prom
    finally:
        prom.close()
        shutil.rmtree(storage, ignore_errors=True)
