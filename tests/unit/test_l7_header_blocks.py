"""One HPACK decode per header block, shared by two readers (agent.l7.header_blocks)."""

from __future__ import annotations

import random

import h2.config
import h2.connection
import hpack
import hpack.huffman_table
import pytest
from hpack.exceptions import HPACKError

from agent.l7.header_blocks import (
    MAX_HEADER_LIST,
    MAX_TABLE_SIZE,
    HeaderBlock,
    HeaderBlockDecoder,
    HeaderBlockLost,
    HpackDecoder,
    text_fields,
)
from agent.l7.http2 import Http2Parser
from agent.redact.http2_masker import Http2HeaderMasker
from agent.redact.rules import DEFAULT_HEADERS


def blocks(n: int) -> list[bytes]:
    enc = hpack.Encoder()
    return [enc.encode([(":status", "200"), ("x-n", str(i)), ("x-same", "v")]) for i in range(n)]


class _Counting:
    """An HPACK decoder that counts its decodes."""

    def __init__(self, decoder: HpackDecoder) -> None:
        self.decoder = decoder
        self.calls: list[int] = []

    def decode(self, data: bytes) -> HeaderBlock:
        self.calls.append(1)
        return self.decoder.decode(data)


def counting(shared: HeaderBlockDecoder) -> list[int]:
    """Counts the decodes of `shared`'s HPACK decoder."""
    counter = _Counting(shared.decoder)
    shared.decoder = counter  # type: ignore[assignment]
    return counter.calls


def test_each_block_is_decoded_once_for_both_readers() -> None:
    shared = HeaderBlockDecoder()
    calls = counting(shared)
    a, b = shared.reader(), shared.reader()
    bs = blocks(3)
    first = [a.decode(raw).fields for raw in bs[:2]]
    assert shared.kept == 2
    assert [b.decode(raw).fields for raw in bs[:2]] == first
    assert shared.kept == 0
    assert (
        b.decode(bs[2]).fields
        == a.decode(bs[2]).fields
        == [(b":status", b"200"), (b"x-n", b"2"), (b"x-same", b"v")]
    )
    assert len(calls) == 3


def test_skipped_and_closed_readers_keep_nothing() -> None:
    shared = HeaderBlockDecoder()
    a, b = shared.reader(), shared.reader()
    bs = blocks(3)
    b.skip()  # b gives block 0 up before a decodes it
    a.decode(bs[0])
    assert shared.kept == 0
    a.decode(bs[1])
    assert shared.kept == 1
    b.close()
    assert shared.kept == 0
    a.decode(bs[2])
    assert shared.kept == 0


def test_a_block_nobody_decoded_breaks_the_chain() -> None:
    shared = HeaderBlockDecoder()
    a = shared.reader()
    bs = blocks(2)
    a.skip()
    with pytest.raises(HeaderBlockLost):
        a.decode(bs[1])


def test_readers_disagreeing_on_the_bytes_get_an_error() -> None:
    shared = HeaderBlockDecoder()
    a, b = shared.reader(), shared.reader()
    bs = blocks(2)
    a.decode(bs[0])
    with pytest.raises(HeaderBlockLost):
        b.decode(bs[1])


def test_decode_errors_reach_both_readers() -> None:
    shared = HeaderBlockDecoder()
    a, b = shared.reader(), shared.reader()
    for r in (a, b):
        with pytest.raises(HPACKError):
            r.decode(b"\xff\xff\xff\xff\xff\x7f")


def test_masker_and_parser_share_one_decode_per_block() -> None:
    """As agent/l7/connection.py wires them: the parser first, then the masker."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    requests, responses = bytearray(), bytearray()
    for i in range(3):
        sid = client.get_next_available_stream_id()
        client.send_headers(
            sid,
            [(":method", "GET"), (":scheme", "https"), (":path", f"/{i}"),
             (":authority", "a"), ("authorization", "Bearer secret")],
            end_stream=True,
        )  # fmt: skip
        sent = client.data_to_send()
        requests += sent
        server.receive_data(sent)
        server.send_headers(sid, [(":status", "200"), ("set-cookie", "s=1")], end_stream=True)
        responses += server.data_to_send()
    shared = (HeaderBlockDecoder(), HeaderBlockDecoder())
    calls = [counting(s) for s in shared]
    parser = Http2Parser(blocks=shared)
    maskers = [
        Http2HeaderMasker(DEFAULT_HEADERS, preface=True, blocks=shared[0]),
        Http2HeaderMasker(DEFAULT_HEADERS, preface=False, blocks=shared[1]),
    ]
    out = parser.feed("request", bytes(requests), 1) + parser.feed("response", bytes(responses), 2)
    masked = [maskers[0].feed(bytes(requests)), maskers[1].feed(bytes(responses))]
    assert parser.failed is None and len(out) == 3
    assert [len(c) for c in calls] == [3, 3]  # one decode per header block
    assert all(s.kept == 0 for s in shared)
    assert b"secret" not in masked[0][0] and masked[0][1] == {"header:authorization"}
    assert masked[1][1] == {"header:set-cookie"}
    alone = Http2Parser()
    alone_out = alone.feed("request", bytes(requests), 1) + alone.feed(
        "response", bytes(responses), 2
    )
    assert [e.to_json() for e in alone_out] == [e.to_json() for e in out]


def _hpack_reference(blocks: list[bytes]) -> list[list[tuple[bytes, bytes]] | str]:
    """What hpack's decoder makes of `blocks`, in order ("error" for a failed block;
    the blocks after one are decoded on, as by our decoder)."""
    ref = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
    ref.max_allowed_table_size = MAX_TABLE_SIZE
    out: list[list[tuple[bytes, bytes]] | str] = []
    for raw in blocks:
        try:
            out.append([(bytes(n), bytes(v)) for n, v in ref.decode(raw, raw=True)])
        except HPACKError:
            out.append("error")
    return out


def _ours(blocks: list[bytes]) -> list[list[tuple[bytes, bytes]] | str]:
    dec = HpackDecoder()
    out: list[list[tuple[bytes, bytes]] | str] = []
    for raw in blocks:
        try:
            out.append(dec.decode(raw).fields)
        except HPACKError:
            out.append("error")
    return out


def test_decoder_agrees_with_hpack_on_encoded_blocks() -> None:
    rng = random.Random(7)
    enc = hpack.Encoder()
    names = [":path", "authorization", "cookie", "x-a", "content-type", "te", "X-Up"]
    blocks = []
    for i in range(300):
        if i % 50 == 25:
            enc.header_table_size = rng.choice([0, 256, 4096])
        fields = [
            hpack.NeverIndexedHeaderTuple(rng.choice(names), "v" * rng.randrange(0, 200))
            if rng.random() < 0.2
            else (rng.choice(names), rng.choice(["a", "b/c?token=1", "x" * rng.randrange(300)]))
            for _ in range(rng.randrange(1, 8))
        ]
        blocks.append(enc.encode(fields, huffman=rng.random() < 0.5))
    assert _ours(blocks) == _hpack_reference(blocks)


def test_decoder_agrees_with_hpack_on_damaged_blocks() -> None:
    """Same fields or an error, block for block, on truncated and bit-flipped input
    (the table goes on from wherever each decoder left it)."""
    rng = random.Random(11)
    enc = hpack.Encoder()
    for trial in range(200):
        blocks = []
        for _ in range(6):
            raw = bytearray(enc.encode([(":path", f"/{trial}"), ("x-k", "v" * trial)]))
            if rng.random() < 0.5 and raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            if rng.random() < 0.3:
                raw = raw[: rng.randrange(len(raw) + 1)]
            blocks.append(bytes(raw))
        ours, ref = _ours(blocks), _hpack_reference(blocks)
        # After an error the two tables may hold different partial results: compare
        # up to and including the first error.
        stop = next((i for i, r in enumerate(ref) if r == "error"), len(ref) - 1)
        assert ours[: stop + 1] == ref[: stop + 1]


def test_decoder_locates_literal_values() -> None:
    block = hpack.Encoder().encode(
        [(":method", "GET"), ("authorization", "Bearer x"), ("x-new", "vv")], huffman=False
    )
    decoded = HpackDecoder().decode(block)
    assert [lit[0] for lit in decoded.literals] == [1, 2]  # field 0 is indexed
    for position, _, h_pos, start, end in decoded.literals:
        assert block[start:end] == decoded.fields[position][1] and not block[h_pos] & 0x80


def test_decoder_limits() -> None:
    dec = HpackDecoder()
    update = hpack.hpack.encode_integer(MAX_TABLE_SIZE + 1, 5)
    update[0] |= 0x20
    with pytest.raises(HPACKError):  # a table size above the limit
        dec.decode(bytes(update))
    with pytest.raises(HPACKError):  # a size update after a field
        dec.decode(b"\x82\x20")
    with pytest.raises(HPACKError):  # index 0
        dec.decode(b"\x80")
    small = HpackDecoder(max_header_list=40)
    with pytest.raises(HPACKError):
        small.decode(hpack.Encoder().encode([("x-a", "1" * 20)]))


# The decoder is C (agent/l7/_hpack.c): the tests below hold it to hpack's decoder on
# what encoders make and on what they never would.


def _random_fields(rng: random.Random) -> list[tuple[str, str]]:
    names = [":path", ":status", "authorization", "cookie", "te", "x-a", "x-" + "n" * 70]
    values = ["", "a", "/p?token=1", "é\xff", "v" * rng.randrange(400)]
    fields = []
    for _ in range(rng.randrange(0, 7)):
        name, value = rng.choice(names), rng.choice(values)
        never = rng.random() < 0.2
        fields.append(hpack.NeverIndexedHeaderTuple(name, value) if never else (name, value))
    return fields


def _damaged(rng: random.Random, raw: bytes) -> bytes:
    """`raw` truncated, with a bit flipped, replaced by garbage, or behind an integer
    longer than HPACK allows -- or as it was."""
    out = bytearray(raw)
    r = rng.random()
    if r < 0.2 and out:
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif r < 0.3:
        out = out[: rng.randrange(len(out) + 1)]
    elif r < 0.35:
        out = bytearray(rng.randbytes(rng.randrange(40)))
    elif r < 0.38:
        out[:0] = b"\x7f\xff\xff\xff\xff\xff\x7f"[: rng.randrange(1, 8)]
    return bytes(out)


def test_decoder_fails_as_hpack_does_on_damaged_and_garbage_blocks() -> None:
    """Random header lists through hpack's encoder (Huffman or not, the dynamic table,
    size updates), then damaged: block for block up to the first failure, the same
    fields and dynamic table, or an error of the same kind (hpack raises our class or
    its subclass, e.g. InvalidTableIndex for InvalidTableIndexError)."""
    rng = random.Random(23)
    failures = 0
    for _ in range(1500):
        enc = hpack.Encoder()
        ours, ref = HpackDecoder(), hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        ref.max_allowed_table_size = MAX_TABLE_SIZE
        for _ in range(rng.randrange(1, 8)):
            if rng.random() < 0.1:
                enc.header_table_size = rng.choice([0, 64, 4096])
            raw = _damaged(rng, enc.encode(_random_fields(rng), huffman=rng.random() < 0.5))
            try:
                expected = [(bytes(n), bytes(v)) for n, v in ref.decode(raw, raw=True)]
            except HPACKError as exc:
                with pytest.raises(HPACKError) as caught:
                    ours.decode(raw)
                assert isinstance(exc, type(caught.value))
                failures += 1
                break  # past a failure the two tables may hold different partial results
            assert ours.decode(raw).fields == expected
            assert ours.table == list(ref.header_table.dynamic_entries)
    assert failures > 300  # the damage did reach the decoder


def test_decoder_literal_positions_on_random_blocks() -> None:
    """Each literal's value string is where the decoder says: its H bit's byte, then
    the string, which decodes (Huffman or not) to the field's value."""
    rng = random.Random(29)
    enc = hpack.Encoder()
    dec = HpackDecoder()
    for _ in range(400):
        raw = enc.encode(_random_fields(rng), huffman=rng.random() < 0.5)
        block = dec.decode(raw)
        for position, _index, h_pos, start, end in block.literals:
            assert h_pos < start <= end <= len(raw)
            string = raw[start:end]
            huffman = raw[h_pos] & 0x80 and string
            value = hpack.huffman_table.decode_huffman(string) if huffman else string
            assert value == block.fields[position][1]


@pytest.mark.parametrize("seed", range(3))
def test_text_fields_decode_like_bytes_decode(seed: int) -> None:
    rng = random.Random(seed)
    fields = [
        (rng.randbytes(rng.randrange(12)), rng.randbytes(rng.randrange(40))) for _ in range(200)
    ]
    fields += [(b"caf\xc3\xa9", b"\xff\xfe ok"), (b"", b"")]
    expected = [(n.decode("utf-8", "replace"), v.decode("utf-8", "replace")) for n, v in fields]
    assert text_fields(fields) == expected
    with pytest.raises(TypeError):
        text_fields([("str", b"bytes")])
