"""Broadcast channels: fanout.channels against the mock, and the mock's broadcast side."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
import trio

from fanout.auth import CertAuth, TokenAuth
from fanout.channels import (
    MANAGE_HOSTS,
    BadChannelId,
    CannotCreateChannelConfig,
    Channel,
    ChannelAuthError,
    ChannelError,
    ChannelNotRegistered,
    Channels,
    FeatureNotEnabled,
)
from fanout.errors import ConfigError, FanoutError, ValidationError
from fanout.outcome import Action, classify
from fanout.testing.devcerts import TestPKI, TestSigningKey, client_ssl_context, make_signing_key
from fanout.testing.mock import MockAPNs, MockConfig

BUNDLE = "com.example.app"
TOKEN = "ab" * 32


@pytest.fixture
def auth(signing_key: TestSigningKey) -> TokenAuth:
    return TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)


@pytest.fixture
async def mock(nursery: trio.Nursery, pki: TestPKI, signing_key: TestSigningKey) -> MockAPNs:
    config = MockConfig(
        team_id=signing_key.team_id, keys={signing_key.key_id: signing_key.public_key}
    )
    server = MockAPNs(config, pki)
    await nursery.start(server.serve)
    return server


def channels(mock: MockAPNs, pki: TestPKI, auth: Any, bundle_id: str = BUNDLE) -> Channels:
    return Channels(
        auth=auth,
        bundle_id=bundle_id,
        environment="sandbox",
        host="localhost",
        port=mock.port,
        ca_file=pki.ca_file,
        timeout=5,
    )


def raw_client(mock: MockAPNs, pki: TestPKI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        http2=True,
        verify=client_ssl_context(pki.ca_file),
        base_url=f"https://localhost:{mock.port}",
        timeout=5,
    )


def payload_of(size: int) -> bytes:
    """A Live Activity update body of exactly ``size`` bytes."""
    head = b'{"aps":{"event":"update","timestamp":1700000000,"content-state":{"s":"'
    tail = b'"}}}'
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    json.loads(body)
    return body


def broadcast_headers(auth: TokenAuth, channel_id: str | None, **extra: str) -> dict[str, str]:
    """Headers as Apple documents them for ``POST /4/broadcasts/apps/<bundleId>``."""
    headers = {
        "authorization": auth.header().decode("ascii"),
        "apns-push-type": "liveactivity",
        "apns-priority": "10",
        "apns-expiration": "0",
        "apns-request-id": str(uuid.uuid4()),
    }
    if channel_id is not None:
        headers["apns-channel-id"] = channel_id
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


# --------------------------------------------------------------------------- Channels client


async def test_lifecycle(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    async with channels(mock, pki, auth) as ch:
        assert await ch.list() == []
        c0 = await ch.create()  # default policy 0
        c1 = await ch.create(storage_policy=1)
        assert c0 == Channel(c0.channel_id, 0, "LiveActivity")
        assert c1.message_storage_policy == 1
        assert c0.channel_id != c1.channel_id
        assert await ch.read(c0.channel_id) == c0
        assert await ch.read(c1.channel_id) == c1
        assert sorted(await ch.list()) == sorted([c0.channel_id, c1.channel_id])
        assert mock.stats.channels == {BUNDLE: {c0.channel_id: 0, c1.channel_id: 1}}

        await ch.delete(c0.channel_id)
        assert await ch.list() == [c1.channel_id]
        with pytest.raises(ChannelNotRegistered) as info:
            await ch.read(c0.channel_id)
        err = info.value
        assert (err.status, err.reason) == (400, "ChannelNotRegistered")
        uuid.UUID(err.request_id)
        assert "ChannelNotRegistered" in str(err)
        assert classify(err.status, err.reason) is Action.CHANNEL_GONE
        with pytest.raises(ChannelNotRegistered):
            await ch.delete(c0.channel_id)
    assert mock.stats.by_status == {200: 5, 201: 2, 204: 1, 400: 2}
    assert mock.stats.protocol_errors == []
    assert len(mock.stats.jwts) == 1  # one token for every request


async def test_requests_carry_auth_and_request_id(
    mock: MockAPNs, pki: TestPKI, auth: TokenAuth
) -> None:
    seen: list[httpx.Request] = []

    async def hook(request: httpx.Request) -> None:
        seen.append(request)

    async with channels(mock, pki, auth) as ch:
        assert ch._client is not None
        ch._client.event_hooks["request"].append(hook)
        channel = await ch.create(1)
        await ch.read(channel.channel_id)
    create, read = seen
    assert create.method == "POST" and create.url.path == f"/1/apps/{BUNDLE}/channels"
    assert json.loads(create.content) == {"message-storage-policy": 1, "push-type": "LiveActivity"}
    assert read.method == "GET" and read.headers["apns-channel-id"] == channel.channel_id
    for request in seen:
        assert request.headers["authorization"] == auth.header().decode()
        uuid.UUID(request.headers["apns-request-id"])
    assert create.headers["apns-request-id"] != read.headers["apns-request-id"]


async def test_channel_limit(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    mock.config.max_channels = 5
    async with channels(mock, pki, auth) as ch:
        made = [await ch.create(i % 2) for i in range(5)]
        with pytest.raises(CannotCreateChannelConfig) as info:
            await ch.create()
        assert info.value.status == 400
        assert "CannotCreateChannelConfig" in str(info.value)
        await ch.delete(made[0].channel_id)
        await ch.create()  # room again
        assert len(await ch.list()) == 5
    # the limit is per bundle id
    async with channels(mock, pki, auth, bundle_id="com.example.other") as other:
        await other.create()


async def test_feature_not_enabled(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    async with channels(mock, pki, auth) as ch:
        channel = await ch.create()
        mock.config.broadcast_enabled = False
        for call in (ch.create, ch.list, lambda: ch.read(channel.channel_id)):
            with pytest.raises(FeatureNotEnabled) as info:
                await call()
            assert (info.value.status, info.value.reason) == (400, "FeatureNotEnabled")


async def test_bad_channel_id(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    async with channels(mock, pki, auth) as ch:
        for bad in ("not base64!", "abc", "QUJD" * 100):
            with pytest.raises(BadChannelId) as info:
                await ch.read(bad)
            assert info.value.reason == "BadChannelId"
        with pytest.raises(BadChannelId):
            await ch.delete("%%%")
        with pytest.raises(ChannelNotRegistered):  # valid base64, never created
            await ch.read("dHN0LXNyY2gtY2hubA==")


async def test_validation_before_io(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    async with channels(mock, pki, auth) as ch:
        for policy in (2, -1, True, "0", 0.0, None):
            with pytest.raises(ValidationError) as info:
                await ch.create(policy)  # type: ignore[arg-type]
            assert info.value.field == "storage_policy"
        for channel_id in ("", "a\nb", " abc", "é", 5):
            with pytest.raises(ValidationError):
                await ch.read(channel_id)  # type: ignore[arg-type]
            with pytest.raises(ValidationError):
                await ch.delete(channel_id)  # type: ignore[arg-type]
    assert mock.stats.requests == 0
    for bundle in (
        "com.example.app.push-type.liveactivity",
        "com.example.app.voip",
        "",
        "com example",
        ".com.example",
    ):
        with pytest.raises(ValidationError) as info:
            channels(mock, pki, auth, bundle_id=bundle)
        assert info.value.field == "bundle_id"
    with pytest.raises(FanoutError, match="async with"):
        await channels(mock, pki, auth).list()
    with pytest.raises(ConfigError):
        Channels(auth=auth, bundle_id=BUNDLE, environment="development")
    assert mock.stats.requests == 0


def test_endpoints(auth: TokenAuth) -> None:
    prod = Channels(auth=auth, bundle_id=BUNDLE)
    assert (prod.host, prod.port) == MANAGE_HOSTS["production"]
    assert prod.base_url == "https://api-manage-broadcast.push.apple.com:2196"
    sandbox = Channels(auth=auth, bundle_id=BUNDLE, environment="sandbox")
    assert sandbox.base_url == "https://api-manage-broadcast.sandbox.push.apple.com:2195"
    assert Channels(auth=auth, bundle_id=BUNDLE, host="::1", port=8443).base_url == (
        "https://[::1]:8443"
    )


async def test_wrong_key(
    mock: MockAPNs, pki: TestPKI, signing_key: TestSigningKey, tmp_path
) -> None:
    # same key id and team, another private key: the signature does not verify
    other = make_signing_key(tmp_path, signing_key.key_id, signing_key.team_id)
    wrong = TokenAuth.from_file(other.path, other.key_id, other.team_id)
    async with channels(mock, pki, wrong) as ch:
        with pytest.raises(ChannelAuthError) as info:
            await ch.create()
    err = info.value
    assert (err.status, err.reason) == (403, "InvalidProviderToken")
    assert wrong.header().decode().split()[1] not in str(err)  # never the JWT
    assert mock.stats.channels == {}


async def test_cert_auth_sends_no_authorization(mock: MockAPNs, pki: TestPKI) -> None:
    # The mock does not ask for client certificates, so a CertAuth client (no authorization
    # header) is refused the way APNs refuses a request with neither.
    async with channels(mock, pki, CertAuth(pki.cert_file, pki.key_file)) as ch:
        with pytest.raises(ChannelAuthError) as info:
            await ch.list()
    assert info.value.reason == "MissingProviderToken"


async def test_topic_mismatch(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    mock.config.topics = {"com.example.other"}
    async with channels(mock, pki, auth) as ch:
        with pytest.raises(ChannelAuthError) as info:
            await ch.create()
    assert (info.value.status, info.value.reason) == (403, "TopicMismatch")


async def test_other_errors_are_channel_errors(
    mock: MockAPNs, pki: TestPKI, auth: TokenAuth
) -> None:
    mock.config.p503 = 1.0
    async with channels(mock, pki, auth) as ch:
        with pytest.raises(ChannelError) as info:
            await ch.list()
    assert type(info.value) is ChannelError
    assert (info.value.status, info.value.reason) == (503, "ServiceUnavailable")


# --------------------------------------------------------------------------- mock: management


async def test_mock_management_validation(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    path = f"/1/apps/{BUNDLE}/channels"
    good = {"message-storage-policy": 0, "push-type": "LiveActivity"}
    cases: list[tuple[str, str, Any, dict[str, str], int, str]] = [
        ("POST", path, {**good, "message-storage-policy": 2}, {}, 400, "BadRequestParams"),
        ("POST", path, {**good, "message-storage-policy": "0"}, {}, 400, "BadRequestParams"),
        ("POST", path, {**good, "extra": 1}, {}, 400, "BadRequestParams"),
        ("POST", path, {"push-type": "LiveActivity"}, {}, 400, "BadRequestParams"),
        ("POST", path, {**good, "push-type": "Alert"}, {}, 400, "InvalidPushType"),
        ("POST", path, b"{not json", {}, 400, "BadRequestPayload"),
        ("POST", path, b"[1]", {}, 400, "BadRequestPayload"),
        ("POST", path, b"", {}, 400, "PayloadEmpty"),
        ("GET", path, None, {}, 400, "MissingChannelId"),
        ("DELETE", path, None, {}, 400, "MissingChannelId"),
        ("PUT", path, good, {}, 405, "MethodNotAllowed"),
        ("POST", f"/1/apps/{BUNDLE}/all-channels", good, {}, 405, "MethodNotAllowed"),
        ("GET", f"/1/apps/{BUNDLE}/nothing", None, {}, 404, "BadPath"),
        ("GET", "/1/apps//channels", None, {}, 404, "BadPath"),
        (
            "POST",
            f"/1/apps/{BUNDLE}.push-type.liveactivity/channels",
            good,
            {},
            400,
            "TopicDisallowed",
        ),
        ("POST", path, good, {"apns-request-id": "nope"}, 400, "BadMessageId"),
        ("POST", path, good, {"authorization": ""}, 403, "MissingProviderToken"),
        ("POST", path, good, {"authorization": "bearer x.y.z"}, 403, "InvalidProviderToken"),
    ]
    async with raw_client(mock, pki) as client:
        for method, url, body, extra, status, reason in cases:
            headers = {"authorization": auth.header().decode(), **extra}
            content = body if isinstance(body, bytes | None) else json.dumps(body).encode()
            r = await client.request(method, url, content=content, headers=headers)
            assert (r.status_code, r.json()) == (status, {"reason": reason}), (method, url, body)
            uuid.UUID(r.headers["apns-request-id"])
        # a valid request id is echoed
        request_id = str(uuid.uuid4())
        r = await client.post(
            path,
            content=json.dumps(good).encode(),
            headers={"authorization": auth.header().decode(), "apns-request-id": request_id},
        )
        assert r.status_code == 201 and r.content == b""
        assert r.headers["apns-request-id"] == request_id
        assert r.http_version == "HTTP/2"
    assert list(mock.stats.channels[BUNDLE].values()) == [0]
    assert mock.stats.protocol_errors == []


# --------------------------------------------------------------------------- mock: broadcast


async def test_mock_broadcast(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    async with channels(mock, pki, auth) as ch:
        c0 = (await ch.create(0)).channel_id
        c1 = (await ch.create(1)).channel_id
        gone = (await ch.create(1)).channel_id
        await ch.delete(gone)
    url = f"/4/broadcasts/apps/{BUNDLE}"
    body = payload_of(200)
    h = broadcast_headers

    async def post(
        headers: dict[str, str], content: bytes = body, path: str = url
    ) -> httpx.Response:
        return await client.post(path, content=content, headers=headers)

    async with raw_client(mock, pki) as client:
        # success: policy 0 with expiration 0, echoing apns-request-id
        headers = h(auth, c0)
        r = await post(headers)
        assert r.status_code == 200 and r.content == b""
        assert r.headers["apns-request-id"] == headers["apns-request-id"]
        # policy 1: any expiration, or none; push type is case-insensitive; topic tolerated
        assert (await post(h(auth, c1, apns_expiration=str(2**31)))).status_code == 200
        no_exp = h(auth, c1, apns_push_type="LiveActivity", apns_topic=BUNDLE, apns_priority="5")
        del no_exp["apns-expiration"]
        assert (await post(no_exp)).status_code == 200
        assert (await post(h(auth, c1, apns_priority="1"))).status_code == 200
        assert (await post(h(auth, c0), payload_of(5120))).status_code == 200
        # generated request id
        plain = h(auth, c0)
        del plain["apns-request-id"]
        r = await post(plain)
        assert r.status_code == 200
        uuid.UUID(r.headers["apns-request-id"])

        absent = h(auth, c0)
        del absent["apns-expiration"]
        no_type = h(auth, c0)
        del no_type["apns-push-type"]
        cases: list[tuple[dict[str, str], bytes, str, int, str]] = [
            (h(auth, c0, apns_expiration="1"), body, url, 400, "BadExpirationDate"),
            (absent, body, url, 400, "BadExpirationDate"),
            (h(auth, c1, apns_expiration="soon"), body, url, 400, "BadExpirationDate"),
            (h(auth, c0), body, f"{url}.push-type.liveactivity", 400, "TopicDisallowed"),
            (h(auth, gone), body, url, 400, "ChannelNotRegistered"),
            (h(auth, "dHN0LXNyY2gtY2hubA=="), body, url, 400, "ChannelNotRegistered"),
            (h(auth, c0), payload_of(5121), url, 413, "PayloadTooLarge"),
            (h(auth, c0), b"", url, 400, "PayloadEmpty"),
            (h(auth, c0), b"{nope", url, 400, "BadRequestPayload"),
            (h(auth, None), body, url, 400, "MissingChannelId"),
            (h(auth, "***"), body, url, 400, "BadChannelId"),
            (no_type, body, url, 400, "MissingPushType"),
            (h(auth, c0, apns_push_type="alert"), body, url, 400, "InvalidPushType"),
            (h(auth, c0, apns_priority="7"), body, url, 400, "BadPriority"),
            (h(auth, c0, apns_request_id="x"), body, url, 400, "BadMessageId"),
            (h(auth, c0, authorization=""), body, url, 403, "MissingProviderToken"),
            (h(auth, c0), body, "/4/broadcasts/apps/", 404, "BadPath"),
            (h(auth, c0), body, "/4/nothing", 404, "BadPath"),
        ]
        for headers, content, path, status, reason in cases:
            r = await post(headers, content, path)
            assert (r.status_code, r.json()) == (status, {"reason": reason}), (reason, path)
            uuid.UUID(r.headers["apns-request-id"])
        r = await client.get(url, headers=h(auth, c0))
        assert (r.status_code, r.json()["reason"]) == (405, "MethodNotAllowed")

        mock.config.broadcast_enabled = False
        r = await post(h(auth, c0))
        assert (r.status_code, r.json()["reason"]) == (400, "FeatureNotEnabled")
        mock.config.broadcast_enabled = True

        # the device path on the same listener is untouched
        r = await client.post(
            f"/3/device/{TOKEN}",
            content=b'{"aps":{"alert":"hi"}}',
            headers={"authorization": auth.header().decode(), "apns-topic": BUNDLE},
        )
        assert r.status_code == 200 and "apns-id" in r.headers

    assert mock.stats.broadcasts == {c0: 3, c1: 3}
    assert mock.stats.delivered == {TOKEN: 1}
    assert mock.stats.protocol_errors == []


async def test_stats_reset_keeps_channels(mock: MockAPNs, pki: TestPKI, auth: TokenAuth) -> None:
    async with channels(mock, pki, auth) as ch:
        channel = await ch.create()
        mock.stats.reset()
        assert mock.stats.requests == 0
        assert await ch.read(channel.channel_id) == channel


@pytest.mark.parametrize("expiration", [-1, 10**12, "0", 1.5])
def test_a_broadcast_expiration_is_checked_as_a_device_pushs(expiration: object) -> None:
    """Milliseconds by mistake (>= 1e11) are refused for a broadcast as for a device push."""
    from fanout.client import prepare_broadcast
    from fanout.errors import ValidationError

    with pytest.raises(ValidationError, match="expiration"):
        prepare_broadcast("ZmFrZWNoYW5uZWw=", {"aps": {"event": "update"}},
                          bundle_id="com.example.app", expiration=expiration)  # type: ignore[arg-type]


@pytest.mark.parametrize("channel_id", ["\tS", " dHVuYQ==", "dHVuYQ== ", "a\x00b", "é"])
def test_a_broadcast_channel_id_no_header_can_carry_is_refused(channel_id: str) -> None:
    """A channel id with a control character or blanks at its ends would make a malformed
    apns-channel-id header, which costs the whole connection (every push on it)."""
    from fanout.client import prepare_broadcast
    from fanout.errors import ValidationError

    with pytest.raises(ValidationError, match="channel_id"):
        prepare_broadcast(channel_id, {"aps": {"event": "update"}}, bundle_id="com.example.app")
