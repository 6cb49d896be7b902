"""grafana/: the dashboard and the Prometheus alert rules against docs/metrics-contract.md,
and every query of both evaluated by a real Prometheus scraping a real ``fanout run``.

Structural tests need nothing but the files (and promtool for the rule checks). The live
test runs the mock APNs and ``fanout run --follow --metrics`` as subprocesses, has a
Debian ``prometheus`` scrape the daemon every second with grafana/alerts.yml loaded, then
evaluates every dashboard expression and every alert expression through the HTTP API.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.prometheus_harness import free_port, http_get, require_binary, start_prometheus

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "fanout.json"
ALERTS = GRAFANA / "alerts.yml"
ALERT_TESTS = GRAFANA / "alerts_test.yml"
CONTRACT = ROOT / "docs" / "metrics-contract.md"
DS = {"type": "prometheus", "uid": "${datasource}"}
FANOUT = [sys.executable, "-m", "fanout"]
METRIC_RE = re.compile(r"\bfanout_[a-z0-9_]+")
# labels Prometheus adds to every series (target labels) or histograms have (le)
TARGET_LABELS = {"instance", "job"}
# Grafana variables -> values that make a dashboard expression plain PromQL
SUBSTITUTIONS = {"$__rate_interval": "1m", "${instance}": ".*", "$instance": ".*"}
# counters whose series appear only when the event happens, which the live run does not
# provoke (an auth failure stops a run with exit 3): their queries may be empty, but the
# family must be declared (# HELP / # TYPE) on the daemon's /metrics
EVENT_ONLY = {"fanout_auth_failures_total", "fanout_wrong_environment_total"}


# --- the contract ------------------------------------------------------------------------

def load_contract() -> dict[str, dict]:
    """metric name -> {"type": counter|gauge|histogram, "labels": set} from the table."""
    metrics = {}
    for line in CONTRACT.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("fanout_"):
            continue
        labels = re.sub(r"\([^)]*\)", "", cells[2])  # "cause (goaway, reset, ...)" -> "cause"
        metrics[cells[0]] = {"type": cells[1],
                             "labels": {x.strip() for x in labels.split(",")} - {"-", ""}}
    return metrics


def resolve(name: str, contract: dict[str, dict]) -> tuple[str, str] | None:
    """(contract metric, suffix) for a series name, accounting for histogram suffixes."""
    if name in contract:
        return name, ""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and contract.get(base, {}).get("type") == "histogram":
            return base, suffix
    return None


# --- the files ---------------------------------------------------------------------------

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return out


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query target."""
    return [(p["title"], t["expr"]) for p in all_panels(dashboard)
            for t in p.get("targets", []) if t.get("expr")]


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def alert_blocks() -> dict[str, str]:
    """alert name -> its YAML text (the file is checked by promtool; this only splits it)."""
    text = ALERTS.read_text()
    parts = re.split(r"^\s*- alert:\s*", text, flags=re.M)[1:]
    return {p.split()[0]: p for p in parts}


def strip_comparisons(expr: str) -> str:
    """An alert condition without its thresholds: ``a > 0.05`` -> ``a``, ``a == 1 and on (i)
    b > 0`` -> ``a and on (i) b``: still valid PromQL, non-empty whenever the series the
    alert looks at exist, whatever their values."""
    return re.sub(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?[0-9.]+(e[+-]?[0-9]+)?\b", "", expr)


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, matcher text) of every fanout_* series selector in expr."""
    return [(m.group(1), m.group(2) or "")
            for m in re.finditer(r"\b(fanout_[a-z0-9_]+)(?:\{([^}]*)\})?", expr)]


# --- structural --------------------------------------------------------------------------

def test_contract_table_parses():
    contract = load_contract()
    assert len(contract) >= 20
    assert contract["fanout_pushes_total"] == {"type": "counter", "labels": {
        "team", "push_type", "outcome", "reason"}}
    assert contract["fanout_push_latency_seconds"]["type"] == "histogram"
    assert contract["fanout_retries_total"]["labels"] == {"team", "cause"}
    assert contract["fanout_in_flight"]["labels"] == {"team"}
    # the table says what fanout.metrics exports: names, types and label names
    from prometheus_client import CollectorRegistry

    from fanout.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry=registry)
    exported = {}
    for collector in list(registry._collector_to_names):
        name = collector._name + ("_total" if collector._type == "counter" else "")
        exported[name] = {"type": collector._type, "labels": set(collector._labelnames)}
    assert exported == contract


def test_dashboard_structure():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == DS
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            assert not p.get("targets"), "a row has no queries"
            continue
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, p["title"]
            assert t["expr"].strip(), p["title"]
    titles = {p["title"] for p in panels}
    assert {"Throughput by outcome", "Latency p50 / p95 / p99", "Latency heatmap",
            "In flight vs stream limit", "Checkpoint lag"} <= titles
    assert any(p["type"] == "heatmap" for p in panels)


def test_dashboard_windows_use_rate_interval():
    for title, expr in dashboard_exprs(load_dashboard()):
        windows = re.findall(r"\[([^\]]*)\]", expr)
        assert windows == ["$__rate_interval"] * len(windows), f"{title}: {expr}"
        assert re.search(r"\b(rate|increase)\(", expr) or not windows, f"{title}: {expr}"


def test_every_metric_referenced_is_in_the_contract_with_its_type_and_labels():
    contract = load_contract()
    texts = {"fanout.json": DASHBOARD.read_text(), "alerts.yml": ALERTS.read_text()}
    for source, text in texts.items():
        names = set(METRIC_RE.findall(text))
        assert names, source
        unknown = sorted(n for n in names if resolve(n, contract) is None)
        assert not unknown, f"{source} uses metrics outside docs/metrics-contract.md: {unknown}"
    exprs = [e for _, e in dashboard_exprs(load_dashboard())]
    exprs += [b.split("expr:", 1)[1].split("\n        for:", 1)[0]
              for b in alert_blocks().values()]
    all_labels = set().union(*(m["labels"] for m in contract.values()))
    for expr in exprs:
        # rate()/increase() only over counters and histogram series; gauges never
        for name in re.findall(r"\b(?:rate|increase)\(\s*(fanout_[a-z0-9_]+)", expr):
            base, suffix = resolve(name, contract)
            assert contract[base]["type"] == "counter" or suffix, f"rate over a gauge: {expr}"
        for name, matchers in selectors(expr):
            base, suffix = resolve(name, contract)
            allowed = contract[base]["labels"] | TARGET_LABELS | ({"le"} if suffix else set())
            used = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers))
            assert used <= allowed, f"{name}: labels {used - allowed} not in the contract"
            if contract[base]["type"] == "histogram":
                assert suffix, f"a histogram is queried through _bucket/_sum/_count: {expr}"
        for group in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
            labels = {x.strip() for x in group.split(",")} - {""}
            assert labels <= all_labels | TARGET_LABELS | {"le"}, f"{labels}: {expr}"


def test_dashboard_covers_every_contract_metric():
    contract = load_contract()
    used = {resolve(n, contract)[0] for n in METRIC_RE.findall(DASHBOARD.read_text())}
    assert used == set(contract), f"no panel for {sorted(set(contract) - used)}"


def test_alert_rules_shape():
    blocks = alert_blocks()
    assert {"FanoutAuthFailures", "FanoutErrorRatioHigh", "FanoutJWTTooOld",
            "FanoutStreamLimitStuckAtOne", "FanoutNoProgress"} <= set(blocks)
    for name, block in blocks.items():
        for key in ("expr:", "for:", "severity:", "summary:", "description:"):
            assert key in block, f"{name} has no {key}"
        assert re.search(r"severity: (critical|warning)\b", block), name
    assert "3300" in blocks["FanoutJWTTooOld"]
    assert "0.05" in blocks["FanoutErrorRatioHigh"]


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True,
                          text=True, timeout=30, cwd=GRAFANA)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_provisioning_files():
    ds = (GRAFANA / "provisioning" / "datasources" / "fanout.yml").read_text()
    assert "type: prometheus" in ds and "url: http://localhost:9090" in ds
    dash = (GRAFANA / "provisioning" / "dashboards" / "fanout.yml").read_text()
    assert "type: file" in dash and "path:" in dash


# --- live --------------------------------------------------------------------------------

def append_input(path: Path, start: int, n: int, malformed_every: int = 50) -> int:
    """Appends lines start .. start+n-1 (every malformed_every-th malformed); next start."""
    payload = {"aps": {"alert": {"title": "t", "body": "hello"}}}
    with open(path, "a") as fh:
        for i in range(start, start + n):
            if i % malformed_every == 0:
                fh.write(["not json", '{"token": 5, "payload": {}}', '{"payload": {}}'][i % 3]
                         + "\n")
            else:
                fh.write(json.dumps({"id": f"p{i}", "token": f"{i:064x}", "payload": payload})
                         + "\n")
    return start + n


def start_mock(tmp_path: Path, key) -> tuple[subprocess.Popen, int, Path]:
    port_file = tmp_path / "mock.port"
    proc = subprocess.Popen(
        FANOUT + ["mock", "--pki-dir", str(tmp_path / "pki"), "--port", "0",
                  "--port-file", str(port_file), "--key-path", str(key.path),
                  "--key-id", key.key_id, "--team-id", key.team_id,
                  "--unregistered-fraction", "0.05", "--p429", "0.05",
                  "--goaway-after", "500", "--latency", "0.01"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mock did not start: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.05)
    return proc, int(port_file.read_text()), tmp_path / "pki" / "ca.pem"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


# checked on top of "non-empty" once the data is there: the daemon is pushing while it is
# scraped (lines are appended to its --follow input every second), not idle
LIVE_VALUES = {
    "sum(rate(fanout_pushes_total[1m]))": lambda v: v > 0,
    "sum(rate(fanout_results_written_total[1m]))": lambda v: v > 0,
    "sum(rate(fanout_input_lines_total[1m]))": lambda v: v > 0,
    "sum(rate(fanout_malformed_lines_total[1m]))": lambda v: v > 0,
    "sum(rate(fanout_pushes_total{outcome=\"invalid_token\"}[1m]))": lambda v: v > 0,
    "histogram_quantile(0.5, sum by (le) (rate(fanout_push_latency_seconds_bucket[1m])))":
        lambda v: 0 < v < 30,
    "sum(fanout_goaways_total)": lambda v: v > 0,
    "sum(fanout_connection_stream_limit)": lambda v: v > 1,
}


def test_every_dashboard_and_alert_query_against_a_live_daemon(tmp_path, signing_key):
    """Asserted, against Prometheus scraping ``fanout run --follow --metrics`` every second
    while lines are appended to its input (the mock answers 5% 410, 5% 429, GOAWAY every
    500 streams):

    - the target is up, and the rule file loaded: every alert of grafana/alerts.yml is
      there, with a ``for`` duration, a severity and summary/description annotations, and
      Prometheus evaluated each one without error (rule health "ok");
    - every dashboard expression (``$__rate_interval`` -> 1m, ``$instance`` -> .*) parses
      and returns a non-empty result (values are not checked, except LIVE_VALUES: pushes,
      results, lines, malformed lines, invalid tokens flowing, a p50 latency within the
      buckets, GOAWAYs seen, stream limit above 1); the instance variable's label_values()
      metric has an instance label;
    - every alert expression as written parses (status success; its result is not checked:
      the conditions are false in this run) and, with its comparisons stripped
      (``strip_comparisons``), returns a non-empty result, i.e. the series it watches exist;
    - exception for both: a query whose only metrics are in EVENT_ONLY (auth failures, which
      this run cannot provoke) may be empty, and then the family must be declared on the
      daemon's /metrics;
    - SIGTERM stops the daemon with exit 0.
    """
    require_binary("prometheus")
    help_text = subprocess.run(FANOUT + ["run", "--help"], capture_output=True, text=True,
                               timeout=30).stdout
    assert "--metrics" in help_text, "fanout run has no --metrics (docs/metrics-contract.md)"
    started = time.monotonic()
    dashboard = load_dashboard()
    exprs = [(title, substitute(e)) for title, e in dashboard_exprs(dashboard)]
    inp = tmp_path / "in.ndjson"
    next_line = append_input(inp, 1, 1000)
    log = tmp_path / "daemon.log"
    metrics_port = free_port()
    target = f"127.0.0.1:{metrics_port}"
    mock, mock_port, ca = start_mock(tmp_path, signing_key)
    daemon = None
    try:
        # Prometheus first: it scrapes a new target only after its discovery interval (~5 s)
        with start_prometheus(tmp_path / "prom", target, rule_files=[ALERTS]) as prom:
            with open(log, "wb") as log_fh:
                daemon = subprocess.Popen(
                    FANOUT + ["run", str(inp), "--follow", "--metrics", target,
                              "--results", str(tmp_path / "results.ndjson"),
                              "--invalid-tokens", str(tmp_path / "invalid.ndjson"),
                              "--host", "127.0.0.1", "--port", str(mock_port),
                              "--ca-file", str(ca), "--key-path", str(signing_key.path),
                              "--key-id", signing_key.key_id, "--team-id", signing_key.team_id,
                              "--topic", "com.example.app", "--max-in-flight", "200",
                              "--drain-timeout", "10", "--status-interval", "0",
                              "--log-format", "json"],
                    stdout=subprocess.DEVNULL, stderr=log_fh)
            alerts = {r["name"]: r for r in prom.rules() if r["type"] == "alerting"}
            assert set(alerts) == set(alert_blocks()), "alerts.yml did not load as written"
            stripped = {}
            for name, rule in alerts.items():
                stripped[name] = strip_comparisons(rule["query"])
                assert stripped[name] != rule["query"], f"{name}: no comparison to strip"

            def problems() -> list[str]:
                """Queries that fail, are empty (and may not be) or have the wrong value, and
                unhealthy rules."""
                out = []
                up = prom.result('up{job="fanout"}')
                if not up or up[0]["value"][1] != "1":
                    out.append(f"target {target} not up: {up}")
                for title, expr in exprs + [(f"alert {n} (stripped)", e)
                                            for n, e in stripped.items()]:
                    answer = prom.query(expr)
                    if answer.get("status") != "success":
                        out.append(f"{title}: {expr}: {answer.get('error')}")
                    elif not answer["data"]["result"] and not set(
                            METRIC_RE.findall(expr)) <= EVENT_ONLY:
                        out.append(f"{title}: empty: {expr}")
                for expr, ok in LIVE_VALUES.items():
                    result = prom.result(expr)
                    if not (result and ok(float(result[0]["value"][1]))):
                        out.append(f"value: {expr} = {result}")
                for rule in prom.rules():
                    if rule["health"] != "ok":
                        out.append(f"rule {rule['name']}: health {rule['health']} "
                                   f"{rule.get('lastError', '')}")
                return out

            # wait, bounded, until every query has its data (rate() needs two samples),
            # feeding the daemon 300 lines a second meanwhile
            deadline = time.monotonic() + 30
            while True:
                next_line = append_input(inp, next_line, 300)
                if daemon.poll() is not None:
                    pytest.fail(f"daemon exited {daemon.returncode}: "
                                f"{log.read_text()[-2000:]}")
                found = problems()
                if not found or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            assert not found, "\n".join(found) + "\n" + prom.log_tail()

            # alert expressions as written: they parse (the conditions are false here)
            for name, rule in alerts.items():
                assert prom.query(rule["query"])["status"] == "success", name
                assert rule["duration"] > 0, f"{name} has no for:"
                assert rule["labels"].get("severity") in {"critical", "warning"}, name
                assert {"summary", "description"} <= set(rule["annotations"]), name
            # the instance variable of the dashboard
            variable = next(v for v in dashboard["templating"]["list"]
                            if v["name"] == "instance")
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)",
                                         variable["definition"]).groups()
            assert prom.result(f"count by ({label}) ({metric})"), variable["definition"]
            # event-only families: declared on /metrics even without a sample
            status, body = http_get(f"http://{target}/metrics")
            assert status == 200
            for name in EVENT_ONLY:
                family = name.removesuffix("_total")
                assert re.search(rf"^# TYPE {family}(_total)? counter$", body.decode(),
                                 re.M), f"{name} not declared on /metrics"
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(max(5.0, 55 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            pytest.fail("daemon did not stop on SIGTERM")
        assert code == 0, log.read_text()[-2000:]
    finally:
        if daemon is not None:
            stop(daemon)
        stop(mock)
