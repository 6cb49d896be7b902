"""Time to recovery and outcome counts per fault, with the client's default timeouts.

One trio process: the fanout mock (in process, JWT verified, 20 ms per stream) behind the
fault relay of the tests (tests/relay.py), and one ``Client(connections=2)`` with the
DEFAULT clocks (timeout 10 s, ping_timeout 5 s; ``--quick``: 2 s and 1 s), so the figures
are what a user gets. Per fault, a fresh mock, relay and client; once both connections are
ready, a paced send (``rate=`` --rate pushes/s) of --n distinct tokens through
``client.fan_out``; --fault-at seconds (1 s) into the send the fault is injected, on the
connections open at that moment (later connections are clean):

- relay ``blackhole``, ``blackhole_up``, ``blackhole_down``, ``stop_reading``, ``drip``
  (server->client bytes one a second): the network forgets the flow (tests/relay.py);
- mock silent, PINGs answered: ``never_answer=1.0`` (streams stay open, PINGs are ACKed);
- mock stops reading, sends PINGs: ``stop_reading_after=1`` (each open connection stops at
  its next request) with ``server_ping_interval=1.0`` from the start;
- mock zero window: ``initial_window_size=0`` from the start (read when a connection
  opens), so here the fault is at the start of the send;
- one ExpiredProviderToken under APNs' 20-minute rule: ``expire_token_once_after`` armed at
  the fault moment, ``token_update_min_interval=1200`` (a new token on a connection that
  has one is 429 TooManyProviderTokenUpdates);
- APNs unreachable: a closed port on 127.0.0.1, 1,000 pushes unpaced, ``unavailable_timeout``
  default (30 s; ``--quick``: 3 s): seconds until all have a result.

The mock faults are healed (back to normal) the moment the relay accepts the client's next
connection, before its TLS handshake, so the replacement connections are clean.

Definitions (times on trio's clock, from the fault):

- seconds (ideal): first push to last result, against the schedule: the client's token
  bucket starts full (``burst = rate``: one second banked), so the ideal is
  (--n - --rate) / --rate, 7 s for 8,000 at 1,000/s;
- recovery: to the first ``delivered`` result that arrived after the first replacement
  connection (opened by the client after the fault) was ready; ``-`` when none opened;
- longest gap: the longest time without any result, from the fault to the last result;
- duplicates: tokens the mock answered 200 more than once; flagged: every one of them has
  ``resent=True`` in its result (at-least-once delivery must say so);
- detail (second table): when the first connection was retired and why, when the first
  replacement was ready, connections opened.

Expectation from the liveness rules (fanout/connection.py): a dead connection is known
within min(2 s, timeout/2) + ping_timeout (7 s by default: the PING goes out stall_after
after the last frame received), a wedged one (PINGs answered, nothing else) at its oldest
stream's deadline (timeout, 10 s); a recovery far beyond
timeout + ping_timeout would be an engine bug. One process, not pinned; 127.0.0.1 only;
every fault is bounded by ``trio.fail_after``.

    python bench/faults.py            # 8,000 pushes at 1,000/s per fault, ~2.7 minutes
    python bench/faults.py --quick    # 3,000 at 1,000/s, timeout 2 s, ping_timeout 1 s
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trio  # noqa: E402
from common import PAYLOAD, TOPIC, machine, make_keys, now, write_results  # noqa: E402

from fanout.auth import TokenAuth  # noqa: E402
from fanout.client import Client  # noqa: E402
from fanout.events import Events  # noqa: E402
from fanout.testing.mock import MockConfig, open_mock  # noqa: E402
from fanout.testing.nginx import free_port  # noqa: E402
from tests.relay import open_relay  # noqa: E402

# (label, kind, relay mode)
FAULTS: list[tuple[str, str, str | None]] = [
    ("relay blackhole", "relay", "blackhole"),
    ("relay blackhole_up", "relay", "blackhole_up"),
    ("relay blackhole_down", "relay", "blackhole_down"),
    ("relay stop_reading", "relay", "stop_reading"),
    ("relay drip (1 B/s down)", "relay", "drip"),
    ("mock silent, PINGs answered", "silent", None),
    ("mock stops reading, PINGs", "mock_stop_reading", None),
    ("mock zero window (from start)", "zero_window", None),
    ("one ExpiredProviderToken, 20-min rule", "expired", None),
    ("APNs unreachable (closed port)", "unreachable", None),
]
UNREACHABLE_N = 1000


class Watch(Events):
    """Connection events on trio's clock."""

    def __init__(self) -> None:
        self.opened: list[float] = []
        self.retired: list[tuple[float, str]] = []
        self.failed = 0

    def connection_opened(self, conn: Any) -> None:
        self.opened.append(trio.current_time())

    def connection_retired(self, conn: Any, why: str) -> None:
        self.retired.append((trio.current_time(), str(why)))

    def connection_failed(self, index: int, exc: BaseException) -> None:
        self.failed += 1


def summarize(results: list, times: list[float], t0: float, fault_at: float | None,
              watch: Watch, delivered_at_mock: Counter | None) -> dict:
    """The figures of one run (see the module docstring for the definitions)."""
    end = times[-1] if times else trio.current_time()
    out: dict[str, Any] = {
        "results": len(results),
        "seconds": round(end - t0, 3),
        "outcomes": dict(Counter(str(r.outcome) for r in results).most_common()),
        "resent": sum(1 for r in results if r.resent),
        "max_attempts": max((r.attempts for r in results), default=0),
        "connections_opened": len(watch.opened),
        "connect_failures": watch.failed,
    }
    if fault_at is not None:
        out["fault_at_s"] = round(fault_at - t0, 3)
        points = [fault_at] + [t for t in times if t >= fault_at]
        gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
        if gaps:
            i = max(range(len(gaps)), key=gaps.__getitem__)
            out["longest_gap_s"] = round(gaps[i], 3)
            out["longest_gap_from_s"] = round(points[i] - fault_at, 3)
        replacements = [t for t in watch.opened if t > fault_at]
        out["replacement_ready_s"] = round(replacements[0] - fault_at, 3) if replacements \
            else None
        retired = [(t, why) for t, why in watch.retired if t >= fault_at]
        out["first_retired_s"] = round(retired[0][0] - fault_at, 3) if retired else None
        out["retired_why"] = dict(Counter(why.split(":")[0][:60] for _, why in retired))
        recovery = None
        if replacements:
            after = [t for t, r in zip(times, results, strict=True)
                     if t >= replacements[0] and str(r.outcome) == "delivered"]
            recovery = round(after[0] - fault_at, 3) if after else None
        out["recovery_s"] = recovery
    if delivered_at_mock is not None:
        twice = {t for t, n in delivered_at_mock.items() if n > 1}
        flagged = {r.token for r in results if r.resent}
        out["duplicates"] = len(twice)
        out["duplicates_flagged"] = twice <= flagged
        out["duplicates_unflagged"] = len(twice - flagged)
    return out


async def run_fault(label: str, kind: str, mode: str | None, index: int, args, pki,
                    key) -> dict:
    """One fault against a fresh mock, relay and client."""
    auth = TokenAuth.from_file(key.path, key.key_id, key.team_id)
    watch = Watch()
    clocks = {"timeout": args.timeout, "ping_timeout": args.ping_timeout}
    if kind == "unreachable":
        port = free_port()  # bound and closed again: nothing listens there
        toks = [f"{index:02x}{i:062x}" for i in range(UNREACHABLE_N)]
        bound = args.unavailable_timeout + 2 * 10.0 + 30
        results: list = []
        times: list[float] = []
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file), connections=2,
                          unavailable_timeout=args.unavailable_timeout, events=watch,
                          **clocks) as client:
            t0 = trio.current_time()
            try:
                with trio.fail_after(bound):
                    async for r in client.fan_out(PAYLOAD, toks):
                        results.append(r)
                        times.append(trio.current_time())
                timed_out = False
            except trio.TooSlowError:
                timed_out = True
        res = summarize(results, times, t0, t0, watch, None)
        res.update(pushes=UNREACHABLE_N, ideal_s=args.unavailable_timeout, timed_out=timed_out,
                   errors=dict(Counter((r.error or "")[:90] for r in results).most_common(3)))
        res["recovery_s"] = None
        return res

    cfg = MockConfig(keys={key.key_id: key.public_key}, team_id=key.team_id,
                     latency=args.latency)
    if kind == "mock_stop_reading":
        cfg.server_ping_interval = 1.0
    elif kind == "zero_window":
        cfg.initial_window_size = 0
    elif kind == "expired":
        cfg.token_update_min_interval = 1200.0
    toks = [f"{index:02x}{i:062x}" for i in range(args.n)]
    ideal = max(0.0, args.n - args.rate) / args.rate  # the bucket starts with rate tokens
    bound = ideal + 2 * (args.timeout + args.ping_timeout) + 20
    results = []
    times = []
    state: dict[str, Any] = {"fault_at": None, "accepted_at_fault": None, "healed_at": None,
                             "results_at_fault": None}
    async with trio.open_nursery() as nursery:
        mock = await open_mock(nursery, cfg, pki)
        relay = await open_relay(nursery, mock.port, drip_interval=1.0)

        def heal() -> None:
            cfg.never_answer = 0.0
            cfg.stop_reading_after = None
            cfg.initial_window_size = None
            state["healed_at"] = trio.current_time()

        async def heal_on_next_connection() -> None:
            """The mock faults apply to the connections open at the fault: heal them the
            moment the relay accepts the next one (before its TLS handshake)."""
            await relay.wait_until(lambda: state["accepted_at_fault"] is not None
                                   and relay.accepted > state["accepted_at_fault"])
            heal()

        def inject() -> None:
            state["fault_at"] = trio.current_time()
            state["results_at_fault"] = len(results)
            state["accepted_at_fault"] = relay.accepted
            if kind == "relay":
                relay.fault(mode)  # type: ignore[arg-type]
            elif kind == "silent":
                cfg.never_answer = 1.0
            elif kind == "mock_stop_reading":
                cfg.stop_reading_after = 1  # every open connection stops at its next request
            elif kind == "expired":
                cfg.expire_token_once_after = mock.stats.by_status[200]  # the next request

        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=relay.port,
                          ca_file=str(pki.ca_file), connections=2, rate=args.rate,
                          events=watch, **clocks) as client:
            with trio.move_on_after(10):
                while len(client.pool.conns) < 2:
                    await trio.sleep(0.01)
            if kind in ("silent", "mock_stop_reading", "zero_window"):
                nursery.start_soon(heal_on_next_connection)
            t0 = trio.current_time()
            if kind == "zero_window":
                inject()  # the window is shut since the connections opened
            else:
                async def fault_timer() -> None:
                    await trio.sleep_until(t0 + args.fault_at)
                    inject()

                nursery.start_soon(fault_timer)
            timed_out = False
            try:
                with trio.fail_after(bound):
                    async for r in client.fan_out(PAYLOAD, toks):
                        results.append(r)
                        times.append(trio.current_time())
            except trio.TooSlowError:
                timed_out = True
            pool_opened = client.pool.opened
        relay.close_connections()
        nursery.cancel_scope.cancel()
    res = summarize(results, times, t0, state["fault_at"], watch, mock.stats.delivered)
    res.update(pushes=args.n, ideal_s=round(ideal, 3), timed_out=timed_out,
               pool_opened=pool_opened, mock_connections=mock.stats.connections,
               mock_requests=mock.stats.requests,
               mock_reasons=dict(mock.stats.by_reason),
               mock_never_answered=mock.stats.never_answered,
               mock_stopped_reading=mock.stats.stopped_reading,
               mock_server_pings=mock.stats.server_pings,
               mock_protocol_errors=len(mock.stats.protocol_errors),
               relay_accepted=relay.accepted, results_at_fault=state["results_at_fault"],
               healed_after_s=None if state["healed_at"] is None or state["fault_at"] is None
               else round(state["healed_at"] - state["fault_at"], 3))
    if len(results) != args.n:
        res["missing_results"] = args.n - len(results)
    return res


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8000, help="pushes per fault")
    ap.add_argument("--rate", type=float, default=1000.0, help="pushes/s (Client rate=)")
    ap.add_argument("--fault-at", type=float, default=1.0, help="seconds into the send")
    ap.add_argument("--latency", type=float, default=0.02, help="mock seconds per stream")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--ping-timeout", type=float, default=5.0)
    ap.add_argument("--unavailable-timeout", type=float, default=30.0)
    ap.add_argument("--only", help="comma-separated kinds or relay modes to run")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    # the engine warns on every failed connect (the unreachable case): the table says it
    logging.getLogger("fanout").setLevel(logging.ERROR)
    if args.quick:
        args.n, args.timeout, args.ping_timeout, args.unavailable_timeout = 3000, 2.0, 1.0, 3.0
    faults = FAULTS
    if args.only:
        wanted = set(args.only.split(","))
        faults = [f for f in FAULTS if f[1] in wanted or f[2] in wanted]

    report: dict = {"machine": machine(), "when": now(), "n": args.n, "rate": args.rate,
                    "fault_at_s": args.fault_at, "latency_ms": args.latency * 1000,
                    "timeout": args.timeout, "ping_timeout": args.ping_timeout,
                    "unavailable_timeout": args.unavailable_timeout, "faults": {}}
    with tempfile.TemporaryDirectory(prefix="fanout-faults-") as tmp:
        pki, key = make_keys(Path(tmp))
        for index, (label, kind, mode) in enumerate(faults):
            res = trio.run(run_fault, label, kind, mode, index, args, pki, key)
            report["faults"][label] = res
            print(f"{label:40s} {res['seconds']:6.2f} s  recovery {fmt(res.get('recovery_s'))}"
                  f"  gap {fmt(res.get('longest_gap_s'))}  {res['outcomes']}"
                  f"  resent {res['resent']}  dup {res.get('duplicates', '-')}"
                  f"{'  TIMED OUT' if res['timed_out'] else ''}", file=sys.stderr, flush=True)

    lines = [f"Faults: per fault a fresh mock (in process, JWT verified, {args.latency * 1000:g} "
             f"ms per stream) behind the fault relay, one Client(connections=2, timeout="
             f"{args.timeout:g}, ping_timeout={args.ping_timeout:g}), a paced fan-out of "
             f"{args.n:,} distinct tokens at {args.rate:,.0f}/s, the fault injected "
             f"{args.fault_at:g} s into the send on the connections open then; "
             f"{report['when']}.", "",
             "| fault | pushes | seconds (ideal) | recovery s | longest gap s | outcomes | "
             "resent | duplicates (all flagged?) | max attempts |",
             "|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for label, r in report["faults"].items():
        outcomes = ", ".join(f"{k} {v:,}" for k, v in r["outcomes"].items()) or "none"
        if r.get("missing_results"):
            outcomes += f" (MISSING {r['missing_results']:,})"
        if r["timed_out"]:
            outcomes += " (TIMED OUT)"
        dup = "-" if "duplicates" not in r else \
            f"{r['duplicates']:,} ({'yes' if r['duplicates_flagged'] else 'NO'})"
        lines.append(f"| {label} | {r['pushes']:,} | {r['seconds']:.2f} ({r['ideal_s']:g}) | "
                     f"{fmt(r.get('recovery_s'))} | {fmt(r.get('longest_gap_s'))} | {outcomes} | "
                     f"{r['resent']:,} | {dup} | {r['max_attempts']} |")
    lines += ["", "| fault | first retired s | why | replacement ready s | connections opened |",
              "|---|---:|---|---:|---:|"]
    for label, r in report["faults"].items():
        why = ", ".join(f"{k} x{v}" for k, v in r.get("retired_why", {}).items()) or "-"
        lines.append(f"| {label} | {fmt(r.get('first_retired_s'))} | {why} | "
                     f"{fmt(r.get('replacement_ready_s'))} | {r['connections_opened']} |")
    dead = min(2.0, args.timeout / 2) + args.ping_timeout
    lines += ["",
              f"- Times from the fault. Recovery: to the first delivered result after the first "
              f"replacement connection was ready. Longest gap: without any result, from the "
              f"fault on. The liveness rules predict a dead connection known within "
              f"{dead:g} s (stall {min(2.0, args.timeout / 2):g} s + ping_timeout), a wedged "
              f"one at its stream deadline ({args.timeout:g} s).",
              "- Ideal: the token bucket starts full (one second of pushes banked), then "
              "the rate: (pushes - rate) / rate. "
              "Seconds against the ideal: the paced feeder takes its rate token, then waits "
              "for a free stream slot, so once both connections' slots are full the schedule "
              "stops and slips by the rest of the stall (it does not catch up afterwards).",
              "- Zero window: the fault is from the start (the window is read when a "
              "connection opens), so its times are from the first push. Unreachable: "
              f"{UNREACHABLE_N:,} pushes unpaced to a closed port; ideal = unavailable_timeout "
              f"({args.unavailable_timeout:g} s)."]
    write_results("faults", report, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
