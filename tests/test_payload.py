import json
import uuid

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fanout.payload as pl
from fanout.errors import ValidationError
from fanout.payload import (
    TOPIC_SUFFIX,
    Alert,
    Aps,
    CriticalSound,
    Notification,
    Payload,
    Prepared,
    PushTemplate,
    PushType,
    decode_payload,
    encode_payload,
    prepare,
    topic_for,
)

TOKEN = "0123456789abcdef" * 4
BUNDLE = "com.example.app"
ALERT = Payload(aps=Aps(alert="hi"))
BG = Payload(aps=Aps(content_available=1))


def note(**kw):
    kw.setdefault("token", TOKEN)
    kw.setdefault("payload", ALERT)
    kw.setdefault("topic", BUNDLE)
    return Notification(**kw)


def rejects(field, **kw):
    with pytest.raises(ValidationError) as ei:
        prepare(note(**kw))
    assert ei.value.field == field, ei.value
    assert str(ei.value).startswith(f"{field}: ")
    return ei.value


# --------------------------------------------------------------------------- prepare


def test_prepare_builds_header_bytes():
    aid = "123E4567-E89B-12D3-A456-426614174000"
    p = prepare(
        note(
            token=TOKEN.upper(),
            priority=5,
            expiration=1700000000,
            collapse_id="c1",
            apns_id=aid,
            id=42,
        )
    )
    assert isinstance(p, Prepared)
    assert p.token == TOKEN
    assert p.path == b"/3/device/" + TOKEN.encode()
    assert p.body == b'{"aps":{"alert":"hi"}}'
    assert p.push_type == b"alert"
    assert p.topic == BUNDLE.encode()
    assert p.priority == b"5"
    assert p.expiration == b"1700000000"
    assert p.collapse_id == b"c1"
    assert p.apns_id == aid.lower().encode()
    assert p.id == 42
    assert p.limit == 4096
    assert TOKEN not in repr(p)


def test_prepare_defaults():
    p = prepare(note())
    assert (p.priority, p.expiration, p.collapse_id, p.apns_id, p.id) == (
        b"10",
        None,
        None,
        None,
        None,
    )


def test_prepare_default_topic():
    p = prepare(note(topic=None, push_type=PushType.VOIP), default_topic=BUNDLE)
    assert p.topic == b"com.example.app.voip"
    assert p.limit == 5120
    assert prepare(note(topic="com.other"), default_topic=BUNDLE).topic == b"com.other"


@pytest.mark.parametrize("n", [2, 16, 64, 108, 160, 200, 512])
def test_variable_length_tokens(n):
    tok = ("a1" * 300)[:n]
    assert prepare(note(token=tok)).token == tok
    assert PushTemplate(ALERT, topic=BUNDLE).for_token(tok.upper()).token == tok


@pytest.mark.parametrize(
    "token",
    [
        TOKEN[:-1],  # odd
        TOKEN[:-2] + "zz",  # non-hex
        TOKEN[:-2] + "  ",  # whitespace (bytes.fromhex would skip it)
        TOKEN[:30] + " " + TOKEN[31:],
        TOKEN[:-2] + "é1",
        TOKEN[:-2] + "0x",
        "-" + TOKEN[1:],
        "ab" * 257,  # too long
    ],
)
def test_bad_tokens(token):
    err = rejects("token", token=token)
    assert token not in str(err)
    with pytest.raises(ValidationError) as ei:
        PushTemplate(ALERT, topic=BUNDLE).for_token(token)
    assert ei.value.field == "token" and token not in str(ei.value)


@pytest.mark.parametrize("token", ["", None, b"abcd", 1234])
def test_token_wrong_type_or_empty(token):
    rejects("token", token=token)


def _body_of(size, push_type=PushType.ALERT):
    """A dict payload whose JSON encoding is exactly ``size`` bytes (a background one with
    the content-available it needs)."""
    aps = {"content-available": 1} if push_type is PushType.BACKGROUND else {}
    base = len(encode_payload({"aps": aps, "p": ""}))
    return {"aps": aps, "p": "x" * (size - base)}


@pytest.mark.parametrize(
    ("push_type", "limit"),
    [(PushType.ALERT, 4096), (PushType.BACKGROUND, 4096), (PushType.VOIP, 5120)],
)
def test_size_limits(push_type, limit):
    ok = _body_of(limit, push_type)
    assert len(encode_payload(ok)) == limit
    assert len(prepare(note(payload=ok, push_type=push_type)).body) == limit
    raw = b"x" * limit
    assert prepare(note(payload=raw, push_type=push_type)).body is raw
    err = rejects("payload", payload=_body_of(limit + 1, push_type), push_type=push_type)
    assert str(limit + 1) in err.message and str(limit) in err.message
    rejects("payload", payload=b"x" * (limit + 1), push_type=push_type)


def test_size_limit_struct_payload():
    p = Payload(aps=Aps(alert="x" * 4096))
    err = rejects("payload", payload=p)
    assert "4096" in err.message


def test_voip_accepts_more_than_4096():
    prepare(note(payload=_body_of(5000), push_type=PushType.VOIP))
    rejects("payload", payload=_body_of(5000), push_type=PushType.ALERT)


@pytest.mark.parametrize("payload", [b"", "", bytearray()])
def test_empty_payload(payload):
    rejects("payload", payload=payload)


def test_payload_wrong_type():
    rejects("payload", payload=12)
    rejects("payload", payload={"a": object()})
    rejects("payload", payload="\ud800")


def test_collapse_id():
    assert prepare(note(collapse_id="a" * 64)).collapse_id == b"a" * 64
    assert prepare(note(collapse_id="é" * 32)).collapse_id == ("é" * 32).encode()
    err = rejects("collapse_id", collapse_id="é" * 32 + "a")
    assert "65" in err.message
    rejects("collapse_id", collapse_id="a" * 65)
    rejects("collapse_id", collapse_id="")
    rejects("collapse_id", collapse_id="a\r\nb")
    rejects("collapse_id", collapse_id=5)


@pytest.mark.parametrize(
    ("push_type", "priority", "expected"),
    [
        (PushType.ALERT, None, b"10"),
        (PushType.ALERT, 5, b"5"),
        (PushType.ALERT, 1, b"1"),
        (PushType.BACKGROUND, None, b"5"),
        (PushType.BACKGROUND, 5, b"5"),
        (PushType.PUSHTOTALK, None, b"10"),
        (PushType.LIVEACTIVITY, None, b"10"),
        (PushType.VOIP, None, b"10"),
    ],
)
def test_priority_ok(push_type, priority, expected):
    payload = BG if push_type is PushType.BACKGROUND else b'{"aps":{}}'
    assert (
        prepare(note(push_type=push_type, priority=priority, payload=payload)).priority == expected
    )


@pytest.mark.parametrize(
    ("push_type", "priority"),
    [
        (PushType.ALERT, 7),
        (PushType.ALERT, 0),
        (PushType.ALERT, "10"),
        (PushType.ALERT, 10.0),
        (PushType.ALERT, True),
        (PushType.BACKGROUND, 10),
        (PushType.BACKGROUND, 1),
    ],
)
def test_priority_bad(push_type, priority):
    rejects("priority", push_type=push_type, priority=priority, payload=BG)


def test_topic_required():
    err = rejects("topic", topic=None)
    assert "required" in err.message
    rejects("topic", topic="")
    rejects("topic", topic="com.x y")
    rejects("topic", topic="com.\nx")


@pytest.mark.parametrize("expiration", [-1, "1700000000", 1.5, True, 1700000000000])
def test_expiration_bad(expiration):
    rejects("expiration", expiration=expiration)


def test_expiration_ok():
    assert prepare(note(expiration=0)).expiration == b"0"


@pytest.mark.parametrize(
    "apns_id",
    [
        "123e4567e89b12d3a456426614174000",
        "{123e4567-e89b-12d3-a456-426614174000}",
        "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-42661417400g",
        "123e4567e-89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-4266-4174000",
        "",
        42,
    ],
)
def test_apns_id_bad(apns_id):
    rejects("apns_id", apns_id=apns_id)


def test_apns_id_uuid_object():
    u = uuid.uuid4()
    assert prepare(note(apns_id=u)).apns_id == str(u).encode()


def test_push_type_str_and_bad():
    assert prepare(note(push_type="VoIP")).push_type == b"voip"
    rejects("push_type", push_type="email")


# --------------------------------------------------------------------------- aps rules


def test_background_needs_content_available():
    rejects("payload", push_type=PushType.BACKGROUND, payload=ALERT)
    rejects("payload", push_type=PushType.BACKGROUND, payload=Payload(aps=Aps(content_available=0)))
    assert prepare(note(push_type=PushType.BACKGROUND, payload=BG)).body == (
        b'{"aps":{"content-available":1}}'
    )
    # a plain dict is checked as a Payload (issue 18); only pre-encoded bytes are not
    rejects("payload", push_type=PushType.BACKGROUND, payload={"aps": {}})
    prepare(note(push_type=PushType.BACKGROUND, payload=b'{"aps":{}}'))


@pytest.mark.parametrize(("payload", "needle"), [
    ({"aps": {"alrt": "x"}}, "alrt"),
    ({"aps": {"badge": "3"}}, "badge"),
    ({"aps": {"alert": {"title": 1}}}, "title"),
    ({"aps": "hi"}, "aps must be an object"),
    ({"aps": {"interruption-level": "loud"}}, "interruption-level"),
])
def test_a_plain_dict_payload_is_checked_as_a_payload_object(payload, needle):
    """Issue 18: these were all delivered (a dict went out unchecked)."""
    err = rejects("payload", payload=payload)
    assert needle in err.message
    # through every door the same: a fan-out's template, a daemon line
    with pytest.raises(ValidationError, match=needle):
        PushTemplate(payload, topic="com.example.app")


def test_a_plain_dict_keeps_its_custom_keys_and_is_checked_once_per_object():
    payload = {"aps": {"alert": "hi"}, "order": {"id": 7}, "deep-link": "app://x"}
    assert prepare(note(payload=payload)).body == encode_payload(payload)
    again = prepare(note(payload=payload, token="cd" * 32))  # the same dict: not re-checked
    assert again.body == encode_payload(payload)


LA_START = Aps(
    event="start",
    timestamp=1,
    attributes_type="Match",
    attributes={"home": "A"},
    content_state={"score": 0},
    alert=Alert(title={"loc-key": "START"}, body="kick-off", sound="default"),
    input_push_token=1,
)


def test_liveactivity_rules():
    la = PushType.LIVEACTIVITY
    p = prepare(note(push_type=la, payload=Payload(aps=LA_START)))
    assert p.topic == b"com.example.app.push-type.liveactivity"
    for missing in ("attributes_type", "attributes", "content_state", "alert"):
        aps = msgspec.structs.replace(LA_START, **{missing: None})
        err = rejects("payload", push_type=la, payload=Payload(aps=aps))
        assert missing.replace("_", "-") in err.message
    rejects("payload", push_type=la, payload=Payload(aps=Aps(content_state={})))
    rejects("payload", push_type=la, payload=Payload(aps=Aps(event="stop", content_state={})))
    rejects("payload", push_type=la, payload=Payload(aps=Aps(event=["start"])))
    rejects("payload", push_type=la, payload=Payload(aps=Aps(event="update", timestamp=1)))
    prepare(note(push_type=la, payload=Payload(aps=Aps(event="update", content_state={}))))
    prepare(note(push_type=la, payload=Payload(aps=Aps(event="end", dismissal_date=0))))
    # any (finite) relevance score for Live Activities
    upd = Aps(event="update", content_state={}, relevance_score=50.0)
    prepare(note(push_type=la, payload=Payload(aps=upd)))
    rejects(
        "payload",
        payload=Payload(aps=msgspec.structs.replace(upd, relevance_score=float("nan"))),
        push_type=la,
    )


@pytest.mark.parametrize("level", ["passive", "active", "time-sensitive", "critical"])
def test_interruption_level_ok(level):
    prepare(note(payload=Payload(aps=Aps(alert="x", interruption_level=level))))


@pytest.mark.parametrize("level", ["urgent", "Active", "", ["active"]])
def test_interruption_level_bad(level):
    rejects("payload", payload=Payload(aps=Aps(alert="x", interruption_level=level)))


def test_relevance_score():
    prepare(note(payload=Payload(aps=Aps(alert="x", relevance_score=0))))
    prepare(note(payload=Payload(aps=Aps(alert="x", relevance_score=1.0))))
    for bad in (1.01, -0.1, float("inf"), "0.5"):
        rejects("payload", payload=Payload(aps=Aps(alert="x", relevance_score=bad)))


def test_critical_sound_volume():
    CriticalSound(volume=0.0)
    CriticalSound(volume=1)
    for bad in (1.5, -0.01, "loud"):
        with pytest.raises(ValidationError) as ei:
            CriticalSound(volume=bad)
        assert ei.value.field == "payload"
    with pytest.raises(ValidationError):
        decode_payload({"aps": {"sound": {"critical": 1, "name": "a", "volume": 2}}})


# --------------------------------------------------------------------------- encoding

FULL_APS = Aps(
    alert=Alert(
        title="t",
        subtitle="s",
        body="b",
        launch_image="l.png",
        title_loc_key="TK",
        title_loc_args=["1"],
        subtitle_loc_key="SK",
        subtitle_loc_args=["2"],
        loc_key="LK",
        loc_args=["3"],
        sound="ding",
    ),
    badge=0,
    sound=CriticalSound(critical=1, name="alarm.caf", volume=0.7),
    thread_id="th",
    category="cat",
    content_available=1,
    mutable_content=1,
    target_content_id="win",
    interruption_level="time-sensitive",
    relevance_score=0.5,
    filter_criteria="work",
    stale_date=1700000100,
    content_state={"score": [1, 2]},
    timestamp=1700000000,
    event="update",
    dismissal_date=1700000200,
    attributes_type="Match",
    attributes={"home": "A"},
    input_push_token=1,
    input_push_channel="Y2hhbm5lbA==",
    content_changed=True,
)

APS_KEYS = {
    "alert", "badge", "sound", "thread-id", "category", "content-available", "mutable-content",
    "target-content-id", "interruption-level", "relevance-score", "filter-criteria", "stale-date",
    "content-state", "timestamp", "event", "dismissal-date", "attributes-type", "attributes",
    "input-push-token", "input-push-channel", "content-changed",
}  # fmt: skip
ALERT_KEYS = {
    "title", "subtitle", "body", "launch-image", "title-loc-key", "title-loc-args",
    "subtitle-loc-key", "subtitle-loc-args", "loc-key", "loc-args", "sound",
}  # fmt: skip


def test_full_aps_round_trip():
    p = Payload(aps=FULL_APS, custom={"deep": {"link": "app://x"}, "n": 1})
    body = p.encode()
    obj = json.loads(body)
    assert list(obj) == ["aps", "deep", "n"]
    assert set(obj["aps"]) == APS_KEYS
    assert set(obj["aps"]["alert"]) == ALERT_KEYS
    assert obj["aps"]["sound"] == {"critical": 1, "name": "alarm.caf", "volume": 0.7}
    assert obj["aps"]["badge"] == 0 and obj["aps"]["content-changed"] is True
    assert decode_payload(obj) == p
    assert decode_payload(obj).encode() == body


def test_none_fields_omitted():
    assert Payload().encode() == b'{"aps":{}}'
    assert Payload(aps=Aps(alert=Alert(title="t"), badge=None)).encode() == (
        b'{"aps":{"alert":{"title":"t"}}}'
    )


def test_alert_as_str_and_dict():
    assert Payload(aps=Aps(alert="hello")).encode() == b'{"aps":{"alert":"hello"}}'
    la = Payload(aps=Aps(alert=Alert(title={"loc-key": "T", "loc-args": ["x"]}, sound="chime")))
    assert json.loads(la.encode())["aps"]["alert"] == {
        "title": {"loc-key": "T", "loc-args": ["x"]},
        "sound": "chime",
    }
    # decode accepts both forms too
    assert decode_payload({"aps": {"alert": "hello"}}).aps.alert == "hello"
    assert decode_payload({"aps": {"alert": {"title-loc-key": "K"}}}).aps.alert == Alert(
        title_loc_key="K"
    )


def test_critical_sound_defaults_are_encoded():
    body = Payload(aps=Aps(alert="fire", sound=CriticalSound())).encode()
    assert json.loads(body)["aps"]["sound"] == {"critical": 1, "name": "default", "volume": 1.0}


def test_custom_keys_beside_aps():
    body = Payload(aps=Aps(alert="x"), custom={"a": 1, "b": [True, None]}).encode()
    assert body == b'{"aps":{"alert":"x"},"a":1,"b":[true,null]}'
    with pytest.raises(ValidationError) as ei:
        Payload(custom={"aps": {}}).encode()
    assert ei.value.field == "payload"


def test_mdm_payload_without_aps():
    assert Payload(custom={"mdm": "magic"}).encode() == b'{"mdm":"magic"}'
    p = prepare(
        note(
            push_type=PushType.MDM,
            topic="com.apple.mgmt.External.x",
            payload=decode_payload({"mdm": "magic"}),
        )
    )
    assert p.body == b'{"mdm":"magic"}' and p.topic == b"com.apple.mgmt.External.x"


def test_encode_payload_forms():
    raw = b'{"aps":{"alert":"pre-encoded"}}'
    assert encode_payload(raw) is raw
    assert prepare(note(payload=raw)).body is raw
    assert encode_payload(bytearray(raw)) == raw
    assert encode_payload('{"aps":{"alert":"é"}}') == '{"aps":{"alert":"é"}}'.encode()
    assert encode_payload({"aps": {"alert": "x"}, "k": 1}) == b'{"aps":{"alert":"x"},"k":1}'
    assert encode_payload(ALERT) == b'{"aps":{"alert":"hi"}}'


@pytest.mark.parametrize(
    "obj",
    [
        {"aps": {"bogus": 1}},
        {"aps": {"alert": {"bogus": 1}}},
        {"aps": {"badge": "1"}},
        {"aps": {"content-available": True}},
        {"aps": {"alert": 3}},
        {"aps": {"content_available": 1}},  # snake case is not an APNs key
        {"aps": {"sound": {"critical": 1, "bogus": 1}}},
        {"aps": []},
        {"aps": "x"},
        [1],
        "aps",
    ],
)
def test_decode_payload_rejects(obj):
    with pytest.raises(ValidationError) as ei:
        decode_payload(obj)
    assert ei.value.field == "payload"


def test_decode_payload_error_names_key():
    with pytest.raises(ValidationError, match="bogus"):
        decode_payload({"aps": {"bogus": 1}})
    with pytest.raises(ValidationError, match=r"\$\.aps\.badge"):
        decode_payload({"aps": {"badge": "1"}})


# --------------------------------------------------------------------------- fan-out template


def test_template_encodes_once(monkeypatch):
    calls = []
    real = pl._encode

    def counting(obj):
        calls.append(obj)
        return real(obj)

    monkeypatch.setattr(pl, "_encode", counting)
    t = PushTemplate(
        Payload(aps=Aps(alert="x"), custom={"k": 1}),
        push_type=PushType.VOIP,
        default_topic=BUNDLE,
        collapse_id="c",
        expiration=0,
    )
    n_after_init = len(calls)
    assert n_after_init > 0
    tokens = [f"{i:02x}" * n for i in range(50) for n in (8, 32, 54)]
    preps = [t.for_token(tok, id=i) for i, tok in enumerate(tokens)]
    assert len(calls) == n_after_init
    assert all(p.body is t.body for p in preps)
    assert all(p.topic is preps[0].topic for p in preps)
    assert [p.id for p in preps] == list(range(len(tokens)))
    assert {p.topic for p in preps} == {b"com.example.app.voip"}
    assert preps[1].path == b"/3/device/" + tokens[1].encode()


def test_template_validates_up_front():
    with pytest.raises(ValidationError) as ei:
        PushTemplate(ALERT, push_type=PushType.BACKGROUND, topic=BUNDLE)
    assert ei.value.field == "payload"
    with pytest.raises(ValidationError) as ei:
        PushTemplate(ALERT)
    assert ei.value.field == "topic"


# --------------------------------------------------------------------------- topics

EXPECTED_TOPIC = {
    PushType.ALERT: "com.example.app",
    PushType.BACKGROUND: "com.example.app",
    PushType.LOCATION: "com.example.app.location-query",
    PushType.VOIP: "com.example.app.voip",
    PushType.COMPLICATION: "com.example.app.complication",
    PushType.FILEPROVIDER: "com.example.app.pushkit.fileprovider",
    PushType.MDM: "com.example.app",
    PushType.LIVEACTIVITY: "com.example.app.push-type.liveactivity",
    PushType.PUSHTOTALK: "com.example.app.voip-ptt",
    PushType.WIDGETS: "com.example.app.push-type.widgets",
    PushType.CONTROLS: "com.example.app.push-type.controls",
}


def test_topic_table_covers_all_types():
    assert set(TOPIC_SUFFIX) == set(PushType) == set(EXPECTED_TOPIC)
    assert len(PushType) == 11


@pytest.mark.parametrize("push_type", list(PushType))
def test_topic_for(push_type):
    expected = EXPECTED_TOPIC[push_type]
    assert topic_for(BUNDLE, push_type) == expected
    assert topic_for(expected, push_type) == expected  # already suffixed: unchanged
    for other in PushType:
        suffix = TOPIC_SUFFIX[other]
        if not suffix or other is push_type or push_type is PushType.MDM:
            continue
        with pytest.raises(ValidationError) as ei:
            topic_for(BUNDLE + suffix, push_type)
        assert ei.value.field == "topic"


def test_topic_for_mdm_any_topic():
    assert (
        topic_for("com.apple.mgmt.External.abc.voip", PushType.MDM)
        == "com.apple.mgmt.External.abc.voip"
    )


def test_topic_for_bad():
    for bad in ("", ".voip"):
        with pytest.raises(ValidationError):
            topic_for(bad, PushType.VOIP)


# --------------------------------------------------------------------------- property

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
aps_key = st.sampled_from(sorted(APS_KEYS | {"bogus", "url-args"}))
alert_value = st.one_of(
    st.text(max_size=50),
    st.dictionaries(st.sampled_from(sorted(ALERT_KEYS | {"nope"})), json_value, max_size=4),
)
aps_value = st.one_of(
    json_value,
    alert_value,
    st.sampled_from(["start", "update", "end", "passive", "critical"]),
    st.integers(0, 1),
    st.floats(0, 1),
    st.text(min_size=3000, max_size=6000),
)
aps_like = st.fixed_dictionaries(
    {"aps": st.one_of(st.dictionaries(aps_key, aps_value, max_size=8), json_value)},
    optional={"custom": json_value, "mdm": st.text(max_size=20)},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    obj=st.one_of(aps_like, st.dictionaries(st.text(max_size=5), json_value, max_size=5)),
    push_type=st.sampled_from(list(PushType)),
    as_struct=st.booleans(),
)
def test_property_prepare_valid_or_validation_error(obj, push_type, as_struct):
    try:
        payload = decode_payload(obj) if as_struct else obj
        p = prepare(note(payload=payload, push_type=push_type, priority=5))
    except ValidationError as e:
        event(f"rejected: {e.field}")
        return
    event("prepared")
    limit = 5120 if push_type is PushType.VOIP else 4096
    assert 0 < len(p.body) <= limit == p.limit
    json.loads(p.body)
    msgspec.json.decode(p.body)
