"""``fanout serve``'s flow control, in-process: the ASGI app driven by hand (so the test
controls when the response is read), a real Client and the mock APNs in the same trio run.
A client that reads its results slowly must slow the reading of its body: the app holds a
bounded number of pushes, whatever the body's length."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from fanout._serve.app import App
from fanout._serve.http import Limits
from fanout._serve.pushes import IN_CHANNEL, OUT_CHANNEL
from fanout.testing.devcerts import TestPKI, TestSigningKey

from .helpers import PAYLOAD, TOPIC, running, tokens

LINES = 3_000
WINDOW = 64


async def test_a_slow_reader_slows_the_intake_and_memory_stays_bounded(
        pki: TestPKI, signing_key: TestSigningKey) -> None:
    body = [(json.dumps({"token": t, "payload": PAYLOAD, "id": i}) + "\n").encode()
            for i, t in enumerate(tokens(LINES, "a6"))]
    read = 0           # lines the app has taken from the body
    written: list[bytes] = []
    reading = trio.Event()  # the client starts reading its results

    async def receive() -> dict[str, Any]:
        nonlocal read
        await trio.lowlevel.checkpoint()
        read += 1
        return {"type": "http.request", "body": body[read - 1], "more_body": read < LINES}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if len(written) >= 1:  # the first chunk goes out, then the reader stalls
                await reading.wait()
            written.append(message["body"])

    scope = {"type": "http", "method": "POST", "path": "/v1/pushes",
             "raw_path": b"/v1/pushes", "query_string": b"", "http_version": "1.1",
             "headers": [(b"content-type", b"application/x-ndjson"),
                         (b"transfer-encoding", b"chunked")]}
    async with running(pki, signing_key, client_kw={"max_in_flight": WINDOW}) as (mock, client):
        app = App(client, default_topic=TOPIC, environment="production", teams=False,
                  keys=None, limits=Limits())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(app, scope, receive, send)
                await trio.testing.wait_all_tasks_blocked(0.05)
                stalled_at = read
                # held: the channels, the engine's window, the results in one write
                bound = IN_CHANNEL + OUT_CHANNEL * 2 + WINDOW * 4
                assert 0 < stalled_at < bound < LINES, (stalled_at, bound)
                assert mock.stats.requests < bound
                reading.set()
        results = [json.loads(line) for chunk in written for line in chunk.splitlines()]
    assert read == LINES
    assert len(results) == LINES and {r["outcome"] for r in results} == {"delivered"}
    assert sorted(r["id"] for r in results) == list(range(LINES))
