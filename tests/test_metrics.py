"""Prometheus metrics (docs/metrics-contract.md): the engine's counters against the mock's
ground truth, and the daemon's endpoint, single process and ``--workers 2``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fanout import Backoff
from fanout.auth import TokenAuth
from fanout.metrics import Metrics, parse_listen, reason_label
from fanout.testing.devcerts import make_signing_key

from .conftest import ROOT
from .helpers import PAYLOAD, collect, daemon_cmd, mock_server, running, tokens

FAST = Backoff(base=0.01, cap=0.05)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """One sample's value; ``team`` defaults to "" (a single client's metrics)."""
    v = registry.get_sample_value(name, {"team": "", **labels})
    return 0.0 if v is None else v


def contract_names() -> list[tuple[str, str]]:
    """(name, type) of every metric in the contract's table."""
    text = (ROOT / "docs" / "metrics-contract.md").read_text()
    return re.findall(r"^\| (fanout_\w+) \| (counter|gauge|histogram) \|", text, re.M)


# --------------------------------------------------------------------------- in process

async def test_counters_match_results_with_410_429_and_goaway(pki, signing_key):
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    toks = tokens(3000)
    dead = set(toks[::25])
    async with running(pki, signing_key, unregistered=dead, p429=0.03, retry_after=0,
                       goaway_after=700, goaway_last_stream_low=True, latency=0.002,
                       client_kw={"events": metrics, "backoff": FAST,
                                  "max_attempts": 20}) as (mock, client):
        metrics.attach(client, interval=0.05)
        results = await collect(client.fan_out(PAYLOAD, toks))
        metrics.sample(client)
        in_flight = value(registry, "fanout_in_flight")
        queued = value(registry, "fanout_queue_depth")
    counts = Counter(str(r.outcome) for r in results)
    assert counts == {"delivered": 3000 - len(dead), "invalid_token": len(dead)}
    assert value(registry, "fanout_pushes_total", push_type="alert", outcome="delivered",
                 reason="none") == counts["delivered"]
    assert value(registry, "fanout_pushes_total", push_type="alert", outcome="invalid_token",
                 reason="Unregistered") == len(dead)
    assert value(registry, "fanout_invalid_tokens_total") == len(dead)
    # every 429 answer was resent once (nothing exhausted its attempts)
    assert mock.stats.by_reason["TooManyRequests"] > 0
    assert value(registry, "fanout_retries_total", cause="429") \
        == mock.stats.by_reason["TooManyRequests"]
    assert value(registry, "fanout_retries_total", cause="unprocessed") >= 1
    assert sum(r.attempts - 1 for r in results) == value(registry, "fanout_retries_total",
                                                         cause="429")
    assert value(registry, "fanout_goaways_total", reason="Shutdown") >= 1
    assert value(registry, "fanout_goaways_total", reason="Shutdown") == mock.stats.goaways_sent
    assert value(registry, "fanout_connections_closed_total", cause="goaway") >= 1
    assert value(registry, "fanout_connections_opened_total") == mock.stats.connections
    assert value(registry, "fanout_connection_failures_total") == 0
    latency_count = sum(value(registry, "fanout_push_latency_seconds_count", push_type="alert",
                              outcome=o) for o in counts)
    assert latency_count == len(results)
    assert value(registry, "fanout_push_latency_seconds_bucket", push_type="alert",
                 outcome="delivered", le="+Inf") == counts["delivered"]
    assert in_flight == 0 and queued == 0
    assert value(registry, "fanout_jwt_rotations_total") == 1
    assert value(registry, "fanout_auth_failures_total", reason="none") == 0


async def test_gauges_stream_limit_and_series_removed_on_close(pki, signing_key):
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    async with running(pki, signing_key, latency=0.01,
                       client_kw={"events": metrics}) as (mock, client):
        metrics.attach(client, interval=0.05)
        results = await collect(client.fan_out(PAYLOAD, tokens(500)))
        assert len(results) == 500
        metrics.sample(client)
        limits = [registry.get_sample_value("fanout_connection_stream_limit",
                                            {"team": "", "connection": str(i)}) for i in range(2)]
        opened = [registry.get_sample_value("fanout_connection_streams_open",
                                            {"team": "", "connection": str(i)}) for i in range(2)]
        age = value(registry, "fanout_jwt_age_seconds")
    assert limits == [1000, 1000]  # raised by the mock after the first authenticated push
    assert opened == [0, 0]
    assert 0 <= age < 60
    assert value(registry, "fanout_in_flight") == 0
    # the connections closed with the client: their series are gone
    for i in range(2):
        assert registry.get_sample_value("fanout_connection_stream_limit",
                                         {"team": "", "connection": str(i)}) is None
    assert value(registry, "fanout_connections_closed_total", cause="closed") == 2


async def test_resets_limiter_wait_and_auth_failures(pki, signing_key, tmp_path):
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    async with running(pki, signing_key, never_answer=0.1, seed=3,
                       client_kw={"events": metrics, "timeout": 0.3, "rate": 100.0,
                                  "max_attempts": 20, "backoff": FAST}) as (mock, client):
        results = await collect(client.fan_out(PAYLOAD, tokens(150)))
    assert Counter(str(r.outcome) for r in results) == {"delivered": 150}
    timeouts = value(registry, "fanout_retries_total", cause="timeout")
    assert timeouts >= 1
    assert value(registry, "fanout_streams_reset_total") >= timeouts
    assert value(registry, "fanout_limiter_wait_seconds_total") > 0

    other = make_signing_key(tmp_path / "other", key_id=signing_key.key_id,
                             team_id=signing_key.team_id)
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    auth = TokenAuth.from_file(other.path, other.key_id, other.team_id)
    async with running(pki, signing_key, auth=auth,
                       client_kw={"events": metrics}) as (mock, client):
        results = await collect(client.fan_out(PAYLOAD, tokens(20)))
    assert {str(r.outcome) for r in results} == {"config_error"}
    assert value(registry, "fanout_auth_failures_total", reason="InvalidProviderToken") >= 1
    assert value(registry, "fanout_pushes_total", push_type="alert", outcome="config_error",
                 reason="InvalidProviderToken") >= 1


def test_bounded_labels_and_listen_parsing():
    assert reason_label(None) == "none"
    assert reason_label("Unregistered") == "Unregistered"
    assert reason_label("x" * 100) == "other"
    assert parse_listen("9464") == ("127.0.0.1", 9464)
    assert parse_listen(":9464") == ("127.0.0.1", 9464)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError):
        parse_listen("host:port")

    class R:
        reason = "SomethingNew"
        outcome = "rejected"
        resent = False

    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    for _ in range(3):
        metrics.push_finished(R(), b"alert", 0.01)
        metrics.retry("mystery")
        metrics.goaway(None, "free-form text from the server")
    assert value(registry, "fanout_pushes_total", push_type="alert", outcome="rejected",
                 reason="other") == 3
    assert value(registry, "fanout_retries_total", cause="other") == 3
    assert value(registry, "fanout_goaways_total", reason="other") == 3


# --------------------------------------------------------------------------- the daemon

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def scrape(port: int) -> dict[str, float]:
    """Sample name{labels} -> value, summed over labels per sample name under ``name``."""
    def get() -> str:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    text = await trio.to_thread.run_sync(get)
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        totals.setdefault(family.name, 0.0)
        for s in family.samples:
            if s.name.endswith("_bucket"):
                totals[s.name] = totals.get(s.name, 0.0)
                continue
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


async def scrape_until(port: int, check, timeout: float = 30) -> dict[str, float]:
    with trio.fail_after(timeout):
        while True:
            try:
                got = await scrape(port)
            except httpx.TransportError:
                got = None
            if got is not None and check(got):
                return got
            await trio.sleep(0.1)


def input_lines(n: int, malformed_every: int = 0) -> bytes:
    out = []
    for i in range(1, n + 1):
        if malformed_every and i % malformed_every == 0:
            out.append(b"not json")
        else:
            out.append(json.dumps({"id": i, "token": f"{i:064x}", "payload": PAYLOAD}).encode())
    return b"\n".join(out) + b"\n"


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def feed_and_scrape(cmd: list[str], data: bytes, port: int, n: int, out: Path,
                          timeout: float = 60):
    """Run the daemon ``cmd`` on stdin (kept open), feed ``data``, wait for ``n`` results
    and for the endpoint on ``port`` to agree, then end stdin; returns (mid-run scrape,
    final scrape, the final /metrics text, returncode)."""
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await proc.stdin.send_all(data)
        early = await scrape_until(port, lambda m: m.get("fanout_in_flight", 0) > 0
                                   or m.get("fanout_pushes_total", 0) > 0, timeout)
        with trio.fail_after(timeout):
            while count_lines(out) < n:
                await trio.sleep(0.05)
        final = await scrape_until(
            port, lambda m: m.get("fanout_results_written_total") == n
            and m.get("fanout_in_flight", -1) == 0, timeout)
        text = await trio.to_thread.run_sync(
            lambda: httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        await proc.stdin.aclose()
        with trio.fail_after(30):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return early, final, text, code


async def _run_with_metrics(tmp_path, pki, key, n: int, *extra: str,
                            malformed_every: int = 0, **mock_kw):
    """The daemon on stdin against a mock, with --metrics: (mid-run scrape, final scrape,
    results, returncode, mock)."""
    port = free_port()
    out = tmp_path / "results.ndjson"
    async with mock_server(pki, key, **mock_kw) as mock:
        cmd = daemon_cmd(mock, pki, key, "--results", str(out), "--metrics",
                         f"127.0.0.1:{port}", *extra)
        early, final, _, code = await feed_and_scrape(
            cmd, input_lines(n, malformed_every), port, n, out)
    results = [json.loads(x) for x in out.read_bytes().splitlines()]
    return early, final, results, code, mock


async def test_daemon_endpoint_exposes_the_contract_and_agrees(tmp_path, pki, signing_key):
    n = 3000
    early, final, results, code, mock = await _run_with_metrics(
        tmp_path, pki, signing_key, n, "--max-in-flight", "200", malformed_every=100,
        latency=0.05, unregistered_fraction=0.1)
    assert code == 0
    for name, kind in contract_names():
        if kind == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                assert name + suffix in final, name + suffix
        else:
            assert name in final or name.removesuffix("_total") in final, name
    counts = Counter(r["outcome"] for r in results)
    assert len(results) == n
    assert final["fanout_input_lines_total"] == n
    assert final["fanout_malformed_lines_total"] == counts["malformed"] == n // 100
    assert final["fanout_results_written_total"] == n
    assert final["fanout_pushes_total"] == counts["delivered"] + counts["invalid_token"]
    assert final["fanout_invalid_tokens_total"] == counts["invalid_token"] > 0
    assert final["fanout_push_latency_seconds_count"] == final["fanout_pushes_total"]
    assert final["fanout_connections_opened_total"] == mock.stats.connections
    assert final["fanout_checkpoint_lag_lines"] == 0
    assert final["fanout_jwt_rotations_total"] == 1


async def test_workers_2_aggregate_across_processes(tmp_path, pki, signing_key):
    n = 2000
    early, final, results, code, mock = await _run_with_metrics(
        tmp_path, pki, signing_key, n, "--workers", "2", latency=0.02,
        unregistered_fraction=0.1)
    assert code == 0
    assert len(results) == n
    counts = Counter(r["outcome"] for r in results)
    assert final["fanout_pushes_total"] == n
    assert final["fanout_invalid_tokens_total"] == counts["invalid_token"]
    assert final["fanout_input_lines_total"] == n  # counted once, by the coordinator
    assert final["fanout_results_written_total"] == n
    assert final["fanout_connections_opened_total"] == mock.stats.connections == 4
    assert final["fanout_jwt_rotations_total"] == 2  # one JWT per worker
    assert final["fanout_in_flight"] == 0


async def test_the_metrics_port_answers_healthz_readyz_and_404(tmp_path, pki, signing_key):
    """Issue 18: /healthz (the process serves), /readyz (ready once APNs answered; 503 while
    stopping), 404 for any other path (it used to answer the metrics on every path)."""
    port = free_port()
    out = tmp_path / "results.ndjson"

    def get(path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)

    async def status(path: str) -> int | None:
        try:
            return (await trio.to_thread.run_sync(get, path)).status_code
        except httpx.TransportError:
            return None

    async with mock_server(pki, signing_key) as mock:
        cmd = daemon_cmd(mock, pki, signing_key, "--results", str(out), "--metrics",
                         f"127.0.0.1:{port}")
        proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
        try:
            await proc.stdin.send_all(input_lines(5))
            with trio.fail_after(30):
                while count_lines(out) < 5:  # APNs answered: connected, credentials good
                    await trio.sleep(0.05)
                while await status("/readyz") != 200:
                    await trio.sleep(0.05)
            assert await status("/healthz") == 200
            assert await status("/metrics") == 200
            assert await status("/") == 404 and await status("/nowhere") == 404
            body = (await trio.to_thread.run_sync(get, "/readyz")).json()
            assert body == {"status": "ready"}
            await proc.stdin.aclose()
            with trio.fail_after(30):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_readyz_says_why_it_is_not_ready() -> None:
    from prometheus_client import CollectorRegistry

    from fanout.metrics import health_app

    state = (False, "APNs unreachable for 12 s")
    app = health_app(CollectorRegistry(), lambda: state)
    seen: list[str] = []
    body = b"".join(app({"PATH_INFO": "/readyz", "REQUEST_METHOD": "GET"},
                        lambda status, headers: seen.append(status)))
    assert seen == ["503 Service Unavailable"]
    assert json.loads(body) == {"status": "not_ready", "reason": "APNs unreachable for 12 s"}
