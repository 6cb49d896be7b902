"""The OpenAPI 3.1 document ``fanout serve`` ships (fanout/_serve/openapi.json): valid, and
its push and result schemas generated from the daemon's msgspec structs, so it cannot drift
from the code.

The schemas of :data:`GENERATED` are ``msgspec.json.schema_components`` of the structs,
plus the documented refinements of :func:`generated_schemas` (value constraints the
decoder leaves to later validation, descriptions, ``tokens_file`` removed). After changing
a struct, regenerate them::

    python -m tests.test_serve_openapi --write
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from fanout._daemon.lines import LineError, PushLine, ResultLine, decode_line
from fanout.outcome import Outcome
from fanout.payload import ENVIRONMENTS, MAX_TOKEN_LENGTH, PRIORITIES, PushType

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "fanout" / "_serve" / "openapi.json"
APP = ROOT / "fanout" / "_serve" / "app.py"
REF = "#/components/schemas/{name}"

DAEMON_STRUCTS: tuple[type[msgspec.Struct], ...] = (PushLine, ResultLine)
APP_STRUCTS = ("FanOutRequest", "BroadcastRequest", "ChannelCreate")
"""The request bodies of fanout/_serve/app.py, generated the same way."""
GENERATED = ("PushLine", "LiveActivityLine", "ResultLine", *APP_STRUCTS)

HEX_TOKEN = f"^(?:[0-9A-Fa-f]{{2}}){{1,{MAX_TOKEN_LENGTH // 2}}}$"
UUID = "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"

# Refinements of a field wherever it appears: added to its non-null branch.
FIELD_CONSTRAINTS: dict[str, dict[str, Any]] = {
    "token": {"pattern": HEX_TOKEN},
    "push_type": {"enum": [str(t) for t in PushType]},
    "priority": {"enum": sorted(PRIORITIES, reverse=True)},
    "expiration": {"minimum": 0, "maximum": 10**11 - 1},
    "collapse_id": {"minLength": 1},
    "apns_id": {"pattern": UUID},
    "environment": {"enum": list(ENVIRONMENTS)},
}
FIELD_DOCS = {
    "payload": "The APNs payload (`aps` and custom keys), at most 4096 bytes encoded "
               "(5120 for voip).",
    "live_activity": "Instead of `payload`: fanout builds the Live Activity's `aps`.",
    "channel_id": "A broadcast channel (iOS 18): the push goes to its subscribers.",
    "id": "Any JSON value; echoed in the result as `id`.",
    "token": "A device token: hex, an even number of digits.",
    "tokens": "A fan-out: the same push to each token, one result per token (a token "
              "that is not hex gives a `rejected` result, not a failed request).",
    "push_type": "The `apns-push-type` header; `alert` by default.",
    "topic": "The `apns-topic`: a bundle id, with the push type's suffix or without it; the "
             "server's default topic when left out.",
    "priority": "10 (now), 5 (power-considerate) or 1 (lowest); 10 by default, 5 for "
                "background.",
    "expiration": "Absolute epoch seconds after which APNs stops trying; 0: at most once.",
    "collapse_id": "The `apns-collapse-id` header: at most 64 bytes.",
    "apns_id": "The `apns-id` header: a canonical UUID.",
    "environment": "production or sandbox; a server without `[[team]]` tables takes only "
                   "its own.",
}
RESULT_DOCS = {
    "id": "The push's `id`, as sent.",
    "line": "The 1-based position of the push in the request body (1 for one push).",
    "outcome": "What became of the push.",
    "status": "APNs' HTTP status, when APNs answered.",
    "reason": "APNs' reason, when it refused the push.",
    "timestamp": "APNs' timestamp (milliseconds) with `Unregistered`: since when the token "
                 "is invalid.",
    "attempts": "Requests made for this push (retries included).",
    "latency_ms": "Milliseconds from first send to the final answer.",
    "error": "Why the push failed before (or without) an APNs answer.",
    "input": "Not set by the server.",
    "entry": "Not set by the server.",
    "team": "The team that served the push (`[[team]]` tables).",
    "environment": "Where a team's push went.",
    "wrong_environment": "The push named the other environment, which accepted the token.",
    "priority": "The apns-priority a Live Activity push went at: its hourly budget lowers "
                "10 to 5. Absent for other pushes.",
}


def _refine(prop: dict[str, Any], **extra: Any) -> None:
    branches = prop.get("anyOf")
    if branches is None:
        prop.update(extra)
        return
    for branch in branches:
        if branch.get("type") != "null":
            branch.update(extra)


def _refine_fields(schema: dict[str, Any], docs: dict[str, str]) -> None:
    props = schema["properties"]
    for name, extra in FIELD_CONSTRAINTS.items():
        if name in props:
            _refine(props[name], **extra)
    for name, text in docs.items():
        if name in props:
            props[name]["description"] = text


def _app_structs() -> list[type[msgspec.Struct]]:
    from fanout._serve import channels, pushes

    return [getattr(pushes, name, None) or getattr(channels, name) for name in APP_STRUCTS]


def generated_schemas() -> dict[str, Any]:
    """The component schemas the document takes from the code: PushLine, LiveActivityLine
    and ResultLine (fanout/_daemon/lines.py), and the request bodies of
    fanout/_serve/app.py, as msgspec generates them, refined as documented here."""
    _, defs = msgspec.json.schema_components([*DAEMON_STRUCTS, *_app_structs()],
                                             ref_template=REF)
    assert set(defs) == set(GENERATED), sorted(defs)

    push = defs["PushLine"]
    del push["properties"]["tokens_file"]  # the server must not read its own files for a client
    push["description"] = (
        "One push, in the daemon's NDJSON line format: exactly one of `token`, `tokens` (a "
        "fan-out) or `channel_id` (a broadcast), and `payload` unless `live_activity` builds "
        "it. The daemon's `tokens_file` is refused over HTTP (400 `bad_request`): the server "
        "does not read its own files for a client. A Live Activity goes with `token` or "
        "`channel_id`, and a broadcast cannot start one.")
    _refine_fields(push, FIELD_DOCS)
    # "exactly one of": a null counts as absent, as in decode_line
    push["oneOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                     for name in ("token", "tokens", "channel_id")]
    push["anyOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                     for name in ("payload", "live_activity")]

    live = defs["LiveActivityLine"]
    live["properties"]["event"]["enum"] = ["start", "update", "end"]

    result = defs["ResultLine"]
    result["properties"]["outcome"]["enum"] = [str(o) for o in Outcome]
    _refine(result["properties"]["environment"], enum=list(ENVIRONMENTS))
    for name, text in RESULT_DOCS.items():
        result["properties"][name]["description"] = text

    for name in ("FanOutRequest", "BroadcastRequest"):
        _refine_fields(defs[name], FIELD_DOCS)
    defs["ChannelCreate"]["properties"]["storage_policy"].update(
        enum=[0, 1], description="0: APNs stores no message, 1: it keeps the most recent one.")
    return {name: defs[name] for name in GENERATED}


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DOC.read_text())
    return doc


def regenerate(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its generated component schemas as the code gives them now."""
    out = copy.deepcopy(doc)
    out["components"]["schemas"].update(generated_schemas())
    return out


def write() -> bool:
    """Rewrite the document's generated schemas; whether anything changed."""
    doc = load()
    new = regenerate(doc)
    if new == doc:
        return False
    DOC.write_text(json.dumps(new, indent=2, ensure_ascii=False) + "\n")
    return True


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator of ``schema`` whose ``#/components/...`` refs resolve in ``doc``."""
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    methods = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
    return {(path, method): op for path, item in doc["paths"].items()
            for method, op in item.items() if method in methods}


# ------------------------------------------------------------------ the tests

def test_document_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    doc = load()
    assert doc["openapi"].startswith("3.1.")
    validator.validate(doc)  # raises OpenAPIValidationError with the path of the fault


def test_schemas_are_valid_json_schema() -> None:
    for name, schema in load()["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{name}: {exc.message}")


def test_generated_schemas_match_the_code() -> None:
    doc = load()
    held = doc["components"]["schemas"]
    fresh = generated_schemas()
    stale = [name for name in GENERATED if held.get(name) != fresh[name]]
    assert not stale, (f"{', '.join(stale)} differ from the code: "
                       f"run python -m tests.test_serve_openapi --write")


def test_pushline_refuses_tokens_file() -> None:
    push = load()["components"]["schemas"]["PushLine"]
    assert "tokens_file" not in push["properties"]
    assert push["additionalProperties"] is False
    assert "tokens_file" in push["description"]
    assert "tokens_file" in PushLine.__struct_fields__  # the daemon still takes it


# Lines the schema and decode_line must judge alike (the structure, not value checks).
TOKEN = "a1b2c3d4" * 8
LINES: list[tuple[dict[str, Any], bool]] = [
    ({"token": TOKEN, "payload": {"aps": {"alert": "hi"}}}, True),
    ({"tokens": [TOKEN, "0f" * 32], "payload": {}, "id": {"any": ["json"]}}, True),
    ({"channel_id": "dHVuYQ==", "payload": {"aps": {}}, "priority": 5}, True),
    ({"token": TOKEN, "live_activity": {"event": "update", "content-state": {"x": 1}}}, True),
    ({"token": TOKEN, "tokens": None, "payload": {}}, True),
    ({"payload": {}}, False),                                   # no target
    ({"token": TOKEN, "channel_id": "x", "payload": {}}, False),  # two targets
    ({"token": TOKEN}, False),                                  # no payload
    ({"token": TOKEN, "payload": {}, "colour": "red"}, False),  # unknown field
    ({"token": TOKEN, "payload": []}, False),
    ({"token": 7, "payload": {}}, False),
    ({"token": TOKEN, "live_activity": {"content-state": {}}}, False),  # no event
    ({"token": TOKEN, "live_activity": {"event": "pause"}}, False),
    ({"token": TOKEN, "payload": {}, "environment": "staging"}, False),
]


@pytest.mark.parametrize(("line", "valid"), LINES)
def test_pushline_schema_agrees_with_decode_line(line: dict[str, Any], valid: bool) -> None:
    doc = load()
    by_schema = _validator(doc, {"$ref": "#/components/schemas/PushLine"}).is_valid(line)
    try:
        decode_line(json.dumps(line).encode())
        by_decoder = True
    except LineError:
        by_decoder = False
    assert (by_schema, by_decoder) == (valid, valid)


def test_tokens_file_is_invalid_by_the_schema() -> None:
    line = {"tokens_file": "/etc/passwd", "payload": {}}
    assert not _validator(load(), {"$ref": "#/components/schemas/PushLine"}).is_valid(line)


def test_examples_validate_and_decode() -> None:
    doc = load()
    seen = 0
    for (path, method), op in _operations(doc).items():
        contents = [op.get("requestBody", {}).get("content", {})]
        contents += [r.get("content", {}) for r in op["responses"].values()]
        for content in contents:
            for media in content.values():
                if "example" in media:
                    seen += 1
                    errors = [e.message for e in
                              _validator(doc, media["schema"]).iter_errors(media["example"])]
                    assert not errors, f"{method.upper()} {path}: {errors}"
    assert seen >= 5
    push = doc["paths"]["/v1/push"]["post"]["requestBody"]["content"]["application/json"]
    decode_line(json.dumps(push["example"]).encode())
    result = doc["paths"]["/v1/push"]["post"]["responses"]["200"]["content"]["application/json"]
    msgspec.json.decode(json.dumps(result["example"]), type=ResultLine)


def test_single_push_takes_no_tokens() -> None:
    check = _validator(load(), {"$ref": "#/components/schemas/SinglePush"})
    assert check.is_valid({"token": TOKEN, "payload": {}})
    assert check.is_valid({"channel_id": "x", "payload": {}})
    assert not check.is_valid({"tokens": [TOKEN], "payload": {}})


EXPECTED = {
    ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/openapi.json", "get"),
    ("/v1/push", "post"), ("/v1/pushes", "post"), ("/v1/fanout", "post"),
    ("/v1/channels", "post"), ("/v1/channels", "get"), ("/v1/channels/{id}", "get"),
    ("/v1/channels/{id}", "delete"), ("/v1/channels/{id}/broadcast", "post"),
    ("/api/push", "post"),
}


def test_every_endpoint_and_security() -> None:
    doc = load()
    ops = _operations(doc)
    assert set(ops) == EXPECTED
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    for (path, _), op in ops.items():
        if path == "/healthz":
            assert op["security"] == []
        else:
            assert "security" not in op  # the global bearer
            assert op["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}
    pushes = ops[("/v1/pushes", "post")]
    assert set(pushes["requestBody"]["content"]) == {"application/x-ndjson", "application/json"}
    for key in (("/v1/pushes", "post"), ("/v1/fanout", "post")):
        assert set(ops[key]["responses"]["200"]["content"]) == {"application/x-ndjson"}


NOT_ERRORS = {("/readyz", "503"), ("/api/push", "400"), ("/api/push", "403")}
"""Answers in their own shape: readiness, and gorush's ``{"code", "message"}``."""


def test_errors_use_the_error_schema_and_429_says_retry_after() -> None:
    doc = load()
    responses = doc["components"]["responses"]
    for (path, method), op in _operations(doc).items():
        for status, answer in op["responses"].items():
            if int(status) < 400 or (path, status) in NOT_ERRORS:
                continue
            if "$ref" in answer:
                answer = responses[answer["$ref"].rsplit("/", 1)[-1]]
            schema = answer["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if status == "429" and path in ("/v1/push", "/v1/channels/{id}/broadcast",
                                            "/api/push"):
                assert answer["headers"]["Retry-After"]["required"] is True


def test_error_codes_of_the_app_are_documented() -> None:
    if not APP.exists():
        pytest.skip("no fanout/_serve/app.py yet")
    documented = set(load()["components"]["schemas"]["Error"]["properties"]["error"]
                     ["properties"]["code"]["enum"])
    source = "".join(p.read_text() for p in APP.parent.glob("*.py"))
    used = {code for status, code in re.findall(r'HttpError\(\s*(\d+),\s*"(\w+)"',
                                                  source) if status != "499"}
    assert used and used <= documented, used - documented


def test_router_serves_what_the_document_says() -> None:
    from fanout._serve.app import App, HttpError, Limits

    app = App(None, default_topic=None, environment="production", teams=False, keys=None,
              limits=Limits())  # the router reads no engine
    by_path: dict[str, set[str]] = {}
    for path, method in EXPECTED:
        by_path.setdefault(path, set()).add(method.upper())
    for path, methods in by_path.items():
        concrete = path.replace("{id}", "ch1")
        for method in methods:
            _, handler, _ = app._route(method, concrete)
            assert handler is not None, (method, path)
        _, handler, args = app._route("PATCH", concrete)
        assert handler is None and isinstance(args[0], HttpError)
        assert args[0].status == 405
        assert set(dict(args[0].headers)[b"allow"].decode().split(", ")) == methods


def test_schemathesis_loads_the_document() -> None:
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_dict(load())
    labels = set()
    for result in schema.get_all_operations():
        labels.add(result.ok().label)  # an Err here is a document schemathesis cannot use
    assert labels == {f"{m.upper()} {p}" for p, m in EXPECTED}


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print(f"{DOC.relative_to(ROOT)}: " + ("rewritten" if write() else "up to date"))
    elif not sys.argv[1:]:
        stale = regenerate(load()) != load()
        print(f"{DOC.relative_to(ROOT)}: " + ("stale: run with --write" if stale else
                                             "up to date"))
        sys.exit(1 if stale else 0)
    else:
        sys.exit("usage: python -m tests.test_serve_openapi [--write]")
