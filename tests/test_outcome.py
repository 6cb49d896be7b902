import msgspec
import pytest

from fanout.outcome import (
    OUTCOME_CLASSES,
    OUTCOME_OF,
    REASONS,
    Action,
    Outcome,
    Reason,
    Result,
    classify,
    outcome_class,
    parse_error_body,
)

A = Action

# Apple's device-push reasons, written out by hand: (status, reason) -> action.
DEVICE_TABLE = {
    "BadCollapseId": (400, A.FIX),
    "BadDeviceToken": (400, A.DROP_TOKEN),
    "BadExpirationDate": (400, A.FIX),
    "BadMessageId": (400, A.FIX),
    "BadPriority": (400, A.FIX),
    "BadTopic": (400, A.FIX),
    "DeviceTokenNotForTopic": (400, A.DROP_TOKEN),
    "DuplicateHeaders": (400, A.FIX),
    "IdleTimeout": (400, A.RECONNECT),
    "InvalidPushType": (400, A.FIX),
    "MissingDeviceToken": (400, A.FIX),
    "MissingTopic": (400, A.FIX),
    "PayloadEmpty": (400, A.FIX),
    "TopicDisallowed": (400, A.CONFIG),
    "BadCertificate": (403, A.CONFIG),
    "BadCertificateEnvironment": (403, A.CONFIG),
    "ExpiredProviderToken": (403, A.REFRESH_AUTH),
    "Forbidden": (403, A.CONFIG),
    "InvalidProviderToken": (403, A.CONFIG),
    "MissingProviderToken": (403, A.CONFIG),
    "UnrelatedKeyIdInToken": (403, A.RECONNECT),
    "BadEnvironmentKeyIdInToken": (403, A.CONFIG),
    "BadPath": (404, A.FIX),
    "MethodNotAllowed": (405, A.FIX),
    "ExpiredToken": (410, A.DROP_TOKEN),
    "Unregistered": (410, A.DROP_TOKEN),
    "PayloadTooLarge": (413, A.FIX),
    "TooManyProviderTokenUpdates": (429, A.RECONNECT),
    "TooManyRequests": (429, A.RETRY_TOKEN),
    "InternalServerError": (500, A.RETRY_BACKOFF),
    "ServiceUnavailable": (503, A.RETRY_BACKOFF),
    "Shutdown": (503, A.RECONNECT),
}

# Apple's broadcast reasons not already in the device table.
BROADCAST_TABLE = {
    "FeatureNotEnabled": (400, A.CONFIG),
    "MissingChannelId": (400, A.FIX),
    "BadChannelId": (400, A.FIX),
    "ChannelNotRegistered": (400, A.CHANNEL_GONE),
    "BadRequestParams": (400, A.FIX),
    "BadRequestPayload": (400, A.FIX),
    "MissingPushType": (400, A.FIX),
    "CannotCreateChannelConfig": (400, A.CONFIG),
    "TopicMismatch": (403, A.CONFIG),
    "Service Unavailable": (503, A.RETRY_BACKOFF),
}

# Every broadcast reason (including those shared with device pushes) must be known.
BROADCAST_REASONS_63 = {
    "FeatureNotEnabled", "MissingChannelId", "BadChannelId", "ChannelNotRegistered",
    "BadRequestParams", "BadRequestPayload", "PayloadEmpty", "BadMessageId", "MissingPushType",
    "InvalidPushType", "CannotCreateChannelConfig", "BadExpirationDate", "TopicDisallowed",
    "BadPriority", "BadCertificate", "BadCertificateEnvironment", "TopicMismatch",
    "MissingProviderToken", "ExpiredProviderToken", "InvalidProviderToken", "BadPath",
    "MethodNotAllowed", "PayloadTooLarge", "TooManyRequests", "TooManyProviderTokenUpdates",
    "InternalServerError", "ServiceUnavailable", "Shutdown",
}  # fmt: skip


def test_reasons_table_is_exactly_the_doc():
    assert set(REASONS) == set(DEVICE_TABLE) | set(BROADCAST_TABLE)
    assert BROADCAST_REASONS_63 <= set(REASONS)


@pytest.mark.parametrize("reason", sorted({**DEVICE_TABLE, **BROADCAST_TABLE}))
def test_each_reason(reason):
    status, action = {**DEVICE_TABLE, **BROADCAST_TABLE}[reason]
    info = REASONS[reason]
    assert (info.status, info.action) == (status, action)
    assert info.description
    assert classify(status, reason) is action


def test_reason_wins_over_status():
    assert classify(400, "Unregistered") is A.DROP_TOKEN
    assert classify(500, "BadDeviceToken") is A.DROP_TOKEN
    assert classify(403, "ExpiredProviderToken") is A.REFRESH_AUTH
    assert classify(503, "Shutdown") is A.RECONNECT


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (200, A.DELIVERED),
        (201, A.DELIVERED),
        (204, A.DELIVERED),
        (410, A.DROP_TOKEN),
        (429, A.RETRY_TOKEN),
        (500, A.RETRY_BACKOFF),
        (502, A.RETRY_BACKOFF),
        (503, A.RETRY_BACKOFF),
        (599, A.RETRY_BACKOFF),
        (403, A.CONFIG),
        (400, A.FIX),
        (404, A.FIX),
        (413, A.FIX),
        (418, A.FIX),
        (0, A.FIX),
        (302, A.FIX),
        (700, A.FIX),
    ],
)
@pytest.mark.parametrize("reason", [None, "", "SomethingNew", "unregistered"])
def test_unknown_reason_by_status(status, reason, action):
    assert classify(status, reason) is action


def test_200_is_delivered_whatever_the_reason():
    assert classify(200, "BadDeviceToken") is A.DELIVERED


def test_outcome_of_terminal_actions():
    assert OUTCOME_OF == {
        A.DELIVERED: Outcome.DELIVERED,
        A.DROP_TOKEN: Outcome.INVALID_TOKEN,
        A.FIX: Outcome.REJECTED,
        A.CONFIG: Outcome.CONFIG_ERROR,
        A.CHANNEL_GONE: Outcome.REJECTED,
    }


def test_outcome_class_bounded():
    for outcome in Outcome:
        for reason in [None, "BadTopic", "ChannelNotRegistered", "x" * 1000]:
            assert outcome_class(outcome, reason) in OUTCOME_CLASSES
    assert outcome_class(Outcome.DELIVERED, None) == "ok"
    assert outcome_class(Outcome.INVALID_TOKEN, "Unregistered") == "token"
    assert outcome_class(Outcome.REJECTED, "PayloadTooLarge") == "payload"
    assert outcome_class(Outcome.CONFIG_ERROR, "InvalidProviderToken") == "config"
    assert outcome_class(Outcome.RETRIES_EXHAUSTED, "InternalServerError") == "retry"
    assert outcome_class(Outcome.RETRIES_EXHAUSTED, None) == "transport"
    assert outcome_class(Outcome.MAYBE_DELIVERED, None) == "transport"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"reason":"BadDeviceToken"}', ("BadDeviceToken", None)),
        (b'{"reason":"Unregistered","timestamp":1700000000123}', ("Unregistered", 1700000000123)),
        (b'{"timestamp":1700000000123,"reason":"Unregistered","x":[1,{}]}', ("Unregistered", 1700000000123)),
        (b' {"reason" : "Shutdown"}\n', ("Shutdown", None)),
        (b'{"reason":"Unregistered","timestamp":"soon"}', ("Unregistered", None)),
        (b'{"reason":42,"timestamp":5}', (None, 5)),
        (b'{"reason":"Unregistered","timestamp":true}', ("Unregistered", None)),
        (b'{"reason":"Unregistered","timestamp":1.7e12}', ("Unregistered", 1700000000000)),
        (b"{}", (None, None)),
        (b"", (None, None)),
        (b"null", (None, None)),
        (b"[1,2]", (None, None)),
        (b'"reason"', (None, None)),
        (b'{"reason":"Bad', (None, None)),
        (b"<html>502 Bad Gateway</html>", (None, None)),
        (b"\xff\xfe\x00garbage", (None, None)),
        (b"[" * 10000, (None, None)),
    ],
)  # fmt: skip
def test_parse_error_body(body, expected):
    assert parse_error_body(body) == expected


def test_parse_error_body_huge():
    pad = b" " * (10 * 1024 * 1024)
    assert parse_error_body(b'{"reason":"Unregistered"}' + pad) == (None, None)
    big_reason = b'{"reason":"' + b"A" * 5000 + b'"}'
    reason, ts = parse_error_body(big_reason)
    assert reason is not None and len(reason) <= 128 and ts is None
    assert parse_error_body(bytearray(b'{"reason":"Shutdown"}')) == ("Shutdown", None)
    assert parse_error_body(memoryview(b'{"reason":"Shutdown"}')) == ("Shutdown", None)


def test_result_json_omits_none_fields():
    r = Result(outcome=Outcome.DELIVERED, id=7, token="abcd", status=200)
    assert r.ok
    assert msgspec.json.encode(r) == b'{"outcome":"delivered","id":7,"token":"abcd","status":200}'
    r = Result(
        outcome=Outcome.INVALID_TOKEN,
        status=410,
        reason="Unregistered",
        timestamp=1700000000123,
        attempts=1,
        latency_ms=12.5,
    )
    assert not r.ok
    assert msgspec.json.decode(msgspec.json.encode(r)) == {
        "outcome": "invalid_token",
        "status": 410,
        "reason": "Unregistered",
        "timestamp": 1700000000123,
        "attempts": 1,
        "latency_ms": 12.5,
    }
    assert msgspec.json.decode(msgspec.json.encode(r), type=Result) == r


def test_result_is_kw_only():
    with pytest.raises(TypeError):
        Result(Outcome.DELIVERED)  # type: ignore[misc]


def test_reason_enum_is_exactly_the_table():
    assert {r.value for r in Reason} == set(REASONS)
    assert all(isinstance(k, Reason) for k in REASONS)
    assert Reason("BadDeviceToken") is Reason.BAD_DEVICE_TOKEN
    assert Reason.BAD_DEVICE_TOKEN == "BadDeviceToken"  # a str: old comparisons hold


def test_a_reason_apple_adds_later_is_kept_not_lost():
    new = Reason("SomethingNew")
    assert isinstance(new, Reason) and new == "SomethingNew" and new.value == "SomethingNew"
    assert new not in REASONS and new not in list(Reason)
    assert classify(403, new) is Action.CONFIG  # falls back to the status
    reason, _ = parse_error_body(b'{"reason":"SomethingNew"}')
    assert reason == "SomethingNew" and isinstance(reason, Reason)
    known, _ = parse_error_body(b'{"reason":"Unregistered","timestamp":1}')
    assert known is Reason.UNREGISTERED
    line = msgspec.json.encode(Result(outcome=Outcome.REJECTED, reason=new))
    assert line == b'{"outcome":"rejected","reason":"SomethingNew"}'
    back = msgspec.json.decode(line, type=Result)
    assert back.reason == "SomethingNew" and isinstance(back.reason, Reason)


def test_unknown_reasons_do_not_grow_memory():
    from fanout import outcome

    for i in range(outcome._MAX_UNKNOWN + 50):
        assert Reason(f"Made{i}").value == f"Made{i}"
    assert len(outcome._unknown) <= outcome._MAX_UNKNOWN
    with pytest.raises(ValueError):
        Reason("")
