"""Helpers shared by the bench/ scripts: core pinning, CPU and RSS from /proc, the sinks
(nginx or the fanout mock), test PKI and signing key, paired ratios and result files.

Everything here talks to 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# FANOUT_BENCH_RESULTS redirects every script's output (run_all.sh --quick uses a subfolder,
# so a quick run never overwrites the full results the README quotes)
RESULTS = Path(os.environ.get("FANOUT_BENCH_RESULTS") or ROOT / "bench" / "results")
TOPIC = "com.example.bench"
PAYLOAD = {"aps": {"alert": {"title": "bench", "body": "x" * 60}}}


# ----------------------------------------------------------------------------- /proc

def pin(core: int) -> list[str]:
    """A ``taskset -c CORE`` prefix, or nothing when there is no such core or no taskset."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        return ["taskset", "-c", str(core)]
    return []


def proc_cpu(pids: list[int]) -> float:
    """User+system CPU seconds used so far by these processes (not their children)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """``pid`` and its direct children (nginx's worker, for instance)."""
    out = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            out += [int(k) for k in kids]
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c in children(p)[1:] if c not in out]
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def self_rss_mb() -> float:
    return rss_mb(os.getpid())


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the load average when the report is written: above ~0.5 on an otherwise idle box
    # means something else shared the cores during the run
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "platform": sys.platform, "kernel": platform.release(),
            "loadavg_1m_5m": [round(x, 2) for x in os.getloadavg()[:2]]}


# ----------------------------------------------------------------------------- sinks

def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early")
        time.sleep(0.05)
    raise SystemExit(f"{what} did not start listening")


def make_keys(tmpdir: Path):
    """A throwaway CA + server certificate and an ES256 .p8 signing key under ``tmpdir``."""
    from fanout.testing.devcerts import make_pki, make_signing_key

    return make_pki(tmpdir), make_signing_key(tmpdir)


def start_sink(kind: str, tmp: Path, pki, key, *, core: int | None = 1, latency: float = 0.0,
               jitter: float = 0.0, unregistered: float = 0.0, bad_tokens: float = 0.0,
               penalty_accepts: int = 1, max_streams: int | None = None) -> tuple[subprocess.Popen, int]:
    """nginx (``return 200`` echoing apns-id, 1000 streams, verifies nothing) or the fanout
    mock in accept-all mode, pinned to ``core`` (None: not pinned). Returns the process and
    its port."""
    prefix = pin(core) if core is not None else []
    if kind == "nginx":
        from fanout.errors import ConfigError
        from fanout.testing.nginx import start_nginx

        try:
            return start_nginx(tmp, pki.cert_file, pki.key_file, prefix=prefix)
        except ConfigError as exc:
            raise SystemExit(f"{exc} (or use --server mock)") from None
    from fanout.testing.nginx import free_port

    port = free_port()
    cmd = prefix + [
        sys.executable, "-m", "fanout", "mock", "--accept-all", "--pki-dir", str(tmp),
        "--port", str(port), "--key-path", str(key.path), "--key-id", key.key_id,
        "--team-id", key.team_id]
    if latency:
        cmd += ["--latency", str(latency)]
    if jitter:
        cmd += ["--jitter", str(jitter)]
    if unregistered:
        cmd += ["--unregistered-fraction", str(unregistered)]
    if bad_tokens:
        cmd += ["--bad-token-fraction", str(bad_tokens)]
    if penalty_accepts != 1:
        cmd += ["--penalty-accepts", str(penalty_accepts)]
    if max_streams:
        cmd += ["--max-streams", str(max_streams)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_port(port, proc, kind)
    return proc, port


@contextlib.contextmanager
def sink_session(prefix: str, start: Any) -> Iterator[tuple[Path, Any, Any, int, list[int]]]:
    """A temporary directory with a fresh test PKI and key, and a sink started in it by
    ``start(tmpdir, pki, key) -> (process, port)``; yields ``(tmpdir, pki, key, port,
    sink_pids)`` once the sink has settled, and stops the sink on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        tmpdir = Path(tmp)
        pki, key = make_keys(tmpdir)
        sink, port = start(tmpdir, pki, key)
        try:
            time.sleep(0.3)
            yield tmpdir, pki, key, port, children(sink.pid)
        finally:
            stop(sink)


def stop(*procs: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM every process still running (all first: they drain side by side), then
    wait for each up to ``timeout`` s and kill what is left."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ----------------------------------------------------------------------------- numbers

def paired_ratio(a_runs: list[dict], b_runs: list[dict], key: str = "cpu_per_push"
                 ) -> tuple[float, list[float]] | None:
    """Median over rounds of a[key]/b[key], pairing each round's runs (taken back to back:
    drift on a shared machine hits both sides of a pair alike)."""
    pairs = [a[key] / b[key] for a, b in zip(a_runs, b_runs, strict=False)
             if "error" not in a and "error" not in b and b.get(key)]
    if not pairs:
        return None
    return statistics.median(pairs), pairs


def summarize_by(runs: dict[str, list[dict]], row: Any) -> dict[str, dict]:
    """Per client, ``row(name, good_runs)`` over its rounds without an ``"error"``; a client
    with no good round gets ``{"error": <its first round's error>}``."""
    summary: dict[str, dict] = {}
    for name, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        if not good:
            summary[name] = {"error": rs[0].get("error") if rs else "no run"}
            continue
        summary[name] = row(name, good)
    return summary


def summarize(runs: dict[str, list[dict]], n: int, cpu_per_push: Any,
              extra: Any = None) -> dict[str, dict]:
    """Per client, the median over its good rounds of pushes/s, client and server CPU per
    push and server load, plus ``extra(name, good_runs)`` fields; ``cpu_per_push(run)``
    reads a run's client CPU per push (seconds)."""
    med = statistics.median

    def row(name: str, good: list[dict]) -> dict[str, Any]:
        return {
            "pushes_per_s": round(med(n / r["seconds"] for r in good)),
            "cpu_us_per_push": round(med(cpu_per_push(r) * 1e6 for r in good), 1),
            "server_cpu_us_per_push": round(med(r["server_cpu"] / n * 1e6 for r in good), 1),
            "server_busy": round(med(r["server_cpu"] / r["seconds"] for r in good), 2),
            "ok": min(r["ok"] for r in good),
            **(extra(name, good) if extra is not None else {}),
        }

    return summarize_by(runs, row)


def median_of(good: list[dict], key: str, digits: int = 2) -> float | None:
    """The median of ``key`` over the runs that have it (not None), rounded; None if none."""
    values = [r[key] for r in good if r.get(key) is not None]
    return round(statistics.median(values), digits) if values else None


def interleave(clients: list[str], rounds: int, run: Any, describe: Any) -> dict[str, list[dict]]:
    """Run every client once per round, in turn (A B C, A B C, ...), so that drift on a
    shared machine hits all alike. ``run(name)`` returns a result dict (``"error"`` on
    failure); ``describe(result)`` is its one-line progress report."""
    runs: dict[str, list[dict]] = {c: [] for c in clients}
    for rnd in range(rounds):
        for name in clients:
            res = run(name)
            runs[name].append(res)
            if "error" in res:
                print(f"round {rnd + 1} {name}: ERROR {res['error']}", file=sys.stderr)
            else:
                print(f"round {rnd + 1} {name:8s} {describe(res)}", file=sys.stderr, flush=True)
    return runs


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def write_results(name: str, report: dict, md_lines: list[str]) -> Path:
    """bench/results/<name>.json and <name>.md; returns the .md path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(md_lines) + "\n")
    return md


def table_head(columns: list[str], align: str) -> list[str]:
    """A markdown table's header and rule; ``align`` has one letter per column, ``l`` for
    left (``---``) or ``r`` for right (``---:``)."""
    rule = {"l": "---", "r": "---:"}
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(rule[a] for a in align) + "|"]


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


# ----------------------------------------------------------------------------- the machine

SPIN = "n = 0\nfor i in range({iterations}):\n    n += i\n"


def cpu_rate(procs: int, iterations: int = 30_000_000) -> float:
    """What ``procs`` CPU-bound Python processes, started together, get done per second
    (iterations of a plain loop). ``cpu_rate(2) / cpu_rate(1)`` is how far this machine
    scales right now: on a shared host two vCPUs often give much less than 2x."""
    code = SPIN.format(iterations=iterations)
    t0 = time.perf_counter()
    spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(procs)]
    for proc in spinners:
        proc.wait(timeout=300)
    return procs * iterations / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- children

def run_json(cmd: list[str], *, timeout: float, env: dict | None = None,
             cwd: Path = ROOT) -> tuple[dict, float | None]:
    """Run a worker that prints one JSON line last on stdout. Returns (its dict, or
    {"error": ...}) and the child's peak RSS in MiB (from wait4's rusage)."""
    import tempfile
    import threading

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            out = proc.stdout.read().decode(errors="replace")
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    peak = usage.ru_maxrss / 1024
    if proc.returncode != 0:
        last = stderr.splitlines()[-1] if stderr else f"exit {proc.returncode}"
        return {"error": last[:300]}, peak
    try:
        return json.loads(out.strip().splitlines()[-1]), peak
    except (ValueError, IndexError):
        return {"error": f"no JSON on stdout: {out[-200:]!r}"}, peak
