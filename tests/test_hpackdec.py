"""The engine's HPACK response decoder (fanout/_engine/hpackdec.py) against hpack's, an
independent implementation: what hpack's Encoder writes (every representation, Huffman or
not, table size updates, evictions) decodes to the same header lists through both, block
after block on one connection's table; malformed blocks are errors hpack's callers catch."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout._engine.hpackdec import Encoded, ResponseDecoder, huffman_decode, make_decoder, plain

HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
NAMES = [b":status", b"apns-id", b"apns-unique-id", b"server", b"date", b"content-type",
         b"content-length", b"retry-after", b"x-custom", b"set-cookie"]
VALUES = st.one_of(st.sampled_from([b"200", b"400", b"410", b"429", b"nginx/1.22.1", b"0",
                                    b"application/json", b""]),
                   st.binary(max_size=80),
                   st.uuids().map(lambda u: str(u).encode()))


@st.composite
def header(draw: st.DrawFn) -> HeaderTuple:
    name = draw(st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=30)))
    value = draw(VALUES)
    kind = draw(st.sampled_from(["index", "never"]))
    return HeaderTuple(name, value) if kind == "index" else NeverIndexedHeaderTuple(name, value)


BLOCKS = st.lists(st.tuples(st.lists(header(), max_size=8), st.booleans(),
                            st.one_of(st.none(), st.integers(0, 4096))), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(BLOCKS)
def test_the_decoder_agrees_with_hpack_block_after_block(blocks) -> None:
    encoder = hpack.Encoder()
    reference = hpack.Decoder(max_header_list_size=1 << 20)
    ours = ResponseDecoder(max_header_list_size=1 << 20)
    for headers, huffman, resize in blocks:
        if resize is not None:
            encoder.header_table_size = resize  # a size update opens the next block
        block = encoder.encode(headers, huffman=huffman)
        expected = [tuple(h) for h in reference.decode(block, raw=True)]
        assert [(n, plain(v)) for n, v in ours.decode(block)] == expected
        assert ours.header_table_size == reference.header_table_size


def test_a_repeated_block_is_decoded_again_after_the_table_changed() -> None:
    encoder = hpack.Encoder()
    ours = ResponseDecoder()
    first = encoder.encode([(b"x-a", b"1")])  # adds x-a: 1 at index 62
    assert list(ours.decode(first)) == [(b"x-a", b"1")]
    refer = bytes([0x80 | 62])
    assert list(ours.decode(refer)) == [(b"x-a", b"1")]
    assert list(ours.decode(refer)) == [(b"x-a", b"1")]  # from the block cache
    ours.decode(encoder.encode([(b"x-b", b"2")]))  # now index 62 is x-b: 2
    assert list(ours.decode(refer)) == [(b"x-b", b"2")]


def test_nginx_blocks_are_cached_though_every_field_is_indexed() -> None:
    """nginx opens with a table size of 0 and then indexes each field: nothing ever
    enters the table, so its identical blocks are decoded once."""
    block = bytes.fromhex("20887689aa6355e580ae212e1f6196c361be94034a5f29141004e28205c659b8"
                          "d34a62d1bf5f87497ca58ae819aa5c0130")
    again = block[1:]  # the later blocks: no size update
    ours, reference = ResponseDecoder(), hpack.Decoder()
    expected = [tuple(h) for h in reference.decode(block, raw=True)]
    assert expected[0] == (b":status", b"200") and expected[1] == (b"server", b"nginx/1.22.1")
    assert list(ours.decode(block)) == expected
    first = ours.decode(again)
    assert list(first) == [tuple(h) for h in reference.decode(again, raw=True)]
    assert ours.decode(again) is first  # the cache, not a second decoding


def test_huffman_strings_of_every_byte_and_length() -> None:
    rng = random.Random(7)
    for n in list(range(0, 70)) + [300, 1000]:
        for _ in range(20):
            s = bytes(rng.randrange(256) for _ in range(n))
            assert huffman_decode(HUFFMAN.encode(s)) == s
    for s in (b"", b"0", b"a", b"\xff" * 5, b"\x00\x01\x02", bytes(range(256))):
        assert huffman_decode(HUFFMAN.encode(s)) == s


@pytest.mark.parametrize("block", [
    b"\x80",                    # index 0
    b"\xff\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an integer that never ends
    bytes([0x80 | 62]),         # a dynamic index into an empty table
    b"\x40\x05ab",              # a literal name shorter than its length
    b"\x00\x01a\x85\xff",       # a Huffman value shorter than its length
    b"\x00\x01a\x81\x00",       # Huffman padding of zeros
    b"\x00\x01a\x84\xff\xff\xff\xff",  # the EOS code inside a string
    b"\x88\x3f\xe1\x1f",        # a size update after a field
    b"\x3f\xe2\x1f",            # a size update above the allowed maximum (4096)
    b"\x0f",                    # a name index that never ends
])
def test_malformed_blocks_are_hpack_errors(block: bytes) -> None:
    with pytest.raises(hpack.HPACKError):
        ResponseDecoder().decode(block)


def test_an_oversized_header_list_is_refused() -> None:
    block = hpack.Encoder().encode([(b"x-big", b"v" * 200)], huffman=False)
    with pytest.raises(hpack.OversizedHeaderListError):
        ResponseDecoder(max_header_list_size=100).decode(block)


def test_fanout_hpack_selects_hpacks_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    block = hpack.Encoder().encode([(b":status", b"200"), (b"apns-id", b"x")])
    assert isinstance(make_decoder(1 << 16), ResponseDecoder)
    monkeypatch.setenv("FANOUT_HPACK", "hpack")
    theirs = make_decoder(1 << 16)
    assert not isinstance(theirs, ResponseDecoder)
    assert [tuple(h) for h in theirs.decode(block)] == [(b":status", b"200"), (b"apns-id", b"x")]


def test_apns_ids_are_left_encoded_until_asked_for() -> None:
    """An answer's apns-id is the echo of the one sent: kept Huffman-coded (Encoded), and
    decoded by plain() only when needed; a raw (not Huffman) one is plain bytes."""
    ident = b"1b4e28ba-2fa1-41d2-883f-0016d3cca427"
    encoder = hpack.Encoder()
    block = encoder.encode([(b":status", b"200"), NeverIndexedHeaderTuple(b"apns-id", ident)])
    (status, (name, value)) = ResponseDecoder().decode(block)
    assert status == (b":status", b"200") and name == b"apns-id"
    assert type(value) is Encoded and value != ident and plain(value) == ident
    raw = hpack.Encoder().encode([NeverIndexedHeaderTuple(b"apns-id", ident)], huffman=False)
    assert ResponseDecoder().decode(raw) == [(b"apns-id", ident)]


ANSWERS = st.lists(st.tuples(st.uuids(), st.uuids(), st.integers(0, 59), st.booleans()),
                   min_size=2, max_size=10)


@settings(max_examples=200, deadline=None)
@given(ANSWERS, st.sampled_from(["nginx", "apns", "indexed"]), st.booleans())
def test_answers_that_differ_only_in_their_ids_agree_with_hpack(answers, shape, huffman) -> None:
    """The shape cache: a block equal to the latest one but for its apns-id values (one
    or two holes) is not decoded again; a changed date second, a changed table (fields
    indexed into it) or another id length must not be taken for it."""
    encoder = hpack.Encoder()
    if shape == "nginx":
        encoder.header_table_size = 0  # nginx: size 0, then every field "indexed" in vain
    reference = hpack.Decoder()
    ours = ResponseDecoder()
    for ident, unique, second, short in answers:
        ids = [str(ident).encode(), str(unique).encode()[:20 if short else 36]]
        headers = [(b":status", b"200")]
        if shape != "apns":
            headers += [(b"server", b"nginx/1.22.1"),
                        (b"date", b"Mon, 07 Dec 2026 15:00:%02d GMT" % second)]
        headers += [NeverIndexedHeaderTuple(b"apns-id", ids[0]),
                    NeverIndexedHeaderTuple(b"apns-unique-id", ids[1])]
        if shape == "indexed":
            headers.append((b"x-seen", b"%d" % second))  # enters the table: generation moves
        block = encoder.encode(headers, huffman=huffman)
        expected = [tuple(h) for h in reference.decode(block, raw=True)]
        assert [(n, plain(v)) for n, v in ours.decode(block)] == expected


def test_the_shape_cache_answers_a_block_with_new_ids_without_decoding() -> None:
    encoder = hpack.Encoder()
    ours = ResponseDecoder()
    a, b = (str(u).encode() for u in ("1b4e28ba-2fa1-41d2-883f-0016d3cca427",
                                      "6f1d2e3c-0000-4000-8000-0123456789ab"))
    first = encoder.encode([(b":status", b"200"), NeverIndexedHeaderTuple(b"apns-id", a)])
    second = encoder.encode([(b":status", b"200"), NeverIndexedHeaderTuple(b"apns-id", b)])
    assert len(first) == len(second) and first != second
    ours.decode(first)
    shape = ours._shape
    assert shape is not None
    got = ours.decode(second)
    assert ours._shape is shape  # matched, not rebuilt by a second decoding
    assert [(n, plain(v)) for n, v in got] == [(b":status", b"200"), (b"apns-id", b)]


def test_an_indexed_id_enters_the_table_at_its_decoded_size() -> None:
    """Found by hypothesis: an apns-unique-id literal *with* indexing was stored in the
    table Huffman-coded (Encoded) and counted at its encoded length, so evictions drifted
    from the encoder's and a later index pointed past the table."""
    encoder = hpack.Encoder()
    blocks = [encoder.encode([(b":status", b"200"), (b":status", b"200"),
                              (b"apns-unique-id", b"\x00\x00"), (b"server", b"200"),
                              (b"\x00", b"200"), (b"\x01", b"200")], huffman=True)]
    encoder.header_table_size = 161
    blocks.append(encoder.encode([(b":status", b"200"), (b"apns-unique-id", b"200")],
                                 huffman=False))
    reference, ours = hpack.Decoder(), ResponseDecoder()
    for block in blocks:
        expected = [tuple(h) for h in reference.decode(block, raw=True)]
        assert [(n, plain(v)) for n, v in ours.decode(block)] == expected


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=12), st.binary(max_size=40).map(HUFFMAN.encode)))
def test_the_bit_by_bit_decoder_agrees_with_the_table(data: bytes) -> None:
    """The first strings of a process are decoded without the 12-bit table (start-up):
    both decoders give the same bytes, or the same error, for any input."""
    from fanout._engine import hpackdec

    hpackdec._build_huffman()

    def result(decode):
        try:
            return decode(data)
        except hpack.HPACKDecodingError as exc:
            return str(exc)

    assert result(hpackdec._slow_decode) == result(huffman_decode)
