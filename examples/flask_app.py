"""A Flask app sending pushes through ``fanout.sync.Client`` (the same goes for a Django view).

Try it against the mock APNs (from the repository root)::

    python -m fanout mock --port 8443 --pki-dir ./mock-pki --key-path AuthKey.p8 \\
        --key-id KEY0000000 --team-id TEAM000000 &
    export FANOUT_HOST=127.0.0.1 FANOUT_PORT=8443 FANOUT_CA_FILE=./mock-pki/ca.pem \\
        FANOUT_KEY_PATH=AuthKey.p8 FANOUT_KEY_ID=KEY0000000 FANOUT_TEAM_ID=TEAM000000 \\
        FANOUT_TOPIC=com.example.app
    flask --app examples.flask_app run --port 5000      # or any WSGI server:
    gunicorn -w 4 --threads 8 examples.flask_app:app    # each worker process gets its own engine
    curl -s localhost:5000/push -H 'content-type: application/json' \\
        -d '{"token": "'$(printf 'ab%.0s' {1..32})'", "title": "Hi", "body": "there"}'

(``AuthKey.p8``: your own, or a test key from ``fanout.testing.devcerts.make_signing_key``.)
The other settings are in examples/settings.py.

Two ways to hold the client, both safe:

* ``POST /push``: one module-level client, built at import. Building it starts nothing (no
  thread, no socket), so a server that forks its workers after importing the app (gunicorn,
  uWSGI) is fine: each worker starts its own engine on its first push.
* ``POST /push-per-request``: a client built inside the view, in ``with``. Clients built
  with the same settings share one set of connections, and every ``TokenAuth`` of a key
  shares one JWT, so this costs no TLS handshake and mints no token; the connections stay
  up ``keep_alive`` seconds after the last such client closes.

``send(..., timeout=10)`` bounds the view's wait: on timeout the push is cancelled (never
resent) and ``TimeoutError`` raised, answered 504 here.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import BadRequest

import fanout.sync
from fanout import Notification, Result, ValidationError

from .settings import client_options

app = Flask(__name__)

# built at import, used from any request thread; the engine starts on the first push
push_client = fanout.sync.Client(**client_options())


def result_json(result: Result) -> dict[str, Any]:
    """What a caller needs of a Result (``reason`` tells a dead token from a bad push)."""
    return {"outcome": result.outcome, "status": result.status, "reason": result.reason,
            "apns_id": result.apns_id, "error": result.error}


def notification() -> Notification:
    """The request's JSON ``{token, title, body}`` as a push."""
    data = request.get_json(force=True, silent=True)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str)
                                             for k in ("token", "title", "body")):
        raise BadRequest("expected JSON {token, title, body}, all strings")
    return Notification(token=data["token"],
                        payload={"aps": {"alert": {"title": data["title"],
                                                   "body": data["body"]}}})


@app.errorhandler(ValidationError)
def bad_push(exc: ValidationError) -> tuple[Any, int]:
    """A push fanout refuses before sending (bad token, payload too big...): 422."""
    return jsonify(detail=str(exc)), 422


@app.errorhandler(TimeoutError)
def too_slow(exc: TimeoutError) -> tuple[Any, int]:
    return jsonify(detail=str(exc)), 504


def answer(result: Result) -> Any:
    """The result as JSON; 422 when fanout refused the push before any I/O (a bad token,
    a payload too big: ``error`` names the field)."""
    if result.outcome == "rejected" and result.status is None:
        return jsonify(detail=result.error), 422
    return jsonify(result_json(result))


@app.post("/push")
def push() -> Any:
    return answer(push_client.send(notification(), timeout=10))


@app.post("/push-per-request")
def push_per_request() -> Any:
    note = notification()
    # a new client and a freshly loaded key per request: same settings, so the same
    # connections and the same JWT as every other request's
    with fanout.sync.Client(**client_options()) as client:
        result = client.send(note, timeout=10)
    return answer(result)
