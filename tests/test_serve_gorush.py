"""gorush's ``POST /api/push`` mapping (fanout/_serve/gorush.py): requests in the spirit of
gorush's README and notify/notification_apns_test.go, and the push lines they must give."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from fanout._daemon.core import line_template
from fanout._daemon.lines import PushLine, ResultLine, decode_line
from fanout._serve.gorush import (
    GorushError,
    Refusal,
    decode_gorush,
    gorush_error,
    gorush_response,
    log_entry,
    refusal_logs,
)
from fanout.outcome import Outcome, Reason, Result

A = "a1" * 32  # device tokens: hex, as fanout's validation wants them later
B = "b2" * 32
C = "c3" * 32


def body(*notifications: dict[str, Any]) -> bytes:
    return json.dumps({"notifications": list(notifications)}).encode()


def ios(**fields: Any) -> dict[str, Any]:
    fields.setdefault("tokens", [A])
    fields.setdefault("platform", 1)
    return fields


def one(**fields: Any) -> PushLine:
    request = decode_gorush(body(ios(**fields)), max_tokens=100)
    assert request.refused == [], request.refused
    assert len(request.pushes) == 1
    return request.pushes[0]


def aps(**fields: Any) -> dict[str, Any]:
    payload = one(**fields).payload
    assert payload is not None
    return payload["aps"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the payload table

LIVE_START = {
    "push_type": "liveactivity", "topic": "com.example.app.push-type.liveactivity",
    "event": "start", "timestamp": 1685952000,
    "content-state": {"homeScore": 0, "awayScore": 0, "minute": 1, "period": "1H"},
    "attributes-type": "FootballMatchAttributes",
    "attributes": {"homeTeam": "Team 1", "awayTeam": "Team 2", "league": "Premier League"},
    "alert": {"title": "Team 1 vs Team 2", "body": "Kick-off! The match has started."},
}

PAYLOADS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("title and message", {"title": "Hello iOS", "message": "Hello World iOS!"},
     {"aps": {"alert": {"body": "Hello World iOS!", "title": "Hello iOS"}}}),
    ("message alone is a plain alert", {"message": "Hello World iOS!"},
     {"aps": {"alert": "Hello World iOS!"}}),
    ("alert object and badge",
     {"badge": 5, "alert": {"title": "Game Request", "body": "Bob wants to play poker",
                            "action-loc-key": "PLAY"}},
     {"aps": {"alert": {"action-loc-key": "PLAY", "body": "Bob wants to play poker",
                        "title": "Game Request"}, "badge": 5}}),
    ("critical sound object",
     {"message": "You got your emails.", "badge": 9,
      "sound": {"critical": 1, "name": "default", "volume": 1.0}},
     {"aps": {"alert": "You got your emails.", "badge": 9,
              "sound": {"critical": 1, "name": "default", "volume": 1.0}}}),
    ("data at the top level",
     {"message": "Hello World iOS!", "data": {"key1": "welcome", "key2": 2}},
     {"aps": {"alert": "Hello World iOS!"}, "key1": "welcome", "key2": 2}),
    ("silent push", {"content_available": True},
     {"aps": {"content-available": 1}}),
    ("any alert key replaces the plain message",
     {"message": "lost", "alert": {"summary-arg": "test", "summary-arg-count": 3}},
     {"aps": {"alert": {"summary-arg": "test", "summary-arg-count": 3}}}),
    ("alert.body overrides message beside a title",
     {"title": "T", "message": "M", "alert": {"body": "override", "subtitle": "S"}},
     {"aps": {"alert": {"body": "override", "title": "T", "subtitle": "S"}}}),
    ("alert.title without title drops message",
     {"message": "M", "alert": {"title": "T"}},
     {"aps": {"alert": {"title": "T"}}}),
    ("localization keys",
     {"alert": {"loc-key": "K", "loc-args": ["a", "b"], "title-loc-key": "TK",
                "title-loc-args": ["c"], "launch-image": "i.png", "action": "Open"}},
     {"aps": {"alert": {"action": "Open", "launch-image": "i.png", "loc-args": ["a", "b"],
                        "loc-key": "K", "title-loc-args": ["c"], "title-loc-key": "TK"}}}),
    ("sound name", {"sound": "bingbong.aiff"}, {"aps": {"sound": "bingbong.aiff"}}),
    ("sound object keeps only non-zero keys", {"sound": {"critical": 0, "name": "x"}},
     {"aps": {"sound": {"name": "x"}}}),
    ("critical read from a float", {"sound": {"critical": 1.0, "name": "x", "volume": 0.5}},
     {"aps": {"sound": {"critical": 1, "name": "x", "volume": 0.5}}}),
    ("name and volume make a critical sound",
     {"sound": {"critical": 3, "name": "test", "volume": 4.5}, "name": "foobar",
      "volume": 0.8},
     {"aps": {"sound": {"critical": 1, "name": "foobar", "volume": 0.8}}}),
    ("volume alone: the default name", {"volume": 0.3},
     {"aps": {"sound": {"critical": 1, "name": "default", "volume": 0.3}}}),
    ("name alone: full volume", {"sound": "ignored", "name": "n"},
     {"aps": {"sound": {"critical": 1, "name": "n", "volume": 1.0}}}),
    ("badge 0 clears", {"badge": 0}, {"aps": {"badge": 0}}),
    ("badge below 0 is left out", {"badge": -1, "message": "m"}, {"aps": {"alert": "m"}}),
    ("aps keys",
     {"message": "m", "category": "C", "thread-id": "T", "mutable_content": True,
      "interruption_level": "time-sensitive", "url-args": ["x"], "relevance-score": 0},
     {"aps": {"alert": "m", "category": "C", "interruption-level": "time-sensitive",
              "mutable-content": 1, "relevance-score": 0, "thread-id": "T",
              "url-args": ["x"]}}),
    ("live activity push-to-start", LIVE_START,
     {"aps": {"alert": LIVE_START["alert"], "content-state": LIVE_START["content-state"],
              "event": "start", "timestamp": 1685952000,
              "attributes-type": "FootballMatchAttributes",
              "attributes": LIVE_START["attributes"]}}),
    ("live activity dates: 0 is left out",
     {"event": "end", "content-state": {"s": 1}, "dismissal-date": 1700000000,
      "stale-date": 0, "timestamp": 0},
     {"aps": {"content-state": {"s": 1}, "dismissal-date": 1700000000, "event": "end"}}),
    ("empty strings, false, null and empty objects are absent",
     {"message": "", "title": "", "sound": "", "category": "", "alert": {"body": ""},
      "badge": None, "content_available": False, "data": {}, "content-state": {}},
     {"aps": {}}),
    ("fields gorush ignores for iOS",
     {"message": "m", "to": C, "image": "http://x", "retry": 3, "subtitle": "s",
      "apns": {"payload": {"aps": {"sound": "s"}}}, "notification": {"title": "t"},
      "huawei_data": "{}", "priority_x": 1},
     {"aps": {"alert": "m"}}),
]


@pytest.mark.parametrize(("fields", "payload"), [(f, p) for _, f, p in PAYLOADS],
                         ids=[name for name, _, _ in PAYLOADS])
def test_payload(fields: dict[str, Any], payload: dict[str, Any]) -> None:
    push = one(**fields)
    assert push.payload == payload
    assert list(push.payload) == list(payload)  # aps first, then the data keys
    # apns2's key order, so the bytes read like gorush's
    assert list(push.payload["aps"]) == list(payload["aps"])


@pytest.mark.parametrize("fields", [f for _, f, _ in PAYLOADS],
                         ids=[name for name, _, _ in PAYLOADS])
def test_lines_are_daemon_lines(fields: dict[str, Any]) -> None:
    """Each push is a line the daemon itself would take, and encodes to a template."""
    push = one(**fields)
    assert decode_line(msgspec.json.encode(push)) == push
    template = line_template(push, "com.example.app")
    assert json.loads(template.body) == push.payload


# ------------------------------------------------------------------ headers and targets

def test_headers() -> None:
    push = one(topic="com.example.app", push_type="alert", apns_id="7e3c5d5a-1b8c-4f0e-9c7a-"
               "2f1d3e4b5a6c", collapse_id="game", expiration=1700000000, priority="high",
               notif_id="n-1", message="m")
    assert push == PushLine(
        payload={"aps": {"alert": "m"}}, token=A, topic="com.example.app", push_type="alert",
        apns_id="7e3c5d5a-1b8c-4f0e-9c7a-2f1d3e4b5a6c", collapse_id="game",
        expiration=1700000000, priority=10, id="n-1")


def test_header_defaults() -> None:
    push = one(message="m", topic="", push_type="", priority="")
    assert (push.topic, push.push_type, push.priority, push.expiration, push.collapse_id,
            push.apns_id, push.id, push.environment) == (None,) * 8


def test_priority_normal_and_expiration_zero() -> None:
    push = one(content_available=True, priority="normal", expiration=0)
    assert (push.priority, push.expiration) == (5, 0)  # gorush sends 0: expire at once


def test_tokens() -> None:
    single = one(tokens=[A], message="m")
    assert (single.token, single.tokens) == (A, None)
    many = one(tokens=[A, B, A], message="m")
    assert (many.token, many.tokens) == (None, [A, B, A])  # as given, like gorush


@pytest.mark.parametrize(("flags", "environment"), [
    ({}, None),
    ({"production": True}, "production"),
    ({"development": True}, "sandbox"),
    ({"production": True, "development": True}, "production"),  # gorush checks it first
    ({"production": False, "development": False}, None),
])
def test_environment(flags: dict[str, bool], environment: str | None) -> None:
    assert one(message="m", **flags).environment == environment


def test_environment_the_server_cannot_reach_is_refused() -> None:
    request = decode_gorush(body(ios(message="p", production=True),
                                 ios(message="s", development=True, tokens=[B]),
                                 ios(message="d")),
                            max_tokens=10, environments={"sandbox"})
    assert [p.environment for p in request.pushes] == ["sandbox", None]
    assert request.indexes == [1, 2]
    [refusal] = request.refused
    assert refusal.index == 0
    assert refusal.message == ("production: true asks for APNs production, but this server "
                               "sends to sandbox only")
    both = decode_gorush(body(ios(message="p", production=True)), max_tokens=10,
                         environments={"sandbox", "production"})
    assert both.pushes[0].environment == "production"


# ------------------------------------------------------------------ refusals

def test_other_platforms_are_refused_and_the_rest_sent() -> None:
    request = decode_gorush(body(
        ios(tokens=[A], message="Hello iOS!"),
        {"tokens": [B], "platform": 2, "message": "Hello Android!", "notif_id": "and"},
        {"tokens": [C], "platform": 3, "message": "Hello Huawei!"},
        {"tokens": [C], "platform": 7},
        {"tokens": [C], "message": "no platform"},
        ios(tokens=[B, C], title="t"),
    ), max_tokens=100)
    assert request.indexes == [0, 5]
    assert request.messages == ["Hello iOS!", ""]
    assert request.counts == 3
    assert [(r.index, r.message) for r in request.refused] == [
        (1, "platform 2 (Android) is not served: fanout sends to APNs only"),
        (2, "platform 3 (Huawei) is not served: fanout sends to APNs only"),
        (3, "platform 7 is not served: fanout sends to APNs only"),
        (4, "platform is missing: fanout serves platform 1 (iOS) only"),
    ]
    android = request.refused[0]
    assert (android.platform, android.notif_id, android.push_message, android.tokens) == (
        2, "and", "Hello Android!", (B,))


def test_refused_platform_fields_are_not_read() -> None:
    """An Android notification's own fields are not iOS-checked (FCM reads them)."""
    request = decode_gorush(body({"tokens": [B], "platform": 2, "priority": "max",
                                  "sound": 3, "badge": "1", "data": {"aps": 1}}),
                            max_tokens=10)
    assert request.pushes == [] and len(request.refused) == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"tokens": []}, "no device token (tokens is empty)"),
    ({"tokens": None}, "no device token (tokens is empty)"),
    ({"data": {"aps": {"alert": "x"}, "k": 1}},
     "data.aps is not allowed: the aps dictionary is built from the notification's fields"),
])
def test_refusals(fields: dict[str, Any], message: str) -> None:
    request = decode_gorush(body(ios(message="m", **fields)), max_tokens=10)
    assert request.pushes == []
    assert [(r.index, r.message) for r in request.refused] == [(0, message)]


def test_refusal_repr_hides_tokens() -> None:
    request = decode_gorush(body({"tokens": [A, B], "platform": 2}), max_tokens=10)
    assert A not in repr(request) and A not in repr(request.refused)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize(("raw", "message"), [
    (b"not json", "body is not JSON"),
    (b'{"notifications": [', "body is not JSON"),
    (b'{"notifications": ["\xff"]}', "body is not JSON"),
    (b"[]", "Missing notifications field."),
    (b'{"notification": []}', "Missing notifications field."),
    (b'{"notifications": null}', "Missing notifications field."),
    (b'{"notifications": {}}', "notifications must be a list, got an object"),
    (b'{"notifications": []}', "Notifications field is empty."),
    (b'{"notifications": [1]}', "notifications[0] must be an object, got an integer"),
])
def test_body_errors(raw: bytes, message: str) -> None:
    with pytest.raises(GorushError) as ei:
        decode_gorush(raw, max_tokens=10)
    assert str(ei.value).startswith(message)
    assert (ei.value.code, ei.value.status) == ("bad_request", 400)


@pytest.mark.parametrize(("fields", "message"), [
    ({"badge": "3"}, "notifications[1].badge must be an integer, got a string"),
    ({"badge": 3.0}, "notifications[1].badge must be an integer, got a number"),
    ({"badge": True}, "notifications[1].badge must be an integer, got a boolean"),
    ({"tokens": A}, "notifications[1].tokens must be a list of strings, got a string"),
    ({"tokens": [A, 1]}, "notifications[1].tokens[1] must be a string, got an integer"),
    ({"platform": "ios"}, "notifications[1].platform must be an integer, got a string"),
    ({"message": 1}, "notifications[1].message must be a string, got an integer"),
    ({"notif_id": 7}, "notifications[1].notif_id must be a string, got an integer"),
    ({"alert": "hi"}, "notifications[1].alert must be an object (a plain alert is the "
                      "message field), got a string"),
    ({"alert": {"title": 1}}, "notifications[1].alert.title must be a string"),
    ({"alert": {"loc-args": "a"}}, "notifications[1].alert.loc-args must be a list of"),
    ({"alert": {"summary-arg-count": "2"}}, "notifications[1].alert.summary-arg-count must"),
    ({"sound": 5}, "notifications[1].sound must be a string or an object, got an integer"),
    ({"sound": ["a"]}, "notifications[1].sound must be a string or an object, got a list"),
    ({"sound": {"volume": "x"}}, "notifications[1].sound.volume must be a number"),
    ({"sound": {"critical": 1.5}}, "notifications[1].sound.critical must be an integer"),
    ({"sound": {"name": 2}}, "notifications[1].sound.name must be a string"),
    ({"volume": "0.5"}, "notifications[1].volume must be a number, got a string"),
    ({"content_available": "true"},
     "notifications[1].content_available must be a boolean (true or false), got a string"),
    ({"production": 1}, "notifications[1].production must be a boolean"),
    ({"data": []}, "notifications[1].data must be an object, got a list"),
    ({"content-state": "x"}, "notifications[1].content-state must be an object"),
    ({"expiration": "1"}, "notifications[1].expiration must be an integer"),
    ({"relevance-score": "1"}, "notifications[1].relevance-score must be a number"),
    ({"url-args": [1]}, "notifications[1].url-args[0] must be a string"),
    ({"priority": "low"}, "notifications[1].priority must be \"high\" or \"normal\", got 'low'"),
    ({"priority": 10}, "notifications[1].priority must be a string, got an integer"),
    ({"topic": ["a"]}, "notifications[1].topic must be a string, got a list"),
])
def test_field_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(GorushError) as ei:
        decode_gorush(body(ios(message="ok"), ios(**fields)), max_tokens=10)
    assert str(ei.value).startswith(message), str(ei.value)
    assert A not in str(ei.value)


def test_too_many_tokens_counts_every_platform() -> None:
    request = body(ios(tokens=[A, B]), {"tokens": [C, C], "platform": 2})
    assert decode_gorush(request, max_tokens=4).counts == 2
    with pytest.raises(GorushError) as ei:
        decode_gorush(request, max_tokens=3)
    assert str(ei.value) == "Number of device tokens (4) over limit (3)"
    assert ei.value.code == "too_many_tokens"


# ------------------------------------------------------------------ the answer

def test_response_shape() -> None:
    assert gorush_response(0, []) == b'{"counts":0,"logs":[],"success":"ok"}'
    logs = [{"type": "failed-push", "platform": "ios", "token": A, "message": "m",
             "error": "BadDeviceToken"}]
    assert json.loads(gorush_response(2, logs)) == {"counts": 2, "logs": logs,
                                                   "success": "ok"}
    assert gorush_error("Missing notifications field.") == (
        b'{"code":400,"message":"Missing notifications field."}')


def test_log_entry_from_result() -> None:
    assert log_entry(Result(outcome=Outcome.DELIVERED, token=A)) is None
    bad = Result(outcome=Outcome.INVALID_TOKEN, token=A, status=400,
                 reason=Reason.BAD_DEVICE_TOKEN)
    entry = log_entry(bad, notif_id="n1", message="Hello")
    assert entry == {"notif_id": "n1", "type": "failed-push", "platform": "ios", "token": A,
                     "message": "Hello", "error": "BadDeviceToken"}
    assert list(entry) == ["notif_id", "type", "platform", "token", "message", "error"]
    lost = Result(outcome=Outcome.RETRIES_EXHAUSTED, token=A, error="connection lost")
    assert log_entry(lost) == {"type": "failed-push", "platform": "ios", "token": A,
                               "message": "", "error": "retries_exhausted: connection lost"}
    bare = log_entry(Result(outcome=Outcome.MAYBE_DELIVERED, token=A))
    assert bare is not None and bare["error"] == "maybe_delivered"


def test_log_entry_from_result_line() -> None:
    assert log_entry(ResultLine(id=None, line=1, outcome="delivered", token=A)) is None
    line = ResultLine(id="n", line=1, outcome="rejected", token=A, status=400,
                      reason="DeviceTokenNotForTopic")
    entry = log_entry(line, message="m", hide_token=True)
    assert entry is not None and entry["error"] == "DeviceTokenNotForTopic"
    assert A not in entry["token"] and entry["token"].startswith(A[:6])
    malformed = ResultLine(id=None, line=1, outcome="malformed", error="payload: too big")
    assert log_entry(malformed) == {"type": "failed-push", "platform": "ios", "token": "",
                                    "message": "", "error": "malformed: payload: too big"}


def test_refusal_logs() -> None:
    [refusal] = decode_gorush(body({"tokens": [A, B], "platform": 2, "notif_id": "x",
                                    "message": "Hello Android!"}), max_tokens=10).refused
    why = "platform 2 (Android) is not served: fanout sends to APNs only"
    assert refusal_logs(refusal) == [
        {"notif_id": "x", "type": "failed-push", "platform": "android", "token": t,
         "message": "Hello Android!", "error": why} for t in (A, B)]
    hidden = refusal_logs(refusal, hide_token=True)
    assert all(A not in e["token"] and B not in e["token"] for e in hidden)
    empty = refusal_logs(Refusal(0, "no device token (tokens is empty)", 1))
    assert empty == [{"type": "failed-push", "platform": "ios", "token": "", "message": "",
                      "error": "no device token (tokens is empty)"}]
    odd = refusal_logs(Refusal(0, "platform 7 ...", 7, tokens=(A,)))
    assert odd[0]["platform"] == ""
