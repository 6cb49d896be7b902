"""`fanout demo` against its mock's fast path, side by side with the same fan-out against
the nginx sink: does the demo show fanout's rate, not the mock's? (issue 19)

Each round runs, in turn (interleaved: demo nginx demo nginx ...):
- ``fanout demo --count N --unregistered 0`` as a user runs it: the command starts the mock
  (fast path by default, JWT verified, topic checked) in a child process and fans one
  payload out to N random tokens over 2 connections; its JSON summary gives pushes/s.
- the same fan-out against nginx (``return 200`` echoing apns-id, verifies nothing, C):
  the demo's own code (``fanout._cli.demo_fan_out``: Client, random tokens, progress), the
  nginx server started once and left unpinned, as the demo's mock is.

Reported: pushes/s of each, client and server CPU µs per push, and demo/nginx pushes/s as
the median of per-round ratios. Target (issue 19): >= 0.8 (within 20% of nginx's figure).

    python bench/demo_rate.py            # 3 rounds x 100,000 (the demo's default count)
    python bench/demo_rate.py --quick    # 2 rounds x 20,000

Everything talks to 127.0.0.1 only; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    interleave,
    machine,
    now,
    paired_ratio,
    proc_cpu,
    run_json,
    sink_session,
    start_sink,
    table_head,
    verdict,
    write_results,
)

TARGET = 0.8
TIMEOUT = 600


def worker(args: argparse.Namespace) -> dict:
    """The demo's fan-out against an already running server (the nginx sink)."""
    import trio

    from fanout._cli import demo_fan_out

    summary = trio.run(lambda: demo_fan_out(args.port, args.ca, args.key, args.key_id,
                                            args.team_id, args.n, 2, quiet=True))
    return summary


def run_demo(n: int) -> dict:
    res, _ = run_json([sys.executable, "-m", "fanout", "demo", "--count", str(n),
                       "--unregistered", "0"], timeout=TIMEOUT, cwd=ROOT)
    if "error" not in res:
        res["server_cpu_us_per_push"] = res.get("mock_cpu_us_per_push")
    return res


def run_nginx(args: argparse.Namespace, port: int, pids: list[int], pki, key) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--port", str(port), "--n", str(args.n),
           "--ca", str(pki.ca_file), "--key", str(key.path), "--key-id", key.key_id,
           "--team-id", key.team_id]
    s0 = proc_cpu(pids)
    res, _ = run_json(cmd, timeout=TIMEOUT)
    s1 = proc_cpu(pids)
    if "error" not in res and res.get("pushes"):
        res["server_cpu_us_per_push"] = round((s1 - s0) / res["pushes"] * 1e6, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="pushes per run (default 100,000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 rounds x 20,000")
    ap.add_argument("--name", default="demo_rate", help="results file name")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--port", type=int)
    ap.add_argument("--ca")
    ap.add_argument("--key")
    ap.add_argument("--key-id")
    ap.add_argument("--team-id")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.n, args.rounds = 20_000, 2

    with sink_session("fanout-demo-rate-",
                      lambda d, p, k: start_sink("nginx", d, p, k, core=None)) \
            as (_tmp, pki, key, port, pids):
        def run(name: str) -> dict:
            res = run_demo(args.n) if name == "demo" else run_nginx(args, port, pids, pki, key)
            if "error" not in res and res.get("pushes") != args.n:
                res["error"] = f"{res.get('pushes')} of {args.n} pushes ended"
            return res

        runs = interleave(["demo", "nginx"], args.rounds, run, lambda r: (
            f"{r['pushes_per_s']:>9,.0f} pushes/s  client {r['client_cpu_us_per_push']:5.1f}"
            f" us/push  server {r.get('server_cpu_us_per_push') or 0:5.1f} us/push"
            f"  {r.get('mock_path', 'nginx')}"))

    good = {k: [r for r in v if "error" not in r] for k, v in runs.items()}
    paired = paired_ratio(runs["demo"], runs["nginx"], key="pushes_per_s")
    ratio, ratios = (round(paired[0], 3), paired[1]) if paired else (None, [])
    rows = {}
    for name, rs in good.items():
        if rs:
            rows[name] = {key: round(statistics.median(r[key] for r in rs if r.get(key)), 1)
                          for key in ("pushes_per_s", "client_cpu_us_per_push",
                                      "server_cpu_us_per_push", "latency_ms_p50")
                          if any(r.get(key) for r in rs)}
    report = {"when": now(), "machine": machine(), "n": args.n, "rounds": args.rounds,
              "runs": runs, "medians": rows, "demo_over_nginx": ratio,
              "rounds_ratio": [round(x, 3) for x in ratios], "target": TARGET}
    lines = [f"`fanout demo` (the mock's fast path) and the same fan-out against nginx, "
             f"{args.n:,} pushes x {args.rounds} interleaved rounds, 2 connections, "
             f"nothing pinned ({report['when']}).", ""]
    lines += table_head(["run", "pushes/s", "client CPU µs/push", "server CPU µs/push",
                         "latency p50 ms"], "lrrrr")
    for name, row in rows.items():
        lines.append(f"| {name} | {row.get('pushes_per_s', 0):,.0f} | "
                     f"{row.get('client_cpu_us_per_push', '–')} | "
                     f"{row.get('server_cpu_us_per_push', '–')} | "
                     f"{row.get('latency_ms_p50', '–')} |")
    lines += ["", f"- demo/nginx pushes/s, median of per-round ratios: **{ratio}** (target >= "
              f"{TARGET}: {verdict(ratio is not None and ratio >= TARGET)}; rounds: "
              f"{', '.join(f'{x:.3f}' for x in ratios)})"]
    md = write_results(args.name, report, lines)
    print("\n".join(lines))
    print(f"\nwrote {md}", file=sys.stderr)


if __name__ == "__main__":
    main()
