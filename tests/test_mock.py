"""Tests of the mock APNs server (fanout.testing.mock) and the test credentials (fanout.testing.devcerts)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import uuid
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import jwt
import pytest
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from fanout.testing.devcerts import (
    TestPKI,
    TestSigningKey,
    client_ssl_context,
    make_pki,
    make_signing_key,
)
from fanout.testing.mock import STREAM_LIMIT_VIOLATION, MockAPNs, MockConfig, open_mock

TOKEN = "ab" * 32
TOPIC = "com.example.app"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> TestSigningKey:
    return make_signing_key(tmp_path_factory.mktemp("keys"))


def make_jwt(key: TestSigningKey, *, iat: float | None = None, **overrides: Any) -> str:
    claims = {
        "iss": overrides.pop("iss", key.team_id),
        "iat": int(time.time() if iat is None else iat),
    }
    headers = {"kid": overrides.pop("kid", key.key_id)}
    return jwt.encode(claims, key.path.read_bytes(), algorithm="ES256", headers=headers)


def config_for(key: TestSigningKey, **kw: Any) -> MockConfig:
    return MockConfig(team_id=key.team_id, keys={key.key_id: key.public_key}, topics={TOPIC}, **kw)


def push_headers(key: TestSigningKey, **extra: str) -> dict[str, str]:
    headers = {
        "authorization": f"bearer {make_jwt(key)}",
        "apns-topic": TOPIC,
        "apns-push-type": "alert",
    }
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


BODY = b'{"aps":{"alert":"hi"}}'


def http_client(pki: TestPKI, mock: MockAPNs) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        http2=True,
        verify=client_ssl_context(pki.ca_file),
        base_url=f"https://localhost:{mock.port}",
        timeout=5,
    )


# --------------------------------------------------------------------------- raw h2 client


class RawClient:
    """A minimal h2 client over trio TLS, to watch SETTINGS and GOAWAY frames."""

    def __init__(self, stream: trio.SSLStream[Any]) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.responses: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.goaway: GoAwayFrame | None = None
        self._buf = bytearray()
        self.eof = False

    @classmethod
    async def connect(cls, pki: TestPKI, mock: MockAPNs) -> RawClient:
        stream = await trio.open_ssl_over_tcp_stream(
            "localhost", mock.port, ssl_context=client_ssl_context(pki.ca_file)
        )
        await stream.do_handshake()
        client = cls(stream)
        client.conn.initiate_connection()
        await client.flush()
        return client

    @property
    def limit(self) -> int:
        return self.conn.remote_settings.max_concurrent_streams

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def request(self, key: TestSigningKey, body: bytes = BODY, **extra: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, self.headers(key, **extra), end_stream=False)
        self.conn.send_data(sid, body, end_stream=True)
        return sid

    @staticmethod
    def headers(key: TestSigningKey, **extra: str) -> list[tuple[bytes, bytes]]:
        headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"localhost")]
        headers.append((b":path", f"/3/device/{TOKEN}".encode()))
        headers += [(k.encode(), v.encode()) for k, v in push_headers(key, **extra).items()]
        return headers

    def _frames(self, data: bytes) -> bytes:
        """Take GOAWAY frames out of ``data`` (h2 cannot go on after one); return the rest."""
        self._buf += data
        rest = bytearray()
        while len(self._buf) >= 9:
            end = 9 + int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < end:
                break
            frame, self._buf = bytes(self._buf[:end]), self._buf[end:]
            if frame[3] == 0x7:
                goaway, length = Frame.parse_frame_header(memoryview(frame[:9]))
                goaway.parse_body(memoryview(frame[9:]))
                self.goaway = goaway
            else:
                rest += frame
        return bytes(rest)

    async def pump(self, until: Callable[[], bool], timeout: float = 2.0) -> None:
        with trio.fail_after(timeout):
            while not until():
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:  # EOF without TLS close_notify
                    data = b""
                if not data:
                    self.eof = True
                    return
                for event in self.conn.receive_data(self._frames(data)):
                    if isinstance(event, h2.events.ResponseReceived):
                        self.responses[event.stream_id] = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        self.bodies[event.stream_id] = (
                            self.bodies.get(event.stream_id, b"") + event.data
                        )
                        self.conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        self.ended.add(event.stream_id)
                await self.flush()

    async def read_until_eof(self) -> None:
        with trio.fail_after(3):
            while await self.stream.receive_some(65536):
                pass
        self.eof = True


# --------------------------------------------------------------------------- devcerts


def test_devcerts_files(tmp_path: Any) -> None:
    pki = make_pki(tmp_path / "pki")
    key = make_signing_key(tmp_path / "keys", key_id="KEY1234567", team_id="TEAM999999")
    assert stat.S_IMODE(os.stat(pki.key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert key.path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    token = jwt.encode({"iss": key.team_id, "iat": 1}, key.path.read_bytes(), algorithm="ES256")
    jwt.decode(token, key.public_key, algorithms=["ES256"], options={"verify_iat": False})


# --------------------------------------------------------------------------- validation


async def test_valid_push(pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery) -> None:
    mock = await open_mock(nursery, config_for(key), pki)
    apns_id = str(uuid.uuid4())
    async with http_client(pki, mock) as client:
        r = await client.post(
            f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key, apns_id=apns_id)
        )
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
        assert r.headers["apns-id"] == apns_id
        assert r.content == b""
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
        assert r.status_code == 200
        uuid.UUID(r.headers["apns-id"])  # generated
    assert mock.stats.delivered == {TOKEN: 2}
    assert mock.stats.by_status == {200: 2}
    assert mock.stats.protocol_errors == []


LONG_BODY = b'{"aps":{},"x":"' + b"a" * 4100 + b'"}'

VALIDATION_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("get", {"method": "GET"}, 405, "MethodNotAllowed"),
    ("bad path", {"path": "/3/devices/abcd"}, 404, "BadPath"),
    ("no token", {"path": "/3/device/"}, 400, "MissingDeviceToken"),
    ("odd token", {"path": "/3/device/abc"}, 400, "BadDeviceToken"),
    ("non-hex token", {"path": "/3/device/zz" + "ab" * 31}, 400, "BadDeviceToken"),
    ("no auth", {"drop": "authorization"}, 403, "MissingProviderToken"),
    (
        "garbage jwt",
        {"headers": {"authorization": "bearer not.a.jwt"}},
        403,
        "InvalidProviderToken",
    ),
    ("no topic", {"drop": "apns-topic"}, 400, "MissingTopic"),
    ("bad push type", {"headers": {"apns-push-type": "shout"}}, 400, "InvalidPushType"),
    ("other app", {"headers": {"apns-topic": "com.other.app"}}, 400, "TopicDisallowed"),
    ("voip w/o suffix", {"headers": {"apns-push-type": "voip"}}, 400, "BadTopic"),
    ("bad topic chars", {"headers": {"apns-topic": "com example"}}, 400, "BadTopic"),
    ("priority 7", {"headers": {"apns-priority": "7"}}, 400, "BadPriority"),
    (
        "background 10",
        {"headers": {"apns-push-type": "background", "apns-priority": "10"}},
        400,
        "BadPriority",
    ),
    ("bad apns-id", {"headers": {"apns-id": "1234"}}, 400, "BadMessageId"),
    ("bad expiration", {"headers": {"apns-expiration": "soon"}}, 400, "BadExpirationDate"),
    ("long collapse id", {"headers": {"apns-collapse-id": "x" * 65}}, 400, "BadCollapseId"),
    ("duplicate", {"duplicate": ("apns-priority", "10")}, 400, "DuplicateHeaders"),
    ("empty body", {"body": b""}, 400, "PayloadEmpty"),
    ("too large", {"body": LONG_BODY}, 413, "PayloadTooLarge"),
    ("not json", {"body": b"{nope"}, 400, "BadRequestPayload"),
    ("json array", {"body": b"[1]"}, 400, "BadRequestPayload"),
]


async def test_validation_errors(pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery) -> None:
    mock = await open_mock(nursery, config_for(key), pki)
    async with http_client(pki, mock) as client:
        for name, case, status, reason in VALIDATION_CASES:
            headers = push_headers(key)
            headers.update(case.get("headers", {}))
            headers.pop(case.get("drop", ""), None)
            header_list = list(headers.items())
            if "duplicate" in case:
                header_list += [case["duplicate"], case["duplicate"]]
            r = await client.request(
                case.get("method", "POST"),
                case.get("path", f"/3/device/{TOKEN}"),
                content=case.get("body", BODY),
                headers=header_list,
            )
            assert (r.status_code, r.json()) == (status, {"reason": reason}), name
            assert r.headers["content-type"] == "application/json", name
            uuid.UUID(r.headers["apns-id"])
        # accepted variants: voip topic + 5120-byte limit, background with priority 5, liveactivity
        ok = [
            (
                {"apns-push-type": "voip", "apns-topic": TOPIC + ".voip"},
                b'{"x":"' + b"a" * 5000 + b'"}',
            ),
            ({"apns-push-type": "background", "apns-priority": "5"}, BODY),
            (
                {"apns-push-type": "liveactivity", "apns-topic": TOPIC + ".push-type.liveactivity"},
                BODY,
            ),
            ({"apns-expiration": "0", "apns-collapse-id": "x" * 64}, BODY),
        ]
        for extra, body in ok:
            headers = push_headers(key)
            headers.update(extra)
            r = await client.post(f"/3/device/{TOKEN}", content=body, headers=headers)
            assert r.status_code == 200, (extra, r.text)
    assert mock.stats.protocol_errors == []
    assert sum(mock.stats.by_reason.values()) == len(VALIDATION_CASES)


async def test_provider_token_checks(
    pki: TestPKI, key: TestSigningKey, tmp_path: Any, nursery: trio.Nursery
) -> None:
    other = make_signing_key(tmp_path, key_id="OTHER12345")
    mock = await open_mock(nursery, config_for(key), pki)
    async with http_client(pki, mock) as client:

        async def reason_for(token: str) -> tuple[int, str | None]:
            headers = push_headers(key)
            headers["authorization"] = f"bearer {token}"
            r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=headers)
            return r.status_code, (r.json()["reason"] if r.content else None)

        forged = jwt.encode(
            {"iss": key.team_id, "iat": int(time.time())},
            other.path.read_bytes(),
            algorithm="ES256",
            headers={"kid": key.key_id},
        )
        assert await reason_for(forged) == (403, "InvalidProviderToken")
        assert await reason_for(make_jwt(key, kid="NOSUCHKEY1")) == (403, "InvalidProviderToken")
        assert await reason_for(make_jwt(key, iss="WRONGTEAM1")) == (403, "InvalidProviderToken")
        hs256 = jwt.encode(
            {"iss": key.team_id, "iat": int(time.time())}, "s" * 32, headers={"kid": key.key_id}
        )
        assert await reason_for(hs256) == (403, "InvalidProviderToken")
        assert await reason_for(make_jwt(key, iat=time.time() - 3700)) == (
            403,
            "ExpiredProviderToken",
        )
        assert await reason_for(make_jwt(key)) == (200, None)


async def test_expired_token_wedges_connection(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config_for(key, expired_token_wedge=True), pki)
    async with http_client(pki, mock) as client:
        headers = push_headers(key)
        headers["authorization"] = f"bearer {make_jwt(key, iat=time.time() - 4000)}"
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=headers)
        assert r.json() == {"reason": "ExpiredProviderToken"}
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
        assert (r.status_code, r.json()) == (403, {"reason": "ExpiredProviderToken"})
    async with http_client(pki, mock) as client:  # a new connection is fine
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
        assert r.status_code == 200
    assert mock.stats.connections == 2


async def test_accept_all_and_fast_modes(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    any_key = await open_mock(nursery, MockConfig(), pki)  # no keys: signatures are not checked
    fast = await open_mock(nursery, MockConfig(validate=False), pki)
    forged = jwt.encode(
        {"iss": "X", "iat": int(time.time())}, key.path.read_bytes(), algorithm="ES256"
    )
    async with http_client(pki, any_key) as client:
        headers = push_headers(key)
        headers["authorization"] = f"bearer {forged}"
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=headers)
        assert r.status_code == 200
    async with http_client(pki, fast) as client:
        r = await client.post(f"/3/device/{TOKEN}", content=b"", headers={})
        assert r.status_code == 200
    assert fast.stats.delivered == {TOKEN: 1}


# --------------------------------------------------------------------------- injected answers


async def test_unregistered_tokens(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    gone = "cd" * 32
    mock = await open_mock(nursery, config_for(key, unregistered={gone}), pki)
    async with http_client(pki, mock) as client:
        before = int(time.time() * 1000)
        r = await client.post(f"/3/device/{gone}", content=BODY, headers=push_headers(key))
        assert r.status_code == 410
        body = r.json()
        assert body["reason"] == "Unregistered"
        assert before <= body["timestamp"] <= int(time.time() * 1000)
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
        assert r.status_code == 200

    tokens = [f"{i:064x}" for i in range(200)]
    fraction = await open_mock(nursery, config_for(key, unregistered_fraction=0.25), pki)
    async with http_client(pki, fraction) as client:
        for token in tokens[:40] + tokens[:40]:
            await client.post(f"/3/device/{token}", content=BODY, headers=push_headers(key))
    statuses = fraction.stats.by_status
    assert statuses[410] % 2 == 0 and 0 < statuses[410] < 80  # same tokens, same answer
    assert all(fraction.stats.delivered[t] in (0, 2) for t in tokens[:40])


async def test_429_fraction_with_retry_after(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config_for(key, p429=0.5, retry_after=7, seed=1), pki)
    async with http_client(pki, mock) as client:
        for _ in range(40):
            r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
            if r.status_code == 429:
                assert r.json() == {"reason": "TooManyRequests"}
                assert r.headers["retry-after"] == "7"
            else:
                assert r.status_code == 200
    assert 5 < mock.stats.by_status[429] < 35
    assert mock.stats.by_reason["TooManyRequests"] == mock.stats.by_status[429]


async def test_5xx_fractions(pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery) -> None:
    mock = await open_mock(nursery, config_for(key, p500=1.0), pki)
    async with http_client(pki, mock) as client:
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
        assert (r.status_code, r.json()) == (500, {"reason": "InternalServerError"})
        mock.config.p500, mock.config.p503, mock.config.retry_after = 0.0, 1.0, 3
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
        assert (r.status_code, r.json()) == (503, {"reason": "ServiceUnavailable"})
        assert r.headers["retry-after"] == "3"


async def test_never_answer(pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery) -> None:
    mock = await open_mock(nursery, config_for(key, never_answer=1.0), pki)
    async with http_client(pki, mock) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key), timeout=0.3
            )
    assert mock.stats.never_answered == 1
    assert mock.stats.seen == {TOKEN: 1}
    assert mock.stats.delivered == {}


async def test_latency_does_not_serialize_streams(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config_for(key, latency=0.2, jitter=0.02), pki)
    client = await RawClient.connect(pki, mock)
    sid = client.request(key)
    await client.flush()
    await client.pump(lambda: sid in client.ended and client.limit == 1000)
    start = trio.current_time()
    sids = [client.request(key) for _ in range(20)]
    await client.flush()
    await client.pump(lambda: all(s in client.ended for s in sids))
    assert trio.current_time() - start < 0.6
    assert mock.stats.delivered == {TOKEN: 21}
    assert mock.stats.max_concurrent == [20]


# --------------------------------------------------------------------------- stream limits


async def test_stream_limit_follows_auth_and_rejections(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config_for(key, max_streams=500), pki)
    client = await RawClient.connect(pki, mock)
    await client.pump(lambda: client.conn.remote_settings.max_concurrent_streams == 1)
    assert mock.stream_limits == [1]

    sid = client.request(key)
    await client.flush()
    await client.pump(lambda: sid in client.ended and client.limit == 500)
    assert client.responses[sid][b":status"] == b"200"

    sid = client.request(key, apns_priority="7")  # rejected -> limit drops to 1
    await client.flush()
    await client.pump(lambda: sid in client.ended and client.limit == 1)
    assert client.responses[sid][b":status"] == b"400"
    assert mock.stream_limits == [1]

    sid = client.request(key)  # accepted -> limit restored
    await client.flush()
    await client.pump(lambda: sid in client.ended and client.limit == 500)

    mock.set_max_streams(50)  # live control
    await client.pump(lambda: client.limit == 50)
    assert mock.stats.protocol_errors == []


async def test_stream_limit_violation_gets_goaway(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config_for(key), pki)
    client = await RawClient.connect(pki, mock)
    # Three streams opened at once, without waiting for the server's SETTINGS (limit 1).
    sids = [1, 3, 5]
    for sid in sids:
        client.conn.send_headers(sid, RawClient.headers(key))
    for sid in sids:
        client.conn.send_data(sid, BODY, end_stream=True)
    await client.flush()
    await client.pump(lambda: client.goaway is not None and sids[0] in client.ended)
    assert client.goaway.error_code == ErrorCodes.REFUSED_STREAM
    assert client.goaway.last_stream_id == sids[0]
    assert client.goaway.additional_data == STREAM_LIMIT_VIOLATION.encode()
    assert client.responses[sids[0]][b":status"] == b"200"
    assert len(mock.stats.protocol_errors) == 1
    await client.read_until_eof()
    # the server is still fine
    async with http_client(pki, mock) as http:
        r = await http.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
        assert r.status_code == 200


# --------------------------------------------------------------------------- GOAWAY and closes


async def test_goaway_after_drains_and_closes(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config_for(key, goaway_after=3), pki)
    client = await RawClient.connect(pki, mock)
    sids = []
    for _ in range(3):
        sids.append(client.request(key))
        await client.flush()
        await client.pump(lambda: sids[-1] in client.ended)
    await client.pump(lambda: client.goaway is not None)
    assert client.goaway.error_code == ErrorCodes.NO_ERROR
    assert client.goaway.last_stream_id == sids[-1]
    assert json.loads(client.goaway.additional_data) == {"reason": "Shutdown"}
    assert all(client.responses[s][b":status"] == b"200" for s in sids)
    await client.read_until_eof()
    assert mock.stats.goaways_sent == 1
    assert mock.stats.streams_after_goaway == 0
    assert mock.stats.streams_per_connection == [3]
    # The closed connection's tasks end with it, not when its drain timer (5 s) fires.
    with trio.fail_after(2):
        while mock._connections:
            await trio.sleep(0.01)


async def test_goaway_last_stream_low(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(
        nursery, config_for(key, goaway_after=6, goaway_last_stream_low=True), pki
    )
    client = await RawClient.connect(pki, mock)
    first = client.request(key)
    await client.flush()
    await client.pump(lambda: first in client.ended and client.limit == 1000)
    sids = [client.request(key) for _ in range(5)]
    await client.flush()
    await client.pump(lambda: client.goaway is not None)
    await client.read_until_eof()
    last = client.goaway.last_stream_id
    assert first < last < sids[-1]
    answered = {s for s in [first, *sids] if s in client.ended}
    assert answered == {s for s in [first, *sids] if s <= last}
    assert mock.stats.delivered[TOKEN] == len(answered) == 3


async def test_new_stream_after_goaway_is_counted(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config_for(key, goaway_after=1), pki)
    client = await RawClient.connect(pki, mock)
    sid = client.request(key)
    await client.flush()
    await client.pump(lambda: client.goaway is not None and sid in client.ended)
    await trio.sleep(0.05)  # our PING ACK (sent by pump) reaches the server
    # h2 refuses to open streams after GOAWAY, so forge a HEADERS frame with its encoder.
    frame = HeadersFrame(sid + 2, client.conn.encoder.encode(RawClient.headers(key)))
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    await client.stream.send_all(frame.serialize())
    await client.read_until_eof()
    assert mock.stats.streams_after_goaway == 1
    assert mock.stats.delivered == {TOKEN: 1}


async def test_close_after(pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery) -> None:
    mock = await open_mock(nursery, config_for(key, close_after=2), pki)
    client = await RawClient.connect(pki, mock)
    for _ in range(2):
        sid = client.request(key)
        await client.flush()
        await client.pump(lambda: sid in client.ended)  # noqa: B023
    await client.pump(lambda: False)
    assert client.eof and client.goaway is None
    assert mock.stats.closes == 1
    assert mock.stats.delivered == {TOKEN: 2}


# --------------------------------------------------------------------------- robustness, stats, binding


async def test_survives_bad_clients(
    pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config_for(key), pki)
    # 1. disconnect in the middle of a request
    client = await RawClient.connect(pki, mock)
    client.conn.send_headers(1, RawClient.headers(key))
    await client.flush()
    await client.stream.aclose()
    # 2. plain TCP, no TLS
    tcp = await trio.open_tcp_stream("127.0.0.1", mock.port)
    await tcp.send_all(b"GET / HTTP/1.1\r\n\r\n")
    await tcp.aclose()
    # 3. an HTTP/2 protocol violation: DATA on stream 0 -> GOAWAY(PROTOCOL_ERROR)
    client = await RawClient.connect(pki, mock)
    await client.stream.send_all(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    await client.pump(lambda: client.goaway is not None)
    assert client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert len(mock.stats.protocol_errors) == 1
    async with http_client(pki, mock) as http:
        r = await http.post(f"/3/device/{TOKEN}", content=BODY, headers=push_headers(key))
        assert r.status_code == 200


async def test_stats_counters(pki: TestPKI, key: TestSigningKey, nursery: trio.Nursery) -> None:
    mock = await open_mock(nursery, config_for(key), pki)
    tokens = [TOKEN, "ef" * 32]
    jwts = [make_jwt(key, iat=time.time() - 10), make_jwt(key, iat=time.time() - 20)]
    async with http_client(pki, mock) as client:
        for token in tokens:
            for j in jwts:
                headers = push_headers(key)
                headers["authorization"] = f"bearer {j}"
                await client.post(f"/3/device/{token}", content=BODY, headers=headers)
        await client.post(f"/3/device/{TOKEN}", content=b"", headers=push_headers(key, apns_id="x"))
    stats = mock.stats
    assert stats.requests == 5
    assert stats.seen == {TOKEN: 3, tokens[1]: 2}
    assert stats.delivered == {TOKEN: 2, tokens[1]: 2}
    assert stats.by_status == {200: 4, 400: 1}
    assert stats.by_reason == {"BadMessageId": 1}
    assert stats.connections == 1 and stats.streams_per_connection == [5]
    assert stats.max_concurrent == [1]
    assert {hashlib.sha256(j.encode()).hexdigest() for j in jwts} <= stats.jwts
    assert not any(j in repr(stats) for j in jwts)
    stats.reset()
    assert stats.requests == 0 and stats.jwts == set() and stats.streams_per_connection == []


async def test_refuses_remote_bind(pki: TestPKI) -> None:
    mock = MockAPNs(MockConfig(), pki)
    with pytest.raises(ValueError, match="allow_remote"):
        await mock.serve("0.0.0.0")


async def test_no_alpn(pki: TestPKI, nursery: trio.Nursery) -> None:
    mock = await open_mock(nursery, MockConfig(alpn=False), pki)
    stream = await trio.open_ssl_over_tcp_stream(
        "localhost", mock.port, ssl_context=client_ssl_context(pki.ca_file)
    )
    await stream.do_handshake()
    assert stream.selected_alpn_protocol() is None
    await stream.aclose()
