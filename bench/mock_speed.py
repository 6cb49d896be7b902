"""The mock's CPU per request on each path (h2 and fast), fanout's client driving it.

Issue 19: the h2-based mock costs 160-430 µs of CPU per request, several times what fanout's
client spends per push, so ``fanout demo`` measured the mock. This starts ``fanout mock`` once
per path (``--path h2``, ``--path fast``), each a process pinned to the second core, validating
as usual (the JWT against its key, the team, the topic), and runs fanout's ``Client.fan_out``
of N distinct tokens against each in turn from a worker pinned to the first core, interleaved
over rounds (h2 fast h2 fast ...) so that drift on a shared machine hits both alike. The mock's
CPU is read from /proc (user + system) around each worker; the client's is the worker's own.

    python bench/mock_speed.py            # 2 rounds x 50,000 pushes
    python bench/mock_speed.py --quick    # 2 rounds x 10,000
    python bench/mock_speed.py --paths fast --n 100000

Prints per path: the mock's CPU µs per request, pushes/s, the client's CPU µs per push and how
busy the mock's core was; then fast/h2 ratios (medians of the rounds' paired ratios). Writes
bench/results/mock_speed.{json,md}. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAYLOAD,
    ROOT,
    TOPIC,
    interleave,
    machine,
    make_keys,
    paired_ratio,
    pin,
    proc_cpu,
    stop,
    table_head,
    wait_port,
    write_results,
)

WORKER_TIMEOUT = 600
TARGET_US = 12.0  # the fast path's budget per request (issue 19: about what fanout's client
#                  spends per push, so that the mock's rate never sets the demo's pace)


def worker(args: argparse.Namespace) -> dict:
    """fanout's Client: one warm-up push, then ``fan_out`` of N distinct tokens."""
    import trio

    from fanout.auth import TokenAuth
    from fanout.client import Client
    from fanout.payload import Notification

    async def main() -> dict:
        auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
        tokens = [f"{i:064x}" for i in range(1, args.n + 1)]
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=args.port,
                          ca_file=args.ca, connections=args.connections) as client:
            warm = await client.send(Notification(token="00" * 32, payload=PAYLOAD))
            if warm.outcome != "delivered":
                raise SystemExit(f"warm-up push: {warm.outcome} {warm.reason}")
            ok = done = 0
            t0, c0 = time.perf_counter(), time.process_time()
            async for r in client.fan_out(PAYLOAD, tokens):
                ok += r.outcome == "delivered"
                done += 1
            return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                    "ok": ok, "done": done}

    return trio.run(main)


def start_mock(path: str, tmp: Path, key, port: int) -> subprocess.Popen:
    cmd = pin(1) + [sys.executable, "-m", "fanout", "mock", "--path", path,
                    "--pki-dir", str(tmp), "--port", str(port), "--topics", TOPIC,
                    "--key-path", str(key.path), "--key-id", key.key_id,
                    "--team-id", key.team_id]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, f"fanout mock --path {path}")
    return proc


def run_once(args: argparse.Namespace, port: int, pids: list[int], pki, key) -> dict:
    cmd = pin(0) + [sys.executable, __file__, "--worker", "--port", str(port), "--n",
                     str(args.n), "--connections", str(args.connections), "--ca",
                     str(pki.ca_file), "--key", str(key.path), "--key-id", key.key_id,
                     "--team-id", key.team_id]
    s0 = proc_cpu(pids)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT, cwd=ROOT)
    s1 = proc_cpu(pids)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "worker failed"}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["mock_cpu"] = s1 - s0
    if res["ok"] != args.n:
        res["error"] = f"{res['ok']} of {args.n} delivered"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="pushes per run (default 50,000)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 rounds x 10,000")
    ap.add_argument("--connections", type=int, default=1, help="the client's connections")
    ap.add_argument("--paths", default="h2,fast", help="mock paths to run (default h2,fast)")
    ap.add_argument("--name", default="mock_speed", help="results file name")
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
        args.n, args.rounds = 10_000, 2
    paths = [p for p in args.paths.split(",") if p]

    import tempfile

    from fanout.testing.nginx import free_port

    with tempfile.TemporaryDirectory(prefix="mock-speed-") as tmp_s:
        tmp = Path(tmp_s)
        pki, key = make_keys(tmp)
        mocks: dict[str, tuple[subprocess.Popen, int]] = {}
        try:
            for path in paths:
                port = free_port()
                mocks[path] = (start_mock(path, tmp, key, port), port)
            time.sleep(0.3)

            def run(path: str) -> dict:
                proc, port = mocks[path]
                return run_once(args, port, [proc.pid], pki, key)

            def describe(r: dict) -> str:
                return (f"mock {r['mock_cpu'] / args.n * 1e6:6.1f} us/request, "
                        f"{args.n / r['seconds']:8.0f} pushes/s, client "
                        f"{r['cpu'] / args.n * 1e6:5.1f} us/push, mock core "
                        f"{r['mock_cpu'] / r['seconds']:.0%} busy")

            runs = interleave(paths, args.rounds, run, describe)
        finally:
            stop(*(proc for proc, _ in mocks.values()))

    med = statistics.median
    summary: dict[str, dict] = {}
    for path, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        if not good:
            summary[path] = {"error": rs[0].get("error") if rs else "no run"}
            continue
        summary[path] = {
            "mock_cpu_us_per_request": round(med(r["mock_cpu"] / args.n * 1e6 for r in good), 1),
            "pushes_per_s": round(med(args.n / r["seconds"] for r in good)),
            "client_cpu_us_per_push": round(med(r["cpu"] / args.n * 1e6 for r in good), 1),
            "mock_busy": round(med(r["mock_cpu"] / r["seconds"] for r in good), 2),
        }
    for r in (r for rs in runs.values() for r in rs if "error" not in r):
        r["mock_cpu_per_request"] = r["mock_cpu"] / args.n
        r["rate"] = args.n / r["seconds"]
    ratios = {}
    if "h2" in runs and "fast" in runs:
        cpu = paired_ratio(runs["fast"], runs["h2"], "mock_cpu_per_request")
        rate = paired_ratio(runs["fast"], runs["h2"], "rate")
        if cpu:
            ratios["mock_cpu_fast_over_h2"] = round(cpu[0], 3)
        if rate:
            ratios["pushes_per_s_fast_over_h2"] = round(rate[0], 2)

    lines = [f"# The mock's CPU per request, h2 path vs fast path ({time.strftime('%Y-%m-%d')})",
             "",
             f"fanout's Client.fan_out of {args.n:,} tokens over {args.connections} "
             f"connection(s), {args.rounds} interleaved rounds; the mock (`fanout mock --path "
             f"...`, validating: JWT, team, topic) pinned to one core, the client to the other.",
             ""]
    lines += table_head(["path", "mock CPU µs/request", "pushes/s", "client CPU µs/push",
                         "mock core busy"], "lrrrr")
    for path, row in summary.items():
        if "error" in row:
            lines.append(f"| {path} | error: {row['error']} | | | |")
            continue
        lines.append(f"| {path} | {row['mock_cpu_us_per_request']} | {row['pushes_per_s']:,} | "
                     f"{row['client_cpu_us_per_push']} | {row['mock_busy']:.0%} |")
    if ratios:
        lines += ["", f"fast/h2: mock CPU per request x{ratios.get('mock_cpu_fast_over_h2')}, "
                      f"pushes/s x{ratios.get('pushes_per_s_fast_over_h2')}"]
    fast = summary.get("fast", {})
    if "mock_cpu_us_per_request" in fast:
        met = fast["mock_cpu_us_per_request"] <= TARGET_US
        lines.append(f"target: fast path <= {TARGET_US:.0f} µs of CPU per request: "
                     f"{'met' if met else 'MISSED'} ({fast['mock_cpu_us_per_request']} µs, "
                     f"{1e6 / fast['mock_cpu_us_per_request']:,.0f} requests/s per core)")
    report = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "n": args.n,
              "rounds": args.rounds, "connections": args.connections, "summary": summary,
              "ratios": ratios, "runs": runs}
    md = write_results(args.name, report, lines)
    print("\n".join(lines))
    print(f"(written to {md})", file=sys.stderr)


if __name__ == "__main__":
    main()
