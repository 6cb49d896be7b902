"""HPACK decoding of responses (RFC 7541), for speed: the engine's response decoder.

A profile of the hot path (bench/breakdown.py) found hpack's ``Decoder`` spending 24 µs of
the 38 µs per push against nginx, 10 of them in its bit-by-bit Huffman decoder. This one
returns the same ``(name, value)`` byte pairs with far fewer Python steps:

- Huffman strings are decoded 12 bits at a time through a table (up to two symbols per
  step; built on first use, about 10 ms), and decoded strings are remembered by their
  encoded bytes (``server``, ``date`` and header names repeat on every response);
- a block that changes nothing in the dynamic table (a response of indexed fields and
  literals without indexing, or nginx's, which empties the table and then indexes every
  field into it in vain) is remembered whole, valid until the table next changes (a
  response that carries a fresh ``apns-id``, as APNs' do, is decoded each time, its
  Huffman strings but the id from the string cache);
- integers take a one-byte fast path.

hpack's ``Decoder`` stays the reference: ``tests/test_hpackdec.py`` decodes what hpack's
``Encoder`` writes (every representation, Huffman or not, table size updates, evictions)
with both and compares, and ``FANOUT_HPACK=hpack`` selects hpack's decoder instead.
Errors are hpack's exception types, so callers catch ``hpack.HPACKError`` either way.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence

from hpack import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]

#: index -> (name, value); index 0 is invalid (RFC 7541, Appendix A)
_STATIC: tuple[Header, ...] = ((b"", b""), *HeaderTable.STATIC_TABLE)
_NSTATIC = len(_STATIC) - 1
_ENTRY_OVERHEAD = 32  # RFC 7541, 4.1
_STRING_CACHE_MAX = 1024
_BLOCK_CACHE_MAX = 256
_VARINT_MAX_BYTES = 10  # as hpack: a longer integer is an error, not a loop
#: headers whose value is new in every answer (APNs' ids): not worth remembering
_UNIQUE = frozenset({b"apns-id", b"apns-unique-id", b"apns-request-id"})

#: 12-bit Huffman table: prefix -> (decoded bytes, bits used, cumulative bits per symbol)
_HUFF12: list[tuple[bytes, int, tuple[int, ...]]] = []
#: (code length, code) -> symbol, for the slow path (codes longer than 12 bits)
_CODES: dict[tuple[int, int], int] = {}


def _build_huffman() -> None:
    """Fill :data:`_CODES` and :data:`_HUFF12`. Tables for k-bit strings are built from
    the (k - L)-bit ones: a string starting with an L-bit code is that symbol, then the
    table entry of its remaining bits (about 8,000 entries in all, a few ms)."""
    short: list[tuple[int, int, int]] = []  # (length, code, symbol) with length <= 12
    for sym, (code, length) in enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True)):
        _CODES[(length, code)] = sym
        if length <= 12:
            short.append((length, code, sym))
    empty: tuple[bytes, int, tuple[int, ...]] = (b"", 0, ())
    tables: list[list[tuple[bytes, int, tuple[int, ...]]]] = [[empty]]
    for k in range(1, 13):
        table = [empty] * (1 << k)
        for length, code, sym in short:
            if length > k:
                continue
            rest_bits = k - length
            sub = tables[rest_bits]
            head = bytes((sym,))
            base = code << rest_bits
            for r in range(1 << rest_bits):
                chunk, used, steps = sub[r]
                table[base | r] = (head + chunk, length + used,
                                   (length, *(length + s for s in steps)))
        tables.append(table)
    _HUFF12[:] = tables[12]


class Encoded(bytes):
    """A Huffman-coded header value left undecoded: an APNs id, new in every answer and,
    when the request carried one, its echo (docs/apns.md: APNs returns the apns-id it was
    sent), so usually never needed. :func:`plain` decodes it."""

    __slots__ = ()


def plain(value: bytes) -> bytes:
    """``value`` as text bytes: an :class:`Encoded` one decoded, any other as it is."""
    return huffman_decode(value) if type(value) is Encoded else value


#: strings decoded bit by bit before the 12-bit table is built (about 8 ms): a process
#: that sends a few pushes (``fanout send``) never pays for it (issue 19, start-up)
_SLOW_DECODES = 64
_slow_left = _SLOW_DECODES


def huffman_decode(data: bytes) -> bytes:
    """The string that ``data`` Huffman-encodes (RFC 7541, 5.2 and Appendix B)."""
    if not _HUFF12:
        global _slow_left
        if _slow_left > 0:
            _slow_left -= 1
            return _slow_decode(data)
        _build_huffman()
    table = _HUFF12
    n = int.from_bytes(data, "big")
    left = len(data) * 8
    parts: list[bytes] = []
    while left >= 12:
        chunk, used, _ = table[(n >> (left - 12)) & 0xFFF]
        if used:
            parts.append(chunk)
            left -= used
            continue
        left = _long_symbol(n, left, parts)  # a code longer than 12 bits
    if left:
        pad = 12 - left  # the last bits, padded with ones to a table index
        chunk, _, steps = table[((n & ((1 << left) - 1)) << pad) | ((1 << pad) - 1)]
        taken = 0
        for k, at in enumerate(steps):
            if at > left:
                break
            taken = k + 1
        if taken:
            parts.append(chunk[:taken])
            left -= steps[taken - 1]
        # what remains must be padding: fewer than 8 bits, all ones (the EOS code's prefix)
        if left > 7 or (n & ((1 << left) - 1)) != (1 << left) - 1:
            raise HPACKDecodingError("Invalid Huffman string: bad padding")
    return b"".join(parts)


def _slow_decode(data: bytes) -> bytes:
    """:func:`huffman_decode` one symbol at a time, through :data:`_CODES` only (the same
    results and errors: tests/test_hpackdec.py compares them)."""
    if not _CODES:
        for sym, (code, length) in enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH,
                                                 strict=True)):
            _CODES[(length, code)] = sym
    n = int.from_bytes(data, "big")
    left = len(data) * 8
    out = bytearray()
    codes = _CODES
    while left:
        sym = -1
        for length in range(5, min(30, left) + 1):  # the shortest code has 5 bits
            found = codes.get((length, (n >> (left - length)) & ((1 << length) - 1)))
            if found is not None:
                sym = found
                break
        if sym < 0:
            break
        if sym == 256:
            raise HPACKDecodingError("Invalid Huffman string: EOS in the string")
        out.append(sym)
        left -= length
    if left >= 12:
        raise HPACKDecodingError("Invalid Huffman string: no code matches")
    if left > 7 or (n & ((1 << left) - 1)) != (1 << left) - 1:
        raise HPACKDecodingError("Invalid Huffman string: bad padding")
    return bytes(out)


def _long_symbol(n: int, left: int, parts: list[bytes]) -> int:
    """Decode one symbol whose code is 13-30 bits long at bit ``left``; the bits left."""
    for length in range(13, min(30, left) + 1):
        sym = _CODES.get((length, (n >> (left - length)) & ((1 << length) - 1)))
        if sym is not None:
            if sym == 256:
                raise HPACKDecodingError("Invalid Huffman string: EOS in the string")
            parts.append(bytes((sym,)))
            return left - length
    raise HPACKDecodingError("Invalid Huffman string: no code matches")


class ResponseDecoder:
    """One connection's HPACK decoding context (its dynamic table). ``decode`` returns the
    header list of one block as ``(name, value)`` byte pairs, as ``hpack.Decoder.decode(
    block, raw=True)`` does."""

    __slots__ = ("max_header_list_size", "max_allowed_table_size", "_table_size", "_dynamic",
                 "_dyn_size", "_generation", "_strings", "_blocks", "_shape")
    #: names whose values are new in every block (APNs' ids): a Huffman-coded one is left
    #: :class:`Encoded`, none is remembered, and theirs are the holes of the shape cache
    #: (:class:`RequestDecoder` adds ``:path``)
    unique_names: frozenset[bytes] = _UNIQUE

    def __init__(self, max_header_list_size: int = 65536,
                 max_allowed_table_size: int = 4096) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = max_allowed_table_size
        self._table_size = max_allowed_table_size
        self._dynamic: deque[Header] = deque()
        self._dyn_size = 0
        self._generation = 0  # bumped at every change of the dynamic table
        self._strings: dict[bytes, bytes] = {}
        self._blocks: dict[bytes, tuple[int, Sequence[Header]]] = {}
        # the latest block with per-answer ids (apns-id ...): its other bytes, so that the
        # next block that differs only in those values is not decoded again (see decode)
        self._shape: _Shape | None = None

    @property
    def header_table_size(self) -> int:
        return self._table_size

    def current_shape(self) -> _Shape | None:
        """The shape cache's entry (``(generation, length, segments, fields, holes)``) while
        it still describes the next block: the dynamic table has not changed since. A block
        of that length with those segments decodes to those fields with its own hole values
        (the fast mock makes its request templates of it)."""
        shape = self._shape
        return shape if shape is not None and shape[0] == self._generation else None

    def decode(self, data: bytes) -> Sequence[Header]:
        data = bytes(data)
        hit = self._blocks.get(data)
        if hit is not None and hit[0] == self._generation:
            return hit[1]
        shape = self._shape
        if shape is not None and shape[0] == self._generation and len(data) == shape[1]:
            # every answer carries a fresh apns-id: a block whose every other byte is the
            # latest such block's decodes to its fields with the new id values (the same
            # representations, so the same table effects: none, as the generation shows)
            for at, segment in shape[2]:
                if not data.startswith(segment, at):
                    break
            else:
                fresh = list(shape[3])
                for start, stop, k, name, huffman in shape[4]:
                    raw = data[start:stop]
                    fresh[k] = (name, Encoded(raw) if huffman else raw)
                return fresh
        generation = self._generation
        unique = False
        unique_names = self.unique_names
        holes: list[tuple[int, int, int, bytes, bool]] | None = []
        headers: list[Header] = []
        size = 0
        i = 0
        end = len(data)
        static, nstatic, dynamic = _STATIC, _NSTATIC, self._dynamic
        string = self._string
        while i < end:
            b = data[i]
            if b & 0x80:  # indexed field (6.1)
                index = b & 0x7F
                i += 1
                if index == 0x7F:
                    index, i = _integer(data, i, 0x7F)
                if 0 < index <= nstatic:
                    header = static[index]
                elif index > nstatic and index - nstatic <= len(dynamic):
                    header = dynamic[index - nstatic - 1]
                else:
                    raise InvalidTableIndex(f"Invalid table index {index}")
            elif b & 0x40 or not b & 0x20:  # a literal (6.2)
                if b & 0x40:  # with incremental indexing: a 6-bit name index
                    index = b & 0x3F
                    mask = 0x3F
                else:  # without indexing or never indexed: a 4-bit name index
                    index = b & 0x0F
                    mask = 0x0F
                i += 1
                if index:
                    if index == mask:
                        index, i = _integer(data, i, mask)
                    if 0 < index <= nstatic:
                        name = static[index][0]
                    elif index > nstatic and index - nstatic <= len(dynamic):
                        name = dynamic[index - nstatic - 1][0]
                    else:
                        raise InvalidTableIndex(f"Invalid table index {index}")
                else:
                    name, i = string(data, i)
                if name in unique_names:  # a fresh id per answer: left encoded (see Encoded);
                    value, i = string(data, i, False)  # neither string nor block repeats
                    unique = True
                    if b & 0x40 and type(value) is Encoded and _ENTRY_OVERHEAD + len(name) \
                            + len(value) * 8 // 30 <= self._table_size:
                        # it may enter the table, where its decoded length counts (a
                        # Huffman code is 5 to 30 bits: nginx's table of size 0 never
                        # takes one)
                        value = huffman_decode(value)
                        holes = None
                    elif holes is not None:
                        holes.append((i - len(value), i, len(headers), name,
                                      type(value) is Encoded))
                else:
                    value, i = string(data, i)
                header = (name, value)
                if b & 0x40:
                    self._add(header)
            else:  # dynamic table size update (6.3): only before the first field
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                new_size = b & 0x1F
                i += 1
                if new_size == 0x1F:
                    new_size, i = _integer(data, i, 0x1F)
                if new_size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self._table_size = new_size
                self._evict()
                self._generation += 1
                continue
            headers.append(header)
            size += _ENTRY_OVERHEAD + len(header[0]) + len(header[1])
            if size > self.max_header_list_size:
                raise OversizedHeaderListError(
                    f"A header list larger than {self.max_header_list_size} has been received")
        if self._table_size > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if generation == self._generation and not unique:  # the block may repeat
            if len(self._blocks) >= _BLOCK_CACHE_MAX:
                self._blocks.clear()
            frozen = tuple(headers)
            self._blocks[data] = (generation, frozen)
            return frozen
        if generation == self._generation and holes:  # the shape of the next answers
            segments = []
            at = 0
            for start, stop, _, _, _ in holes:
                segments.append((at, data[at:start]))
                at = stop
            segments.append((at, data[at:]))
            self._shape = (generation, end, segments, tuple(headers), holes)
        return headers

    def _string(self, data: bytes, i: int, remember: bool = True) -> tuple[bytes, int]:
        """A string literal at ``i`` (5.2): its bytes and the index after it. A Huffman
        string is decoded and remembered by its encoded bytes; with ``remember`` false it
        is returned undecoded, as :class:`Encoded`."""
        try:
            b = data[i]
        except IndexError:
            raise HPACKDecodingError("Truncated header block") from None
        length = b & 0x7F
        i += 1
        if length == 0x7F:
            length, i = _integer(data, i, 0x7F)
        raw = data[i:i + length]
        if len(raw) != length:
            raise HPACKDecodingError("Truncated header block")
        i += length
        if not b & 0x80:
            return raw, i
        if not remember:
            return Encoded(raw), i
        cached = self._strings.get(raw)
        if cached is None:
            cached = huffman_decode(raw)
            if len(self._strings) >= _STRING_CACHE_MAX:
                self._strings.clear()
            self._strings[raw] = cached
        return cached, i

    def _add(self, header: Header) -> None:
        size = _ENTRY_OVERHEAD + len(header[0]) + len(header[1])
        if size > self._table_size:  # larger than the table: it empties the table (4.4)
            if self._dynamic:  # (nginx sets the size to 0 and then indexes every field:
                self._dynamic.clear()  # the table stays empty and its blocks cacheable)
                self._dyn_size = 0
                self._generation += 1
            return
        self._generation += 1
        self._dynamic.appendleft(header)
        self._dyn_size += size
        self._evict()

    def _evict(self) -> None:
        dynamic = self._dynamic
        while self._dyn_size > self._table_size and dynamic:
            name, value = dynamic.pop()
            self._dyn_size -= _ENTRY_OVERHEAD + len(name) + len(value)


#: (table generation, block length, [(offset, bytes between the id values)], the fields,
#: [(value start, value stop, field index, name, Huffman-coded)])
_Shape = tuple[int, int, list[tuple[int, bytes]], tuple[Header, ...],
               list[tuple[int, int, int, bytes, bool]]]


def _integer(data: bytes, i: int, prefix_max: int) -> tuple[int, int]:
    """The rest of an integer whose prefix was all ones (5.1), from ``i``: value, index."""
    value = prefix_max
    shift = 0
    for k in range(_VARINT_MAX_BYTES):
        try:
            b = data[i + k]
        except IndexError:
            raise HPACKDecodingError("Unable to decode HPACK integer: truncated") from None
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i + k + 1
    raise HPACKDecodingError("Variable integer representation is too long")


def make_decoder(max_header_list_size: int) -> ResponseDecoder:
    """The engine's decoder for one connection: this module's, or hpack's own when
    ``FANOUT_HPACK=hpack`` (the reference, for comparison)."""
    if os.environ.get("FANOUT_HPACK", "").strip().lower() == "hpack":
        return _HpackDecoder(max_header_list_size)  # type: ignore[return-value]
    return ResponseDecoder(max_header_list_size)


class _HpackDecoder:
    """hpack's Decoder behind :class:`ResponseDecoder`'s ``decode``."""

    def __init__(self, max_header_list_size: int) -> None:
        import hpack

        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)

    def decode(self, data: bytes) -> list[Header]:
        return self._decoder.decode(data, raw=True)  # type: ignore[return-value]


class RequestDecoder(ResponseDecoder):
    """The decoder of request blocks (the mock's fast path): :class:`ResponseDecoder` with
    ``:path`` among the values new in every block, as each push names its device. So a
    request that differs from the one before only in its path and ids (fanout's: its
    constant fields indexed, ``:path`` and ``apns-id`` never-indexed literals) comes from
    the shape cache, and a Huffman-coded path is left :class:`Encoded` too."""

    __slots__ = ()
    unique_names = _UNIQUE | {b":path"}
