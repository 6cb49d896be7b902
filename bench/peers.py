"""fanout side by side with its peers: aioapns (PyPI) and, when Node is present,
@parse/node-apn and apns2 (npm), on the same workload, interleaved.

The workload: N pushes of the same ~90-byte payload to N distinct tokens, after one
warm-up push, over 2 connections (or the peer's nearest equivalent: node-apn's
MultiProvider with 2 clients; apns2's fixed undici pool of 32 connections with one request
in flight each, which the library does not let you change). Node peers send in chunks of
1000 (node-apn fails a bulk send of 20k at once), aioapns in gathers of 1000 per
connection, fanout streams through ``fan_out``. Every client signs a real ES256 JWT; the
sink (nginx, ``return 200`` echoing apns-id, 1000 streams) verifies nothing, so no client
pays for the server's checks.

Each client runs in its own process pinned to core 0, the sink on core 1; rounds are
interleaved (A B C D, A B C D, ...). Reported: pushes/s, client CPU µs per push (user +
system of the client process over its send phase), the sink's CPU over the same window,
the client's peak RSS, and fanout/peer CPU per push as the median of per-round paired
ratios. Targets (issue 19): fanout <= 0.05 x aioapns, fanout <= 0.25 x node-apn.

    python bench/peers.py                 # 3 rounds x 20,000 pushes
    python bench/peers.py --quick         # 2 rounds x 5,000
    python bench/peers.py --clients fanout,node-apn

Node packages are installed on demand into /tmp/fanout-bench-node (``npm install``).
Every push goes to 127.0.0.1 only; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    interleave,
    machine,
    now,
    paired_ratio,
    pin,
    proc_cpu,
    run_json,
    sink_session,
    start_sink,
    summarize,
    table_head,
    verdict,
    write_results,
)

BENCH = Path(__file__).resolve().parent
NODE_DIR = Path(os.environ.get("FANOUT_BENCH_NODE", "/tmp/fanout-bench-node"))
NODE_PACKAGES = {"node-apn": "@parse/node-apn@8", "apns2": "apns2@12"}
NODE_SCRIPTS = {"node-apn": "node_apn.js", "apns2": "apns2.js"}
NODE_MODULE_DIRS = {"node-apn": "@parse/node-apn", "apns2": "apns2"}
TARGETS = {"aioapns": 0.05, "node-apn": 0.25}
WORKER_TIMEOUT = 300


def ensure_node(wanted: list[str]) -> dict[str, str]:
    """Install the npm peers into NODE_DIR if missing. Returns {peer: why skipped}."""
    skipped: dict[str, str] = {}
    if not shutil.which("node"):
        return {p: "node not installed" for p in wanted}
    missing = [p for p in wanted
               if not (NODE_DIR / "node_modules" / NODE_MODULE_DIRS[p] / "package.json").exists()]
    if missing:
        if not shutil.which("npm"):
            return {p: "npm not installed" for p in missing}
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        if not (NODE_DIR / "package.json").exists():
            (NODE_DIR / "package.json").write_text('{"name": "fanout-bench-node", "private": true}\n')
        print(f"installing {', '.join(NODE_PACKAGES[p] for p in missing)} into {NODE_DIR}",
              file=sys.stderr)
        try:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"]
                           + [NODE_PACKAGES[p] for p in missing],
                           cwd=NODE_DIR, check=True, timeout=300)
        except (subprocess.SubprocessError, OSError) as exc:
            return {p: f"npm install failed: {exc}" for p in missing}
    return skipped


def node_version() -> str | None:
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(name: str) -> str | None:
    if name in ("aioapns", "fanout"):
        try:
            from importlib.metadata import version

            return version(name)
        except Exception:
            return None
    if name in NODE_MODULE_DIRS:
        import json

        try:
            pj = NODE_DIR / "node_modules" / NODE_MODULE_DIRS[name] / "package.json"
            return json.loads(pj.read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None
    return None


def command(name: str, port: int, n: int, connections: int, pki, key) -> tuple[list[str], dict | None]:
    if name in NODE_SCRIPTS:
        env = dict(os.environ, NODE_PATH=str(NODE_DIR / "node_modules"))
        return pin(0) + ["node", str(BENCH / "peers" / NODE_SCRIPTS[name]), "127.0.0.1",
                         str(port), str(pki.ca_file), str(key.path), key.key_id, key.team_id,
                         str(n), str(connections)], env
    return pin(0) + [sys.executable, str(BENCH / "throughput.py"), "--worker", name,
                     "--port", str(port), "--n", str(n), "--connections", str(connections),
                     "--ca", str(pki.ca_file), "--key", str(key.path), "--key-id", key.key_id,
                     "--team-id", key.team_id], None


def run_one(name: str, port: int, n: int, connections: int, pki, key,
            sink_pids: list[int]) -> dict:
    cmd, env = command(name, port, n, connections, pki, key)
    s0 = proc_cpu(sink_pids)
    res, peak = run_json(cmd, timeout=WORKER_TIMEOUT, env=env)
    s1 = proc_cpu(sink_pids)
    res["rss_peak_mb"] = round(res.get("rss_peak_mb") or peak or 0, 1)
    if "error" in res:
        return res
    res["server_cpu"] = s1 - s0
    res["cpu_per_push"] = res["cpu"] / n
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 rounds x 5,000 pushes")
    ap.add_argument("--server", choices=["nginx", "mock"], default="nginx")
    ap.add_argument("--clients", default="fanout,aioapns,node-apn,apns2")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 5_000, 2
    clients = [c for c in args.clients.split(",") if c]
    skipped: dict[str, str] = {}
    if "aioapns" in clients:
        try:
            import aioapns  # noqa: F401
        except ImportError:
            skipped["aioapns"] = "not installed (pip install -e '.[bench]')"
    skipped.update(ensure_node([c for c in clients if c in NODE_SCRIPTS]))
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}", file=sys.stderr)
    clients = [c for c in clients if c not in skipped]

    with sink_session("fanout-peers-",
                      lambda d, p, k: start_sink(args.server, d, p, k)) \
            as (tmpdir, pki, key, port, sink_pids):
        runs = interleave(
            clients, args.rounds,
            lambda name: run_one(name, port, args.n, args.connections, pki, key, sink_pids),
            lambda res: (f"{args.n / res['seconds']:8.0f} pushes/s "
                         f"{res['cpu_per_push'] * 1e6:7.1f} us CPU/push  server "
                         f"{res['server_cpu'] / args.n * 1e6:6.1f} us/push  "
                         f"rss {res['rss_peak_mb']:.0f} MiB  ok={res['ok']}"))

    summary = summarize(
        runs, args.n, lambda r: r["cpu_per_push"],
        lambda name, good: {
            "version": package_version(name),
            "rss_peak_mb": round(statistics.median(r["rss_peak_mb"] for r in good), 1),
            "rounds_ok": len(good),
        })
    ratios = {}
    for other in clients:
        if other == "fanout":
            continue
        pr = paired_ratio(runs.get("fanout", []), runs[other])
        if pr is None:
            continue
        ratio, pairs = pr
        entry = {"ratio": round(ratio, 3), "peer_over_fanout": round(1 / ratio, 2),
                 "per_round": [round(x, 3) for x in pairs]}
        if other in TARGETS:
            entry["target"] = f"<= {TARGETS[other]}"
            entry["met"] = ratio <= TARGETS[other]
        ratios[f"fanout/{other}"] = entry
    report = {"n": args.n, "rounds": args.rounds, "connections": args.connections,
              "machine": {**machine(), "server": args.server, "node": node_version()},
              "clients": summary, "ratios": ratios, "skipped": skipped, "when": now(),
              "notes": ["every client signs a real ES256 JWT (Node peers too); the sink "
                        "verifies nothing",
                        "apns2 uses its own fixed pool (32 connections, 1 request in flight "
                        "each); node-apn a MultiProvider of `connections` http2 sessions"]}
    m = report["machine"]
    lines = [f"Peers: {args.n:,} pushes x {args.rounds} rounds, interleaved; sink {args.server} "
             f"(verifies nothing; every client, the Node peers too, signs a real ES256 JWT); "
             f"{args.connections} connections (apns2: its fixed 32-connection pool); client on "
             f"core 0, sink on core 1. {m['cpu_model'] or 'unknown CPU'}, {m['cpus']} CPUs (load average {m['loadavg_1m_5m'][0]} at the end), "
             f"Python {m['python']}, Node {m['node'] or 'absent'}; {report['when']}.", "",
             *table_head(["client", "version", "pushes/s", "client CPU µs/push",
                          "server CPU µs/push", "server busy", "peak RSS MiB"], "llrrrrr")]
    for name, s in summary.items():
        if "error" in s:
            lines.append(f"| {name} | | error: {s['error']} | | | | |")
        else:
            lines.append(f"| {name} | {s['version'] or ''} | {s['pushes_per_s']:,} | "
                         f"{s['cpu_us_per_push']} | {s['server_cpu_us_per_push']} | "
                         f"{s['server_busy']:.0%} | {s['rss_peak_mb']:.0f} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | | skipped: {why} | | | | |")
    lines.append("")
    for k, v in ratios.items():
        tgt = (f"target {v['target']}: {verdict(v['met'])}; " if "target" in v
               else "no target; ")
        lines.append(f"- {k} CPU per push, median of per-round ratios: **{v['ratio']}** "
                     f"(the peer uses {v['peer_over_fanout']}x fanout's CPU per push; {tgt}"
                     f"rounds: {', '.join(map(str, v['per_round']))})")
    for peer in TARGETS:
        if peer not in clients and "fanout" in clients:
            lines.append(f"- fanout/{peer}: not measured ({skipped.get(peer, 'not selected')})")
    write_results("peers", report, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
