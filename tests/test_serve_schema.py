"""Property-based tests of ``fanout serve`` (issue 17) against the OpenAPI document it ships
(fanout/_serve/openapi.json): schemathesis generates requests from the document (its
examples, its coverage cases, then fuzzing) and sends them over HTTP to a real ``fanout
serve`` process in front of a real ``fanout mock``. Every answer must come within a timeout,
be no 5xx, and match the document: status code, content type, headers and body schema.

A 504 is by design when the request's own ``?timeout=`` is shorter than APNs takes; every
other 5xx is a fault. Negative cases stay on for ``/v1/pushes`` too: a bad line there is a
200 with a ``malformed`` result, which these checks accept (``negative_data_rejection`` is not
one of them).

The two faults this test found are pinned at the end by their minimal requests: a channel
id no header can carry (a 500, and a malformed ``apns-channel-id`` header that cost the
connections to APNs), both a 400 since.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fanout._serve.keys import hash_key
from fanout.testing.devcerts import TestSigningKey

from .test_examples import Mock, _wait_for
from .test_serve import KEY, Serve
from .test_serve_openapi import load

CALL_TIMEOUT = 20.0  # seconds, every request: no case may hang the test
MAX_EXAMPLES = 25  # fuzzed cases per operation; with the coverage cases ~2500 requests, ~15 s
SHORT_DEADLINE = 1.0  # a ?timeout= under this may end in 504 by design
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
AUTH = {"authorization": f"Bearer {KEY}"}
PAYLOAD = {"aps": {"alert": "Goal!"}}


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A /v1/pushes body: each item of the generated array as one line."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def _start(tmp: Path, signing_key: TestSigningKey, *extra: str) -> tuple[Mock, Serve]:
    """A mock and a server in front of it, with limits that keep generated requests small;
    pushes reach only the mock, on 127.0.0.1. Returns once the server is ready."""
    keys = tmp / "keys"
    keys.write_text(f"{hash_key(KEY)} name=main\n")
    mock = Mock(tmp, signing_key)
    try:
        serve = Serve(tmp, mock, "--api-keys", str(keys), "--max-body", "65536",
                      "--max-stream-body", "65536", "--max-tokens", "50",
                      "--body-timeout", "2",
                      # schemathesis opens a connection per request and leaves it to the
                      # server's idle timeout: 1,800 requests open more than the default cap
                      "--max-connections", "100000", *extra)
    except BaseException:
        mock.kill()
        raise
    assert mock.env["FANOUT_HOST"] == "127.0.0.1"
    with httpx.Client(base_url=serve.url, headers=AUTH, timeout=CALL_TIMEOUT) as http:
        _wait_for(lambda: http.get("/readyz").status_code == 200, "fanout serve ready",
                  serve.proc, serve.log)
    return mock, serve


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           signing_key: TestSigningKey) -> Iterator[str]:
    """The server's base URL, for the module's tests."""
    mock, serve = _start(tmp_path_factory.mktemp("serve-schema"), signing_key,
                         "--push-timeout", "5")
    try:
        yield serve.url
    finally:
        serve.kill()
        mock.kill()


schema = schemathesis.openapi.from_dict(
    load(), config=schemathesis.Config.from_dict({"auth": {"openapi": {"bearer": {"bearer": KEY}}}}))
"""Loaded at import, not from a fixture, so that each operation is a test of its own."""


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_document(case: schemathesis.Case[Any], served: str) -> None:
    response = case.call(base_url=served, timeout=CALL_TIMEOUT)
    checks = list(CHECKS)
    if response.status_code == 504 and _own_deadline(case) < SHORT_DEADLINE:
        checks.remove(not_a_server_error)  # the client's own deadline passed
    case.validate_response(response, checks=checks, transport_kwargs={"base_url": served})


def _own_deadline(case: schemathesis.Case[Any]) -> float:
    """The ``?timeout=`` a request set (seconds), infinite without one."""
    value = (case.query or {}).get("timeout")
    try:
        return float(value) if value is not None else math.inf
    except (TypeError, ValueError):
        return math.inf


# ---------------------------------------------------------------- found by it


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_channel_id_no_header_can_carry_is_a_400(served: str, method: str) -> None:
    r = httpx.request(method, f"{served}/v1/channels/%09", headers=AUTH, timeout=CALL_TIMEOUT)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/channels/%09S/broadcast", {"payload": PAYLOAD}),
    ("/v1/push", {"channel_id": " dHVuYQ==", "payload": PAYLOAD}),
], ids=["broadcast", "push"])
def test_a_broadcast_channel_id_no_header_can_carry_is_a_400(served: str, path: str,
                                                             body: dict[str, Any]) -> None:
    r = httpx.post(f"{served}{path}", json=body, headers=AUTH, timeout=CALL_TIMEOUT)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "bad_request"
