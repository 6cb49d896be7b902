"""Soak: ``fanout run --follow`` for --minutes at a steady rate, a fault every minute.

The daemon (the real executable, a subprocess) tails an NDJSON file this script appends
to at --rate lines/s; the fanout mock runs in this process and misbehaves for the first
half of every minute, a different fault each time, in turn: GOAWAY with a low
last-stream-id, abrupt closes, a 429 storm, 500/503 bursts, a server 1.5 s slow, streams
never answered (the daemon's 2 s deadline resets them), 5% bad and 2% unregistered
tokens, and the server killed and restarted on the same port; and faults of the daemon's
own host: the reader of its results (a FIFO this script reads) stops reading for 20 s,
the daemon is killed with SIGKILL and started again (as a service manager would), the
input file is rotated (moved away, a new file at its path). Every few seconds it
samples the daemon's RSS and open file descriptors (/proc) and its trio task count (from
the daemon's JSON status line).

At the end the input stops, the daemon is given time to finish and then SIGTERM; every
line must have a result (pushes lost: lines without one, must be 0). Reports outcome
counts, resends, the samples, and a plot of RSS, fds and tasks over time with the fault
windows shaded (bench/results/soak.png when matplotlib is installed).

    python bench/soak.py                 # 30 minutes at 300 lines/s
    python bench/soak.py --quick         # 3 minutes (every fault once in 8 min: not all)
    python bench/soak.py --minutes 10 --rate 500
    python bench/soak.py --quick --faults results,daemon,input   # the host's faults

127.0.0.1 only; bounded by --minutes (plus at most --finish-timeout to finish).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, now, rss_mb, write_results  # noqa: E402

PAYLOAD = {"aps": {"alert": {"title": "soak", "body": "x" * 40}}}
TOPIC = "com.example.soak"


def _set(**values):
    def apply(config) -> None:
        for k, v in values.items():
            setattr(config, k, v)
    return apply


# (name, apply to the mock's config, undo); "restart" is handled by the server loop
FAULTS = [
    ("goaway", _set(goaway_after=300, goaway_last_stream_low=True),
     _set(goaway_after=None, goaway_last_stream_low=False)),
    ("abrupt close", _set(close_after=400), _set(close_after=None)),
    ("429 storm", _set(p429=0.3), _set(p429=0.0)),
    ("5xx burst", _set(p500=0.1, p503=0.1), _set(p500=0.0, p503=0.0)),
    ("slow 1.5 s", _set(latency=1.5), _set(latency=0.0)),
    ("never answered 2%", _set(never_answer=0.02), _set(never_answer=0.0)),
    ("bad tokens 5% + 2% unregistered", _set(bad_token_fraction=0.05,
                                            unregistered_fraction=0.02),
     _set(bad_token_fraction=0.0, unregistered_fraction=0.0)),
    ("server restart", None, None),
    ("results reader stalls 20 s", None, None),
    ("daemon kill -9, restarted", None, None),
    ("input rotated", None, None),
]
HOST_FAULTS = {"results reader stalls 20 s", "daemon kill -9, restarted", "input rotated"}


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def soak(args: argparse.Namespace, tmp: Path) -> dict:
    import trio

    from fanout.testing.devcerts import make_pki, make_signing_key
    from fanout.testing.mock import MockAPNs, MockConfig

    pki, key = make_pki(tmp), make_signing_key(tmp)
    config = MockConfig(keys={key.key_id: key.public_key}, team_id=key.team_id, seed=11)
    inp, out, fifo = tmp / "in.ndjson", tmp / "results.ndjson", tmp / "results.fifo"
    inp.write_bytes(b"")
    os.mkfifo(fifo)
    # the reader end, and a write end held open so the reader never sees EOF while the
    # daemon is being restarted
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    hold = os.open(fifo, os.O_WRONLY)
    state = {"lines": 0, "fault": None, "tasks": None, "restarts": 0, "rotations": 0}
    reading = trio.Event()
    reading.set()
    host = {"stall": reading, "kill": trio.Event(), "rotate": trio.Event()}
    samples: list[dict] = []
    windows: list[dict] = []
    mocks: list[MockAPNs] = []
    port_box: list[int] = []
    restart = trio.Event()

    async def server(task_status=trio.TASK_STATUS_IGNORED) -> None:
        nonlocal restart
        port = 0
        while True:
            mock = MockAPNs(config, pki)
            mocks.append(mock)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(mock.serve, "127.0.0.1", port)
                if not port_box:
                    port_box.append(port)
                    task_status.started(port)
                await restart.wait()
                restart = trio.Event()
                nursery.cancel_scope.cancel()  # the server dies with its connections
            await trio.sleep(3.0)               # down for 3 s, then back on the same port

    async def feed(deadline: float) -> None:
        fh = open(inp, "ab", buffering=0)  # noqa: SIM115 - reopened on rotation
        try:
            t0 = trio.current_time()
            while trio.current_time() < deadline:
                if host["rotate"].is_set():  # what logrotate does: move, new file
                    host["rotate"] = trio.Event()
                    fh.close()
                    state["rotations"] += 1
                    inp.rename(inp.with_name(f"in.ndjson.{state['rotations']}"))
                    fh = open(inp, "ab", buffering=0)  # noqa: SIM115
                due = int((trio.current_time() - t0) * args.rate)
                batch = []
                while state["lines"] < due:
                    i = state["lines"]
                    batch.append(json.dumps({"id": i, "token": f"{i:064x}",
                                             "payload": PAYLOAD}).encode() + b"\n")
                    state["lines"] += 1
                if batch:
                    fh.write(b"".join(batch))
                await trio.sleep(0.05)
        finally:
            fh.close()

    async def consume(task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The results' reader: copies the FIFO into the results file; stops reading while
        the stall fault is on."""
        stream = trio.lowlevel.FdStream(rfd)
        task_status.started()
        with open(out, "ab") as fh:
            while True:
                await host["stall"].wait()
                data = await stream.receive_some(65536)
                if not data:
                    return
                fh.write(data)
                fh.flush()

    async def faults(deadline: float) -> None:
        t0 = trio.current_time()
        k = 0
        while trio.current_time() + 60 <= deadline + 1:
            name, apply, undo = args.rotation[k % len(args.rotation)]
            start = trio.current_time() - t0
            state["fault"] = name
            if name == "server restart":
                restart.set()
            elif name == "results reader stalls 20 s":
                host["stall"] = trio.Event()
            elif name == "daemon kill -9, restarted":
                host["kill"].set()
            elif name == "input rotated":
                host["rotate"].set()
            else:
                apply(config)
            await trio.sleep(20 if name in HOST_FAULTS else 30)
            if name == "results reader stalls 20 s":
                host["stall"].set()
            if undo is not None:
                undo(config)
            state["fault"] = None
            windows.append({"fault": name, "start_s": round(start, 1),
                            "end_s": round(trio.current_time() - t0, 1)})
            print(f"[{start / 60:5.1f} min] {name}: done; {state['lines']:,} lines so far",
                  file=sys.stderr, flush=True)
            k += 1
            await trio.sleep(30)

    async def read_status(stream) -> None:
        buf = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"{"):
                    try:
                        status = json.loads(line)
                    except ValueError:
                        continue
                    if "tasks" in status:
                        state["tasks"] = status["tasks"]
                elif b"Traceback" in line or b"error" in line.lower():
                    print("daemon:", line.decode(errors="replace")[:300], file=sys.stderr)

    procs: list = []

    async def _killer(proc) -> None:
        await host["kill"].wait()
        host["kill"] = trio.Event()
        proc.kill()

    async def daemon(cmd: list[str], finishing: trio.Event,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the daemon; after a kill -9 start it again, as systemd would."""
        while True:
            proc = await trio.lowlevel.open_process(cmd, cwd=ROOT, stderr=subprocess.PIPE)
            procs.append(proc)
            async with trio.open_nursery() as inner:
                inner.start_soon(read_status, proc.stderr)
                if len(procs) == 1:
                    task_status.started()

                inner.start_soon(_killer, proc)
                await proc.wait()
                inner.cancel_scope.cancel()
            if finishing.is_set():
                return
            state["restarts"] += 1

    async with trio.open_nursery() as nursery:
        port = await nursery.start(server)
        await nursery.start(consume)
        finishing = trio.Event()
        cmd = [sys.executable, "-m", "fanout", "run", str(inp), "--follow", "--results",
               str(fifo), "--host", "127.0.0.1", "--port", str(port), "--ca-file",
               str(pki.ca_file), "--key-path", str(key.path), "--key-id", key.key_id,
               "--team-id", key.team_id, "--topic", TOPIC, "--timeout", "2",
               "--max-attempts", "30", "--log-format", "json", "--status-interval", "2"]
        await nursery.start(daemon, cmd, finishing)
        t0 = trio.current_time()
        deadline = t0 + args.minutes * 60
        nursery.start_soon(feed, deadline)
        nursery.start_soon(faults, deadline)
        while trio.current_time() < deadline:
            await trio.sleep(args.sample_every)
            pid = procs[-1].pid
            samples.append({"t": round(trio.current_time() - t0, 1),
                            "lines": state["lines"], "fault": state["fault"],
                            "rss_mb": rss_mb(pid) or None, "fds": proc_fds(pid),
                            "tasks": state["tasks"]})
        # the input stops; let the daemon finish what it has, then stop it
        expected = state["lines"]
        finish_by = trio.current_time() + args.finish_timeout
        while trio.current_time() < finish_by:
            if len(_done(out)) >= expected:
                break
            await trio.sleep(1)
        finishing.set()
        proc = procs[-1]
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(60):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(hold)  # the reader sees EOF once the daemon's end is closed too
        with trio.move_on_after(10):
            while procs[-1].returncode is None:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

    results = [json.loads(x) for x in out.read_bytes().splitlines() if x.strip()]
    per_line = Counter(r["id"] for r in results)  # the input's lines are ids 0, 1, ...
    lost = [n for n in range(expected) if n not in per_line]
    delivered_tokens = set()
    for m in mocks:
        delivered_tokens |= set(m.stats.delivered)
    outcomes = Counter(r["outcome"] for r in results)
    false_delivered = sum(1 for r in results if r["outcome"] == "delivered"
                          and r["token"] not in delivered_tokens)
    return {"lines": expected, "results": len(results), "lost": len(lost),
            "lost_first": lost[:20], "duplicated_lines": sum(1 for c in per_line.values() if c > 1),
            "resent_marked": sum(1 for r in results if r.get("resent")),
            "delivered_not_seen_by_mock": false_delivered,
            "outcomes": dict(outcomes), "daemon_exit": proc.returncode,
            "mock_restarts": len(mocks) - 1, "daemon_restarts": state["restarts"],
            "input_rotations": state["rotations"], "windows": windows, "samples": samples}


def _done(out: Path) -> set:
    with open(out, "rb") as fh:
        return {json.loads(x)["id"] for x in fh if x.strip()}


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = report["samples"]
    t = [x["t"] / 60 for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    for ax, key, label in zip(axes, ("rss_mb", "fds", "tasks"),
                              ("daemon RSS (MB)", "open fds", "trio tasks"), strict=True):
        ax.plot(t, [x[key] for x in s], lw=1)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        for w in report["windows"]:
            ax.axvspan(w["start_s"] / 60, w["end_s"] / 60, color="orange", alpha=0.15)
    axes[-1].set_xlabel("minutes (shaded: a fault is on)")
    axes[0].set_title(f"fanout run --follow, {report['rate']} lines/s, a fault every minute: "
                      f"{report['lines']:,} lines, {report['lost']} lost")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=300, help="input lines per second")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--finish-timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--faults", help="comma-separated name prefixes: only these faults, in "
                                     "this order (default: all, in turn)")
    args = ap.parse_args()
    args.rotation = FAULTS
    if args.faults:
        want = [w.strip().lower() for w in args.faults.split(",")]
        args.rotation = [f for w in want for f in FAULTS if f[0].startswith(w)]
        if len(args.rotation) != len(want):
            ap.error(f"--faults: not every name matches one of {[f[0] for f in FAULTS]}")
    if args.quick:
        args.minutes, args.sample_every = 3.0, 2.0

    import trio

    with tempfile.TemporaryDirectory(prefix="fanout-soak-") as tmp:
        report = trio.run(soak, args, Path(tmp))
    report |= {"minutes": args.minutes, "rate": args.rate, "machine": machine(), "when": now()}
    s = [x for x in report["samples"] if x["rss_mb"] is not None]
    first = s[: max(1, len(s) // 10)]
    last = s[-max(1, len(s) // 10):]

    def med(rows: list[dict], key: str) -> float | None:
        vals = [x[key] for x in rows if x[key] is not None]
        return round(statistics.median(vals), 1) if vals else None

    summary = {k: {"first_10pct": med(first, k), "last_10pct": med(last, k),
                   "max": max((round(x[k], 1) for x in s if x[k] is not None), default=None)}
               for k in ("rss_mb", "fds", "tasks")}
    report["summary"] = summary
    lines = [f"Soak: `fanout run --follow` for {args.minutes:g} min at {args.rate} lines/s "
             f"against the mock, a fault for the first 30 s of every minute "
             f"({', '.join(w['fault'] for w in report['windows'][:len(args.rotation)])}); "
             f"{report['when']}.", "",
             f"- Lines {report['lines']:,}, results {report['results']:,}, "
             f"**pushes lost: {report['lost']}** (lines without a result); lines with more "
             f"than one result {report['duplicated_lines']} ({report['resent_marked']} "
             f"marked resent); results `delivered` the mock never delivered: "
             f"{report['delivered_not_seen_by_mock']}; daemon exit {report['daemon_exit']}; "
             f"mock restarts {report['mock_restarts']}, daemon restarts after kill -9 "
             f"{report['daemon_restarts']}, input rotations {report['input_rotations']}.",
             f"- Outcomes: {', '.join(f'{k} {v:,}' for k, v in sorted(report['outcomes'].items()))}.",
             "", "| | first 10% (median) | last 10% (median) | max |", "|---|---:|---:|---:|"]
    for k, label in (("rss_mb", "daemon RSS MB"), ("fds", "open fds"), ("tasks", "trio tasks")):
        v = summary[k]
        lines.append(f"| {label} | {v['first_10pct']} | {v['last_10pct']} | {v['max']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.faults and plot(report, RESULTS / "soak.png"):
        lines += ["", "![soak](soak.png)"]
    # a chosen set of faults is reported apart from the full rotation's figures
    write_results("soak" if not args.faults else "soak-host" if all(
        f[0] in HOST_FAULTS for f in args.rotation) else "soak-some", report, lines)
    print("\n".join(lines))
    if report["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
