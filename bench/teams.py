"""Two teams in one process: one team's revoked key does not slow the other.

The client (core 0) sends through a :class:`fanout.teams.Teams` router to two servers (core
1): beta's pushes go to nginx (answers 200 at once), acme's to the fanout mock, validating
JWTs. Three cases, interleaved over --rounds, each --n beta pushes:

- plain: beta's pushes through a plain Client (no router): the cost of the router;
- beta_alone: beta's pushes through the router, nothing else;
- acme_revoked: the same beta pushes mixed 1:1 with acme pushes, while acme's mock knows
  another public key under acme's key id (403 InvalidProviderToken: acme's pushes end
  ``config_error``);
- beta_alone_paced, acme_revoked_paced: the same two with beta's team limited to --rate
  pushes/s (its token bucket emptied first) (a load the core can carry, as in production where APNs' round trip, not the
  CPU, sets the pace).

Unpaced, the client's core is saturated, so acme's refused pushes take their (small) share
of it from beta: that ratio says what a refused push costs. Paced, the question is the
issue's: does a revoked team slow the other? Target (issue 9): paced, beta's throughput
with acme revoked >= 0.95 x beta alone. 127.0.0.1 only; every run is bounded by
--max-seconds.

    python bench/teams.py            # 40,000 beta pushes, 3 rounds
    python bench/teams.py --quick    # 10,000, 1 round
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAYLOAD,
    ROOT,
    machine,
    now,
    paired_ratio,
    pin,
    sink_session,
    start_sink,
    stop,
    verdict,
    wait_port,
    write_results,
)

CASES = ("plain", "beta_alone", "acme_revoked", "beta_alone_paced", "acme_revoked_paced")
TARGET = 0.95


def worker(args: argparse.Namespace) -> dict:
    import random
    import time

    import trio

    from fanout.auth import TokenAuth
    from fanout.client import Client
    from fanout.payload import Notification
    from fanout.teams import Team, Teams

    auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
    beta_topic, acme_topic = "com.beta.app", "com.acme.app"
    beta = [Notification(token=f"{i:064x}", payload=PAYLOAD, topic=beta_topic)
            for i in range(args.n)]
    items = list(beta)
    if args.case.startswith("acme_revoked"):
        items += [Notification(token=f"{i:064x}", payload=PAYLOAD, topic=acme_topic)
                  for i in range(args.n, 2 * args.n)]
        random.Random(1).shuffle(items)

    async def main() -> dict:
        done = 0
        t0, c0 = time.perf_counter(), time.process_time()
        last = t0
        with trio.move_on_after(args.max_seconds):
            if args.case == "plain":
                async with Client(auth=auth, topic=beta_topic, host="127.0.0.1",
                                  port=args.beta_port, ca_file=args.ca) as client:
                    t0, c0 = time.perf_counter(), time.process_time()
                    async for _ in client.send_many(items):
                        done += 1
                    last = time.perf_counter()
            else:
                common = {"ca_file": args.ca, "host": "127.0.0.1"}
                paced = {"rate": args.rate} if args.case.endswith("_paced") else {}
                teams = [Team("beta", auth, {beta_topic},
                              client={**common, "port": args.beta_port, **paced}),
                         Team("acme", auth, {acme_topic},
                              client={**common, "port": args.acme_port})]
                async with Teams(teams) as router:
                    await router.send(beta[0])  # both cases start with beta's pool open
                    if paced:  # empty beta's token bucket (burst = 1 s): measure the pace
                        warm = [Notification(token=f"{i:064x}", payload=PAYLOAD,
                                             topic=beta_topic)
                                for i in range(10 * args.n, 10 * args.n + int(args.rate))]
                        async for _ in router.send_many(warm):
                            pass
                    t0, c0 = time.perf_counter(), time.process_time()
                    async for r in router.send_many(items):
                        if r.team == "beta":
                            done += r.ok
                            last = time.perf_counter()
        return {"seconds": last - t0, "cpu": time.process_time() - c0, "done": done,
                "complete": done == args.n}
    return trio.run(main)


def run_case(case: str, args, pki, key, beta_port: int, acme_port: int) -> dict:
    cmd = pin(0) + [sys.executable, __file__, "--worker", case, "--beta-port", str(beta_port),
                    "--acme-port", str(acme_port), "--n", str(args.n), "--rate", str(args.rate),
                    "--max-seconds",
                    str(args.max_seconds), "--ca", str(pki.ca_file), "--key", str(key.path),
                    "--key-id", key.key_id, "--team-id", key.team_id]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         timeout=2 * args.max_seconds + 60)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["done"]:
        return {"error": "no beta push delivered"}
    res["pushes_per_s"] = res["done"] / res["seconds"]
    res["cpu_per_push"] = res["cpu"] / res["done"]
    return res


def start_revoked_mock(tmpdir: Path, key) -> tuple[subprocess.Popen, int]:
    """The fanout mock validating JWTs against another key under acme's key id: every
    push is refused 403 InvalidProviderToken, as after a revoked key."""
    from fanout.testing.devcerts import make_signing_key
    from fanout.testing.nginx import free_port

    other = make_signing_key(tmpdir / "revoked", key_id=key.key_id, team_id=key.team_id)
    port = free_port()
    proc = subprocess.Popen(pin(1) + [
        sys.executable, "-m", "fanout", "mock", "--pki-dir", str(tmpdir), "--port", str(port),
        "--key-path", str(other.path), "--key-id", other.key_id, "--team-id", other.team_id],
        cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_port(port, proc, "mock")
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=5000.0,
                    help="beta's pushes/s in the paced cases (default 5000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=CASES)
    for name in ("--beta-port", "--acme-port", "--ca", "--key", "--key-id", "--team-id"):
        ap.add_argument(name)
    args = ap.parse_args()
    if args.worker:
        args.case = args.worker
        args.beta_port, args.acme_port = int(args.beta_port), int(args.acme_port)
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.n, args.rounds = 10_000, 1
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    with sink_session("fanout-teams-", lambda d, p, k: start_sink("nginx", d, p, k)) \
            as (tmpdir, pki, key, beta_port, _pids):
        acme, acme_port = start_revoked_mock(tmpdir, key)
        try:
            for rnd in range(args.rounds):
                for case in CASES:
                    res = run_case(case, args, pki, key, beta_port, acme_port)
                    runs[case].append(res)
                    print(f"round {rnd + 1} {case:13s} " + (
                        f"ERROR {res['error']}" if "error" in res else
                        f"beta {res['pushes_per_s']:8,.0f}/s  "
                        f"{res['cpu_per_push'] * 1e6:5.1f} us CPU/push  done {res['done']:,}"),
                        file=sys.stderr, flush=True)
        finally:
            stop(acme)
    report: dict = {"machine": machine(), "when": now(), "n": args.n, "rounds": args.rounds,
                    "cases": {}}
    lines = [f"Teams: {args.n:,} pushes of team beta (nginx) through a Teams router, "
             f"alone and mixed 1:1 with team acme's pushes while acme's key is revoked "
             f"(the fanout mock answers 403); {args.rounds} rounds interleaved; "
             f"{report['when']}.", "",
             "| case | beta pushes/s | client CPU/push (us) | vs beta alone (rate) | complete |",
             "|---|---:|---:|---:|---|"]
    for case in CASES:
        good = [r for r in runs[case] if "error" not in r]
        if not good:
            lines.append(f"| {case} | error: {runs[case][0].get('error')} | | | |")
            continue
        base = "beta_alone_paced" if case.endswith("_paced") else "beta_alone"
        ratio = paired_ratio(runs[case], runs[base], key="pushes_per_s")
        e = report["cases"][case] = {
            "pushes_per_s": round(statistics.median(r["pushes_per_s"] for r in good)),
            "cpu_us_per_push": round(statistics.median(r["cpu_per_push"] for r in good) * 1e6,
                                     1),
            "rate_vs_beta_alone": round(ratio[0], 3) if ratio else None,
            "complete": all(r["complete"] for r in good)}
        lines.append(f"| {case} | {e['pushes_per_s']:,} | {e['cpu_us_per_push']} | "
                     f"{e['rate_vs_beta_alone']} | {'yes' if e['complete'] else 'no (cut)'} |")
    revoked = report["cases"].get("acme_revoked_paced", {}).get("rate_vs_beta_alone")
    unpaced = report["cases"].get("acme_revoked", {}).get("rate_vs_beta_alone")
    overhead = paired_ratio(runs["beta_alone"], runs["plain"], key="cpu_per_push")
    lines.append("")
    if overhead:
        report["router_cpu_vs_plain"] = round(overhead[0], 3)
        lines.append(f"- The router costs {overhead[0]:.2f}x the client CPU per push of a "
                     f"plain Client (beta_alone vs plain, paired per round).")
    if unpaced is not None:
        lines.append(f"- Unpaced (the client's core saturated): beta with acme revoked does "
                     f"{unpaced} of beta alone; the difference is the CPU of acme's refused "
                     f"pushes, routed and answered config_error without a request.")
    if revoked is not None:
        report["met"] = revoked >= TARGET
        lines.append(f"- Paced at {args.rate:,.0f}/s: beta with acme revoked does {revoked} of "
                     f"beta alone (target >= {TARGET}: {verdict(revoked >= TARGET)}).")
    write_results("teams", report, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
