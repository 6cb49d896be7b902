"""The front door (``fanout serve``) against the library: CPU per push and added latency.

One run starts Debian's nginx as the APNs stand-in (``--server mock``: the fanout mock,
accept-all) pinned to core 0, and one ``fanout serve`` process pinned to core 1 (the
engine inside it, 2 connections as the library), warmed up and kept for the whole run.
Then, interleaved over rounds with the order rotated each round:

* ``library``: a trio process on core 1, ``fanout.Client.send_many`` of N
  ``Notification`` objects (one token and one payload each, as an NDJSON line holds), the
  baseline; its CPU per push;
* ``serve-ndjson``: N pushes, one JSON line each, streamed as a chunked HTTP/1.1 body to
  ``POST /v1/pushes`` while the NDJSON results are read as they come; the front door's cost
  is the CPU of the serve process (HTTP, JSON, the engine) per push;
* ``serve-single``: K ``POST /v1/push`` requests, one push each, over 64 keep-alive
  HTTP/1.1 connections (64 in flight); the serve process's CPU per push.

The HTTP clients run on core 0, beside nginx (which takes 10-20% of it): the serve process
then has core 1 to itself as the library process has, so their CPU per push compares like
with like, and the client's own work never steals from what is measured. The HTTP clients
are minimal (raw sockets and ``selectors``, request bytes formatted, responses counted),
for three reasons measured here: httpx sends a whole request body before it reads the
response (no streaming both ways); its HTTP/1.1 pool used ~5 ms of client CPU per request
with 64 in flight on trio (the client, not the server, set the pace); and over h2c
hypercorn's GOAWAY after 1,000 requests per connection (``keep_alive_max_requests``) fails
httpx's request 1,001. Both sides' CPU is read from /proc over the client's measured
window; the serve process's is also checked idle during ``library`` runs.

Then the latency added at 50% load: R is the library's pushes/s from the rounds; single
pushes are sent open loop at R/2 on a 1 ms grid, through the library (``Client.send`` per
push, one task each, ``gc.freeze()`` once connected as the README recommends) and through
serve (``POST /v1/push``, 64 connections); latency runs from a push's slot in the schedule
to its result (queueing in the client counts). If serve-single's own maximum S is below
R/2, serve is saturated there, so both are also measured at S/2 (the front door's 50%).
The first second of each schedule is left out.

    python bench/serve.py                 # 5 rounds: 60,000 pushes (library, NDJSON),
                                          # 20,000 single requests; latency 5 s per level,
                                          # 3 passes (~4 min on 2 cores)
    python bench/serve.py --quick         # 1 round: 4,000 / 2,000; latency 2 s
    python bench/serve.py --server mock   # the fanout mock as the sink instead of nginx

Target (issue 17): serve-ndjson's serve CPU per push <= 1.5 x the library's (paired per
round, then medianed). serve-single is reported, with no target. 127.0.0.1 only; every
loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAYLOAD,
    ROOT,
    TOPIC,
    children,
    machine,
    make_keys,
    median_of,
    now,
    paired_ratio,
    percentile,
    pin,
    proc_cpu,
    rss_mb,
    run_json,
    start_sink,
    stop,
    summarize_by,
    table_head,
    verdict,
    write_results,
)

CANDIDATES = ["library", "serve-ndjson", "serve-single"]
NDJSON_TARGET = 1.5
CONNECTIONS = 2          # engine connections to the sink, library and serve alike
HTTP_CONNECTIONS = 64    # serve-single: keep-alive connections, one request in flight each
LINES_PER_CHUNK = 256    # serve-ndjson: NDJSON lines per HTTP chunk (~30 KB)
SKIP_SECONDS = 1.0       # latency: the first second of each schedule is left out
GRID = 0.001             # paced senders wake at most every millisecond
PAYLOAD_JSON = json.dumps(PAYLOAD, separators=(",", ":"))
DELIVERED = b'"outcome":"delivered"'


# ----------------------------------------------------------------------------- workers

def _push_json(i: int) -> bytes:
    return b'{"token":"%064x","payload":%s}' % (i, PAYLOAD_JSON.encode())


def _pct(values: list[float]) -> dict[str, float]:
    values.sort()
    if not values:
        return {}
    return {"p50": round(percentile(values, 0.50) or 0, 3),
            "p90": round(percentile(values, 0.90) or 0, 3),
            "p99": round(percentile(values, 0.99) or 0, 3), "max": round(values[-1], 3)}


def _client(args: argparse.Namespace) -> Any:
    from fanout import Client
    from fanout.auth import TokenAuth

    auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
    return Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=args.port,
                  ca_file=args.ca, connections=CONNECTIONS)


def worker_library(args: argparse.Namespace) -> dict[str, Any]:
    """``send_many`` of N notifications, each its own token and payload; the process's
    CPU over the fan-out."""
    import trio

    from fanout.payload import Notification

    n = args.count

    async def main() -> dict[str, Any]:
        async with _client(args) as client:
            await client.send(Notification(token="00" * 32, payload=PAYLOAD))
            ok = done = 0
            t0, c0 = time.perf_counter(), time.process_time()
            with trio.fail_after(args.timeout):
                async for r in client.send_many(
                        Notification(token=f"{i:064x}", payload=PAYLOAD) for i in range(n)):
                    ok += r.outcome == "delivered"
                    done += 1
            return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                    "ok": ok, "done": done}

    return trio.run(main)


def worker_library_paced(args: argparse.Namespace) -> dict[str, Any]:
    """Open loop: push i is due at t0 + i / rate and sent by its own ``Client.send`` task;
    its latency runs from that slot to its result."""
    import gc

    import trio

    from fanout.payload import Notification

    n, rate = args.count, args.rate
    skip = min(int(rate * SKIP_SECONDS), n // 4)  # a short (saturated) run: its first quarter
    latencies: list[float] = []
    counts = {"ok": 0, "done": 0}

    async def main() -> dict[str, Any]:
        async with _client(args) as client, trio.open_nursery() as nursery:
            await client.send(Notification(token="00" * 32, payload=PAYLOAD))
            gc.collect()
            gc.freeze()

            async def one(i: int, slot: float) -> None:
                r = await client.send(Notification(token=f"{i:064x}", payload=PAYLOAD))
                counts["ok"] += r.outcome == "delivered"
                counts["done"] += 1
                if i >= skip:
                    latencies.append((trio.current_time() - slot) * 1000)

            t0 = trio.current_time() + 0.01
            c0 = time.process_time()
            i = 0
            with trio.fail_after(args.timeout):
                while i < n:
                    due = min(n, int((trio.current_time() - t0) * rate) + 1)
                    while i < due:
                        nursery.start_soon(one, i, t0 + i / rate)
                        i += 1
                    await trio.sleep_until(max(t0 + i / rate, trio.current_time() + GRID))
                while counts["done"] < n:
                    await trio.sleep(GRID)
            seconds = trio.current_time() - t0
            return {"seconds": seconds, "cpu": time.process_time() - c0, **counts,
                    "achieved_per_s": round(n / seconds), "e2e_ms": _pct(latencies)}

    return trio.run(main)


class _Response:
    """An HTTP/1.1 response read from a buffer: content-length or chunked bodies."""

    @staticmethod
    def parse(buf: bytearray) -> tuple[int, int, bytes, bool] | None:
        """(bytes used, status, body, connection closes) or None while incomplete."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        close = b"\r\nconnection: close" in head
        pos = end + 4
        if b"\r\ntransfer-encoding: chunked" not in head:
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                length = int(head[at + 17:].split(b"\r\n", 1)[0])
            if len(buf) < pos + length:
                return None
            return pos + length, status, bytes(buf[pos:pos + length]), close
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(buf[pos:eol].split(b";")[0], 16)
            if len(buf) < eol + 2 + size + 2:
                return None
            if size == 0:
                return eol + 4, status, bytes(body), close
            body += buf[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def worker_stream(args: argparse.Namespace) -> dict[str, Any]:
    """N pushes as a chunked NDJSON body to POST /v1/pushes, written while the results
    are read (one thread, ``selectors``)."""
    n = args.count

    def body() -> Iterator[bytes]:
        for start in range(0, n, LINES_PER_CHUNK):
            data = b"\n".join(_push_json(i) for i in range(start, min(n, start + LINES_PER_CHUNK)))
            data += b"\n"
            yield b"%x\r\n%s\r\n" % (len(data), data)
        yield b"0\r\n\r\n"

    sock = _connect(args.port)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    chunks = body()
    pending = memoryview(b"POST /v1/pushes HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: "
                         b"application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n" +
                         next(chunks))
    writing = True
    buf = bytearray()
    head: bytes | None = None
    lines = ok = errors = 0
    tail = b""
    pos = 0
    finished = False
    s0, c0, t0 = proc_cpu([args.serve_pid]), time.process_time(), time.perf_counter()
    deadline = t0 + args.timeout
    while not finished:
        if time.perf_counter() > deadline:
            raise SystemExit(f"no end within {args.timeout:g} s: {lines} results")
        for _, events in sel.select(1.0):
            if events & selectors.EVENT_WRITE and writing:
                try:
                    sent = sock.send(pending)
                except BlockingIOError:
                    sent = 0
                pending = pending[sent:]
                if not pending:
                    more = next(chunks, None)
                    if more is None:
                        writing = False
                        sel.modify(sock, selectors.EVENT_READ)
                    else:
                        pending = memoryview(more)
            if events & selectors.EVENT_READ:
                data = sock.recv(1 << 18)
                if not data:
                    raise SystemExit(f"the server closed the stream after {lines} results")
                buf += data
                if head is None:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    head = bytes(buf[:end])
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise SystemExit(f"answer {head[:40]!r}")
                    pos = end + 4
                # the chunked body, chunk by chunk; result lines counted as they come
                while True:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    size = int(buf[pos:eol], 16)
                    if len(buf) < eol + 4 + size:
                        break
                    if size == 0:
                        finished = True
                        break
                    chunk = tail + bytes(buf[eol + 2:eol + 2 + size])
                    *whole, tail = chunk.split(b"\n")
                    for line in whole:
                        lines += 1
                        if DELIVERED in line:
                            ok += 1
                        elif line.startswith(b'{"error"'):
                            errors += 1
                    pos = eol + 4 + size
                del buf[:pos]
                pos = 0
    seconds = time.perf_counter() - t0
    cpu, serve_cpu = time.process_time() - c0, proc_cpu([args.serve_pid]) - s0
    sel.close()
    sock.close()
    return {"seconds": seconds, "cpu": cpu, "serve_cpu": serve_cpu, "ok": ok, "done": lines,
            "stream_errors": errors}


class _Conn:
    __slots__ = ("sock", "buf", "slot", "sent", "index")

    def __init__(self, port: int) -> None:
        self.sock = _connect(port)
        self.buf = bytearray()
        self.slot = self.sent = 0.0
        self.index = -1


def worker_single(args: argparse.Namespace) -> dict[str, Any]:
    """POST /v1/push, one push per request, over ``--conns`` keep-alive connections (one
    request in flight on each). Closed loop (``--rate 0``): every connection kept busy.
    Open loop: request i is due at t0 + i / rate; latency from that slot to the answer
    (and from the request's write, apart)."""
    n, rate = args.count, args.rate
    skip = min(int(rate * SKIP_SECONDS), n // 4) if rate else 0
    sel = selectors.DefaultSelector()
    conns = [_Conn(args.port) for _ in range(args.conns)]
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    idle: deque[_Conn] = deque(conns)
    waiting: deque[tuple[int, float]] = deque()  # due, no connection free yet
    e2e: list[float] = []
    wire: list[float] = []
    ok = done = reconnects = 0
    bad: dict[int, int] = {}
    most_waiting = 0
    head = b"POST /v1/push HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    s0, c0 = proc_cpu([args.serve_pid]), time.process_time()
    t0 = time.perf_counter() + (0.01 if rate else 0.0)
    deadline = t0 + args.timeout
    nxt = 0  # next request to schedule
    while done < n:
        now_ = time.perf_counter()
        if now_ > deadline:
            raise SystemExit(f"no end within {args.timeout:g} s: {done} of {n} answered")
        if rate:
            due = min(n, int((now_ - t0) * rate) + 1) if now_ >= t0 else 0
        else:
            due = n
        while nxt < due:
            waiting.append((nxt, t0 + nxt / rate if rate else now_))
            nxt += 1
        most_waiting = max(most_waiting, len(waiting))
        while waiting and idle:
            c = idle.popleft()
            c.index, c.slot = waiting.popleft()
            body = _push_json(c.index)
            c.sent = time.perf_counter()
            c.sock.sendall(head + b"content-length: %d\r\n\r\n%s" % (len(body), body))
        if rate and nxt < n:
            timeout = max(GRID, t0 + nxt / rate - time.perf_counter())
        else:
            timeout = 1.0
        for key, _ in sel.select(timeout):
            c = key.data
            data = c.sock.recv(1 << 16)
            if not data:
                raise SystemExit("the server closed a connection with a request in flight")
            c.buf += data
            parsed = _Response.parse(c.buf)
            if parsed is None:
                continue
            used, status, answer, close = parsed
            del c.buf[:used]
            arrived = time.perf_counter()
            done += 1
            if status == 200 and DELIVERED in answer:
                ok += 1
            else:
                bad[status] = bad.get(status, 0) + 1
            if c.index >= skip:
                e2e.append((arrived - c.slot) * 1000)
                wire.append((arrived - c.sent) * 1000)
            if close:  # hypercorn ends a connection after 1,000 requests
                sel.unregister(c.sock)
                c.sock.close()
                c.sock = _connect(args.port)
                c.buf.clear()
                sel.register(c.sock, selectors.EVENT_READ, c)
                reconnects += 1
            idle.append(c)
    seconds = time.perf_counter() - t0
    cpu, serve_cpu = time.process_time() - c0, proc_cpu([args.serve_pid]) - s0
    for c in conns:
        c.sock.close()
    out: dict[str, Any] = {"seconds": seconds, "cpu": cpu, "serve_cpu": serve_cpu, "ok": ok,
                           "done": done, "not_delivered": bad, "reconnects": reconnects}
    if rate:
        out |= {"achieved_per_s": round(n / seconds), "most_waiting": most_waiting,
                "e2e_ms": _pct(e2e), "wire_ms": _pct(wire)}
    return out


WORKERS = {"library": worker_library, "library-paced": worker_library_paced,
           "serve-ndjson": worker_stream, "serve-single": worker_single,
           "serve-paced": worker_single}


# ----------------------------------------------------------------------------- parent

class Stack:
    """The sink on core 0 and ``fanout serve`` on core 1, for the whole run."""

    def __init__(self, tmpdir: Path, server: str, max_tokens: int) -> None:
        self.pki, self.key = make_keys(tmpdir)
        self.sink, self.sink_port = start_sink(server, tmpdir, self.pki, self.key, core=0)
        self.sink_pids = children(self.sink.pid)
        env = {**os.environ, "APNS_HOST": "127.0.0.1", "APNS_PORT": str(self.sink_port),
               "APNS_CA_FILE": str(self.pki.ca_file), "APNS_KEY_PATH": str(self.key.path),
               "APNS_KEY_ID": self.key.key_id, "APNS_TEAM_ID": self.key.team_id,
               "APNS_TOPIC": TOPIC, "APNS_CONNECTIONS": str(CONNECTIONS)}
        port_file = tmpdir / "serve-port"
        self.log = tmpdir / "serve.log"
        with self.log.open("wb") as log:
            self.serve = subprocess.Popen(
                pin(1) + [sys.executable, "-m", "fanout", "serve", "--listen", "127.0.0.1:0",
                          "--port-file", str(port_file), "--max-tokens", str(max_tokens)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.serve.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"fanout serve did not start:\n{self.tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        while not self._ready():
            if self.serve.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"fanout serve not ready:\n{self.tail()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def close(self) -> None:
        stop(self.serve, self.sink)


def run_worker(stack: Stack, name: str, count: int, rate: float = 0.0,
               timeout: float = 120.0) -> dict[str, Any]:
    library = name.startswith("library")
    port = stack.sink_port if library else stack.port
    cmd = pin(1 if library else 0) + [
        sys.executable, __file__, "--worker", name, "--port", str(port), "--count", str(count),
        "--rate", str(rate), "--timeout", str(timeout), "--serve-pid", str(stack.serve.pid),
        "--conns", str(HTTP_CONNECTIONS), "--ca", str(stack.pki.ca_file),
        "--key", str(stack.key.path), "--key-id", stack.key.key_id,
        "--team-id", stack.key.team_id]
    k0, v0 = proc_cpu(stack.sink_pids), proc_cpu([stack.serve.pid])
    res, peak = run_json(cmd, timeout=timeout + 30)
    k1, v1 = proc_cpu(stack.sink_pids), proc_cpu([stack.serve.pid])
    if stack.serve.poll() is not None:
        raise SystemExit(f"fanout serve exited:\n{stack.tail()}")
    if "error" in res:
        return res
    res["sink_cpu"] = k1 - k0
    res["peak_rss_mb"] = round(peak or 0, 1)
    if library:
        res["serve_idle_cpu"] = round(v1 - v0, 3)  # serve idles on core 1 meanwhile
        res["measured_cpu"] = res["cpu"]
    else:
        res["measured_cpu"] = res["serve_cpu"]
        res["client_cpu_us_per_push"] = res["cpu"] / count * 1e6
    res["cpu_per_push"] = res["measured_cpu"] / count
    res["cpu_us_per_push"] = res["cpu_per_push"] * 1e6
    res["pushes_per_s"] = count / res["seconds"]
    if res["done"] != count or res["ok"] != count:
        res["error"] = f"{res['ok']} delivered, {res['done']} results for {count} pushes"
    return res


def describe(res: dict[str, Any]) -> str:
    client = (f"  client {res['client_cpu_us_per_push']:5.1f} µs/push"
              if "client_cpu_us_per_push" in res else "")
    return (f"{res['pushes_per_s']:7.0f} pushes/s {res['cpu_us_per_push']:6.1f} µs CPU/push"
            f"{client}  sink busy {res['sink_cpu'] / res['seconds']:4.0%}")


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    def row(name: str, good: list[dict]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "runs": len(good),
            "pushes_per_s": round(statistics.median(r["pushes_per_s"] for r in good)),
            "cpu_us_per_push": median_of(good, "cpu_us_per_push", 1),
            "client_cpu_us_per_push": median_of(good, "client_cpu_us_per_push", 1),
            "sink_cpu_us_per_push": round(statistics.median(
                r["sink_cpu"] / r["done"] * 1e6 for r in good), 1),
            "measured_busy": round(statistics.median(
                r["measured_cpu"] / r["seconds"] for r in good), 2),
        }
        if name == "library":
            out["serve_idle_cpu_s"] = median_of(good, "serve_idle_cpu", 3)
        else:
            pr = paired_ratio(runs[name], runs.get("library", []))
            if pr is not None:
                out["cpu_ratio_vs_library"] = round(pr[0], 3)
                out["cpu_ratio_per_round"] = [round(x, 3) for x in pr[1]]
        if name == "serve-single":
            out["reconnects"] = min(r.get("reconnects", 0) for r in good)
        return out

    return summarize_by(runs, row)


def latency_phase(stack: Stack, levels: list[tuple[str, float]], serve_max: float | None,
                  seconds: float, passes: int) -> list[dict[str, Any]]:
    """Per level and pass, the library's and serve's paced runs back to back; per level and
    path the pass with the median p99 is kept, with every pass's p99. Where the rate is
    past serve's own maximum, serve gets only what it can answer in the window (its queue
    grows either way: the figures say it is saturated, nothing more)."""
    out = []
    for label, rate in levels:
        n = int(rate * (seconds + SKIP_SECONDS))
        sizes = {"library-paced": n, "serve-paced": n}
        if serve_max and rate > 0.9 * serve_max:
            sizes["serve-paced"] = min(n, int(serve_max * (seconds + SKIP_SECONDS)))
        got: dict[str, list[dict]] = {"library-paced": [], "serve-paced": []}
        for p in range(passes):
            order = list(got) if p % 2 == 0 else list(got)[::-1]
            for name in order:
                count = sizes[name]
                res = run_worker(stack, name, count, rate=rate,
                                 timeout=max(60.0, 4 * count / 1000))
                res |= {"level": label, "rate": round(rate), "n": count}
                got[name].append(res)
                if "error" in res:
                    print(f"latency {label} {name}: ERROR {res['error']}", file=sys.stderr)
                    continue
                e = res["e2e_ms"]
                print(f"latency {label} ({rate:,.0f}/s) {name:13s} achieved "
                      f"{res['achieved_per_s']:6,}/s  p50 {e['p50']:7.2f} p99 {e['p99']:7.2f} "
                      f"max {e['max']:7.1f} ms", file=sys.stderr, flush=True)
        level: dict[str, Any] = {"level": label, "rate": round(rate), "n": sizes,
                                 "passes": passes}
        for name, rs in got.items():
            good = sorted((r for r in rs if "error" not in r), key=lambda r: r["e2e_ms"]["p99"])
            if not good:
                level[name] = {"error": rs[0].get("error")}
                continue
            keep = dict(good[(len(good) - 1) // 2])
            keep["p99_passes"] = [r["e2e_ms"]["p99"] for r in rs if "error" not in r]
            level[name] = keep
        lib, srv = level["library-paced"], level["serve-paced"]
        if "error" not in lib and "error" not in srv:
            level["added_ms"] = {k: round(srv["e2e_ms"][k] - lib["e2e_ms"][k], 3)
                                 for k in ("p50", "p99")}
        for name, res in (("library", lib), ("serve", srv)):
            if "error" not in res:
                level[f"{name}_saturated"] = res["achieved_per_s"] < 0.95 * rate
        out.append(level)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=60_000,
                    help="pushes per library and NDJSON run")
    ap.add_argument("--single", type=int, default=20_000, help="requests per serve-single run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per latency run")
    ap.add_argument("--passes", type=int, default=3,
                    help="latency passes per level (the pass with the median p99 is shown)")
    ap.add_argument("--quick", action="store_true", help="4,000 / 2,000 pushes, 1 round, 2 s")
    ap.add_argument("--server", choices=["nginx", "mock"], default="nginx")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--no-latency", action="store_true", help="skip the latency phase")
    ap.add_argument("--name", help="results file name (default serve)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    for flag in ("--port", "--serve-pid", "--conns"):
        ap.add_argument(flag, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    for flag in ("--ca", "--key", "--key-id", "--team-id"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.quick:
        args.count, args.single, args.rounds, args.seconds, args.passes = \
            4_000, 2_000, 1, 2.0, 1
    names = [c for c in args.candidates.split(",") if c]
    unknown = set(names) - set(CANDIDATES)
    if unknown:
        raise SystemExit(f"unknown candidates: {', '.join(sorted(unknown))}")
    if "library" not in names:
        names.insert(0, "library")  # the baseline every ratio needs
    counts = {"library": args.count, "serve-ndjson": args.count, "serve-single": args.single}

    runs: dict[str, list[dict]] = {c: [] for c in names}
    orders: list[list[str]] = []
    levels: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fanout-serve-bench-") as tmp:
        stack = Stack(Path(tmp), args.server, max(args.count, args.single) + 1000)
        try:
            # warm-up, not measured: connections, JWT, first imports of every code path
            for name, n in (("serve-ndjson", 1000), ("serve-single", 500)):
                res = run_worker(stack, name, n)
                if "error" in res:
                    raise SystemExit(f"warm-up {name}: {res['error']}\n{stack.tail()}")
            for rnd in range(args.rounds):
                shift = rnd % len(names)
                order = names[shift:] + names[:shift]
                orders.append(order)
                for name in order:
                    n = counts[name]
                    res = run_worker(stack, name, n, timeout=max(120.0, n / 500))
                    res["round"] = rnd + 1
                    runs[name].append(res)
                    if "error" in res:
                        print(f"round {rnd + 1} {name}: ERROR {res['error']}", file=sys.stderr)
                    else:
                        print(f"round {rnd + 1} {name:12s} {describe(res)}", file=sys.stderr,
                              flush=True)
            summary = summarize(runs)
            lib, single = summary.get("library", {}), summary.get("serve-single", {})
            if not args.no_latency and "error" not in lib:
                r_lib = lib["pushes_per_s"]
                wanted = [("library max / 2", r_lib / 2)]
                if "error" not in single and single["pushes_per_s"] / 2 < 0.9 * r_lib / 2:
                    wanted.append(("serve-single max / 2", single["pushes_per_s"] / 2))
                levels = latency_phase(stack, wanted, single.get("pushes_per_s"),
                                       args.seconds, args.passes)
            serve_rss = rss_mb(stack.serve.pid)
        finally:
            stack.close()

    nd = summary.get("serve-ndjson", {})
    ratio = nd.get("cpu_ratio_vs_library")
    met = ratio is not None and ratio <= NDJSON_TARGET
    sink = "nginx" if args.server == "nginx" else "fanout mock (accept-all)"
    report = {
        "counts": counts, "rounds": args.rounds, "orders": orders,
        "target": {"serve_ndjson_cpu_ratio_vs_library": f"<= {NDJSON_TARGET}"},
        "machine": {**machine(), "server": sink, "sink_core": 0, "measured_core": 1,
                    "http_client_core": 0, "engine_connections": CONNECTIONS,
                    "http_connections_single": HTTP_CONNECTIONS,
                    "ndjson_lines_per_chunk": LINES_PER_CHUNK},
        "candidates": summary, "verdict": {"ndjson_ratio": ratio, "met": met},
        "latency": levels, "serve_rss_mb_at_end": round(serve_rss, 1),
        "runs": runs, "when": now()}
    m = report["machine"]
    lines = [
        f"{sink} on core 0; `fanout serve` (engine inside, {CONNECTIONS} connections) and the "
        f"library process on core 1; the HTTP clients on core 0. {args.count:,} pushes per "
        f"library and NDJSON run, {args.single:,} single requests ({HTTP_CONNECTIONS} "
        f"keep-alive HTTP/1.1 connections), {args.rounds} round(s), order rotated. CPU: the "
        f"library process, or the serve process, over the client's window. Machine: "
        f"{m['cpus']} × {m['cpu_model']}, Python {m['python']}, load {m['loadavg_1m_5m']}.",
        "", *table_head(["candidate", "pushes/s", "CPU µs/push", "× library",
                         "HTTP client µs/push", "sink µs/push", "measured busy", "verdict"],
                        "lrrrrrrl")]
    for name, s in summary.items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error']} | | | | | | |")
            continue
        r = s.get("cpu_ratio_vs_library")
        mark = "baseline" if name == "library" else (
            f"{verdict(met)} (target ≤ {NDJSON_TARGET})" if name == "serve-ndjson" else
            "no target")
        lines.append(f"| {name} | {s['pushes_per_s']:,} | {s['cpu_us_per_push']} | "
                     f"{'' if r is None else r} | {s['client_cpu_us_per_push'] or ''} | "
                     f"{s['sink_cpu_us_per_push']} | {s['measured_busy']:.0%} | {mark} |")
    idle = lib.get("serve_idle_cpu_s") if "error" not in lib else None
    if idle is not None:
        lines += ["", f"The serve process, idle on core 1 during each library run, used {idle} s "
                  "of CPU meanwhile."]
    lines += ["", "Per round (CPU µs/push, × library of that round):", ""]
    for name in names:
        cells = []
        for i, r in enumerate(runs[name]):
            if "error" in r:
                cells.append("error")
                continue
            base = runs["library"][i] if i < len(runs["library"]) else None
            x = (f" ({r['cpu_per_push'] / base['cpu_per_push']:.2f}x)"
                 if name != "library" and base and "error" not in base else "")
            cells.append(f"{r['cpu_us_per_push']:.1f}{x}")
        lines.append(f"- {name}: " + "; ".join(cells))
    if levels:
        lines += ["", "Latency, open loop, single pushes, from a push's slot in the schedule to "
                  f"its result (the first {SKIP_SECONDS:g} s left out; {args.seconds:g} s "
                  f"measured, {args.passes} pass(es)):", "",
                  *table_head(["load", "rate/s", "path", "pushes", "achieved/s",
                               "CPU µs/push", "p50 ms", "p99 ms", "max ms", "added p50 ms",
                               "added p99 ms"], "lrlrrrrrrrr")]
        for lv in levels:
            for name, path in (("library-paced", "library"), ("serve-paced", "serve")):
                res = lv[name]
                if "error" in res:
                    lines.append(f"| {lv['level']} | {lv['rate']:,} | {path} | error: "
                                 f"{res['error']} | | | | | | | |")
                    continue
                e = res["e2e_ms"]
                added = lv.get("added_ms") if name == "serve-paced" else None
                sat = " (saturated)" if lv.get(f"{path}_saturated") else ""
                lines.append(f"| {lv['level']} | {lv['rate']:,} | {path}{sat} | "
                             f"{res['n']:,} | {res['achieved_per_s']:,} | "
                             f"{res['cpu_us_per_push']:.1f} | {e['p50']} | {e['p99']} | "
                             f"{e['max']} | {'' if not added else added['p50']} | "
                             f"{'' if not added else added['p99']} |")
    lines += ["", f"- target (serve-ndjson serve CPU per push ≤ {NDJSON_TARGET} × library): "
              f"{verdict(met)} ({'no ratio' if ratio is None else f'{ratio}x'})"]
    md = write_results(args.name or "serve", report, lines)
    print("\n".join(lines))
    print(f"\n{md}", file=sys.stderr)


if __name__ == "__main__":
    main()
