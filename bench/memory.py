"""RSS against pushes queued and in flight: it must stay flat.

1. The library: one ``fan_out`` of --tokens tokens (default 1,000,000) fed by a generator,
   against the nginx sink; the sending process samples its own RSS, the pushes done and
   the engine's outstanding count (queued + in flight) every 0.25 s.
2. The daemon: ``bench/daemon_rss.py`` (``fanout run`` over a large NDJSON input, RSS
   sampled once a second beside the checkpoint's line), run as it is and folded in.

Reported: RSS at 10% of the run, at the end, the peak, and the growth between the first
two; bench/results/memory.json and .md (the daemon's own samples stay in
bench/results/daemon_rss.json).

    python bench/memory.py                 # 1,000,000 tokens; daemon over 200 MB
    python bench/memory.py --quick         # 100,000 tokens; daemon over 5 MB

Client pinned to core 0, sink to core 1; 127.0.0.1 only; bounded by --max-seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAYLOAD,
    RESULTS,
    ROOT,
    TOPIC,
    machine,
    now,
    pin,
    run_json,
    self_rss_mb,
    sink_session,
    start_sink,
    write_results,
)

FLAT_MB = 10.0  # growth after the first 10% we still call flat


def worker(args: argparse.Namespace) -> dict:
    import trio

    from fanout.auth import TokenAuth
    from fanout.client import Client

    async def main() -> dict:
        auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
        state = {"done": 0, "ok": 0}
        samples: list[dict] = []
        t0 = trio.current_time()
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=args.port,
                          ca_file=args.ca, connections=args.connections) as client:

            async def sampler() -> None:
                while True:
                    samples.append({"t": round(trio.current_time() - t0, 2),
                                    "done": state["done"], "outstanding": client.outstanding,
                                    "rss_mb": round(self_rss_mb(), 1)})
                    await trio.sleep(0.25)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler)
                with trio.move_on_after(args.max_seconds):
                    tokens = (f"{i:064x}" for i in range(args.tokens))
                    async for r in client.fan_out(PAYLOAD, tokens):
                        state["done"] += 1
                        state["ok"] += r.outcome == "delivered"
                nursery.cancel_scope.cancel()
            samples.append({"t": round(trio.current_time() - t0, 2), "done": state["done"],
                            "outstanding": client.outstanding, "rss_mb": round(self_rss_mb(), 1)})
        return {"seconds": trio.current_time() - t0, **state, "samples": samples}
    return trio.run(main)


def summarise(samples: list[dict], total: int, done_key: str) -> dict:
    if not samples:
        return {}
    early = [s for s in samples if s[done_key] >= total * 0.1] or samples
    first, last = early[0]["rss_mb"], samples[-1]["rss_mb"]
    return {"rss_at_10pct_mb": first, "rss_end_mb": last,
            "rss_peak_mb": max(s["rss_mb"] for s in samples),
            "rss_growth_mb": round(last - first, 1), "flat": last - first <= FLAT_MB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, help="default 1,000,000 (--quick: 100,000)")
    ap.add_argument("--daemon-mb", type=int,
                    help="daemon input size in MB, default 200 (--quick: 5; 0: skip)")
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=300)
    ap.add_argument("--quick", action="store_true")
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
    if args.tokens is None:
        args.tokens = 100_000 if args.quick else 1_000_000
    if args.daemon_mb is None:
        args.daemon_mb = 5 if args.quick else 200

    with sink_session("fanout-memory-",
                      lambda d, p, k: start_sink("nginx", d, p, k)) \
            as (tmpdir, pki, key, port, sink_pids):
        cmd = pin(0) + [sys.executable, __file__, "--worker", "--port", str(port),
                        "--tokens", str(args.tokens), "--connections", str(args.connections),
                        "--max-seconds", str(args.max_seconds), "--ca", str(pki.ca_file),
                        "--key", str(key.path), "--key-id", key.key_id,
                        "--team-id", key.team_id]
        lib, _ = run_json(cmd, timeout=args.max_seconds + 60)
    if "error" in lib:
        raise SystemExit(f"library run failed: {lib['error']}")
    lib_summary = summarise(lib["samples"], args.tokens, "done")
    print(f"library: {lib['done']:,} of {args.tokens:,} pushes ({lib['ok']:,} delivered) in "
          f"{lib['seconds']:.1f} s; RSS {lib_summary['rss_at_10pct_mb']} MB at 10%, "
          f"{lib_summary['rss_end_mb']} MB at the end, peak {lib_summary['rss_peak_mb']} MB; "
          f"outstanding at most {max(s['outstanding'] for s in lib['samples']):,}",
          file=sys.stderr, flush=True)

    daemon = None
    if args.daemon_mb:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "daemon_rss.py"),
                               "--mb", str(args.daemon_mb),
                               "--max-seconds", str(args.max_seconds)],
                              cwd=ROOT, capture_output=True, text=True,
                              timeout=args.max_seconds + 120)
        if proc.returncode == 0 and (RESULTS / "daemon_rss.json").exists():
            daemon = json.loads((RESULTS / "daemon_rss.json").read_text())
            print(proc.stdout.strip().splitlines()[-1], file=sys.stderr)
        else:
            daemon = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}

    report = {"machine": machine(), "when": now(), "connections": args.connections,
              "library": {"tokens": args.tokens, "done": lib["done"], "ok": lib["ok"],
                          "seconds": round(lib["seconds"], 1),
                          "max_outstanding": max(s["outstanding"] for s in lib["samples"]),
                          **lib_summary, "samples": lib["samples"]},
              "daemon": None if daemon is None else
              {k: v for k, v in daemon.items() if k != "samples"}}
    if daemon and "samples" in daemon:
        report["daemon"]["flat"] = (daemon.get("rss_growth_mb") or 0) <= FLAT_MB
    m = report["machine"]
    lines = [f"Memory: RSS while pushing, against the nginx sink; {m['cpu_model'] or 'unknown CPU'}"
             f", {m['cpus']} CPUs (load average {m['loadavg_1m_5m'][0]} at the end), Python {m['python']}; {report['when']}. Flat means growth "
             f"after the first 10% of the run <= {FLAT_MB:g} MB.", "",
             "| run | pushes | seconds | max outstanding (queued + in flight) | RSS at 10% MB "
             "| RSS at end MB | peak MB | growth MB | flat |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    L = report["library"]
    lines.append(f"| library `fan_out`, generator of tokens | {L['done']:,} | {L['seconds']} | "
                 f"{L['max_outstanding']:,} | {L['rss_at_10pct_mb']} | {L['rss_end_mb']} | "
                 f"{L['rss_peak_mb']} | {L['rss_growth_mb']} | {'yes' if L['flat'] else 'NO'} |")
    D = report["daemon"]
    if D and "error" not in D:
        lines.append(f"| daemon `fanout run`, {D['input_mb']} MB NDJSON | {D['lines']:,} | "
                     f"{D['seconds']} | | {D['rss_first_10pct_mb']} | {D['rss_end_mb']} | "
                     f"{max(s['rss_mb'] for s in daemon['samples'])} | {D['rss_growth_mb']} | "
                     f"{'yes' if D['flat'] else 'NO'} |")
    elif D:
        lines.append(f"| daemon | error: {D['error']} | | | | | | | |")
    big = RESULTS / "daemon_rss_10m.json"  # a separate run: ~11 minutes on its own
    if big.exists():
        B = json.loads(big.read_text())
        peak = max(s["rss_mb"] for s in B["samples"])
        lines.append(f"| daemon `fanout run`, {B['input_mb']} MB NDJSON (separate run, "
                     f"`daemon_rss_10m.json`) | {B['lines']:,} | {B['seconds']} | | "
                     f"{B['rss_first_10pct_mb']} | {B['rss_end_mb']} | {peak} | "
                     f"{B['rss_growth_mb']} | {'yes' if B['rss_growth_mb'] <= 10 else 'NO'} |")
    lines += ["", "The 10,000,000-line daemon input is not part of the timed set (about 11 "
              "minutes on its own here): `python bench/daemon_rss.py --mb 1450`, then copy "
              "its `daemon_rss.json` to `daemon_rss_10m.json`."]
    write_results("memory", report, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
