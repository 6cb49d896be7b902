"""The mock's fast path (fanout.testing._fast) against its oracle, the h2 path: the same
requests get the same answers and leave the same MockStats, faults replay from the same seed,
HTTP/2 (stream limits, GOAWAY, flow control, CONTINUATION, padding, PING, violations) behaves
alike, and fanout's own Client, httpx and curl work against it."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import hpack
import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.errors import ErrorCodes

from fanout.testing import _fast
from fanout.testing.devcerts import TestPKI, TestSigningKey, client_ssl_context
from fanout.testing.mock import STREAM_LIMIT_VIOLATION, MockAPNs, MockConfig, open_mock

TOPIC = "com.example.app"
TOKEN = "ab" * 32
BODY = b'{"aps":{"alert":"hi"}}'
PATHS = ("h2", "fast")

Probe = Callable[[MockAPNs], Awaitable[Any]]


def config(key: TestSigningKey, path: str, **kw: Any) -> MockConfig:
    return MockConfig(team_id=key.team_id, keys={key.key_id: key.public_key}, topics={TOPIC},
                      path=path, **kw)  # type: ignore[arg-type]


def make_jwt(key: TestSigningKey, *, iat: float | None = None, kid: str | None = None,
             signer: bytes | None = None, iss: str | None = None) -> str:
    claims = {"iss": iss or key.team_id, "iat": int(time.time() if iat is None else iat)}
    return jwt.encode(claims, signer or key.path.read_bytes(), algorithm="ES256",
                      headers={"kid": kid or key.key_id})


def other_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def stats_of(mock: MockAPNs) -> dict[str, Any]:
    """Every MockStats field (channels by their policies and counts: their ids are random)."""
    out = {f.name: copy.deepcopy(getattr(mock.stats, f.name))
           for f in dataclasses.fields(mock.stats)}
    out["channels"] = {b: sorted(c.values()) for b, c in mock.stats.channels.items()}
    out["broadcasts"] = sorted(mock.stats.broadcasts.values())
    return out


async def on_both(pki: TestPKI, make: Callable[[str], MockConfig], probe: Probe
                  ) -> tuple[tuple[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]:
    """Run ``probe`` against a fresh mock of each path: ((h2 result, h2 stats), (fast ...))."""
    out = []
    for path in PATHS:
        async with trio.open_nursery() as nursery:
            mock = await open_mock(nursery, make(path), pki)
            result = await probe(mock)
            out.append((result, stats_of(mock)))
            if path == "fast":
                assert set(mock.paths) == {"fast"}  # no fallback to h2
            nursery.cancel_scope.cancel()
    return out[0], out[1]


def http_client(pki: TestPKI, mock: MockAPNs) -> httpx.AsyncClient:
    return httpx.AsyncClient(http2=True, verify=client_ssl_context(pki.ca_file),
                             base_url=f"https://localhost:{mock.port}", timeout=5)


def answer(r: httpx.Response) -> tuple[Any, ...]:
    """What must agree between the paths: status, reason, header names, a 410's timestamp,
    retry-after (apns-id values are random when the request had none)."""
    body = json.loads(r.content) if r.content else {}
    reason = body.get("reason") if isinstance(body, dict) else None
    names = tuple(sorted(k for k in r.headers if k not in ("apns-request-id",)))
    return (r.status_code, reason, names, isinstance(body.get("timestamp"), int),
            r.headers.get("retry-after"), r.http_version)


# --------------------------------------------------------------------------- (1) agreement


def request_table(key: TestSigningKey) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(method, path, headers, body) of every case; the JWTs are made once for both paths."""
    good = f"bearer {make_jwt(key)}"
    bad_sig = f"bearer {make_jwt(key, signer=other_key_pem())}"
    wrong_kid = f"bearer {make_jwt(key, kid='WRONGKID00')}"
    wrong_team = f"bearer {make_jwt(key, iss='OTHERTEAM0')}"
    expired = f"bearer {make_jwt(key, iat=time.time() - 4000)}"
    future = f"bearer {make_jwt(key, iat=time.time() + 4000)}"

    def push(topic: str | None = TOPIC, push_type: str | None = "alert", auth: str | None = good,
             token: str = TOKEN, body: bytes = BODY, **extra: str) -> tuple[str, str, dict[str, str], bytes]:
        headers = {k.replace("_", "-"): v for k, v in extra.items()}
        if auth is not None:
            headers["authorization"] = auth
        if topic is not None:
            headers["apns-topic"] = topic
        if push_type is not None:
            headers["apns-push-type"] = push_type
        return "POST", f"/3/device/{token}", headers, body

    suffixes = {"alert": "", "background": "", "mdm": "", "location": ".location-query",
                "voip": ".voip", "complication": ".complication",
                "fileprovider": ".pushkit.fileprovider", "liveactivity": ".push-type.liveactivity",
                "pushtotalk": ".voip-ptt", "widgets": ".push-type.widgets",
                "controls": ".push-type.controls"}
    cases = [push(), push(apns_id="c3eff96a-7c26-4cdf-8003-79789c2f8a41"),
             ("GET", "/stats", {}, b"")]
    for push_type, suffix in suffixes.items():
        prio = {"apns_priority": "5"} if push_type == "background" else {}
        cases.append(push(TOPIC + suffix, push_type, **prio))           # right suffix
        wrong = ".voip" if suffix != ".voip" else ".complication"
        cases.append(push(TOPIC + wrong, push_type, **prio))            # wrong suffix
    cases += [
        push("com.other.app"), push("bad topic!"), push(None), push(TOPIC, None),
        push(TOPIC, "nonsense"), push(apns_priority="7"), push(TOPIC, "background"),
        push(apns_id="not-a-uuid"), push(apns_expiration="soon"), push(apns_expiration="0"),
        push(apns_collapse_id="x" * 65), push(apns_collapse_id="x" * 64),
        push(body=b'{"aps":{"alert":"' + b"x" * 4100 + b'"}}'),
        push(TOPIC + ".voip", "voip", body=b'{"aps":{},"x":"' + b"x" * 4200 + b'"}'),
        push(body=b""), push(body=b"not json"), push(body=b"[1,2]"),
        push(token="zz" * 32), push(token="abc"), push(token="dead" + "00" * 30),
        push(auth=bad_sig), push(auth=wrong_kid), push(auth=wrong_team), push(auth=expired),
        push(auth=future), push(auth=None), push(auth="basic abc"), push(auth="bearer "),
        push(auth="bearer not.a.jwt"), push(),
        ("POST", "/3/other", {"authorization": good}, BODY),
        ("POST", "/3/device/", {"authorization": good}, BODY),
        ("GET", f"/3/device/{TOKEN}", {"authorization": good}, b""),
        ("POST", "/stats", {}, b""),
        ("DELETE", "/stats", {}, b""),
        push(),
        ("GET", f"/1/apps/{TOPIC}/all-channels", {"authorization": good}, b""),
        ("POST", f"/4/broadcasts/apps/{TOPIC}", {"authorization": good}, BODY),
        ("GET", "/stats", {}, b""),
    ]
    return cases


async def test_both_paths_answer_the_same(pki: TestPKI, signing_key: TestSigningKey) -> None:
    cases = request_table(signing_key)
    unregistered = {"dead" + "00" * 30}

    async def probe(mock: MockAPNs) -> list[tuple[Any, ...]]:
        out = []
        async with http_client(pki, mock) as client:
            for method, path, headers, body in cases:
                r = await client.request(method, path, headers=headers, content=body or None)
                out.append(answer(r))
                if path == "/stats" and method == "GET":
                    out.append(r.json())
            # a channel, then a broadcast to it (its id is the mock's, random)
            good = {"authorization": cases[0][2]["authorization"]}
            r = await client.post(f"/1/apps/{TOPIC}/channels", headers=good,
                                  content=b'{"message-storage-policy":1,"push-type":"LiveActivity"}')
            out.append(answer(r))
            channel = {**good, "apns-channel-id": r.headers["apns-channel-id"],
                       "apns-push-type": "liveactivity", "apns-priority": "10"}
            r = await client.post(f"/4/broadcasts/apps/{TOPIC}", headers=channel,
                                  content=b'{"aps":{"event":"update","timestamp":1}}')
            out.append(answer(r))
        return out

    (h2_answers, h2_stats), (fast_answers, fast_stats) = await on_both(
        pki, lambda path: config(signing_key, path, unregistered=unregistered), probe)
    for case, a, b in zip(["-", *cases], h2_answers, fast_answers, strict=False):
        assert a == b, case
    assert h2_answers == fast_answers
    assert h2_stats == fast_stats
    # the table covers what it means to
    statuses = {a[0] for a in h2_answers if isinstance(a, tuple)}
    assert statuses >= {200, 400, 403, 404, 405, 410, 413}
    assert any(a[0] == 410 and a[3] for a in h2_answers if isinstance(a, tuple))  # timestamp
    assert fast_stats["delivered"][TOKEN] == 1 and fast_stats["broadcasts"] == [1]  # since DELETE


async def test_seeded_faults_replay_alike(pki: TestPKI, signing_key: TestSigningKey) -> None:
    auth = f"bearer {make_jwt(signing_key)}"
    tokens = [f"{i:064x}" for i in range(1, 121)]
    headers = {"authorization": auth, "apns-topic": TOPIC, "apns-push-type": "alert"}

    async def probe(mock: MockAPNs) -> list[tuple[Any, ...]]:
        async with http_client(pki, mock) as client:
            return [answer(await client.post(f"/3/device/{t}", headers=headers, content=BODY))
                    for t in tokens]

    def make(path: str) -> MockConfig:
        return config(signing_key, path, p503=0.2, p500=0.05, p429=0.1, retry_after=5, seed=19,
                      unregistered_fraction=0.05, bad_token_fraction=0.05,
                      sandbox_token_fraction=0.1, unregistered={tokens[3]})

    (a, sa), (b, sb) = await on_both(pki, make, probe)
    assert a == b
    assert sa == sb
    reasons = sa["by_reason"]
    assert {"ServiceUnavailable", "InternalServerError", "TooManyRequests", "Unregistered",
            "BadDeviceToken"} <= set(reasons)
    assert {x[4] for x in a if x[0] in (429, 503)} == {"5"}

    # token_topic: every token belongs to another app
    (a, sa), (b, sb) = await on_both(
        pki, lambda path: config(signing_key, path, token_topic="com.example.other", seed=3),
        probe)
    assert a == b and sa == sb
    assert sa["by_reason"] == {"DeviceTokenNotForTopic": len(tokens)}


# --------------------------------------------------------------------------- raw HTTP/2


class Raw:
    """A hand-driven HTTP/2 client (hpack + frames): does whatever a test asks, violations
    included, and records what the server sent."""

    def __init__(self, stream: trio.SSLStream[Any]) -> None:
        self.stream = stream
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.buf = bytearray()
        self.limit: int | None = None
        self.limits: list[int] = []
        self.status: dict[int, int] = {}
        self.answers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.goaway: tuple[int, int, bytes] | None = None
        self.ping_acks: list[bytes] = []
        self.window_updates: list[tuple[int, int]] = []
        self.resets: list[tuple[int, int]] = []
        self.eof = False
        self.pending_settings_acks = 0

    @classmethod
    async def connect(cls, pki: TestPKI, mock: MockAPNs, settings: bytes = b"") -> Raw:
        stream = await trio.open_ssl_over_tcp_stream(
            "localhost", mock.port, ssl_context=client_ssl_context(pki.ca_file))
        await stream.do_handshake()
        raw = cls(stream)
        await raw.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, settings))
        return raw

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def headers(self, sid: int, headers: list[tuple[str, str]], end_stream: bool = False,
                split: int = 0, pad: int = 0) -> bytes:
        block = self.enc.encode(headers)
        flags = 0x1 if end_stream else 0
        if pad:
            block = bytes((pad,)) + block + b"\0" * pad
            flags |= 0x8
        if not split:
            return frame(1, flags | 0x4, sid, block)
        parts = [block[i:i + split] for i in range(0, len(block), split)]
        out = frame(1, flags, sid, parts[0])
        for i, part in enumerate(parts[1:], 2):
            out += frame(9, 0x4 if i == len(parts) else 0, sid, part)
        return out

    def request(self, sid: int, key: TestSigningKey, body: bytes = BODY, pad: int = 0,
                **kw: Any) -> bytes:
        headers = push_headers(key, **kw.pop("extra", {}))
        data = bytes((pad,)) + body + b"\0" * pad if pad else body
        return self.headers(sid, headers, **kw) + frame(0, 0x1 | (0x8 if pad else 0), sid, data)

    def opened_together(self, sids: list[int], key: TestSigningKey) -> bytes:
        """Every stream's HEADERS, then every stream's DATA: all open at once."""
        return b"".join(self.headers(s, push_headers(key)) for s in sids) \
            + b"".join(frame(0, 0x1, s, BODY) for s in sids)

    async def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not until():
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.eof = True
                    return
                self.buf += data
                out = b""
                while len(self.buf) >= 9:
                    length = int.from_bytes(self.buf[:3], "big")
                    if len(self.buf) < 9 + length:
                        break
                    ftype, flags = self.buf[3], self.buf[4]
                    sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFF_FFFF
                    payload = bytes(self.buf[9:9 + length])
                    del self.buf[:9 + length]
                    out += self._on_frame(ftype, flags, sid, payload)
                if out:
                    await self.send(out)

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
        if ftype == 4 and not flags & 1:  # SETTINGS
            for i in range(0, len(payload), 6):
                code = int.from_bytes(payload[i:i + 2], "big")
                if code == 3:
                    self.limit = int.from_bytes(payload[i + 2:i + 6], "big")
                    self.limits.append(self.limit)
            return frame(4, 1, 0)
        if ftype == 1:
            for name, value in self.dec.decode(payload, raw=True):
                self.answers.setdefault(sid, []).append((bytes(name), bytes(value)))
                if name == b":status":
                    self.status[sid] = int(value)
        elif ftype == 0:
            self.bodies[sid] = self.bodies.get(sid, b"") + payload
        elif ftype == 7:
            self.goaway = (int.from_bytes(payload[:4], "big"),
                           int.from_bytes(payload[4:8], "big"), payload[8:])
        elif ftype == 6:
            if flags & 1:
                self.ping_acks.append(payload)
            else:
                return frame(6, 1, 0, payload)
        elif ftype == 8:
            self.window_updates.append((sid, int.from_bytes(payload, "big")))
        elif ftype == 3:
            self.resets.append((sid, int.from_bytes(payload, "big")))
        if ftype in (0, 1) and flags & 1:
            self.ended.add(sid)
        return b""

    async def sync(self, tag: bytes) -> None:
        """A PING round trip: everything sent before it has been processed by the server."""
        await self.send(frame(6, 0, 0, tag))
        await self.pump(lambda: tag in self.ping_acks)

    async def until_eof(self) -> None:
        await self.pump(lambda: False)


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big") \
        + payload


def push_headers(key: TestSigningKey, **extra: str) -> list[tuple[str, str]]:
    headers = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
               (":path", f"/3/device/{TOKEN}"), ("authorization", f"bearer {_JWTS[key.path]}"),
               ("apns-topic", TOPIC), ("apns-push-type", "alert")]
    return headers + [(k.replace("_", "-"), v) for k, v in extra.items()]


_JWTS: dict[Any, str] = {}


@pytest.fixture(autouse=True)
def one_jwt(signing_key: TestSigningKey) -> None:
    """One JWT for the whole test, so that both paths see the same digests."""
    _JWTS.setdefault(signing_key.path, make_jwt(signing_key))


# --------------------------------------------------------------------------- (3) stream limits


async def test_stream_limits_cold_start_and_after_rejection(
    pki: TestPKI, signing_key: TestSigningKey
) -> None:
    key = signing_key

    async def probe(mock: MockAPNs) -> dict[str, Any]:
        raw = await Raw.connect(pki, mock)
        await raw.pump(lambda: raw.limit is not None)
        cold = raw.limit  # announced at connect: 1
        await raw.send(raw.request(1, key))
        await raw.pump(lambda: 1 in raw.ended and raw.limit == 500)
        await raw.send(raw.request(3, key, extra={"apns_priority": "7"}))  # rejected
        await raw.pump(lambda: 3 in raw.ended and raw.limit == 1)
        await raw.sync(b"acked-1!")  # our ACK of limit 1 reached the server
        # two streams at once while the limit is 1: the second violates it
        await raw.send(raw.opened_together([5, 7], key))
        await raw.pump(lambda: raw.goaway is not None and 5 in raw.ended)
        await raw.until_eof()
        return {"cold": cold, "limits": raw.limits, "status": raw.status, "goaway": raw.goaway,
                "eof": raw.eof, "pings": raw.ping_acks}

    (a, sa), (b, sb) = await on_both(pki, lambda p: config(key, p, max_streams=500), probe)
    assert a == b and sa == sb
    assert a["cold"] == 1 and a["limits"] == [1, 500, 1, 500]
    assert a["status"] == {1: 200, 3: 400, 5: 200}
    assert a["goaway"] == (5, ErrorCodes.REFUSED_STREAM, STREAM_LIMIT_VIOLATION.encode())
    assert a["eof"]
    assert len(sa["protocol_errors"]) == 1 and "MAX_CONCURRENT_STREAMS=1" in sa["protocol_errors"][0]
    assert sa["rejected_per_connection"] == [1] and sa["goaways_sent"] == 1


async def test_cold_start_violation_gets_goaway(pki: TestPKI, signing_key: TestSigningKey) -> None:
    key = signing_key

    async def probe(mock: MockAPNs) -> Any:
        raw = await Raw.connect(pki, mock)
        # three streams at once, before the server's SETTINGS (limit 1) were even read
        await raw.send(raw.opened_together([1, 3, 5], key))
        await raw.pump(lambda: raw.goaway is not None and 1 in raw.ended)
        await raw.until_eof()
        return raw.status, raw.goaway, raw.eof

    (a, sa), (b, sb) = await on_both(pki, lambda p: config(key, p), probe)
    assert a == b and sa == sb
    assert a == ({1: 200}, (1, ErrorCodes.REFUSED_STREAM, STREAM_LIMIT_VIOLATION.encode()), True)
    assert sa["protocol_errors"] == [
        "connection 0: stream 3 opened with 1 streams open, MAX_CONCURRENT_STREAMS=1"]


async def test_http2_features_alike(pki: TestPKI, signing_key: TestSigningKey) -> None:
    """CONTINUATION, padding, PING, flow control both ways, RST_STREAM, the client's GOAWAY."""
    key = signing_key

    async def probe(mock: MockAPNs) -> dict[str, Any]:
        # the client's stream window: 20 bytes, too small for an error body (h2 resets it)
        raw = await Raw.connect(pki, mock, settings=(4).to_bytes(2, "big") + (20).to_bytes(4, "big"))
        await raw.send(raw.request(1, key, split=40, pad=3))  # CONTINUATIONs, padded
        await raw.pump(lambda: 1 in raw.ended and raw.limit == 1000)
        # a 200 KB body in 16 KB frames: it only completes if the server opens its windows
        sid, big = 3, b"x" * 200_000
        await raw.send(raw.headers(sid, push_headers(key)))
        sent = 0

        def credit() -> int:  # what the server let us send on the stream and the connection
            return 65_535 + min(sum(n for s, n in raw.window_updates if s == 0),
                                sum(n for s, n in raw.window_updates if s == sid))

        while sent < len(big):
            room = credit() - sent
            if room <= 0:
                before = credit()
                await raw.pump(lambda: credit() > before)  # noqa: B023
                continue
            n = min(16_384, room, len(big) - sent)
            await raw.send(frame(0, 0x1 if sent + n == len(big) else 0, sid, big[sent:sent + n]))
            sent += n
        await raw.pump(lambda: sid in dict(raw.resets) or sid in raw.ended)
        # a stream the client resets before finishing it, then a good one
        await raw.send(raw.headers(5, push_headers(key)) + frame(3, 0, 5, (8).to_bytes(4, "big")))
        await raw.send(raw.request(7, key))
        await raw.pump(lambda: 7 in raw.ended)
        await raw.sync(b"pingpong")
        await raw.send(frame(7, 0, 0, (7).to_bytes(4, "big") + (0).to_bytes(4, "big")))
        await raw.until_eof()
        return {"status": raw.status, "resets": raw.resets, "ended": sorted(raw.ended),
                "eof": raw.eof, "conn_credit": sum(n for s, n in raw.window_updates if s == 0)
                >= 200_000 - 65_535, "stream_credit": any(s == 3 for s, _ in raw.window_updates)}

    (a, sa), (b, sb) = await on_both(pki, lambda p: config(key, p), probe)
    assert a == b and sa == sb
    assert a["status"] == {1: 200, 3: 413, 7: 200}
    assert a["resets"] == [(3, ErrorCodes.INTERNAL_ERROR)]  # its body did not fit our window
    assert a["conn_credit"] and a["stream_credit"] and a["eof"]
    assert sa["by_status"] == {200: 2}  # the reset answer is not counted, as on the h2 path
    assert sa["requests"] == 3 and sa["protocol_errors"] == []


@pytest.mark.parametrize("violation, code", [
    (frame(0, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR),            # DATA on stream 0
    (frame(6, 0, 0, b"short"), ErrorCodes.FRAME_SIZE_ERROR),      # PING of 5 bytes
    (frame(0, 0, 1, b"x" * 20_000), ErrorCodes.FRAME_SIZE_ERROR),  # over 16,384 bytes
    (frame(8, 0, 0, (0).to_bytes(4, "big")), ErrorCodes.PROTOCOL_ERROR),  # increment 0
], ids=["data-on-0", "short-ping", "frame-too-large", "zero-window-update"])
async def test_violations_get_the_same_goaway(pki: TestPKI, signing_key: TestSigningKey,
                                              violation: bytes, code: int) -> None:
    async def probe(mock: MockAPNs) -> Any:
        raw = await Raw.connect(pki, mock)
        await raw.send(raw.request(1, signing_key))
        await raw.pump(lambda: 1 in raw.ended)
        await raw.send(violation)
        await raw.until_eof()
        return raw.status, raw.goaway

    (a, sa), (b, sb) = await on_both(pki, lambda p: config(signing_key, p), probe)
    assert a == b == ({1: 200}, (1, code, b""))
    assert len(sa["protocol_errors"]) == len(sb["protocol_errors"]) == 1
    assert sa["goaways_sent"] == sb["goaways_sent"] == 1


def literal(headers: list[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing (new names and values each block, none
    entering the dynamic table)."""
    def text(value: str) -> bytes:
        data = value.encode()
        n = len(data)
        if n < 127:
            return bytes((n,)) + data
        n -= 127
        length = bytearray((127,))
        while n >= 128:
            length.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes(length) + bytes((n,)) + data
    return b"".join(b"\x00" + text(n) + text(v) for n, v in headers)


@pytest.mark.parametrize("encoding, name, good, bad, message", [
    ("hpack", "X-Upper", None, "1", "uppercase header name"),
    ("literal", "X-Upper", None, "1", "uppercase header name"),
    ("literal", "apns-collapse-id", "ab", "a\nb", "Illegal character"),
    ("literal", "apns-collapse-id", "ab", " ab", "surrounded by whitespace"),
    ("literal", "te", "trailers", "gzip", "Invalid value for TE header"),
    ("literal", "connection", None, "close", "Connection-specific header"),
    ("literal", ":path", f"/3/device/{TOKEN}", "", "empty :path header"),
], ids=["uppercase", "uppercase-literal", "newline", "whitespace", "te", "connection",
        "empty-path"])
async def test_invalid_headers_alike(pki: TestPKI, signing_key: TestSigningKey, encoding: str,
                                     name: str, good: str | None, bad: str, message: str) -> None:
    """h2's header validation runs on the fast path too (cached per shape of header list, so a
    valid request of the same shape goes first), with h2's own message."""
    def block(raw: Raw, value: str) -> bytes:
        headers = [(n, v) for n, v in push_headers(signing_key) if n != name] + [(name, value)]
        if name.startswith(":"):  # pseudo-headers first
            headers.sort(key=lambda h: not h[0].startswith(":"))
        return raw.enc.encode(headers) if encoding == "hpack" else literal(headers)

    async def probe(mock: MockAPNs) -> Any:
        raw = await Raw.connect(pki, mock)
        await raw.send(raw.request(1, signing_key))
        await raw.pump(lambda: 1 in raw.ended)
        sid = 3
        if good is not None:
            await raw.send(frame(1, 0x5, sid, block(raw, good)))
            await raw.pump(lambda: sid in raw.ended)  # noqa: B023
            sid += 2
        await raw.send(frame(1, 0x5, sid, block(raw, bad)))
        await raw.until_eof()
        return raw.status, raw.goaway

    (a, sa), (b, sb) = await on_both(pki, lambda p: config(signing_key, p), probe)
    assert a == b and sa == sb
    last = 5 if good is not None else 3
    assert a[1] == (last, ErrorCodes.PROTOCOL_ERROR, b"")
    assert len(sa["protocol_errors"]) == 1 and message in sa["protocol_errors"][0]


async def test_huffman_paths_and_ids_are_read_plain(pki: TestPKI, signing_key: TestSigningKey
                                                   ) -> None:
    """Request blocks go through the engine's hpackdec, which leaves a Huffman-coded
    :path and apns-id undecoded (Encoded) and answers a block that differs from the one
    before only in those values from its shape cache: the mock still reads them plain
    (the token seen, the id validated and echoed) as the h2 path does."""
    key = signing_key
    ids = ["c3eff96a-7c26-4cdf-8003-79789c2f8a41", "0b5ae2a4-9a2e-4e4e-8d7e-3f1c2b9a0d11",
           "not-a-uuid-but-36-characters-long-xx", "7d1c55e0-4f8b-4f55-9a3e-2b6f4e8c9d01"]
    tokens = [f"{i:064x}" for i in range(1, len(ids) + 1)]

    def block(raw: Raw, token: str, ident: str) -> bytes:
        headers = [(n, v) for n, v in push_headers(key) if n != ":path"]
        headers.insert(3, hpack.NeverIndexedHeaderTuple(":path", f"/3/device/{token}"))
        headers.append(hpack.NeverIndexedHeaderTuple("apns-id", ident))
        return raw.enc.encode(headers, huffman=True)

    async def probe(mock: MockAPNs) -> Any:
        raw = await Raw.connect(pki, mock)
        sids = []
        for n, (token, ident) in enumerate(zip(tokens, ids, strict=True)):
            sid = 2 * n + 1
            await raw.send(frame(1, 0x4, sid, block(raw, token, ident)) + frame(0, 0x1, sid, BODY))
            await raw.pump(lambda: sid in raw.ended)  # noqa: B023
            sids.append(sid)
        # the echo of a valid id (a refused one is answered with a random id)
        return [(raw.status[s], dict(raw.answers[s])[b"apns-id"] if raw.status[s] == 200
                 else None) for s in sids]

    (a, sa), (b, sb) = await on_both(pki, lambda p: config(key, p), probe)
    assert a == b and sa == sb
    assert a == [(200, ids[0].encode()), (200, ids[1].encode()), (400, None),
                 (200, ids[3].encode())]
    assert sa["seen"] == {t: 1 for t in tokens} and sa["by_reason"] == {"BadMessageId": 1}


def fanout_block(raw: Raw, key: TestSigningKey, token: str = TOKEN, ident: str | None = None,
                 topic: str = TOPIC, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A request block as fanout's client encodes one: every constant field indexed (after
    the first block), ``:path`` and ``apns-id`` never-indexed literals, no Huffman coding,
    so that the fast path reads every block after the first two from its template."""
    headers: list[Any] = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                          hpack.NeverIndexedHeaderTuple(":path", f"/3/device/{token}"),
                          ("authorization", f"bearer {_JWTS[key.path]}"), ("apns-topic", topic),
                          ("apns-push-type", "alert"), *extra]
    if ident is not None:
        headers.append(hpack.NeverIndexedHeaderTuple("apns-id", ident))
    return raw.enc.encode(headers, huffman=False)


def reasons(raw: Raw, sids: list[int]) -> list[tuple[int, str | None, bytes | None]]:
    """Each stream's status, reason and apns-id (echoed for 200 and valid ids, else random)."""
    out = []
    for sid in sids:
        body = json.loads(raw.bodies[sid]) if raw.bodies.get(sid) else {}
        fields = dict(raw.answers.get(sid, []))
        echo = fields.get(b"apns-id") if raw.status.get(sid) == 200 else None
        out.append((raw.status.get(sid, 0), body.get("reason"), echo))
    return out


async def test_template_requests_answer_alike(pki: TestPKI, signing_key: TestSigningKey,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests encoded as fanout's client encodes them: the fast path reads them from a
    template (a block of hpackdec's shape cache, read in place; the request line and
    check_headers' verdict on it remembered; a whole request in one read answered without
    storing its stream) and must answer them as the h2 path does: every kind of request,
    configuration changed under a live connection, bodies split from their HEADERS."""
    key = signing_key
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    decoded = []  # blocks the fast path decoded (the others it read from a template)
    decode = _fast._RequestDecoder.decode

    def counting(self: Any, block: bytes) -> Any:
        decoded.append(block)
        return decode(self, block)

    monkeypatch.setattr(_fast._RequestDecoder, "decode", counting)

    async def probe(mock: MockAPNs) -> Any:
        ids = iter(str(uuid.UUID(int=n + 1, version=4)) for n in range(10_000))
        tokens = iter(f"{n:064x}" for n in range(1, 10_000))
        raw = await Raw.connect(pki, mock)
        sids: list[int] = []
        sid = -1

        def next_sid() -> int:
            nonlocal sid
            sid += 2
            sids.append(sid)
            return sid

        async def push(n: int = 1, body: bytes = BODY, **kw: Any) -> None:
            """n requests, one at a time, each answered before the next is sent."""
            for _ in range(n):
                s = next_sid()
                kw.setdefault("ident", None)
                ident = kw["ident"] if kw["ident"] is not None else next(ids)
                token = kw.get("token") or next(tokens)
                block = fanout_block(raw, key, token, ident,
                                     **{k: v for k, v in kw.items() if k not in ("ident", "token")})
                await raw.send(frame(1, 0x4, s, block) + frame(0, 0x1, s, body))
                await raw.pump(lambda: s in raw.ended)  # noqa: B023

        await push(4)  # learnt from the second; the others read from the template
        await push(2, token="zz" * 32)  # not a hex token: the general path
        await push(2, token="abc")  # another length: another shape
        await push(2)
        await push(2, token="dead" + "00" * 30)  # unregistered: 410 on the template
        await push(2, ident="not-a-uuid-but-36-characters-long-xx")
        await push(2, ident="c3eff96a-7c26-4cdf-8003-79789c2f8a41")  # the same id twice
        for body in (b"", b"not json", b"[1,2]", b'{"aps":{"alert":"' + b"x" * 4100 + b'"}}'):
            await push(2, body=body)
        await push(3, topic="com.other.app")
        await push(3, extra=(("apns-push-type", "background"),))  # a duplicate header
        await push(3, extra=(("apns-priority", "5"),))
        await push(3, extra=(("apns-expiration", "soon"),))
        await push(2)
        # several requests in one write (and read): each answered as it is read
        batch = []
        for _ in range(5):
            s = next_sid()
            batch.append(frame(1, 0x4, s, fanout_block(raw, key, next(tokens), next(ids)))
                         + frame(0, 0x1, s, BODY))
        await raw.send(b"".join(batch))
        await raw.pump(lambda: all(x in raw.ended for x in sids))
        # HEADERS, then its DATA in a later read; a padded DATA; HEADERS ending the stream
        for data in (frame(0, 0x1, 0, BODY), frame(0, 0x9, 0, bytes((3,)) + BODY + bytes(3))):
            s = next_sid()
            await raw.send(frame(1, 0x4, s, fanout_block(raw, key, next(tokens), next(ids))))
            await raw.sync(b"hdrs%04d" % s)
            await raw.send(data[:5] + s.to_bytes(4, "big") + data[9:])
            await raw.pump(lambda: s in raw.ended)  # noqa: B023
        s = next_sid()
        await raw.send(frame(1, 0x5, s, fanout_block(raw, key, next(tokens), next(ids))))
        await raw.pump(lambda: s in raw.ended)  # noqa: B023
        await push(2)
        # the configuration changed under the connection
        mock.config.topics = {"com.other.app"}
        await push(2)
        mock.config.topics = {TOPIC}
        await push(2)
        mock.config.p503, mock.config.retry_after = 1.0, 7
        await push(2)
        mock.config.p503 = 0.0
        mock.config.record_bodies = True
        await push(2)
        mock.config.record_bodies = False
        mock.config.latency = 0.01  # answered later: the general path
        await push(2)
        mock.config.latency = 0.0
        mock.config.validate = False
        await push(2, token="zz" * 32)
        mock.config.validate = True
        await push(2)
        mock.config.keys = {key.key_id: other}  # the key revoked
        await push(2)
        return reasons(raw, sids), raw.limits

    (a, sa), (b, sb) = await on_both(pki, lambda p: config(key, p, unregistered={
        "dead" + "00" * 30}), probe)
    for n, (x, y) in enumerate(zip(a[0], b[0], strict=True)):
        assert x == y, n
    assert a == b
    assert sa == sb
    statuses = {x[0] for x in a[0]}
    assert statuses >= {200, 400, 403, 410, 413, 503}
    assert sa["by_reason"]["TopicDisallowed"] >= 5 and sa["bodies"]
    assert len(decoded) < len(a[0]) // 2, (len(decoded), len(a[0]))


async def test_template_refused_values_alike(pki: TestPKI, signing_key: TestSigningKey) -> None:
    """A value h2 refuses in a block of a template (an apns-id hole learnt as a UUID or as
    any value) gets h2's GOAWAY and message, as on the h2 path."""
    key = signing_key

    for learnt, bad in (("c3eff96a-7c26-4cdf-8003-79789c2f8a41",
                         "c3eff96a-7c26-4cdf-8003-79789c2f8a4\n"),
                        ("x" * 36, "x" * 17 + "\n" + "x" * 18),
                        ("x" * 36, " " + "x" * 35)):

        async def probe(mock: MockAPNs) -> Any:
            raw = await Raw.connect(pki, mock)
            for s in (1, 3, 5):
                await raw.send(frame(1, 0x4, s, fanout_block(raw, key, ident=learnt))  # noqa: B023
                               + frame(0, 0x1, s, BODY))
                await raw.pump(lambda: s in raw.ended)  # noqa: B023
            await raw.send(frame(1, 0x4, 7, fanout_block(raw, key, ident=bad))  # noqa: B023
                           + frame(0, 0x1, 7, BODY))
            await raw.until_eof()
            return raw.status, raw.goaway

        (a, sa), (b, sb) = await on_both(pki, lambda p: config(key, p), probe)
        assert a == b and sa == sb
        assert a[1] == (7, ErrorCodes.PROTOCOL_ERROR, b"")  # opened before it is validated
        assert len(sa["protocol_errors"]) == 1


@pytest.mark.parametrize("bad_block, code", [
    (b"\x80", ErrorCodes.PROTOCOL_ERROR),                  # index 0
    (b"\x00\x01a\x81\x00", ErrorCodes.PROTOCOL_ERROR),     # Huffman padding of zeros
    (b"\x83\x20\x83", ErrorCodes.PROTOCOL_ERROR),           # a size update after a field
    (hpack.Encoder().encode([("x-big", "v" * 9000)], huffman=False),
     ErrorCodes.ENHANCE_YOUR_CALM),                        # over MAX_HEADER_LIST_SIZE
], ids=["index-0", "huffman-padding", "late-size-update", "oversized"])
async def test_malformed_header_blocks_alike(pki: TestPKI, signing_key: TestSigningKey,
                                             bad_block: bytes, code: int) -> None:
    """hpackdec's errors are h2's: the same GOAWAY and exception name as on the h2 path."""
    async def probe(mock: MockAPNs) -> Any:
        raw = await Raw.connect(pki, mock)
        await raw.send(raw.request(1, signing_key))
        await raw.pump(lambda: 1 in raw.ended)
        await raw.send(frame(1, 0x5, 3, bad_block))
        await raw.until_eof()
        return raw.status, raw.goaway

    (a, sa), (b, sb) = await on_both(pki, lambda p: config(signing_key, p), probe)
    assert a == b == ({1: 200}, (1, code, b""))
    names = [[e.split(": ")[1] for e in s["protocol_errors"]] for s in (sa, sb)]
    assert names[0] == names[1] and len(names[0]) == 1


# --------------------------------------------------------------------------- (2) fanout


async def test_fanout_client_against_the_fast_path(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    from fanout.auth import TokenAuth
    from fanout.client import Client

    n = 3000
    tokens = [f"{i:064x}" for i in range(1, n + 1)]
    mock = await open_mock(nursery, config(signing_key, "fast", max_streams=100,
                                           unregistered_fraction=0.05), pki)
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    results: dict[str, list[str]] = {}
    async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=mock.port,
                      ca_file=str(pki.ca_file), connections=2) as client:
        async for r in client.fan_out({"aps": {"alert": "hi"}}, tokens):
            results.setdefault(r.token, []).append(r.outcome)
    assert sorted(results) == tokens and all(len(v) == 1 for v in results.values())
    stats = mock.stats
    delivered = [t for t, v in results.items() if v == ["delivered"]]
    dead = [t for t, v in results.items() if v != ["delivered"]]
    assert stats.delivered == {t: 1 for t in delivered}
    assert stats.by_status == {200: len(delivered), 410: len(dead)}
    assert 0 < len(dead) < n // 10 and stats.by_reason == {"Unregistered": len(dead)}
    assert stats.requests == n and set(stats.seen) == set(tokens)
    assert len(stats.jwts) == 1 and stats.connections == 2 and mock.paths == {"fast": 2}
    assert max(stats.max_concurrent) <= 100  # answered as they complete: rarely above 1
    assert stats.protocol_errors == [] and stats.goaways_sent == 0


async def test_falls_back_to_h2_for_faults_it_lacks(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config(signing_key, "fast", goaway_after=2), pki)
    raw = await Raw.connect(pki, mock)
    await raw.send(raw.request(1, signing_key))
    await raw.pump(lambda: 1 in raw.ended)
    await raw.send(raw.request(3, signing_key))
    await raw.pump(lambda: raw.goaway is not None)
    assert raw.goaway[:2] == (3, ErrorCodes.NO_ERROR)
    assert mock.paths == {"h2": 1}
    mock.config.goaway_after = None  # read per connection: the next one is fast
    async with http_client(pki, mock) as client:
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers=dict(
            push_headers(signing_key)[4:]))
        assert r.status_code == 200
    assert mock.paths == {"h2": 1, "fast": 1}


async def test_latency_and_never_answer_on_the_fast_path(
    pki: TestPKI, signing_key: TestSigningKey
) -> None:
    async def probe(mock: MockAPNs) -> Any:
        raw = await Raw.connect(pki, mock)
        await raw.send(raw.request(1, signing_key))
        await raw.pump(lambda: 1 in raw.ended and raw.limit == 1000)
        mock.config.never_answer = 0.2  # read as each request completes
        sids = list(range(3, 83, 2))
        await raw.send(b"".join(raw.request(s, signing_key) for s in sids))
        await raw.pump(lambda: mock.stats.requests == 41
                       and len(raw.ended) + mock.stats.never_answered == 41)
        return sorted(raw.status.items())

    (a, sa), (b, sb) = await on_both(
        pki, lambda p: config(signing_key, p, latency=0.01, jitter=0.005, seed=5), probe)
    assert a == b
    assert sa["never_answered"] == sb["never_answered"] > 0
    assert sa["by_status"] == sb["by_status"] and sa["requests"] == sb["requests"] == 41
    assert len(a) == len(b) == 41 - sa["never_answered"]


# --------------------------------------------------------------------------- (5) other clients


async def test_curl_and_httpx_against_the_fast_path(
    pki: TestPKI, signing_key: TestSigningKey, nursery: trio.Nursery
) -> None:
    mock = await open_mock(nursery, config(signing_key, "fast"), pki)
    auth = f"bearer {_JWTS[signing_key.path]}"
    async with http_client(pki, mock) as client:
        r = await client.post(f"/3/device/{TOKEN}", content=BODY, headers={
            "authorization": auth, "apns-topic": TOPIC, "apns-push-type": "alert"})
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert len(r.headers["apns-id"]) == 36
    curl = shutil.which("curl")
    if curl is None:
        return
    done = await trio.run_process(
        [curl, "-s", "--http2", "--cacert", str(pki.ca_file), "-o", "-", "-w",
         "\n%{http_code} %{http_version}", "-H", f"authorization: {auth}", "-H",
         f"apns-topic: {TOPIC}", "-H", "apns-push-type: alert", "-d", BODY.decode(),
         f"https://localhost:{mock.port}/3/device/{TOKEN}"], capture_stdout=True)
    assert done.stdout.decode().split() == ["200", "2"]
    done = await trio.run_process(
        [curl, "-s", "--http2", "--cacert", str(pki.ca_file), "-d", BODY.decode(), "-H",
         f"apns-topic: {TOPIC}", f"https://localhost:{mock.port}/3/device/{TOKEN}"],
        capture_stdout=True)
    assert json.loads(done.stdout) == {"reason": "MissingProviderToken"}
    done = await trio.run_process(
        [curl, "-s", "--http2", "--cacert", str(pki.ca_file),
         f"https://localhost:{mock.port}/stats"], capture_stdout=True)
    summary = json.loads(done.stdout)
    assert summary["delivered"] == 2 and summary["jwts"] == 1
    assert summary["by_reason"] == {"MissingProviderToken": 1}
    assert mock.stats.jwts == {hashlib.sha256(auth[7:].encode()).hexdigest()}
    assert mock.paths == {"fast": 4}
