"""Memory per push in flight and per queued push (issue 19).

Python heap (tracemalloc) and RSS of the sending process while K pushes are outstanding,
for two values of K; the difference divided by the difference in K is the cost of one
more push:

- **in flight**: the mock never answers (``never_answer=1.0``) and announces K streams from
  the start, so every push holds a stream, its deadline and its pending state;
- **queued**: the mock announces one stream (and never answers), so of K concurrent
  ``send()`` calls one is in flight and the rest wait for a stream slot (``send_many`` and
  ``fan_out`` queue nothing: they pull from the caller's iterable as slots free up).

In flight, for ``send_many`` (one ``Notification`` per push, the caller's objects
counted), ``fan_out`` (one payload encoded once, a token string per push) and concurrent
``send()`` calls (a trio task each, counted).

    python bench/push_memory.py            # K = 1,000 and 4,000
    python bench/push_memory.py --quick    # K = 500 and 2,000

127.0.0.1 only; every push is bounded by the run (the client is closed, which resets the
streams, once the figures are taken).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import secrets
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import trio

from fanout import Client, Notification, TokenAuth
from fanout.testing import MockConfig, open_mock
from fanout.testing.devcerts import make_pki, make_signing_key

TOPIC = "com.example.app"
PAYLOAD = {"aps": {"alert": {"title": "Order shipped", "body": "Your order 42 is on its way"}}}
RESULTS = Path(__file__).resolve().parent / "results"


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def _outstanding(k: int, mode: str, api: str, pki: Any, key: Any) -> tuple[int, int]:
    """(heap bytes, RSS kB) with ``k`` pushes outstanding, in ``mode`` in_flight|queued."""
    streams = k + 10 if mode == "in_flight" else 1
    config = MockConfig(team_id=key.team_id, keys={key.key_id: key.public_key},
                        topics={TOPIC}, never_answer=1.0, initial_max_streams=streams,
                        max_streams=streams, seed=1)
    tokens = [secrets.token_hex(32) for _ in range(k)]
    pulled = 0

    def source() -> Any:
        nonlocal pulled
        for token in tokens:
            pulled += 1
            yield Notification(token=token, payload=PAYLOAD) if api == "send_many" else token

    async with trio.open_nursery() as nursery:
        mock = await open_mock(nursery, config, pki)
        auth = TokenAuth.from_file(key.path, key.key_id, key.team_id, shared=False)
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=mock.port,
                          ca_file=str(pki.ca_file), connections=1, timeout=600.0,
                          max_in_flight=k, ping_timeout=600.0) as client:

            async def drive() -> None:
                stream = (client.send_many(source()) if api == "send_many"
                          else client.fan_out(PAYLOAD, source()))
                async for _ in stream:
                    pass

            async def one(token: str) -> None:
                nonlocal pulled
                pulled += 1
                await client.send(Notification(token=token, payload=PAYLOAD))

            gc.collect()
            base_heap, base_rss = tracemalloc.get_traced_memory()[0], _rss_kb()
            if api == "send":  # k concurrent send() calls: one in flight, k - 1 waiting
                for token in tokens:
                    nursery.start_soon(one, token)
            else:
                nursery.start_soon(drive)
            want = k if mode == "in_flight" else 1
            with trio.move_on_after(60) as waited:
                while mock.stats.requests < want or pulled < k:
                    await trio.sleep(0.05)
            if waited.cancelled_caught:
                raise RuntimeError(f"{mode} {api}: {mock.stats.requests} requests seen, "
                                   f"{pulled} pushes pulled of {k} after 60 s")
            await trio.sleep(0.2)  # the last writes settle
            gc.collect()
            heap, rss = tracemalloc.get_traced_memory()[0], _rss_kb()
            nursery.cancel_scope.cancel()
    return heap - base_heap, rss - base_rss


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--small", type=int)
    ap.add_argument("--large", type=int)
    args = ap.parse_args()
    small = args.small or (500 if args.quick else 1000)
    large = args.large or (2000 if args.quick else 4000)
    tmp = Path(tempfile.mkdtemp(prefix="push-memory-"))
    pki, key = make_pki(tmp / "pki"), make_signing_key(tmp / "keys")
    tracemalloc.start()
    rows = []
    for mode, api in (("in_flight", "send_many"), ("in_flight", "fan_out"),
                      ("in_flight", "send"), ("queued", "send")):
            a = await _outstanding(small, mode, api, pki, key)
            b = await _outstanding(large, mode, api, pki, key)
            per_heap = (b[0] - a[0]) / (large - small)
            per_rss = (b[1] - a[1]) * 1024 / (large - small)
            rows.append({"mode": mode, "api": api, "k": [small, large],
                         "heap_bytes_per_push": round(per_heap),
                         "rss_bytes_per_push": round(per_rss)})
            print(f"{mode:9} {api:9} heap {per_heap:7.0f} B/push  RSS {per_rss:7.0f} B/push",
                  flush=True)
    out = {"when": __import__("datetime").datetime.now(__import__("datetime").UTC)
           .strftime("%Y-%m-%d %H:%M UTC"), "python": sys.version.split()[0], "rows": rows,
           "note": "heap: tracemalloc (Python objects, the caller's included); RSS: "
                   "VmRSS growth (includes tracemalloc's own bookkeeping, so an upper bound)"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "push_memory.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    trio.run(main)
