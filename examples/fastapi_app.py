"""A FastAPI app sending pushes through ONE ``fanout.asyncio.Client``, opened by the lifespan.

Try it against the mock APNs (from the repository root)::

    python -m fanout mock --port 8443 --pki-dir ./mock-pki --key-path AuthKey.p8 \\
        --key-id KEY0000000 --team-id TEAM000000 &
    export FANOUT_HOST=127.0.0.1 FANOUT_PORT=8443 FANOUT_CA_FILE=./mock-pki/ca.pem \\
        FANOUT_KEY_PATH=AuthKey.p8 FANOUT_KEY_ID=KEY0000000 FANOUT_TEAM_ID=TEAM000000 \\
        FANOUT_TOPIC=com.example.app
    uvicorn examples.fastapi_app:app --port 8000
    curl -s localhost:8000/push -H 'content-type: application/json' \\
        -d '{"token": "'$(printf 'ab%.0s' {1..32})'", "title": "Hi", "body": "there"}'

(``AuthKey.p8``: your own, or a test key from ``fanout.testing.devcerts.make_signing_key``.)
The other settings are in examples/settings.py.

Endpoints:

* ``POST /push`` ``{token, title, body}``: one push; its result as JSON.
* ``POST /fanout`` ``{tokens, title, body}``: one payload to many tokens; counts by outcome.
* ``POST /live-activity/update`` ``{token, activity_id, content_state}``: a Live Activity
  update, within the activity's budget and in order.

Every request shares the one client: one set of HTTP/2 connections and one provider token
(JWT) for the whole process, whatever the number of requests in flight. Cancelling a request
(the HTTP client went away) cancels its push in the engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import fanout.asyncio
from fanout import Notification, Result, ValidationError

from .settings import client_options


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One client for the app's life; closing waits (``close_timeout``) for pushes out."""
    options = client_options()
    async with fanout.asyncio.Client(**options) as client:
        app.state.push = client
        # one LiveActivities for the app: it keeps each activity's budget and order
        app.state.activities = client.live_activities(options["topic"])
        yield


app = FastAPI(title="fanout example", lifespan=lifespan)


class Push(BaseModel):
    token: str
    title: str
    body: str


class FanOut(BaseModel):
    tokens: list[str] = Field(max_length=10_000)
    title: str
    body: str


class ActivityUpdate(BaseModel):
    token: str
    activity_id: str
    content_state: dict[str, Any]


def result_json(result: Result) -> dict[str, Any]:
    """What a caller needs of a Result (``reason`` tells a dead token from a bad push)."""
    return {"outcome": result.outcome, "status": result.status, "reason": result.reason,
            "apns_id": result.apns_id, "error": result.error}


def alert(title: str, body: str) -> dict[str, Any]:
    return {"aps": {"alert": {"title": title, "body": body}}}


def refused_before_sending(result: Result) -> bool:
    """fanout refused the push before any I/O (it names the field in ``error``): the
    caller's fault, so the app answers 422, not 500."""
    return result.outcome == "rejected" and result.status is None


@app.exception_handler(ValidationError)
async def bad_push(request: Request, exc: ValidationError) -> JSONResponse:
    """A fan-out whose payload cannot go to anyone raises at once: 422 as well."""
    return JSONResponse(status_code=422, content={"detail": str(exc)})


@app.post("/push")
async def push(body: Push, request: Request) -> dict[str, Any]:
    client: fanout.asyncio.Client = request.app.state.push
    result = await client.send(Notification(token=body.token,
                                            payload=alert(body.title, body.body)))
    if refused_before_sending(result):  # a bad token, a payload too big...
        raise HTTPException(status_code=422, detail=result.error)
    return result_json(result)


@app.post("/fanout")
async def fan_out(body: FanOut, request: Request) -> dict[str, Any]:
    client: fanout.asyncio.Client = request.app.state.push
    counts: Counter[str] = Counter()
    async for result in client.fan_out(alert(body.title, body.body), body.tokens):
        counts[result.outcome] += 1
    return {"sent": sum(counts.values()), "by_outcome": dict(counts)}


@app.post("/live-activity/update")
async def live_activity_update(body: ActivityUpdate, request: Request) -> dict[str, Any]:
    activities: fanout.asyncio.LiveActivities = request.app.state.activities
    result = await activities.update(body.token, body.content_state,
                                     activity_id=body.activity_id)
    return result_json(result)
