"""Differential tests: our hand-written HTTP/2 framer against independent implementations.

hpack's Decoder checks every header block we encode; h2 acting as a strict server checks
every frame on a real TLS connection, under flow-control, HPACK-size and JWT-rotation
pressure. The same engine is run against nginx in test_nginx.py.
"""

from __future__ import annotations

import json
import random
import ssl
import time
import uuid

import hpack
import jwt
import pytest
import trio
from h2.settings import SettingCodes
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout._engine import framer as fr
from fanout._engine.connection import Connection, Exchange
from fanout.auth import TokenAuth
from fanout.client import Client
from fanout.errors import FanoutError, ProtocolError
from fanout.payload import Notification, PushTemplate, PushType

from .h2server import StrictH2Server
from .helpers import SteppedClock

# ---------------------------------------------------------------- HPACK encoder (unit)

def _decode_all(blocks, decoder):
    return [decoder.decode(b, raw=True) for b in blocks]


def test_encoder_blocks_decode_with_hpack_through_rotation_and_resizes():
    rng = random.Random(7)
    enc = fr.RequestEncoder(4096)
    dec = hpack.Decoder()
    expected, blocks = [], []
    jwt_value = b"bearer " + b"a" * 180
    for i in range(2000):
        if i % 97 == 0:
            jwt_value = b"bearer " + bytes(rng.choice(b"abcdefgh") for _ in range(180))
        if i == 700:
            enc.set_max_size(256)
            dec.max_allowed_table_size = 256
        if i == 1400:
            enc.set_max_size(0)
        if i == 1600:
            enc.set_max_size(4096)
            dec.max_allowed_table_size = 4096
        topic = rng.choice([b"com.a", b"com.b.voip", b"com.c.push-type.liveactivity"])
        consts = (b":authority", b"api.push.apple.com", b"authorization", jwt_value,
                  b"apns-topic", topic, b"apns-push-type", b"alert", b"apns-priority",
                  rng.choice([b"10", b"5"]))
        path = b"/3/device/" + bytes(rng.randrange(256) for _ in range(32)).hex().encode()
        apns_id = b"x" * rng.randrange(0, 300)
        lead, rest = enc.constant(consts)
        block = lead + fr.METHOD_POST + fr.SCHEME_HTTPS \
            + fr.literal_never_indexed(b":path", path) + rest \
            + fr.literal_never_indexed(b"apns-id", apns_id)
        blocks.append(block)
        expected.append([(b":authority", consts[1]), (b":method", b"POST"), (b":scheme", b"https"),
                         (b":path", path)]
                        + [(consts[j], consts[j + 1]) for j in range(2, len(consts), 2)]
                        + [(b"apns-id", apns_id)])
    for block, exp in zip(blocks, expected, strict=False):
        assert dec.decode(block, raw=True) == exp


def test_steady_state_constant_headers_are_one_byte_indexes():
    enc = fr.RequestEncoder()
    consts = (b":authority", b"h", b"authorization", b"bearer x", b"apns-topic", b"t",
              b"apns-push-type", b"alert", b"apns-priority", b"10")
    first = b"".join(enc.constant(consts))
    second = b"".join(enc.constant(consts))
    assert len(second) == 5 and all(b & 0x80 for b in second)
    assert len(first) > len(second)
    dec = hpack.Decoder()
    assert dec.decode(first, raw=True) == dec.decode(second, raw=True)


def test_integer_encoding_matches_rfc_examples():
    # RFC 7541 C.1: 10 with a 5-bit prefix, 1337 with a 5-bit prefix, 42 with 8 bits
    assert fr.encode_int(10, 5, 0) == bytes([0b01010])
    assert fr.encode_int(1337, 5, 0) == bytes([31, 154, 10])
    assert fr.encode_int(42, 8, 0) == bytes([42])


# ---------------------------------------------------------------- frame splitting (unit)

def _ready_connection() -> Connection:
    """A connection that has had the server's (empty) SETTINGS, never connected."""
    ends = _Ends()
    conn = Connection("127.0.0.1", 1, _CTX, ends, ends)
    conn._handle(fr.SETTINGS, 0, 0, b"")
    return conn


def test_frames_split_across_reads_are_acted_on_whole():
    """Connection._receive (what the read loop runs on every read) keeps a frame begun in
    one read for the next: fed one byte at a time, PING, SETTINGS and WINDOW_UPDATE each
    take effect once, when whole."""
    conn = _ready_connection()
    window = conn._send_window
    data = fr.ping(b"12345678") + fr.settings_frame({3: 100}) + fr.window_update(0, 5)
    for i in range(len(data)):
        conn._receive(data[i:i + 1])
    assert conn._send_window == window + 5
    assert conn.remote_max_streams == conn.limit == 100
    sent = b"".join(conn._out)
    assert sent.count(fr.ping(b"12345678", ack=True)) == 1  # answered once, when whole
    assert not conn._reader.buf


def test_an_oversized_frame_is_refused():
    conn = _ready_connection()
    with pytest.raises(ProtocolError):
        conn._receive(fr.frame_header(conn._reader.max_frame_size + 1, fr.DATA, 0, 1))


class _Ends:
    """Records each stream's end (a StreamListener); ignores the lifecycle (an observer)."""

    def __init__(self) -> None:
        self.sids: list[int] = []

    def on_response(self, conn, job, status, headers, body):
        self.sids.append(job.sid)

    def on_unprocessed(self, conn, job, why):
        self.sids.append(job.sid)

    on_lost = on_unprocessed

    def on_timeout(self, conn, job):
        self.sids.append(job.sid)

    def on_capacity(self, conn):
        pass

    def on_retired(self, conn, why):
        pass

    def on_closed(self, conn):
        pass


_CTX = ssl.create_default_context()  # never connects


async def _each_stream_ends_once(data: bytes) -> None:
    """Three streams in flight, ``data`` from the server, then the close: each stream ends
    through exactly one listener call, whatever the bytes."""
    ends = _Ends()
    conn = Connection("127.0.0.1", 1, _CTX, ends, ends)
    conn._handle(fr.SETTINGS, 0, 0, b"")  # the server's (empty) SETTINGS: ready
    template = PushTemplate({"aps": {"alert": "x"}}, topic="com.example.app")
    for i in range(3):
        conn.start(Exchange(template.for_token(f"{i:064x}")))
    try:
        conn._receive(data)
    except FanoutError:
        pass  # the connection closes
    conn._fail_all("closed")  # what run() does then
    assert sorted(ends.sids) == [1, 3, 5]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_connection(data):
    trio.run(_each_stream_ends_once, data)


# ---------------------------------------------------------------- h2 as the server (wire)

def _check_request(rec, auth_key, team, topic):
    h = dict(rec.headers)
    assert len(h) == len(rec.headers), "duplicate header"
    assert h[b":method"] == b"POST" and h[b":scheme"] == b"https"
    assert h[b":path"].startswith(b"/3/device/")
    assert h[b"apns-topic"] == topic
    scheme, token = h[b"authorization"].split(b" ")
    claims = jwt.decode(token, auth_key, algorithms=["ES256"])
    assert claims["iss"] == team
    assert json.loads(rec.body)["aps"]
    return h


async def test_framer_frames_accepted_by_strict_h2_server(server_ssl, pki, signing_key):
    """Tiny flow-control window (bodies split across DATA frames), small HPACK table,
    a JWT rotation every 100 pushes, 4 KB payloads: h2 must see every request intact."""
    server = StrictH2Server(server_ssl, settings={
        SettingCodes.INITIAL_WINDOW_SIZE: 1000,
        SettingCodes.HEADER_TABLE_SIZE: 256,
        SettingCodes.MAX_CONCURRENT_STREAMS: 50,
    })
    clock = SteppedClock(time.time() - 3600)  # iat in the past: the server checks it
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id,
                               refresh_after=60, min_refresh_interval=0, clock=clock)
    rng = random.Random(3)
    sent = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        async with Client(auth=auth, topic="com.example.app", host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file), connections=2) as client:
            notes = []
            for i in range(600):
                token = f"{i:064x}"
                size = rng.choice([10, 300, 1500, 3900])
                body = {"aps": {"alert": "x" * size}, "i": i}
                sent[token] = body
                notes.append(Notification(
                    token=token, payload=body, id=i,
                    apns_id=f"00000000-0000-4000-8000-{i:012d}" if i % 3 == 0 else None,
                    collapse_id=f"c{i}" if i % 5 == 0 else None,
                    expiration=1_900_000_000 if i % 7 == 0 else None,
                    push_type=PushType.ALERT))
            results = []
            async for r in client.send_many(notes):
                results.append(r)
                if len(results) % 100 == 0:
                    clock.now += 61  # the JWT is due: the next pushes carry a new one
        nursery.cancel_scope.cancel()
    assert server.errors == []
    assert sorted(r.outcome for r in results) == ["delivered"] * 600
    assert len(server.requests) == 600
    assert auth.rotations > 1
    for rec in server.requests:
        h = _check_request(rec, signing_key.public_key, signing_key.team_id, b"com.example.app")
        token = h[b":path"].rsplit(b"/", 1)[1].decode()
        assert json.loads(rec.body) == sent[token]
        i = sent[token]["i"]
        # every device push carries an apns-id: the caller's, else a fresh canonical UUID
        if i % 3 == 0:
            assert h[b"apns-id"] == f"00000000-0000-4000-8000-{i:012d}".encode()
        else:
            assert str(uuid.UUID(h[b"apns-id"].decode())) == h[b"apns-id"].decode()
        assert (b"apns-collapse-id" in h) == (i % 5 == 0)
        assert (h.get(b"apns-expiration") == b"1900000000") == (i % 7 == 0)
    assert server.max_open <= 50


async def test_huge_header_block_is_split_into_continuation(server_ssl, pki, signing_key):
    """A header block over the peer's max frame size goes out as HEADERS + CONTINUATION."""
    server = StrictH2Server(server_ssl)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        async with Client(auth=None, topic="com.example.app", host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file), connections=1) as client:
            from fanout.payload import prepare
            p = prepare(Notification(token="ab" * 32, payload={"aps": {}}), default_topic="com.example.app")
            big = prepare(Notification(token="cd" * 32, payload={"aps": {}}),
                          default_topic="com.example.app")
            big.topic = b"com.example." + b"t" * 20000  # larger than 16384: must be split
            r1 = await client.send(p)
            r2 = await client.send(big)
        nursery.cancel_scope.cancel()
    assert server.errors == []
    assert r1.ok and r2.ok
    assert dict(server.requests[1].headers)[b"apns-topic"].endswith(b"t" * 100)


async def test_stream_limit_followed_live(server_ssl, pki):
    """The server moves its limit 1 -> 1000 -> 1 -> 1000 mid-run: no protocol error."""
    server = StrictH2Server(server_ssl, settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1},
                            answer_delay=0.002)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        from fanout.events import Events

        class Retries(Events):
            causes: list[str] = []

            def retry(self, cause):
                self.causes.append(cause)
        events = Retries()
        async with Client(topic="com.example.app", host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file), connections=1, events=events) as client:
            seen_limits = []

            async def flip():
                for limit in (1000, 1, 1000):
                    await trio.sleep(0.15)
                    server.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})
                    with trio.move_on_after(5):  # however loaded the machine is
                        while client.pool.conns[0].remote_max_streams != limit:
                            await trio.sleep(0.005)
                    seen_limits.append(client.pool.conns[0].remote_max_streams)

            nursery.start_soon(flip)
            count = 0
            with trio.fail_after(20):
                async for r in client.fan_out({"aps": {"alert": "x"}},
                                              (f"{i:064x}" for i in range(3000))):
                    assert r.ok, r
                    count += 1
        nursery.cancel_scope.cancel()
    assert count == 3000
    assert server.errors == []
    assert seen_limits == [1000, 1, 1000]
    assert server.max_open > 100
    assert events.causes == []  # no refused stream, no resend


async def test_response_split_into_continuation_frames_is_reassembled(server_ssl, pki):
    """h2 splits a 40 KB response header block into HEADERS + CONTINUATION frames."""
    server = StrictH2Server(server_ssl, response_headers=[(b"x-big", b"v" * 40_000)])
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        async with Client(topic="com.example.app", host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file), connections=1) as client:
            results = []
            with trio.fail_after(10):
                async for r in client.fan_out({"aps": {"alert": "x"}},
                                              (f"{i:064x}" for i in range(20))):
                    results.append(r)
        nursery.cancel_scope.cancel()
    assert [r.outcome for r in results] == ["delivered"] * 20
    assert server.errors == []


async def test_rate_limited_sends_all_arrive(server_ssl, pki):
    server = StrictH2Server(server_ssl)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        async with Client(topic="com.example.app", host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file), rate=300.0,
                          topic_rates={"com.example.app": 1000.0}) as client:
            waited = []
            taken = []
            original, original_try = client.limiter.acquire, client.limiter.try_acquire

            async def spy(topic):
                waited.append(await original(topic))
                return waited[-1]

            def try_spy(topic):
                taken.append(original_try(topic))
                return taken[-1]

            def give_back_spy(topic):
                taken.append(-1)  # taken, then returned: the push could not start
                original_give_back(topic)
            original_give_back = client.limiter.give_back
            client.limiter.acquire = spy
            client.limiter.try_acquire = try_spy
            client.limiter.give_back = give_back_spy
            results = []
            start = trio.current_time()
            with trio.fail_after(20):
                async for r in client.fan_out({"aps": {"alert": "x"}},
                                              (f"{i:064x}" for i in range(600))):
                    results.append(r)
            elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert [r.outcome for r in results] == ["delivered"] * 600
    # every push paid its tokens: taken at once (the burst, then each tick's share) or
    # waited for in acquire(); 600 at 300/s with a burst of 300 cannot end within 1 s
    assert sum(taken) + len(waited) == 600 and sum(1 for w in waited if w > 0) > 100
    assert elapsed >= 0.95
