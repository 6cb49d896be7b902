"""The HTTP/2 framing of the hot path (RFC 9113 frames, RFC 7541 HPACK for requests).

Why hand-written: the h2 state machine costs 475-950 µs per push in Python, this framer
about 100 (docs/perf.md, "Header encoding"). Requests are encoded here; responses are
decoded with hpack's Decoder, an independent implementation. Tests check every frame
written here against h2 acting as the server, and the engine runs against nginx too.

Request header strategy (docs/perf.md, "Header encoding"; docs/apns.md, "Headers"):
constant headers (:authority, authorization, apns-topic, apns-push-type, apns-priority)
are inserted once into the server's dynamic table and sent afterwards as one-byte
indexes; per-request values (:path, apns-id, apns-collapse-id, apns-expiration) go as
literals never indexed, without Huffman coding. The encoder models the table it builds,
evicting as the peer would at its SETTINGS_HEADER_TABLE_SIZE, so a JWT rotation simply
inserts a new entry.
"""

from __future__ import annotations

import struct
from collections import deque

from ..errors import ProtocolError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, \
    S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = range(1, 7)
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, \
    FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, \
    ENHANCE_YOUR_CALM, INADEQUATE_SECURITY, HTTP_1_1_REQUIRED = range(14)

MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1
DEFAULT_MAX_FRAME = 16384

_HDR = struct.Struct(">BHBBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _HDR.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id)


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def ping(data: bytes, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, data)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code) + debug)


def parse_settings(payload: bytes) -> dict[int, int]:
    if len(payload) % 6:
        raise ProtocolError(f"SETTINGS payload of {len(payload)} bytes is not a multiple of 6")
    return {k: v for k, v in _SETTING.iter_unpack(payload)}


def parse_goaway(payload: bytes) -> tuple[int, int, bytes]:
    if len(payload) < 8:
        raise ProtocolError("GOAWAY payload shorter than 8 bytes")
    last, code = _GOAWAY.unpack_from(payload)
    return last & MAX_STREAM_ID, code, bytes(payload[8:])


def parse_u32(payload: bytes, what: str) -> int:
    if len(payload) != 4:
        raise ProtocolError(f"{what} payload must be 4 bytes, got {len(payload)}")
    value: int = _U32.unpack(payload)[0]
    return value & MAX_STREAM_ID


# --------------------------------------------------------------------------- HPACK (encode)

STATIC_TABLE_LEN = 61
_STATIC_NAME = {  # RFC 7541 Appendix A: first index of each name we send
    b":authority": 1, b":method": 2, b":path": 4, b":scheme": 6, b"authorization": 23,
    b"content-length": 28, b"content-type": 31,
}
METHOD_POST = b"\x83"      # static 3 :method POST
SCHEME_HTTPS = b"\x87"     # static 7 :scheme https


def encode_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_str(data: bytes) -> bytes:
    """String literal without Huffman coding."""
    return encode_int(len(data), 7, 0) + data


def literal_never_indexed(name: bytes, value: bytes) -> bytes:
    idx = _STATIC_NAME.get(name)
    if idx is not None:
        return encode_int(idx, 4, 0x10) + encode_str(value)
    return b"\x10" + encode_str(name) + encode_str(value)


class RequestEncoder:
    """Encodes request header blocks and models the dynamic table they build."""

    __slots__ = ("max_size", "size", "_entries", "_lookup", "_inserted", "_pending_update",
                 "_cache")

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size
        self.size = 0
        self._entries: deque[tuple[bytes, bytes, int]] = deque()  # oldest first
        self._lookup: dict[tuple[bytes, bytes], int] = {}           # (name, value) -> seq
        self._inserted = 0
        self._pending_update: int | None = None
        self._cache: dict[tuple[bytes, ...], tuple[bytes, bytes]] = {}  # pairs -> (lead, rest)

    def set_max_size(self, peer_max: int, cap: int = 4096) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed: shrink (never grow past ``cap``)."""
        new = min(peer_max, cap)
        if new == self.max_size:
            return
        self.max_size = new
        self._pending_update = new
        self._evict(0)
        self._cache.clear()

    def _evict(self, room: int) -> None:
        while self._entries and self.size + room > self.max_size:
            name, value, seq = self._entries.popleft()
            self.size -= len(name) + len(value) + 32
            if self._lookup.get((name, value)) == seq:
                del self._lookup[(name, value)]

    def _indexed(self, name: bytes, value: bytes) -> bytes:
        seq = self._lookup.get((name, value))
        if seq is not None:
            return encode_int(STATIC_TABLE_LEN + 1 + self._inserted - seq, 7, 0x80)
        idx = _STATIC_NAME.get(name)
        out = (encode_int(idx, 6, 0x40) if idx is not None else b"\x40" + encode_str(name)) \
            + encode_str(value)
        size = len(name) + len(value) + 32
        if size > self.max_size:  # too large to store: the peer empties its table
            self._evict(self.max_size + 1)
            return out
        self._evict(size)
        self._inserted += 1
        self._entries.append((name, value, self._inserted))
        self._lookup[(name, value)] = self._inserted
        self.size += size
        return out

    def constant(self, pairs: tuple[bytes, ...]) -> tuple[bytes, bytes]:
        """Encode the constant headers ``(":authority", value, name, value, ...)``.

        Returns ``(lead, rest)``: ``lead`` opens the block (a pending table size update,
        then the :authority pseudo-header), ``rest`` holds the regular headers, which must
        follow every pseudo-header. Cached; the cache is dropped whenever the table
        changes, because dynamic indexes shift.
        """
        out = self._cache.get(pairs)
        if out is not None:
            return out
        before = self._inserted
        prefix = b""
        if self._pending_update is not None:
            prefix = encode_int(self._pending_update, 5, 0x20)
            self._pending_update = None
        lead = prefix + self._indexed(pairs[0], pairs[1])
        rest = b"".join(self._indexed(pairs[i], pairs[i + 1]) for i in range(2, len(pairs), 2))
        if self._inserted != before or prefix:
            self._cache.clear()  # the next call caches pure indexes into the new table
            return lead, rest
        if len(self._cache) > 64:
            self._cache.clear()
        out = self._cache[pairs] = (lead, rest)
        return out


# --------------------------------------------------------------------------- frame reader

class FrameReader:
    """What a connection's receive side keeps between reads: the bytes of a frame not yet
    whole, and our SETTINGS_MAX_FRAME_SIZE (bigger frames are refused). The splitting is
    :meth:`fanout._engine.connection.Connection._receive`, on the hot path."""

    __slots__ = ("buf", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self.buf = bytearray()
        self.max_frame_size = max_frame_size


def strip_padding(flags: int, payload: bytes, ftype: int) -> bytes:
    """Remove PADDED (and HEADERS' PRIORITY) fields from a DATA/HEADERS payload."""
    start = 0
    end = len(payload)
    if flags & PADDED:
        if not payload:
            raise ProtocolError("PADDED frame with empty payload")
        pad = payload[0]
        start = 1
        end -= pad
    if ftype == HEADERS and flags & PRIORITY_FLAG:
        start += 5
    if end < start:
        raise ProtocolError("padding longer than the frame payload")
    if start == 0 and end == len(payload):
        return payload
    return payload[start:end]
