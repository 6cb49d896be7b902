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

Every push goes to 127.0.0.1 only, and every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TOPIC = "com.example.bench"
PAYLOAD = {"aps": {"alert": {"title": "bench", "body": "x" * 60}}}
WORKER_TIMEOUT = 300

def _pin(core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        return ["taskset", "-c", str(core)]
    return []


def _proc_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            out += [int(k) for k in kids]
    except OSError:
        pass
    return out


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early")
        time.sleep(0.05)
    raise SystemExit(f"{what} did not start listening")


def start_sink(kind: str, tmp: Path, pki, key) -> tuple[subprocess.Popen, int]:
    if kind == "nginx":
        from fanout.errors import ConfigError
        from fanout.nginx import start_nginx

        try:
            return start_nginx(tmp, pki.cert_file, pki.key_file, prefix=_pin(1))
        except ConfigError as exc:
            raise SystemExit(f"{exc} (or use --server mock)") from None
    from fanout.nginx import free_port

    port = free_port()
    proc = subprocess.Popen(_pin(1) + [
        sys.executable, "-m", "fanout", "mock", "--accept-all", "--pki-dir", str(tmp),
        "--port", str(port), "--key-path", str(key.path), "--key-id", key.key_id,
        "--team-id", key.team_id], cwd=ROOT)
    _wait_port(port, proc, kind)
    return proc, port


# ----------------------------------------------------------------------------- workers

def worker_fanout(args: argparse.Namespace) -> dict:
    import trio

    from fanout.auth import TokenAuth
    from fanout.client import Client

    async def main() -> dict:
        auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
        tokens = [f"{i:064x}" for i in range(args.n)]
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=args.port,
                          ca_file=args.ca, connections=args.connections) as client:
            await client.send(_warm_notification())
            ok = 0
            t0, c0 = time.perf_counter(), time.process_time()
            async for r in client.fan_out(PAYLOAD, tokens):
                ok += r.outcome == "delivered"
            return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                    "ok": ok}
    return trio.run(main)


def _warm_notification():
    from fanout.payload import Notification

    return Notification(token="00" * 32, payload=PAYLOAD, topic=TOPIC)


def worker_floor(args: argparse.Namespace) -> dict:
    """The bare framer loop: one Connection per socket, a fixed request, no engine."""
    import ssl

    import trio

    from fanout.auth import TokenAuth
    from fanout.connection import Connection, Exchange
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
                conn = Connection("127.0.0.1", args.port, ctx, loop, auth=auth, index=i)
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

def run_worker(name: str, port: int, n: int, connections: int, pki, key, sink_pids: list[int]) -> dict:
    cmd = _pin(0) + [sys.executable, __file__, "--worker", name, "--port", str(port), "--n",
                     str(n), "--connections", str(connections), "--ca", str(pki.ca_file),
                     "--key", str(key.path), "--key-id", key.key_id, "--team-id", key.team_id]
    s0 = _proc_cpu(sink_pids)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT, cwd=ROOT)
    s1 = _proc_cpu(sink_pids)
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
    ap.add_argument("--worker")
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
    from fanout.devcerts import make_pki, make_signing_key

    clients = [c for c in args.clients.split(",") if c]
    if "aioapns" in clients:
        try:
            import aioapns  # noqa: F401
        except ImportError:
            print("aioapns not installed (pip install aioapns): skipped", file=sys.stderr)
            clients.remove("aioapns")
    runs: dict[str, list[dict]] = {c: [] for c in clients}
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        tmpdir = Path(tmp)
        pki, key = make_pki(tmpdir), make_signing_key(tmpdir)
        sink, port = start_sink(args.server, tmpdir, pki, key)
        try:
            time.sleep(0.3)
            sink_pids = _children(sink.pid)
            for rnd in range(args.rounds):
                for name in clients:
                    res = run_worker(name, port, args.n, args.connections, pki, key, sink_pids)
                    runs[name].append(res)
                    if "error" in res:
                        print(f"round {rnd + 1} {name}: ERROR {res['error']}", file=sys.stderr)
                    else:
                        print(f"round {rnd + 1} {name:8s} {args.n / res['seconds']:8.0f} pushes/s "
                              f"{res['cpu'] / args.n * 1e6:7.1f} us CPU/push  server "
                              f"{res['server_cpu'] / args.n * 1e6:6.1f} us/push  ok={res['ok']}",
                              file=sys.stderr)
        finally:
            sink.terminate()
            sink.wait(10)

    summary = {}
    for name, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        if not good:
            summary[name] = {"error": rs[0].get("error") if rs else "no run"}
            continue
        summary[name] = {
            "pushes_per_s": round(statistics.median(args.n / r["seconds"] for r in good)),
            "cpu_us_per_push": round(statistics.median(r["cpu"] / args.n * 1e6 for r in good), 1),
            "server_cpu_us_per_push": round(statistics.median(r["server_cpu"] / args.n * 1e6
                                                              for r in good), 1),
            "server_busy": round(statistics.median(r["server_cpu"] / r["seconds"] for r in good), 2),
            "ok": min(r["ok"] for r in good),
        }
    # Ratios pair each round's runs (taken back to back) and take the median over rounds:
    # drift on a shared machine hits both sides of a pair alike.
    ratios = {}
    for other, target in (("aioapns", 0.25), ("floor", 1.5)):
        pairs = [a["cpu"] / b["cpu"] for a, b in zip(runs.get("fanout", []), runs.get(other, []),
                                                      strict=False)
                 if "error" not in a and "error" not in b]
        if pairs:
            ratio = statistics.median(pairs)
            ratios[f"fanout/{other}"] = {"ratio": round(ratio, 3), "target": f"<= {target}",
                                         "met": ratio <= target,
                                         "per_round": [round(x, 3) for x in pairs]}
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
               "platform": sys.platform, "server": args.server}
    report = {"n": args.n, "rounds": args.rounds, "connections": args.connections,
              "machine": machine, "clients": summary, "ratios": ratios,
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Server: {args.server}, {args.n:,} pushes x {args.rounds} rounds, "
             f"{args.connections} connections, client and server each pinned to a core.", "",
             "| client | pushes/s | client CPU µs/push | server CPU µs/push | server busy |",
             "|---|---:|---:|---:|---:|"]
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
    (RESULTS / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
