"""The mock's fast path: the same mock APNs without the ``h2`` state machine.

The h2-based path (:mod:`._server`) costs 160-430 µs of CPU per request, several times what
fanout's client spends per push, so a benchmark against it measures the mock. This path serves
a connection in one reader task and one writer task: TLS through :class:`ssl.MemoryBIO` (every
record that has arrived decrypted at once, everything queued encrypted and sent in one write),
every complete frame of a read parsed by hand, each request validated and answered as it
completes, and all the answers of a read sent together. What a request is answered is decided
by the same code as on the h2 path (:func:`._device.evaluate_device`,
:func:`._broadcast.evaluate_broadcast`, :func:`._http.response`, the provider tokens of
:mod:`._jwt`), drawing from the mock's seeded ``rng`` in the same order, and counted into the
same :class:`MockStats` the same way, so both paths agree request for request
(tests/test_fastmock.py). One exception, the steady state of a client like fanout's (see
below, templates): a device push read from a template is decided by
:meth:`FastConnection._evaluate_device`, evaluate_device's steps in its order by its own
helpers, with what the template alone decides worked out once.

HTTP/2 is kept to what the h2 path does: the same first SETTINGS (stream limit 1 until the first
valid JWT, 1 again after a rejection; a limit applies once the client ACKs it, as h2 applies
its local settings), SETTINGS/PING ACKs, WINDOW_UPDATE both ways (the windows replenished once
half is consumed, as h2's window manager does; one difference: the connection window is opened
to 16 MiB at the start, where h2 keeps 65,535, so that a fast client never waits for connection
credit), RST_STREAM, the client's GOAWAY (the connection closes), CONTINUATION, padding,
content-length checked against the DATA, a client exceeding the stream limit refused with GOAWAY
``Maximum active streams violated``, other violations answered with h2's GOAWAY (its error codes;
its exception names and, mostly, messages in ``stats.protocol_errors``: a malformed header
block is not always worded as hpack words it). Faults drawn per
request (p429/p500/p503, never_answer, latency and jitter) and per token (unregistered, bad
token, environment, token_topic) are those of :mod:`._faults`, in its order.

Request headers are decoded by the engine's own decoder, :class:`.hpackdec.RequestDecoder` (its
Huffman table and caches), with h2's errors. h2's header validation
(:func:`h2.utilities.validate_headers`, and its normalisation) runs once per distinct *shape*
of header list (the list itself but for the values new in every request, of which it keeps
what h2 reads: whether they hold a character h2 refuses, whether a ``:path`` is empty) and its
verdict is cached. Responses are encoded by hand: ``:status`` from the static table when it is
there, everything else as literals without indexing (no dynamic table, no Huffman coding).

Templates, fanout's steady state (about 8 µs of CPU per request, where reading every request
as above costs 25): once a request whose block hpackdec keeps as the shape of the next ones
(every field indexed but the ``:path`` and ``apns-id`` literals, nothing entering the table)
passed h2's validation as it is, that block is the connection's template
(:class:`_Template`), until the next block the decoder reads. The frame loop matches a
HEADERS frame against it in place (one regular expression: the template's bytes, the hole
values captured, a device path's hex token and a UUID apns-id checked as they were when
learnt), with no decoding, no header list and no Request unless one is needed; when the
request's DATA (all of its body, END_STREAM) follows in the same read and nothing delays the
answer, the whole request is read, decided and answered without storing its stream
(:meth:`FastConnection._request`). Anything else (another block, a value to check in full,
padding, faults that delay or drop answers, another path) takes the general path above.

Not implemented here (a connection is served by the h2 path when the config asks for them, see
:func:`h2_reason`): ``goaway_after``, ``close_after``, ``stop_reading_after``,
``server_ping_interval``, ``initial_window_size``.

What a connection does alike on both paths (its stats, the stream limit it announces and what
an answer does to it, the lifecycle, our GOAWAY and its drain, deciding and counting an answer,
``/stats``) is :class:`ConnectionBase`, which the h2 path's connection builds on too: the server
sits on top of both paths, so this module never imports :mod:`._server`.
"""

from __future__ import annotations

import logging
import re
import ssl
import struct
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from operator import itemgetter
from typing import Any, Literal, Protocol

import h2.exceptions
import msgspec
import trio
from h2.errors import ErrorCodes
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.table import HeaderTable

from .._engine.framer import encode_int, encode_str
from .._engine.hpackdec import Encoded, RequestDecoder, huffman_decode, plain
from ..errors import redact
from . import _faults
from ._apple import DEVICE_PREFIX, HEX, STREAM_LIMIT_VIOLATION, UUID, VOIP_PAYLOAD_LIMIT
from ._broadcast import evaluate_broadcast
from ._config import MockConfig, MockStats
from ._device import _payload_reason, _request_line_failure, check_headers, evaluate_device
from ._http import Answer, Headers, Request, json_headers, response
from ._jwt import MockState, ProviderTokens


class _Host(MockState, Protocol):
    """What the fast path uses of the server (:class:`MockAPNs` is one): like the handlers,
    it never imports it, so the server sits on top of both of its paths."""

    paths: Counter[str]
    _connections: set[Any]

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None: ...

log: logging.Logger = logging.getLogger("fanout.mock")

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_READ_SIZE = 32 * 1024  # ~150 requests: answers flow back while the client sends more
_MAX_FRAME_SIZE = 16_384  # our SETTINGS_MAX_FRAME_SIZE (h2's default, which the mock keeps)
_MAX_HEADER_LIST = 8_000  # our SETTINGS_MAX_HEADER_LIST_SIZE, as on the h2 path
_BODY_CAP = 8_192  # bytes kept per stream, as on the h2 path
_WINDOW = 65_535  # our stream windows (SETTINGS_INITIAL_WINDOW_SIZE, as h2's)
# our connection window, opened by a WINDOW_UPDATE right after our first SETTINGS (h2 keeps the
# default 65,535, which makes a fast client wait for credit every ~600 pushes: a third of the
# throughput measured with bench/mock_speed.py)
_CONN_WINDOW = 16 * 1024 * 1024
_MAX_WINDOW = 2**31 - 1
_HANDSHAKE_TIMEOUT = 10.0
_LINGER = 0.5  # seconds to wait for the client's EOF before closing our side
_DRAIN_TIMEOUT = 5.0  # seconds after our GOAWAY before the connection is closed regardless
_GOAWAY_PING = b"fanoutGA"  # PING sent right after our GOAWAY; its ACK proves the client saw it
STATS_PATH = b"/stats"
"""``GET`` answers :meth:`MockStats.summary` as JSON, ``DELETE`` the same and then
:meth:`MockStats.reset`; no fault applies to them and no count includes them."""
_MAX_RESET_KEPT = 65_536  # streams remembered as reset (h2 keeps 2**16 closed streams)
_VALIDATION_CACHE_MAX = 4_096

# frame types and flags (RFC 9113)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, \
    _WINDOW_UPDATE, _CONTINUATION = range(10)
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20
# settings
_S_HEADER_TABLE_SIZE, _S_ENABLE_PUSH, _S_MAX_CONCURRENT_STREAMS, _S_INITIAL_WINDOW_SIZE, \
    _S_MAX_FRAME_SIZE, _S_MAX_HEADER_LIST_SIZE = range(1, 7)
_S_ENABLE_CONNECT_PROTOCOL = 8

_HDR = struct.Struct(">BHBBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")

#: Fields whose fault the fast path does not implement: a connection is then served by h2.
H2_ONLY_FIELDS: tuple[str, ...] = (
    "goaway_after", "close_after", "stop_reading_after", "server_ping_interval",
    "initial_window_size",
)


def h2_reason(config: MockConfig) -> str | None:
    """Why a new connection must be served by the h2 path (a field of ``config`` that asks for
    a fault the fast path does not implement), or ``None``: the fast path serves it."""
    for name in H2_ONLY_FIELDS:
        if getattr(config, name) is not None:
            return f"{name} is set"
    return None


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def _first_settings(max_streams: int) -> bytes:
    """The SETTINGS h2 sends for the h2 path's ``local_settings`` (same values, same order)."""
    values = (
        (_S_HEADER_TABLE_SIZE, 4096), (_S_ENABLE_PUSH, 0), (_S_INITIAL_WINDOW_SIZE, _WINDOW),
        (_S_MAX_FRAME_SIZE, _MAX_FRAME_SIZE), (_S_ENABLE_CONNECT_PROTOCOL, 0),
        (_S_MAX_CONCURRENT_STREAMS, max_streams), (_S_MAX_HEADER_LIST_SIZE, _MAX_HEADER_LIST),
    )
    return _frame(_SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values))


_SETTINGS_ACK = _frame(_SETTINGS, _ACK, 0)


# --------------------------------------------------------------------------- HPACK (encode)



_STATIC_NAME: dict[bytes, int] = {}
for _i, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_NAME.setdefault(_name, _i)
_STATUS_INDEXED = {
    value: bytes((0x80 | i,))
    for i, (name, value) in enumerate(HeaderTable.STATIC_TABLE, 1) if name == b":status"
}
_NAME_PREFIX: dict[bytes, bytes] = {}  # name -> the start of its literal without indexing


def _name_prefix(name: bytes) -> bytes:
    prefix = _NAME_PREFIX.get(name)
    if prefix is None:
        idx = _STATIC_NAME.get(name)
        prefix = encode_int(idx, 4, 0x00) if idx is not None else b"\x00" + encode_str(name)
        if len(_NAME_PREFIX) < 1024:
            _NAME_PREFIX[name] = prefix
    return prefix


def encode_response(headers: Headers) -> bytes:
    """A response header block: ``:status`` indexed when the static table has it, every
    other field a literal without indexing (the peer's dynamic table is never used)."""
    out = bytearray()
    for name, value in headers:
        if name == b":status":
            indexed = _STATUS_INDEXED.get(value)
            if indexed is not None:
                out += indexed
                continue
        out += _name_prefix(name)
        out += encode_int(len(value), 7, 0)
        out += value
    return bytes(out)


# --------------------------------------------------------------------------- HPACK (decode)

#: Names whose value h2's validation reads beyond its characters: kept whole in the shape.
_VALUE_SENSITIVE = frozenset({b"te", b":method", b":authority", b"host", b":path"})
_BLANK = (0x20, 0x09)  # the whitespace h2 refuses at either end of a value
_REFUSED = b"\x00\r\n"  # the characters h2 refuses in a value
_REQUEST_FLAGS = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False)
_TRAILER_FLAGS = HeaderValidationFlags(
    is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False)
_ShapeElement = tuple[bytes, bytes] | bytes
# shape of a header list -> True (valid as it is) or False (valid once normalised: cookies)
_validated: dict[tuple[bool, tuple[_ShapeElement, ...]], bool] = {}
#: Names whose values are new in every request: a shape keeps only what h2's validation
#: reads of them (see :meth:`_RequestDecoder.decode`), where it keeps every other header
#: whole. They include those whose Huffman-coded values hpackdec leaves Encoded.
_VARYING = RequestDecoder.unique_names | {b"apns-expiration", b"apns-collapse-id"}
#: the names of a header list -> the positions of its varying headers
_layouts: dict[tuple[bytes, ...], tuple[int, ...]] = {}
_LAYOUTS_MAX = 1_024
_name_of = itemgetter(0)


def _layout(names: tuple[bytes, ...]) -> tuple[int, ...]:
    varying = tuple(k for k, name in enumerate(names) if name in _VARYING)
    if len(_layouts) >= _LAYOUTS_MAX:
        _layouts.clear()
    _layouts[names] = varying
    return varying


class _Template:
    """A request header block that hpackdec's shape cache stands for (see
    :meth:`_RequestDecoder.learn`): a block of its length whose bytes outside the value holes
    are its segments decodes to the same header list with the holes' values (each of a fixed
    length: the bytes before it say so) and changes nothing in the dynamic table. What a
    request of it is (its fields but the holes', method, duplicate flag, content-length; that
    h2 finds it valid as it is when the hole values have no character h2 refuses) is known
    once. :attr:`pattern` matches such a block and captures the hole values: a ``:path``
    learnt as a device push's with a hex token (``/3/device/`` and an even number of hex
    digits) must be one too, an ``apns-id`` learnt as a UUID one too (h2 finds nothing to
    refuse in them, and :func:`._device.evaluate_device` nothing to refuse of them); any other
    value is read whole and checked as h2 checks it (:func:`_checked_values`)."""

    __slots__ = ("shape", "length", "pattern", "checks", "path_at", "device", "id_at",
                 "id_valid", "names", "fields", "proto", "given_id", "authorization", "topic",
                 "method", "duplicate", "expected", "line_failure", "verdicts")

    def __init__(self, shape: object, length: int, segments: list[tuple[int, bytes]],
                 holes: list[tuple[int, int, bytes, bool]], values: list[bytes],
                 request: Request, expected: int | None) -> None:
        self.shape = shape  # hpackdec's, for reuse while it stays current
        self.length = length
        names = [h[2] for h in holes]
        self.names = tuple(names)
        self.path_at = path_at = names.index(b":path")
        self.id_at = id_at = names.index(b"apns-id") if b"apns-id" in names else -1
        self.device = self.id_valid = False
        parts = []
        checks = []  # (hole index, Huffman-coded) of the values checked in Python
        for k, ((_, segment), (start, stop, _, huffman), value) in enumerate(
                zip(segments, holes, values, strict=False)):
            parts.append(re.escape(segment))
            n = stop - start
            if k == path_at and not huffman and _is_device_path(value):
                self.device = True
                parts.append(b"(" + re.escape(DEVICE_PREFIX) + b"[0-9a-fA-F]{%d})" % (n - 10))
            elif k == id_at and not huffman and UUID.fullmatch(value) is not None:
                self.id_valid = True
                parts.append(b"(" + UUID.pattern + b")")
            else:
                checks.append((k, huffman))
                parts.append(b"(.{%d})" % n)
        parts.append(re.escape(segments[-1][1]))
        self.pattern = re.compile(b"".join(parts), re.DOTALL)
        self.checks = tuple(checks)
        fields = request.fields
        self.fields = dict(fields)  # in order; the holes' values replaced per request
        proto = Request([], bytearray())  # for _request_line_failure: its path set per call
        proto.method, proto.duplicate, proto.fields = request.method, request.duplicate, fields
        self.proto = proto
        # with a device path of a hex token, what _request_line_failure says of every request
        # of the template (its method, duplicate flag, a path that is no bare prefix, a token
        # of an even number of hex digits): its verdict on the learnt one
        proto.path = values[path_at]
        self.line_failure = _request_line_failure(proto, values[path_at][10:]) \
            if self.device else None
        self.given_id = fields.get(b"apns-id")  # (without an apns-id hole)
        self.authorization = fields.get(b"authorization")
        self.topic = fields.get(b"apns-topic")
        self.method = request.method
        self.duplicate = request.duplicate
        self.expected = expected
        # (id valid, id given) -> (config, its topics, check_headers' verdict on a good
        # body, push type): every header check_headers reads is one of the template's own
        self.verdicts: dict[tuple[bool, bool], tuple[object, object, str | None, str | None]] = {}

    def request(self, values: tuple[bytes, ...], body: bytearray) -> Request:
        """The request of a block of this template whose hole values are ``values``."""
        fields = self.fields.copy()
        path = b""
        for k, name in enumerate(self.names):
            if k == self.path_at:
                path = values[k]
            else:
                fields[name] = values[k]
        request = _new_request(Request)
        request.method = self.method
        request.path = path
        request.fields = fields
        request.duplicate = self.duplicate
        request.body = body
        return request


def _is_device_path(path: bytes) -> bool:
    """``/3/device/`` and a token of an even number of hex digits (what
    :func:`._device._request_line_failure` accepts of a path)."""
    token = path[10:]
    return path.startswith(DEVICE_PREFIX) and bool(token) and not len(token) % 2 \
        and HEX.fullmatch(token) is not None


def _checked_values(template: _Template, values: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
    """A template's hole values, the Huffman-coded ones decoded; ``None`` if one the pattern
    does not check is not valid Huffman, has a character h2 refuses or is an empty
    ``:path``: the general path reads that block (for h2's message)."""
    out = list(values)
    for k, coded in template.checks:
        value = out[k]
        if coded:
            try:
                value = out[k] = huffman_decode(value)
            except HPACKError:
                return None
        if value:
            if 0 in value or 13 in value or 10 in value or value[0] in _BLANK \
                    or value[-1] in _BLANK:
                return None
        elif k == template.path_at:
            return None
    return tuple(out)


class _RequestDecoder:
    """One connection's request header decoding: hpackdec's (the engine's decoder, with its
    dynamic table, Huffman table and caches), h2's errors, every value plain, and the shape
    of the header list, which :func:`_checked` caches h2's verdict by. ``template`` is the
    block hpackdec would answer from its shape cache, once a request of it was validated
    (:meth:`learn`): the frame loop reads such blocks itself (:meth:`FastConnection._express`)
    without decoding them again, until the next block that is not one of them."""

    __slots__ = ("decoder", "template", "_last")

    def __init__(self) -> None:
        self.decoder = RequestDecoder(max_header_list_size=_MAX_HEADER_LIST)
        self.template: _Template | None = None
        self._last: _Template | None = None

    def decode(self, block: bytes) -> tuple[Headers, tuple[_ShapeElement, ...] | None]:
        """The header list of ``block`` and its shape (``None``: validate it in full): the
        list itself but for its varying headers (:data:`_VARYING`), of which it keeps the
        name when h2's validation cannot tell the value from another (no character h2
        refuses), the whole header when it reads the value (a ``:path`` only as non-empty)."""
        self.template = None  # the table may change: see learn
        try:
            decoded = self.decoder.decode(block)
            # a list is the decoder's own fresh one; a tuple, a block it remembered
            headers: Headers = decoded if type(decoded) is list else list(decoded)
            names = tuple(map(_name_of, headers))
            varying = _layouts.get(names)
            if varying is None:
                varying = _layout(names)
            for k in varying:
                name, value = headers[k]
                if type(value) is Encoded:  # an id hpackdec left Huffman-coded
                    headers[k] = (name, plain(value))
        except OversizedHeaderListError as exc:  # as h2's _decode_headers
            raise h2.exceptions.DenialOfServiceError(f"Oversized header block: {exc}") from exc
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise h2.exceptions.ProtocolError(f"Error decoding header block: {exc}") from exc
        shape: list[_ShapeElement] = list(headers)
        valid = True
        for k in varying:
            name, value = headers[k]
            # h2 refuses NUL, CR and LF in a value, and a space or tab at either end
            if value and (len(value.translate(None, _REFUSED)) != len(value)
                          or value[0] in _BLANK or value[-1] in _BLANK):
                valid = False  # validate in full, for h2's message
            elif name in _VALUE_SENSITIVE and (name != b":path" or not value):
                shape[k] = (name, value)
            else:
                shape[k] = name  # any value validates alike (any non-empty :path)
        return headers, (tuple(shape) if valid else None)

    def learn(self, block: bytes, headers: Headers, request: Request,
              expected: int | None) -> None:
        """``block`` (decoded to ``headers``, ``request``) passed h2's validation as it is:
        if it is an instance of the block hpackdec's shape cache holds (its bytes but the
        value holes, while the dynamic table has not changed), make that the template.

        The template is hpackdec's current shape (:meth:`ResponseDecoder.current_shape`):
        valid exactly when hpackdec would answer a block from that shape, and only until
        the next :meth:`decode`."""
        shape = self.decoder.current_shape()
        if shape is None or shape[1] != len(block):
            return
        last = self._last
        if last is not None and last.shape is shape:
            self.template = last
            return
        for at, segment in shape[2]:
            if not block.startswith(segment, at):
                return
        holes = []
        for start, stop, _, name, huffman in shape[4]:
            # each hole's name once in the list (so its value is the field's, or the path)
            if sum(1 for n, _ in headers if n == name) != 1:
                return
            holes.append((start, stop, name, huffman))
        if not any(h[2] == b":path" for h in holes):
            return
        plain_values = dict(headers)
        values = [plain_values[h[2]] for h in holes]
        self.template = self._last = _Template(
            shape, shape[1], shape[2], holes, values, request, expected)


def _checked(headers: Headers, shape: tuple[_ShapeElement, ...] | None, validate: bool,
             trailer: bool = False) -> Headers:
    """``headers`` as h2 passes them on: normalised (cookies joined) and, with ``validate``,
    validated (:class:`h2.exceptions.ProtocolError` if h2 would refuse them); the verdict is
    cached per shape."""
    flags = _TRAILER_FLAGS if trailer else _REQUEST_FLAGS
    key = (validate, shape) if shape is not None and not trailer else None
    if key is not None:
        as_is = _validated.get(key)
        if as_is is True:
            return headers
        if as_is is False:
            out = normalize_inbound_headers(headers, flags)
            return list(validate_headers(out, flags) if validate else out)
    out = normalize_inbound_headers(headers, flags)
    checked = [(n, v) for n, v in (validate_headers(out, flags) if validate else out)]
    if key is not None:
        if len(_validated) >= _VALIDATION_CACHE_MAX:
            _validated.clear()
        _validated[key] = checked == headers
    return checked


def _content_length(headers: Headers) -> int | None:
    """h2's reading of ``content-length`` (``H2Stream._initialize_content_length``)."""
    content_length = None
    for n, v in headers:
        if n == b"content-length":
            if not v.isdigit():
                raise h2.exceptions.ProtocolError(f"Invalid content-length header: {v!r}")
            parsed = int(v, 10)
            if content_length is None:
                content_length = parsed
            elif parsed != content_length:
                raise h2.exceptions.ProtocolError(
                    f"Conflicting content-length headers: {content_length} and {parsed}")
    return content_length


def _strip(flags: int, payload: bytes, headers_frame: bool) -> bytes:
    """A DATA or HEADERS payload without its padding (and HEADERS' priority fields)."""
    start = 0
    end = len(payload)
    if flags & _PADDED:
        if not payload:
            raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid")
        start = 1
        end -= payload[0]
    if headers_frame and flags & _PRIORITY_FLAG:
        start += 5
    if end < start:
        raise h2.exceptions.ProtocolError("Received frame with invalid padding.")
    return payload if start == 0 and end == len(payload) else payload[start:end]


# --------------------------------------------------------------------------- device pushes

_BROADCAST_ROOTS = (b"/1/", b"/4/")  # paths _decide sends to evaluate_broadcast
_UUID_FULLMATCH = UUID.fullmatch
#: A body every payload check passes: with it, check_headers' verdict is the headers' alone.
_GOOD_BODY = bytearray(b"{}")
_PAYLOAD_VERDICTS_MAX = 256
_PAYLOAD_MEMO_MAX = VOIP_PAYLOAD_LIMIT  # bodies remembered: up to the largest limit
#: (body, push type) -> _payload_reason's verdict (a pure function of them)
_payload_verdicts: dict[tuple[bytes, str | None], str | None] = {}
#: the 200 answer's block but for the apns-id value: :status 200 indexed, the apns-id name
#: and the value's length prefix (encode_response's encoding of response()'s headers)
_OK_BLOCK_HEAD = _STATUS_INDEXED[b"200"] + _name_prefix(b"apns-id")
_OK_BLOCK_HEAD_LEN = len(_OK_BLOCK_HEAD) + 1


def _header_reason(template: _Template, cfg: MockConfig, id_ok: bool, id_given: bool,
                   body: bytearray) -> str | None:
    """``check_headers(cfg, fields, id_ok, id_given, body)`` for a request of ``template``:
    its verdict on the headers (every field it reads but ``apns-id`` is the template's)
    remembered per (id valid, id given) while the config and its topics are the same
    objects, then the payload's (remembered per body and push type)."""
    entry = template.verdicts.get((id_ok, id_given))
    if entry is None or entry[0] is not cfg or entry[1] is not cfg.topics:
        fields = template.fields
        push_type_b = fields.get(b"apns-push-type")
        push_type = None if push_type_b is None else push_type_b.decode("ascii", "replace")
        entry = (cfg, cfg.topics, check_headers(cfg, fields, id_ok, id_given, _GOOD_BODY),
                 push_type)
        template.verdicts[(id_ok, id_given)] = entry
    if entry[2] is not None:
        return entry[2]
    if len(body) > _PAYLOAD_MEMO_MAX:  # too large for any push type: not worth keeping
        return _payload_reason(body, entry[3])
    key = (bytes(body), entry[3])
    try:
        return _payload_verdicts[key]
    except KeyError:
        pass
    if len(_payload_verdicts) >= _PAYLOAD_VERDICTS_MAX:
        _payload_verdicts.clear()
    reason = _payload_verdicts[key] = _payload_reason(body, entry[3])
    return reason


# --------------------------------------------------------------------------- connection

_new_request = object.__new__  # a Request whose fields the caller sets (see _express)


class _Stream:
    """One request being received or waiting for its answer."""

    __slots__ = ("id", "path", "_request", "body", "control", "silent", "ended", "expected",
                 "received", "unacked", "send_window", "template", "values")

    def __init__(self, stream_id: int, path: bytes | None, request: Request | None,
                 body: bytearray, control: bool, send_window: int) -> None:
        self.id = stream_id
        self.path = path  # the first :path, as the h2 path reads it
        self._request = request  # None: read from a template, made when needed (request)
        self.body = body  # the request's body
        self.control = control  # GET/DELETE /stats: no fault, not counted
        self.silent = False  # never_answer: stays open, never answered
        self.ended = False  # END_STREAM received
        self.expected: int | None = None  # content-length
        self.received = 0  # body bytes received
        self.unacked = 0  # flow-controlled bytes not yet credited back to the stream
        self.send_window = send_window  # what we may send on it
        self.template: _Template | None = None  # the header block it was read from
        self.values: tuple[bytes, ...] = ()  # and the values of that block's holes

    @property
    def request(self) -> Request:
        request = self._request
        if request is None:
            assert self.template is not None
            request = self._request = self.template.request(self.values, self.body)
        return request


# --------------------------------------------------------------------------- both paths

def _stats_answer(stats: MockStats, method: bytes | None) -> tuple[Headers, bytes]:
    """The answer to a request for :data:`STATS_PATH`: ``GET`` the summary, ``DELETE`` the
    summary and then :meth:`MockStats.reset`, anything else 405."""
    if method in (b"GET", b"DELETE"):
        body = msgspec.json.encode(stats.summary())
        if method == b"DELETE":
            stats.reset()
        return [(b":status", b"200"), *json_headers(body)], body
    body = msgspec.json.encode({"reason": "MethodNotAllowed"})
    return [(b":status", b"405"), (b"allow", b"GET, DELETE"), *json_headers(body)], body


def count_connection(stats: MockStats) -> int:
    """Count a new connection (its handshake done) in ``stats``; its index there."""
    index = len(stats.streams_per_connection)
    stats.connections += 1
    stats.streams_per_connection.append(0)
    stats.max_concurrent.append(0)
    stats.rejected_per_connection.append(0)
    return index


class ConnectionBase:
    """What a connection of either path (:class:`FastConnection`, and the h2 path's
    ``_server._Connection``) keeps and does alike: its per-connection stats, the stream limit
    it announces (and what an answer does to it), a reader and a writer in one nursery and
    the close after both, our GOAWAY and its drain, and how an answer is decided and counted.
    Each path supplies the HTTP/2 side: the loops, :meth:`_answer`, :meth:`_send_goaway`,
    :meth:`_announce_limit`, :meth:`_drained` and :meth:`_close`."""

    _streams: dict[int, Any]  # open streams, as h2 counts them

    def __init__(self, mock: _Host, index: int) -> None:
        self.mock = mock
        self.index = index
        stats = mock.stats
        self._per_conn_streams = stats.streams_per_connection  # kept across stats.reset()
        self._per_conn_concurrent = stats.max_concurrent
        self._per_conn_rejected = stats.rejected_per_connection
        self.advertised_limit = mock.config.initial_max_streams
        self._authenticated = False
        self._penalty = 0  # accepted pushes still needed before the limit is restored
        self._tokens = ProviderTokens()
        self._goaway_last: int | None = None
        self._goaway_acked = False
        self._dead = False  # stop processing frames (a protocol error, the client's GOAWAY)
        self._stats_only: bool | None = None  # None: no request yet; True: only /stats ones
        self._close_mode: Literal["graceful", "abort"] | None = None
        self._wake = trio.Event()
        self._reader_scope = trio.CancelScope()
        self._reader_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._debug = log.isEnabledFor(logging.DEBUG)

    # ---------------------------------------------------------------- each path's

    async def _read_loop(self) -> None:
        raise NotImplementedError

    async def _write_loop(self) -> None:
        raise NotImplementedError

    def _close(self, mode: Literal["graceful", "abort"] = "graceful") -> None:
        raise NotImplementedError

    def _answer(self, stream: Any) -> None:
        raise NotImplementedError

    def _send_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        """Queue our GOAWAY, then a PING of :data:`_GOAWAY_PING`."""
        raise NotImplementedError

    def _announce_limit(self, limit: int) -> None:
        """Queue a SETTINGS frame of MAX_CONCURRENT_STREAMS ``limit``."""
        raise NotImplementedError

    def _drained(self, last_stream_id: int) -> bool:
        """Whether every stream at or below ``last_stream_id`` that will be answered was."""
        raise NotImplementedError

    # ---------------------------------------------------------------- lifecycle

    async def serve(self) -> None:
        """Run the connection as one of the mock's live ones until it is over."""
        connections = self.mock._connections
        connections.add(self)
        try:
            await self.run()
        except Exception:  # never let one connection take the server down
            log.exception("mock connection %d failed", self.index)
        finally:
            connections.discard(self)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write_loop)
            self._start(nursery)
            self._kick()  # our SETTINGS
            with self._reader_scope:
                await self._read_loop()
            self._reader_done.set()
            if self._close_mode is None:  # the client went away
                nursery.cancel_scope.cancel()

    def _start(self, nursery: trio.Nursery) -> None:
        """Start the tasks a path runs besides its reader and writer."""

    async def _stop_reader(self) -> None:
        """Closing: give the reader a moment to see the client's EOF, then stop it."""
        with trio.move_on_after(_LINGER):
            await self._reader_done.wait()
        self._reader_scope.cancel()
        await self._reader_done.wait()

    def _kick(self) -> None:
        self._wake.set()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def _note_protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        """Count a violation that h2 answers with a GOAWAY (its error code)."""
        stats = self.mock.stats
        stats.protocol_errors.append(f"connection {self.index}: {type(exc).__name__}: {exc}")
        stats.goaways_sent += 1

    # ---------------------------------------------------------------- streams

    def _opened(self, control: bool, unstored: int = 0) -> None:
        """A request opened a stream (``control``: a /stats one, counted in no stream count;
        ``unstored``: 1 if it is open but not in ``_streams``). Keeps
        ``stats.stats_only_connections`` (a connection counts in the current stats only if it
        was accepted after their last reset: its per-connection list is theirs) and the
        per-connection stream counts."""
        if self._stats_only is not False:  # no request yet, or only /stats ones
            stats = self.mock.stats
            current = self._per_conn_streams is stats.streams_per_connection
            if self._stats_only is None:
                self._stats_only = control
                if control and current:
                    stats.stats_only_connections += 1
            elif not control:
                self._stats_only = False
                if current:
                    stats.stats_only_connections -= 1
        if not control:
            index = self.index
            self._per_conn_streams[index] += 1
            n = len(self._streams) + unstored
            if n > self._per_conn_concurrent[index]:
                self._per_conn_concurrent[index] = n

    def _refuse_stream(self, sid: int, limit: int, last_stream_id: int) -> None:
        """Stream ``sid`` opened beyond our MAX_CONCURRENT_STREAMS ``limit``: GOAWAY."""
        self.mock.stats.protocol_errors.append(
            f"connection {self.index}: stream {sid} opened with {len(self._streams)}"
            f" streams open, MAX_CONCURRENT_STREAMS={limit}"
        )
        self._goaway(last_stream_id, ErrorCodes.REFUSED_STREAM, STREAM_LIMIT_VIOLATION.encode())

    # ---------------------------------------------------------------- GOAWAY

    def _goaway(self, last_stream_id: int, code: int = ErrorCodes.NO_ERROR,
                debug: bytes | None = None) -> None:
        """Our GOAWAY, then a PING whose ACK proves the client saw it; the connection closes
        once every stream at or below ``last_stream_id`` is answered (or at a deadline)."""
        if self._goaway_last is not None:
            return
        if debug is None:
            debug = msgspec.json.encode({"reason": self.mock.config.goaway_reason})
        self._goaway_last = last_stream_id
        self._send_goaway(last_stream_id, code, debug)
        self.mock.stats.goaways_sent += 1
        if self._debug:
            log.debug("connection %d: GOAWAY last-stream-id=%d code=%d", self.index,
                      last_stream_id, code)
        self._spawn(self._drain_deadline)
        self._check_drain()
        self._kick()

    def _check_drain(self) -> None:
        """After our GOAWAY, close once every stream at or below last-stream-id is answered."""
        last = self._goaway_last
        if last is None or self._close_mode is not None:
            return
        if self._drained(last):
            self._close("graceful")

    async def _drain_deadline(self) -> None:
        await trio.sleep(_DRAIN_TIMEOUT)
        self._close("graceful")

    # ---------------------------------------------------------------- answers

    async def _answer_later(self, stream: Any, delay: float) -> None:
        await trio.sleep(delay)
        self._answer(stream)
        self._kick()

    def _decide(self, request: Request, stream_id: int) -> Answer:
        """What a complete request is answered, in APNs' terms."""
        try:
            path = request.path
            if path is not None and path[:3] in (b"/1/", b"/4/"):
                return evaluate_broadcast(self.mock, self._tokens, request)
            return evaluate_device(self.mock, self._tokens, request)
        except Exception:  # a mock bug must not take the connection down
            log.exception("connection %d: evaluating stream %d failed", self.index, stream_id)
            return Answer(500, "InternalServerError", str(uuid.uuid4()).encode(), None, False)

    def _answered(self, stream_id: int, answer: Answer) -> None:
        """Count a sent answer, then its consequences for the stream limit (authenticated,
        a penalty after a rejection, the limit restored)."""
        mock = self.mock
        stats = mock.stats
        status, reason = answer.status, answer.reason
        by_status = stats.by_status
        by_status[status] = by_status.get(status, 0) + 1  # (Counter's += 1, without a
        if reason is not None:                            # __missing__ call per new key)
            stats.by_reason[reason] += 1
        elif answer.token is not None:
            delivered = stats.delivered
            delivered[answer.token] = delivered.get(answer.token, 0) + 1
        if self._debug:
            log.debug("connection %d stream %d token %s -> %d %s", self.index, stream_id,
                      redact(answer.token), status, reason or "")
        if answer.auth_ok:
            self._authenticated = True
        if status < 300:  # 200, or 201/204 from channel management
            if self._penalty:
                self._penalty -= 1
        elif 400 <= status < 500 and status != 410:
            self._per_conn_rejected[self.index] += 1
            if mock.config.drop_to_one_on_reject:
                self._penalty = mock.config.penalty_accepts
        self.retarget_limit()

    def retarget_limit(self) -> None:
        """Announce the stream limit the connection's state calls for, if it changed."""
        cfg = self.mock.config
        if self._penalty:
            target = 1
        elif self._authenticated:
            target = cfg.max_streams
        else:
            target = cfg.initial_max_streams
        if target != self.advertised_limit and self._close_mode is None and not self._dead:
            self.advertised_limit = target
            self._announce_limit(target)
            self._kick()


class FastConnection(ConnectionBase):
    """Server side of one HTTP/2 connection on the fast path (see the module's docstring)."""

    def __init__(self, mock: _Host, sock: trio.SocketStream, tls: ssl.SSLObject,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, index: int) -> None:
        super().__init__(mock, index)
        self.sock = sock
        self._tls = tls
        self._in = incoming
        self._tls_out = outgoing
        cfg = mock.config
        self._validate = cfg.validate
        # h2's local MAX_CONCURRENT_STREAMS: the first is current at once, each later one
        # once a SETTINGS ACK pops the one before (h2.settings.Settings.acknowledge)
        self._limits: deque[int] = deque([cfg.initial_max_streams])
        self._decoder = _RequestDecoder()

        self._out = bytearray(_first_settings(cfg.initial_max_streams) + _frame(
            _WINDOW_UPDATE, 0, 0, _U32.pack(_CONN_WINDOW - _WINDOW)))
        self._inbuf = bytearray()
        self._preface_done = False
        self._streams: dict[int, _Stream] = {}
        self._highest = 0  # highest stream id opened (h2's highest_inbound_stream_id)
        self._max_sid = 0  # highest stream id seen in a HEADERS frame (refused ones too)
        self._reset: set[int] = set()  # streams closed by a reset (either side)
        self._cont_sid = 0  # stream whose header block awaits CONTINUATION frames
        self._cont_parts: list[bytes] = []
        self._cont_end = False
        # flow control: what the client may still send, and what we may send
        self._recv_window = _CONN_WINDOW
        self._recv_unacked = 0
        self._send_window = _WINDOW
        self._peer_initial_window = _WINDOW
        self._peer_max_frame = _MAX_FRAME_SIZE

    # ---------------------------------------------------------------- lifecycle

    async def _read_loop(self) -> None:
        tls = self._tls
        incoming = self._in
        try:
            while True:
                data = await self.sock.receive_some(_READ_SIZE)
                if not data:
                    return
                incoming.write(data)
                chunks = []
                closed = False
                try:
                    while True:
                        chunk = tls.read(_READ_SIZE)
                        if not chunk:
                            closed = True
                            break
                        chunks.append(chunk)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:  # the client's close_notify
                    closed = True
                except ssl.SSLError as exc:
                    log.debug("connection %d: TLS error: %s", self.index, exc)
                    return
                if chunks and not self._dead:
                    self._receive(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                if self._out or self._tls_out.pending:
                    self._kick()
                if closed:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                OSError):
            return

    async def _write_loop(self) -> None:
        tls, outgoing, out = self._tls, self._tls_out, self._out
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while True:  # more may be queued while we send: flush it all before closing
                    if out:
                        data = bytes(out)
                        out.clear()
                        tls.write(data)
                    if not outgoing.pending:
                        break
                    await self.sock.send_all(outgoing.read())
                if self._close_mode is not None:
                    await self._finish_close()
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                OSError, ssl.SSLError):
            pass
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _finish_close(self) -> None:
        """Close after everything queued was sent, letting the client read it first."""
        await self._stop_reader()
        with trio.move_on_after(_LINGER):
            try:
                self._tls.unwrap()
            except ssl.SSLError:  # SSLWantReadError: the close_notify is written
                pass
            if self._tls_out.pending:
                await self.sock.send_all(self._tls_out.read())

    def _close(self, mode: Literal["graceful", "abort"] = "graceful") -> None:
        """Close once everything queued is sent (always gracefully: close_after's abort is
        the h2 path's)."""
        if self._close_mode is None:
            self._close_mode = "graceful"
            self._kick()

    # ---------------------------------------------------------------- inbound frames

    def _receive(self, data: bytes) -> None:
        """Handle every complete frame in the buffer, one at a time as the h2 path feeds h2."""
        if self._inbuf:
            self._inbuf += data
            buf = bytes(self._inbuf)
            self._inbuf.clear()
        else:
            buf = data
        pos = 0
        size = len(buf)
        try:
            if not self._preface_done:
                if size < len(_PREFACE):
                    if _PREFACE[:size] != buf:
                        raise h2.exceptions.ProtocolError("Invalid HTTP/2 preamble.")
                    self._inbuf += buf
                    return
                if buf[:len(_PREFACE)] != _PREFACE:
                    raise h2.exceptions.ProtocolError("Invalid HTTP/2 preamble.")
                pos = len(_PREFACE)
                self._preface_done = True
            unpack = _HDR.unpack_from
            streams = self._streams
            while size - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(buf, pos)
                length = (hi << 16) | lo
                if length > _MAX_FRAME_SIZE:
                    raise h2.exceptions.FrameTooLargeError(
                        f"Received overlong frame: length {length}, max {_MAX_FRAME_SIZE}")
                start = pos + 9
                end = start + length
                if end > size:
                    break
                pos = end
                sid &= 0x7FFF_FFFF
                if ftype <= _HEADERS and self._goaway_last is None and not self._cont_sid:
                    # the steady state, read in place: a request's HEADERS, its DATA
                    if ftype == _DATA:
                        stream = streams.get(sid) if sid and not flags & _PADDED else None
                        if stream is not None and not stream.ended:
                            self._data(stream, flags, buf, start, length)
                            if self._dead:
                                return
                            continue
                    else:
                        at = self._express(flags, sid, buf, start, length, size)
                        if at:
                            if self._dead:
                                return
                            pos = at
                            continue
                payload = buf[start:end]
                if sid and self._goaway_last is not None and sid > self._goaway_last:
                    # after our GOAWAY: ignored, as the h2 path does not feed them to h2
                    if ftype == _HEADERS and sid > self._max_sid:
                        self._max_sid = sid
                        if self._goaway_acked:
                            self.mock.stats.streams_after_goaway += 1
                    continue
                if self._cont_sid and (ftype != _CONTINUATION or sid != self._cont_sid):
                    raise h2.exceptions.ProtocolError(
                        f"Expected CONTINUATION frame on stream {self._cont_sid}")
                if ftype == _HEADERS:
                    self._on_headers(flags, sid, payload)
                elif ftype == _DATA:
                    self._on_data(flags, sid, payload)
                elif ftype == _CONTINUATION:
                    self._on_continuation(flags, sid, payload)
                else:
                    self._on_control(ftype, flags, sid, payload)
                if self._dead:
                    return
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        if pos < size:
            self._inbuf += buf[pos:]

    def _express(self, flags: int, sid: int, buf: bytes, start: int, length: int,
                 size: int) -> int:
        """A HEADERS frame (its payload of ``length`` bytes from ``start``) opening a stream
        with a block of the decoder's template, read in place, with its DATA when the whole
        request is in ``buf`` (up to ``size``): where the next frame starts. 0, nothing
        done, for any other: the general path (:meth:`_on_headers`) reads it, errors
        included."""
        template = self._decoder.template
        if (template is None or length != template.length
                or flags & (_END_HEADERS | _PADDED | _PRIORITY_FLAG) != _END_HEADERS
                or sid <= self._max_sid or not sid & 1
                or len(self._streams) >= self._limits[0]):
            return 0
        end = start + length
        match = template.pattern.match(buf, start, end)
        if match is None:  # not the template's, or a value to check in full
            return 0
        values: tuple[bytes, ...] = match.groups()
        if template.checks:
            checked = _checked_values(template, values)
            if checked is None:
                return 0
            values = checked
        self._max_sid = self._highest = sid
        if template.device and not flags & _END_STREAM and size - end >= 9:
            # the whole request here: its DATA next, all of the body, END_STREAM
            hi, n, ftype, data_flags, data_sid = _HDR.unpack_from(buf, end)
            stop: int = end + 9 + n
            cfg = self.mock.config
            if (ftype == _DATA and data_flags == _END_STREAM and data_sid == sid and not hi
                    and stop <= size and n <= _MAX_FRAME_SIZE
                    and not (cfg.never_answer or cfg.latency or cfg.jitter)):
                self._request(template, values, sid, buf, end + 9, n, cfg)
                return stop
        path = values[template.path_at]
        control = path == STATS_PATH
        stream = _Stream(sid, path, None, bytearray(), control, self._peer_initial_window)
        stream.expected = template.expected
        stream.template = template
        stream.values = values
        self._streams[sid] = stream
        self._opened(control)
        if flags & _END_STREAM:
            self._end(stream)
        return end

    def _request(self, template: _Template, values: tuple[bytes, ...], sid: int, buf: bytes,
                 start: int, n: int, cfg: MockConfig) -> None:
        """A device push of a template read whole: its HEADERS (as :meth:`_express` opens a
        stream), its one DATA frame of ``n`` bytes from ``start`` (as :meth:`_data`), its
        answer (as :meth:`_finish`), the stream never stored."""
        self._opened(False, 1)
        window = self._recv_window - n
        self._recv_window = window
        if window < 0:
            raise h2.exceptions.FlowControlError(f"Flow control window shrunk below 0: {window}")
        if n > _WINDOW:
            raise h2.exceptions.FlowControlError(
                f"Flow control window shrunk below 0: {_WINDOW - n}")
        body = bytearray(buf[start:start + n])
        expected = template.expected
        if expected is not None and expected != n:
            raise h2.exceptions.InvalidBodyLengthError(expected, n)
        self._credit(n)
        stats = self.mock.stats
        stats.requests += 1
        path = values[template.path_at]
        token = path[10:].decode("ascii", "replace")
        seen = stats.seen
        seen[token] = seen.get(token, 0) + 1
        if self._dead or self._close_mode is not None:
            return
        try:
            answer = self._evaluate_device(template, values, body, cfg, path, token)
        except Exception:  # a mock bug must not take the connection down (as _decide)
            log.exception("connection %d: evaluating stream %d failed", self.index, sid)
            answer = Answer(500, "InternalServerError", str(uuid.uuid4()).encode(), None, False)
        self._reply(sid, answer, self._peer_initial_window, False)

    def _data(self, stream: _Stream, flags: int, buf: bytes, start: int, length: int) -> None:
        """An unpadded DATA frame of an open stream, read in place (as :meth:`_on_data`)."""
        window = self._recv_window - length
        self._recv_window = window
        if window < 0:
            raise h2.exceptions.FlowControlError(
                f"Flow control window shrunk below 0: {window}")
        unacked = stream.unacked + length
        stream.unacked = unacked
        if unacked > _WINDOW:
            raise h2.exceptions.FlowControlError(
                f"Flow control window shrunk below 0: {_WINDOW - unacked}")
        body = stream.body
        if len(body) <= _BODY_CAP:
            body += buf[start:start + length]
        received = stream.received + length
        stream.received = received
        end_stream = flags & _END_STREAM
        expected = stream.expected
        if expected is not None and (expected < received
                                     or (end_stream and expected != received)):
            raise h2.exceptions.InvalidBodyLengthError(expected, received)
        self._credit(length)
        if end_stream:
            if stream.template is not None:
                self._finish(stream)
            else:
                self._end(stream)
        elif unacked >= _WINDOW // 2:  # h2's window manager: half the window used
            self._out += _frame(_WINDOW_UPDATE, 0, stream.id, _U32.pack(unacked))
            stream.unacked = 0

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        """h2's answer to a violation (a GOAWAY with its error code), then close."""
        self._note_protocol_error(exc)
        self._out += _frame(_GOAWAY, 0, 0, _U32.pack(self._highest) + _U32.pack(exc.error_code))
        self._dead = True
        self._close()

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise h2.exceptions.ProtocolError("Received HEADERS frame on stream 0")
        if sid > self._max_sid:  # opens a new stream (after our GOAWAY it was dropped)
            self._max_sid = sid
            limit = self._limits[0]
            if len(self._streams) >= limit:
                self._refuse_stream(sid, limit, self._highest)
                return
        block = _strip(flags, payload, True)
        if flags & _END_HEADERS:
            self._on_block(sid, block, bool(flags & _END_STREAM))
        else:
            self._cont_sid = sid
            self._cont_parts = [block]
            self._cont_end = bool(flags & _END_STREAM)

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not self._cont_sid:
            raise h2.exceptions.ProtocolError("Received unexpected CONTINUATION frame")
        self._cont_parts.append(payload)
        if flags & _END_HEADERS:
            block = b"".join(self._cont_parts)
            self._cont_sid = 0
            self._cont_parts = []
            self._on_block(sid, block, self._cont_end)

    def _on_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        """A complete header block: a request, or trailers."""
        stream = self._streams.get(sid)
        if stream is not None:  # trailers
            headers, _ = self._decoder.decode(block)
            if stream.ended:
                raise h2.exceptions.StreamClosedError(sid)
            if not end_stream:
                raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set")
            _checked(headers, None, self._validate, trailer=True)
            self._end(stream)
            return
        if sid <= self._highest:  # a closed stream (the table must follow the block still)
            self._decoder.decode(block)
            if sid in self._reset:
                self._out += _frame(_RST_STREAM, 0, sid, _U32.pack(ErrorCodes.STREAM_CLOSED))
                return
            raise h2.exceptions.StreamClosedError(sid)
        headers, shape = self._decoder.decode(block)
        if not sid & 1:
            raise h2.exceptions.ProtocolError("Invalid stream ID for peer.")
        self._highest = sid  # h2 opens the stream before it checks its headers
        request = Request(headers, bytearray())
        expected = None
        if b"content-length" in request.fields:  # h2 reads it before validating
            expected = _content_length(headers)
        checked = _checked(headers, shape, self._validate)
        if checked is not headers and checked != headers:  # normalised (cookies joined)
            headers = checked
            request = Request(headers, request.body)
        elif shape is not None:  # valid as it is: the next blocks may be read in place
            self._decoder.learn(block, headers, request, expected)
        self._open(sid, headers, request, expected, end_stream)

    def _open(self, sid: int, headers: Headers, request: Request, expected: int | None,
              end_stream: bool) -> None:
        path = None
        for name, value in headers:  # the first :path, as the h2 path reads it
            if name == b":path":
                path = value
                break
        control = path == STATS_PATH
        stream = _Stream(sid, path, request, request.body, control, self._peer_initial_window)
        stream.expected = expected
        self._streams[sid] = stream
        self._highest = sid
        self._opened(control)
        if end_stream:
            self._end(stream)

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise h2.exceptions.ProtocolError("Received DATA frame on stream 0")
        flow = len(payload)
        self._recv_window -= flow
        if self._recv_window < 0:
            raise h2.exceptions.FlowControlError(
                f"Flow control window shrunk below 0: {self._recv_window}")
        stream = self._streams.get(sid)
        if stream is None or stream.ended:
            if sid > self._highest:
                raise h2.exceptions.NoSuchStreamError(sid)
            # a closed stream: h2 credits the connection window and resets the stream
            self._credit(flow)
            self._out += _frame(_RST_STREAM, 0, sid, _U32.pack(ErrorCodes.STREAM_CLOSED))
            return
        stream.unacked += flow
        if stream.unacked > _WINDOW:
            raise h2.exceptions.FlowControlError(
                f"Flow control window shrunk below 0: {_WINDOW - stream.unacked}")
        data = _strip(flags, payload, False)
        body = stream.body
        if len(body) <= _BODY_CAP:
            body += data
        stream.received += len(data)
        end_stream = bool(flags & _END_STREAM)
        expected = stream.expected
        if expected is not None and (expected < stream.received
                                     or (end_stream and expected != stream.received)):
            raise h2.exceptions.InvalidBodyLengthError(expected, stream.received)
        self._credit(flow)
        if end_stream:
            self._end(stream)
        elif stream.unacked >= _WINDOW // 2:  # h2's window manager: half the window used
            self._out += _frame(_WINDOW_UPDATE, 0, sid, _U32.pack(stream.unacked))
            stream.unacked = 0

    def _credit(self, flow: int) -> None:
        """The connection window: credited back once half of it is consumed, as h2 does."""
        if not flow:
            return
        unacked = self._recv_unacked + flow
        if unacked >= _CONN_WINDOW // 2:
            self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(unacked))
            self._recv_window += unacked
            unacked = 0
        self._recv_unacked = unacked

    def _on_control(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == _SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == _WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == _PING:
            if sid:
                raise h2.exceptions.ProtocolError("PING frame on a non-zero stream")
            if len(payload) != 8:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid")
            if flags & _ACK:
                if payload == _GOAWAY_PING:
                    self._goaway_acked = True
            else:
                self._out += _frame(_PING, _ACK, 0, payload)
        elif ftype == _RST_STREAM:
            if not sid:
                raise h2.exceptions.ProtocolError("RST_STREAM frame on stream 0")
            if len(payload) != 4:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid")
            if sid in self._streams:
                self._on_reset(sid)
            elif sid > self._highest:
                raise h2.exceptions.ProtocolError(f"RST_STREAM on idle stream {sid}")
        elif ftype == _GOAWAY:  # the client's: nothing more can be answered; close
            self._dead = True
            self._close()
        elif ftype == _PRIORITY:
            if not sid:
                raise h2.exceptions.ProtocolError("PRIORITY frame on stream 0")
            if len(payload) != 5:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid")
        elif ftype == _PUSH_PROMISE:
            raise h2.exceptions.ProtocolError("Received pushed stream")
        # other types: extensions, ignored

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise h2.exceptions.ProtocolError("SETTINGS frame on a non-zero stream")
        if flags & _ACK:
            if payload:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid")
            if len(self._limits) > 1:
                self._limits.popleft()
            return
        if len(payload) % 6:
            raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid")
        for code, value in _SETTING.iter_unpack(payload):
            if code == _S_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise h2.exceptions.FlowControlError(
                        f"Setting {code} has invalid value {value}")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif code == _S_MAX_FRAME_SIZE:
                if not _MAX_FRAME_SIZE <= value <= 2**24 - 1:
                    raise h2.exceptions.ProtocolError(
                        f"Setting {code} has invalid value {value}")
                self._peer_max_frame = value
            elif code == _S_ENABLE_PUSH and value not in (0, 1):
                raise h2.exceptions.ProtocolError(f"Setting {code} has invalid value {value}")
        self._out += _SETTINGS_ACK

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid")
        increment = _U32.unpack(payload)[0] & 0x7FFF_FFFF
        if not increment:
            raise h2.exceptions.ProtocolError("WINDOW_UPDATE with an increment of 0")
        if not sid:
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                raise h2.exceptions.FlowControlError(
                    f"Flow control window mustn't exceed {_MAX_WINDOW}")
            return
        stream = self._streams.get(sid)
        if stream is not None:
            stream.send_window += increment
        elif sid > self._highest:
            raise h2.exceptions.ProtocolError(f"WINDOW_UPDATE on idle stream {sid}")

    def _on_reset(self, sid: int) -> None:
        self._streams.pop(sid, None)
        self._remember_reset(sid)
        self._check_drain()

    def _remember_reset(self, sid: int) -> None:
        if len(self._reset) >= _MAX_RESET_KEPT:
            self._reset.clear()
        self._reset.add(sid)

    def _end(self, stream: _Stream) -> None:
        """END_STREAM: the request is complete (the h2 path's ``_on_complete``)."""
        stream.ended = True
        if stream.control:
            self._answer_stats(stream)
            return
        mock = self.mock
        stats = mock.stats
        stats.requests += 1
        path = stream.path
        if path is not None and len(path) > 10 and path.startswith(DEVICE_PREFIX):
            token = path[10:].decode("ascii", "replace")
            seen = stats.seen
            seen[token] = seen.get(token, 0) + 1
        cfg = mock.config
        if cfg.never_answer and _faults.never_answers(cfg, mock.rng):
            stats.never_answered += 1
            stream.silent = True
            self._check_drain()
            return
        if cfg.latency or cfg.jitter:
            delay = _faults.answer_delay(cfg, mock.rng)
            if delay > 0:
                self._spawn(self._answer_later, stream, delay)
                return
        self._answer(stream)

    # ---------------------------------------------------------------- GOAWAY

    def _send_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        self._out += _frame(_GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code) + debug)
        self._out += _frame(_PING, 0, 0, _GOAWAY_PING)

    def _drained(self, last_stream_id: int) -> bool:
        return all(sid > last_stream_id or s.silent for sid, s in self._streams.items())

    # ---------------------------------------------------------------- answers

    def _answer(self, stream: _Stream) -> None:
        sid = stream.id
        if self._dead or self._close_mode is not None or self._streams.get(sid) is not stream:
            return
        self._reply(sid, self._decide(stream.request, sid), stream.send_window, True)

    def _reply(self, sid: int, answer: Answer, send_window: int, stored: bool) -> None:
        """Send ``answer`` on stream ``sid`` (its window ``send_window``), forget the stream
        (``stored``: it is in ``_streams``), count the answer."""
        apns_id = answer.apns_id
        if answer.status == 200 and answer.extra is None and len(apns_id) < 127:
            # response()'s [(:status, 200), (apns-id, id)], as encode_response writes it
            out = self._out
            n = len(apns_id)
            out += _HDR.pack(0, _OK_BLOCK_HEAD_LEN + n, _HEADERS, _END_HEADERS | _END_STREAM,
                             sid)
            out += _OK_BLOCK_HEAD
            out.append(n)
            out += apns_id
            if stored:
                del self._streams[sid]
        else:
            headers, body = response(answer, self.mock.config)
            sent = self._send(sid, send_window, headers, body)
            if stored:
                del self._streams[sid]
            if not sent:
                return
        self._answered(sid, answer)
        if self._goaway_last is not None:
            self._check_drain()

    def _finish(self, stream: _Stream) -> None:
        """END_STREAM of a stream read from a template: :meth:`_end` and :meth:`_answer` in
        one for a device push of a device template (see :meth:`_evaluate_device`) when
        nothing delays the answer; otherwise :meth:`_end`."""
        cfg = self.mock.config
        template = stream.template
        path = stream.path
        assert template is not None and path is not None
        if not template.device or cfg.never_answer or cfg.latency or cfg.jitter:
            self._end(stream)
            return
        stream.ended = True
        stats = self.mock.stats
        stats.requests += 1
        token = path[10:].decode("ascii", "replace")
        seen = stats.seen
        seen[token] = seen.get(token, 0) + 1
        if self._dead or self._close_mode is not None:
            return
        try:
            answer = self._evaluate_device(template, stream.values, stream.body, cfg, path,
                                           token)
        except Exception:  # a mock bug must not take the connection down (as _decide)
            log.exception("connection %d: evaluating stream %d failed", self.index, stream.id)
            answer = Answer(500, "InternalServerError", str(uuid.uuid4()).encode(), None, False)
        self._reply(stream.id, answer, stream.send_window, True)

    def _evaluate_device(self, template: _Template, values: tuple[bytes, ...],
                         body: bytearray, cfg: MockConfig, path: bytes, token: str) -> Answer:
        """:func:`._device.evaluate_device` for a device push read from a device template
        (``values`` its hole values, ``path`` among them, ``token`` decoded from it): the
        same checks, by the same helpers, in the same order, drawing from ``rng`` alike;
        what only the template decides is its own (the request line's verdict; the id's
        validity when the pattern checks it) and check_headers' verdict on its headers is
        remembered (:func:`_header_reason`)."""
        mock = self.mock
        k = template.id_at
        if k < 0:
            given_id = template.given_id
            id_ok = given_id is not None and _UUID_FULLMATCH(given_id) is not None
        else:
            given_id = values[k]
            id_ok = template.id_valid or _UUID_FULLMATCH(given_id) is not None
        apns_id = given_id if given_id is not None and id_ok else str(uuid.uuid4()).encode()
        tokens = self._tokens
        failure = _faults.server_fault(cfg, mock.rng, tokens.wedged)
        if failure is not None:
            return Answer(failure[0], failure[1], apns_id, token, False)
        if cfg.validate:
            failure = template.line_failure or tokens.authorize(template.authorization, mock)
            if failure is not None:
                return Answer(failure[0], failure[1], apns_id, token, False)
            reason = _header_reason(template, cfg, id_ok, given_id is not None, body)
            if reason is not None:
                return Answer(413 if reason == "PayloadTooLarge" else 400, reason, apns_id,
                              token, True)
        failure = _faults.token_fault(cfg, token, template.topic)
        if failure is not None:
            return Answer(failure[0], failure[1], apns_id, token, True)
        if _faults.throttled(cfg, mock.rng):
            return Answer(429, "TooManyRequests", apns_id, token, True)
        if cfg.record_bodies:
            priority = int(template.fields.get(b"apns-priority", b"10"))
            mock.stats.bodies.setdefault(token, []).append((priority, bytes(body)))
        return Answer(200, None, apns_id, token, True)

    def _answer_stats(self, stream: _Stream) -> None:
        """``GET /stats`` (and ``DELETE``: then reset them), as the h2 path answers them."""
        if self._dead or self._close_mode is not None:
            return
        headers, body = _stats_answer(self.mock.stats, stream.request.method)
        self._send(stream.id, stream.send_window, headers, body)
        self._streams.pop(stream.id, None)
        self._check_drain()

    def _send(self, sid: int, send_window: int, headers: Headers, body: bytes) -> bool:
        """Queue a response on stream ``sid`` (its window ``send_window``); ``False`` (and the
        stream reset after its HEADERS) if the client's windows cannot take the body, as h2
        refuses it on the h2 path."""
        block = encode_response(headers)
        out = self._out
        n = len(block)
        if not body:
            out += _HDR.pack(n >> 16, n & 0xFFFF, _HEADERS, _END_HEADERS | _END_STREAM, sid)
            out += block
            return True
        out += _HDR.pack(n >> 16, n & 0xFFFF, _HEADERS, _END_HEADERS, sid)
        out += block
        size = len(body)
        if size > self._send_window or size > send_window:
            log.debug("connection %d: cannot answer stream %d: window too small", self.index,
                      sid)
            out += _frame(_RST_STREAM, 0, sid, _U32.pack(ErrorCodes.INTERNAL_ERROR))
            self._remember_reset(sid)
            return False
        self._send_window -= size
        step = self._peer_max_frame
        for start in range(0, size, step):
            chunk = body[start:start + step]
            last = start + step >= size
            m = len(chunk)
            out += _HDR.pack(m >> 16, m & 0xFFFF, _DATA, _END_STREAM if last else 0, sid)
            out += chunk
        return True

    def _announce_limit(self, limit: int) -> None:
        self._limits.append(limit)
        self._out += _frame(_SETTINGS, 0, 0, _SETTING.pack(_S_MAX_CONCURRENT_STREAMS, limit))


# --------------------------------------------------------------------------- listener

async def _handshake(sock: trio.SocketStream, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                     outgoing: ssl.MemoryBIO) -> bool:
    """The server side of the TLS handshake over the memory BIOs; ``False`` if it failed."""
    with trio.move_on_after(_HANDSHAKE_TIMEOUT):
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        await sock.send_all(outgoing.read())
                    data = await sock.receive_some(_READ_SIZE)
                    if not data:
                        return False
                    incoming.write(data)
            if outgoing.pending:
                await sock.send_all(outgoing.read())
            return True
        except ssl.SSLError as exc:
            log.debug("TLS handshake failed: %s", exc)
            if outgoing.pending:  # the alert
                try:
                    await sock.send_all(outgoing.read())
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
    return False


class FastListener:
    """Accepts TCP connections for a :class:`MockAPNs` and serves each on the fast path, or
    hands it to the h2 path when the config asks for a fault the fast path lacks."""

    def __init__(self, mock: _Host, ssl_context: ssl.SSLContext) -> None:
        self.mock = mock
        self.ssl_context = ssl_context
        self._last_choice: str | None = None

    async def handle(self, sock: trio.SocketStream) -> None:
        mock = self.mock
        reason = h2_reason(mock.config)
        choice = "fast" if reason is None else f"h2 ({reason}: the fast path lacks it)"
        mock.paths["fast" if reason is None else "h2"] += 1
        level = logging.INFO if choice != self._last_choice else logging.DEBUG
        self._last_choice = choice
        log.log(level, "mock connection %d: served by the %s path",
                len(mock.stats.streams_per_connection), choice)
        if reason is not None:
            await mock._handle(trio.SSLStream(sock, self.ssl_context, server_side=True,
                                              https_compatible=False))
            return
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ssl_context.wrap_bio(incoming, outgoing, server_side=True)
        try:
            if not await _handshake(sock, tls, incoming, outgoing):
                return
            if not tls.selected_alpn_protocol() and mock.config.alpn:
                log.debug("client negotiated no ALPN protocol; speaking h2 anyway")
            index = count_connection(mock.stats)
            await FastConnection(mock, sock, tls, incoming, outgoing, index).serve()
        finally:
            await trio.aclose_forcefully(sock)


async def serve_fast(mock: _Host, listeners: list[trio.SocketListener],
                     ssl_context: ssl.SSLContext) -> None:
    """Serve ``listeners`` (plain TCP) for ``mock`` until cancelled (see :class:`FastListener`)."""
    await trio.serve_listeners(FastListener(mock, ssl_context).handle, listeners)
