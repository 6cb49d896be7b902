"""Client CPU per push and pushes/s: fanout vs the bare framer loop vs aioapns, side by side.

One run starts a sink (nginx from Debian, ``return 200`` with 1000 streams, pinned to the
second core), then runs each client in its own subprocess pinned to the first core,
interleaved (A B C A B C ...) so that drift on these shared machines hits all alike. Each
worker reports the CPU its send phase used; the parent reads the sink's CPU from /proc in
the same window, so a saturated server is visible. Medians and ratios are printed and
written to bench/results/.

    python bench/throughput.py                 # 3 rounds x 20,000 pushes
    python bench/throughput.py --quick         # 2 rounds x 10,000
    python bench/throughput.py --server mock   # the fanout mock in accept-all mode
    python bench/throughput.py --matrix        # + fanout over the issue's matrix
    python bench/throughput.py --matrix-only --quick

The matrix (fanout only, one run per cell): connections {1, 2, 4} x stream limit {100,
1000} x payload {256 B, 2 KB, 4 KB} x injected server latency {0, 20 ms +- 10 ms} x
rejection {0, 5% unregistered}. Cells without latency run against nginx (the stream limit
set in its config; rejected tokens start with ``dead`` and get 410 Unregistered); cells
with latency need the fanout mock (``--latency 0.02 --jitter 0.01 --max-streams``,
``--unregistered-fraction``), which is Python on one core and becomes the bottleneck:
its busy column says so. ``--quick`` runs a subset.

Every push goes to 127.0.0.1 only, and every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAYLOAD,
    RESULTS,
    ROOT,
    TOPIC,
    interleave,
    machine,
    pin,
    proc_cpu,
    sink_session,
    start_sink,
    summarize,
    table_head,
)

WORKER_TIMEOUT = 300


# ----------------------------------------------------------------------------- workers

def worker_fanout(args: argparse.Namespace) -> dict:
    import trio

    from fanout.auth import TokenAuth
    from fanout.client import Client

    async def main() -> dict:
        auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
        payload = sized_payload(args.payload_bytes) if args.payload_bytes else PAYLOAD
        every = args.dead_every
        tokens = [f"dead{i:060x}" if every and i % every == every - 1 else f"{i:064x}"
                  for i in range(args.n)]
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=args.port,
                          ca_file=args.ca, connections=args.connections) as client:
            await client.send(_warm_notification())
            ok = done = 0
            t0, c0 = time.perf_counter(), time.process_time()
            async for r in client.fan_out(payload, tokens):
                ok += r.outcome == "delivered"
                done += 1
            return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                    "ok": ok, "done": done}
    return trio.run(main)


def sized_payload(size: int) -> dict:
    """An alert payload whose JSON encoding is ``size`` bytes."""
    base = {"aps": {"alert": {"title": "bench", "body": ""}}}
    pad = size - len(json.dumps(base, separators=(",", ":")))
    base["aps"]["alert"]["body"] = "x" * max(0, pad)
    return base


def _warm_notification():
    from fanout.payload import Notification

    return Notification(token="00" * 32, payload=PAYLOAD, topic=TOPIC)


def worker_floor(args: argparse.Namespace) -> dict:
    """The bare framer loop: one Connection per socket, a fixed request, no engine."""
    import ssl

    import trio

    from fanout._engine.connection import Connection, Exchange
    from fanout.auth import TokenAuth
    from fanout.payload import PushTemplate

    auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
    template = PushTemplate(PAYLOAD, topic=TOPIC)
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["h2"])
    state = {"left": args.n, "ok": 0, "done": None}

    class Loop:
        def __init__(self) -> None:
            self.conns: list[Connection] = []

        def fill(self, conn: Connection) -> None:
            while state["left"] > 0 and conn.capacity > 0:
                state["left"] -= 1
                conn.start(Exchange(template.for_token(f"{state['left']:064x}")))

        def on_response(self, conn, job, status, headers, body) -> None:
            state["ok"] += status == 200
            if state["ok"] == args.n:
                state["done"].set()

        def on_capacity(self, conn) -> None:
            if state["done"] is not None:
                self.fill(conn)

        def on_unprocessed(self, conn, job, why) -> None:
            raise RuntimeError(why)

        on_lost = on_unprocessed

        def on_timeout(self, conn, job) -> None:
            raise RuntimeError("timeout")

        def on_retired(self, conn, why) -> None: ...

        def on_closed(self, conn) -> None: ...

    async def main() -> dict:
        loop = Loop()
        async with trio.open_nursery() as nursery:
            conns = []
            for i in range(args.connections):
                conn = Connection("127.0.0.1", args.port, ctx, loop, loop, auth=auth, index=i)
                await nursery.start(conn.run)
                conns.append(conn)
            state["done"] = trio.Event()
            t0, c0 = time.perf_counter(), time.process_time()
            for conn in conns:
                loop.fill(conn)
            await state["done"].wait()
            out = {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                   "ok": state["ok"]}
            for conn in conns:
                conn.retire("done")
        return out
    return trio.run(main)


def worker_aioapns(args: argparse.Namespace) -> dict:
    import asyncio
    import ssl

    from aioapns import APNs, NotificationRequest
    from aioapns.connection import APNsProductionClientProtocol

    class LocalProtocol(APNsProductionClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = args.port

    async def main() -> dict:
        ctx = ssl.create_default_context(cafile=args.ca)
        ctx.set_alpn_protocols(["h2"])
        apns = APNs(key=Path(args.key).read_text(), key_id=args.key_id, team_id=args.team_id,
                    topic=TOPIC, ssl_context=ctx, max_connections=args.connections)
        apns.pool.protocol_class = LocalProtocol
        await apns.send_notification(NotificationRequest(device_token="00" * 32,
                                                         message=PAYLOAD))
        ok = 0
        t0, c0 = time.perf_counter(), time.process_time()
        chunk = 1000 * args.connections
        for start in range(0, args.n, chunk):
            reqs = [NotificationRequest(device_token=f"{i:064x}", message=PAYLOAD)
                    for i in range(start, min(args.n, start + chunk))]
            results = await asyncio.gather(*(apns.send_notification(r) for r in reqs))
            ok += sum(r.is_successful for r in results)
        return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "ok": ok}
    return asyncio.run(main())


WORKERS = {"fanout": worker_fanout, "floor": worker_floor, "aioapns": worker_aioapns}


# ----------------------------------------------------------------------------- parent

def run_worker(name: str, port: int, n: int, connections: int, pki, key, sink_pids: list[int],
               extra: list[str] | None = None) -> dict:
    cmd = pin(0) + [sys.executable, __file__, "--worker", name, "--port", str(port), "--n",
                     str(n), "--connections", str(connections), "--ca", str(pki.ca_file),
                     "--key", str(key.path), "--key-id", key.key_id, "--team-id", key.team_id]
    cmd += extra or []
    s0 = proc_cpu(sink_pids)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT, cwd=ROOT)
    s1 = proc_cpu(sink_pids)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["server_cpu"] = s1 - s0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--server", choices=["nginx", "mock"], default="nginx")
    ap.add_argument("--clients", default="fanout,floor,aioapns")
    ap.add_argument("--matrix", action="store_true", help="also run fanout over the matrix")
    ap.add_argument("--matrix-only", action="store_true")
    ap.add_argument("--name", default="throughput", help="results file name")
    ap.add_argument("--worker")
    ap.add_argument("--payload-bytes", type=int, default=0)
    ap.add_argument("--dead-every", type=int, default=0)
    ap.add_argument("--port", type=int)
    ap.add_argument("--ca")
    ap.add_argument("--key")
    ap.add_argument("--key-id")
    ap.add_argument("--team-id")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.quick:
        args.n, args.rounds = 10_000, 2
    report: dict = {}
    lines: list[str] = []
    if not args.matrix_only:
        report, lines = compare(args)
    if args.matrix or args.matrix_only:
        cells, mlines = run_matrix(args)
        report = report or {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        report["matrix"] = cells
        lines += ([""] if lines else []) + mlines
    name = args.name if not (args.matrix_only and args.name == "throughput") else "throughput_matrix"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def compare(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The side-by-side runs: fanout, floor, aioapns, interleaved over rounds."""
    clients = [c for c in args.clients.split(",") if c]
    if "aioapns" in clients:
        try:
            import aioapns  # noqa: F401
        except ImportError:
            print("aioapns not installed (pip install aioapns): skipped", file=sys.stderr)
            clients.remove("aioapns")
    with sink_session("fanout-bench-",
                      lambda d, p, k: start_sink(args.server, d, p, k)) \
            as (tmpdir, pki, key, port, sink_pids):
        runs = interleave(
            clients, args.rounds,
            lambda name: run_worker(name, port, args.n, args.connections, pki, key,
                                    sink_pids),
            lambda res: (f"{args.n / res['seconds']:8.0f} pushes/s "
                         f"{res['cpu'] / args.n * 1e6:7.1f} us CPU/push  server "
                         f"{res['server_cpu'] / args.n * 1e6:6.1f} us/push  ok={res['ok']}"))

    summary = summarize(runs, args.n, lambda r: r["cpu"] / args.n)
    # Ratios pair each round's runs (taken back to back) and take the median over rounds:
    # drift on a shared machine hits both sides of a pair alike.
    ratios = {}
    for other, target in (("aioapns", 0.05), ("floor", 1.5)):
        pairs = [a["cpu"] / b["cpu"] for a, b in zip(runs.get("fanout", []), runs.get(other, []),
                                                      strict=False)
                 if "error" not in a and "error" not in b]
        if pairs:
            ratio = statistics.median(pairs)
            ratios[f"fanout/{other}"] = {"ratio": round(ratio, 3), "target": f"<= {target}",
                                         "met": ratio <= target,
                                         "per_round": [round(x, 3) for x in pairs]}
    report = {"n": args.n, "rounds": args.rounds, "connections": args.connections,
              "machine": {**machine(), "server": args.server}, "clients": summary, "ratios": ratios,
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    lines = [f"Server: {args.server}, {args.n:,} pushes x {args.rounds} rounds, "
             f"{args.connections} connections, client and server each pinned to a core.", "",
             *table_head(["client", "pushes/s", "client CPU µs/push", "server CPU µs/push",
                          "server busy"], "lrrrr")]
    for name, s in summary.items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error']} | | | |")
        else:
            lines.append(f"| {name} | {s['pushes_per_s']:,} | {s['cpu_us_per_push']} | "
                         f"{s['server_cpu_us_per_push']} | {s['server_busy']:.0%} |")
    lines.append("")
    for k, v in ratios.items():
        lines.append(f"- {k} CPU per push, median of per-round ratios: **{v['ratio']}** "
                     f"(target {v['target']}: {'met' if v['met'] else 'MISSED'}; rounds: "
                     f"{', '.join(map(str, v['per_round']))})")
    return report, lines


# ----------------------------------------------------------------------------- matrix

MATRIX_FULL = {"connections": (1, 2, 4), "streams": (100, 1000), "payload": (256, 2048, 4096),
               "latency": (0.0, 0.02), "reject": (0.0, 0.05)}
MATRIX_QUICK = {"connections": (1, 4), "streams": (1000,), "payload": (256, 4096),
                "latency": (0.0,), "reject": (0.0, 0.05)}
JITTER = 0.01


def _matrix_sink(latency: float, streams: int, reject: float, tmpdir: Path, pki, key):
    """nginx (its stream limit patched into the config) when there is no latency to inject,
    else the fanout mock."""
    if not latency:
        import fanout.testing.nginx as ng

        saved = ng.CONF
        ng.CONF = saved.replace("http2_max_concurrent_streams 1000;",
                                f"http2_max_concurrent_streams {streams};")
        try:
            return start_sink("nginx", tmpdir, pki, key)
        finally:
            ng.CONF = saved
    return start_sink("mock", tmpdir, pki, key, latency=latency, jitter=JITTER,
                      unregistered=reject, max_streams=streams)


def run_matrix(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    import itertools

    dims = MATRIX_QUICK if args.quick else MATRIX_FULL
    n_fast = 5_000 if args.quick else 10_000
    n_slow = 4_000  # the mock runs at a few thousand pushes/s
    cells: list[dict] = []
    for latency, streams, reject in itertools.product(dims["latency"], dims["streams"],
                                                      dims["reject"]):
        with sink_session("fanout-matrix-", partial(_matrix_sink, latency, streams, reject)) \
                as (tmpdir, pki, key, port, sink_pids):
            for conns, size in itertools.product(dims["connections"], dims["payload"]):
                n = n_slow if latency else n_fast
                extra = ["--payload-bytes", str(size)]
                if reject and not latency:
                    extra += ["--dead-every", str(round(1 / reject))]
                res = run_worker("fanout", port, n, conns, pki, key, sink_pids, extra)
                label = (f"{conns}c {streams}s {size}B "
                         f"{'20±10ms' if latency else '0ms'} {reject:.0%}rej")
                cell = {"connections": conns, "streams": streams, "payload_bytes": size,
                        "latency_ms": latency * 1000, "jitter_ms": JITTER * 1000 if latency
                        else 0, "reject": reject, "n": n,
                        "server": "mock" if latency else "nginx", "label": label}
                if "error" in res:
                    cell["error"] = res["error"]
                    print(f"matrix {label}: ERROR {res['error']}", file=sys.stderr)
                else:
                    cell |= {"pushes_per_s": round(n / res["seconds"]),
                             "cpu_us_per_push": round(res["cpu"] / n * 1e6, 1),
                             "server_cpu_us_per_push": round(res["server_cpu"] / n * 1e6, 1),
                             "server_busy": round(res["server_cpu"] / res["seconds"], 2),
                             "delivered": res["ok"], "results": res.get("done", res["ok"])}
                    print(f"matrix {label:28s} {cell['pushes_per_s']:7,} pushes/s "
                          f"{cell['cpu_us_per_push']:6.1f} us/push  server busy "
                          f"{cell['server_busy']:.0%}  delivered {res['ok']:,}/{n:,}",
                          file=sys.stderr, flush=True)
                cells.append(cell)
    lines = [f"Matrix ({'quick subset' if args.quick else 'full'}): fanout alone, one run per "
             f"cell, client on core 0, server on core 1. Latency 0: nginx (stream limit in its "
             f"config, rejected tokens get 410 Unregistered); latency 20±10 ms: the fanout mock "
             f"(accept-all, Python on one core: where its busy column nears 100% it, not "
             f"fanout, sets the rate).", "",
             "| connections | stream limit | payload | server latency | rejected | server | "
             "pushes/s | client CPU µs/push | server CPU µs/push | server busy | delivered |",
             "|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for c in cells:
        head = (f"| {c['connections']} | {c['streams']} | {c['payload_bytes']:,} B | "
                f"{'20 ± 10 ms' if c['latency_ms'] else '0'} | {c['reject']:.0%} | {c['server']} | ")
        if "error" in c:
            lines.append(head + f"error: {c['error']} | | | | |")
        else:
            lines.append(head + f"{c['pushes_per_s']:,} | {c['cpu_us_per_push']} | "
                         f"{c['server_cpu_us_per_push']} | {c['server_busy']:.0%} | "
                         f"{c['delivered']:,}/{c['n']:,} |")
    return cells, lines


if __name__ == "__main__":
    main()
