"""A fleet on one Redis Stream: pushes/s with 1, 2 and 4 daemons in one consumer group.

A redis-server (Debian, 127.0.0.1, no persistence) and a sink; per run the stream gets
--entries push jobs (``fanout enqueue``), then N daemons (``fanout run --source
redis://... --group bench``, results to /dev/null) start together and the run ends when
the stream is empty and nothing is pending (the daemons delete what they acked). Rate =
entries / (first daemon started -> stream done), so each daemon's process start (~0.35 s)
counts. Interleaved over --rounds (1 2 4, 1 2 4, ...); ratios are medians of per-round
paired ratios.

The sink: the fanout mock in accept-all mode (the issue's choice; Python on one core, so
it caps every N and its busy column shows it) and nginx (which keeps up, so the daemons'
own scaling shows; on 2 cores, 2 daemons is the useful comparison).

    python bench/fleet.py                      # 60,000 entries, 1/2/4 daemons, 2 rounds, both sinks
    python bench/fleet.py --quick              # 10,000 entries, 1 round, nginx only

127.0.0.1 only; every run bounded (--timeout).
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    machine,
    now,
    paired_ratio,
    proc_cpu,
    sink_session,
    start_sink,
    stop,
    write_results,
)

from fanout.testing.nginx import free_port  # noqa: E402

STREAM = "bench"


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True).stdout.strip()


class Probe:
    """XLEN over one socket: spawning redis-cli 20 times a second would take the daemons'
    CPU. The daemons delete what they ack, so XLEN 0 means every entry is done."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port))

    def xlen(self) -> int:
        self.sock.sendall(b"*2\r\n$4\r\nXLEN\r\n$%d\r\n%s\r\n" % (len(STREAM), STREAM.encode()))
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += self.sock.recv(64)
        return int(reply[1:-2])

    def close(self) -> None:
        self.sock.close()


def run(n_daemons: int, entries: int, redis_port: int, sink_port: int, pki, key, inp: Path,
        sink_pids: list[int], timeout: float) -> dict:
    cli(redis_port, "DEL", STREAM)
    url = f"redis://127.0.0.1:{redis_port}/{STREAM}"
    fed = subprocess.run([sys.executable, "-m", "fanout", "enqueue", str(inp), "--to", url,
                          "--max-backlog", str(entries)], cwd=ROOT, capture_output=True,
                         text=True)
    if fed.returncode != 0:
        return {"error": f"enqueue: {fed.stderr.strip()[-200:]}"}
    cmd = [sys.executable, "-m", "fanout", "run", "--source", url, "--group", "bench",
           "--results", "/dev/null", "--host", "127.0.0.1", "--port", str(sink_port),
           "--ca-file", str(pki.ca_file), "--key-path", str(key.path), "--key-id", key.key_id,
           "--team-id", key.team_id, "--topic", TOPIC, "--status-interval", "0"]
    s0 = proc_cpu(sink_pids)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd + ["--consumer", f"d{i}"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(n_daemons)]
    probe = Probe(redis_port)
    try:
        while True:
            if time.perf_counter() - t0 > timeout:
                return {"error": f"timed out after {timeout} s"}
            if any(p.poll() is not None for p in procs):
                return {"error": "a daemon exited early"}
            if probe.xlen() == 0:
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        s1 = proc_cpu(sink_pids)
    finally:
        probe.close()
        stop(*procs, timeout=30)
    return {"seconds": seconds, "pushes_per_s": entries / seconds,
            "sink_busy": (s1 - s0) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=60_000)
    ap.add_argument("--daemons", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--server", choices=["mock", "nginx", "both"], default="both")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.entries, args.rounds, args.server = 10_000, 1, "nginx"
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server not installed (apt-get install redis-server redis-tools)")
    counts = [int(x) for x in args.daemons.split(",")]
    servers = ["mock", "nginx"] if args.server == "both" else [args.server]
    report: dict = {"machine": machine(), "when": now(), "entries": args.entries,
                    "rounds": args.rounds, "servers": {}}
    lines = [f"Fleet: N `fanout run --source redis://...` daemons in one consumer group over "
             f"{args.entries:,} stream entries, start to stream empty (process start "
             f"included), {args.rounds} rounds interleaved; nothing pinned; "
             f"{report['machine']['cpus']} CPUs; {report['when']}.", "",
             "| sink | daemons | pushes/s | vs 1 daemon | sink busy (of one core) |",
             "|---|---:|---:|---:|---:|"]
    redis_port = free_port()
    for server in servers:
        with sink_session("fanout-fleet-", lambda d, p, k, s=server: start_sink(
                s, d, p, k, core=None)) as (tmp, pki, key, port, sink_pids):
            inp = tmp / "in.ndjson"
            inp.write_text("".join(json.dumps({"id": i, "token": f"{i:064x}",
                                               "payload": PAYLOAD}) + "\n"
                                   for i in range(args.entries)))
            redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port",
                                      str(redis_port), "--save", "", "--appendonly", "no",
                                      "--dir", str(tmp)], stdout=subprocess.DEVNULL)
            try:
                for _ in range(100):
                    if cli(redis_port, "PING") == "PONG":
                        break
                    time.sleep(0.05)
                runs: dict[int, list[dict]] = {n: [] for n in counts}
                for rnd in range(args.rounds):
                    for n in counts:
                        res = run(n, args.entries, redis_port, port, pki, key, inp, sink_pids,
                                  args.timeout)
                        runs[n].append(res)
                        print(f"{server} round {rnd + 1} daemons={n}: " + (
                            f"ERROR {res['error']}" if "error" in res else
                            f"{res['pushes_per_s']:8,.0f} pushes/s  sink busy "
                            f"{res['sink_busy']:.0%}"), file=sys.stderr, flush=True)
            finally:
                stop(redis)
        entry = {}
        for n in counts:
            good = [r for r in runs[n] if "error" not in r]
            if not good:
                entry[n] = {"error": runs[n][0]["error"]}
                lines.append(f"| {server} | {n} | error: {runs[n][0]['error']} | | |")
                continue
            ratio = paired_ratio(runs[n], runs[counts[0]], key="pushes_per_s")
            entry[n] = {"pushes_per_s": round(statistics.median(r["pushes_per_s"] for r in good)),
                        "ratio": round(ratio[0], 3) if ratio else None,
                        "sink_busy": round(statistics.median(r["sink_busy"] for r in good), 2)}
            e = entry[n]
            lines.append(f"| {server} | {n} | {e['pushes_per_s']:,} | {e['ratio']} | "
                         f"{e['sink_busy']:.0%} |")
        report["servers"][server] = entry
    lines += ["", "- The mock is Python on one core: where its busy column nears 100% it is "
                  "the limit, not the fleet. nginx keeps up; on 2 cores the daemons and nginx "
                  "share them, so 2 daemons is the useful comparison there."]
    write_results("fleet", report, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
