"""HTTP/2 header masking on real h2/hpack streams: same length, still decodable,
secrets gone (plain and Huffman-coded), independent of how the stream is split,
fail closed on anything it cannot follow."""

from __future__ import annotations

import itertools
import random

import h2.config
import h2.connection
import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.redact.http2_masker import PREFACE, Http2HeaderMasker
from agent.redact.rules import DEFAULT_HEADERS

AUTH = b"Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.s1gnatureXYZ"
COOKIE = b"session=0123456789abcdefghijklmnopqrstuvwxyzSECRET"
KEYS = [b"key-AAAA-1111-first-api-key-value", b"key-BBBB-2222-second-api-key-value"]
SET_COOKIE = b"sid=s3rv3r-s1d3-s3ss10n-t0k3n; Path=/; HttpOnly"
SECRETS = [AUTH, COOKIE, *KEYS, SET_COOKIE]
SENSITIVE = {n.encode() for n in DEFAULT_HEADERS}


def huff(value: bytes) -> bytes:
    return HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(value)


def request(i: int, **extra: str) -> list[tuple[str, str]]:
    headers = [(":method", "GET"), (":path", f"/r/{i}"), (":scheme", "https")]
    headers += [(":authority", "api.example"), ("authorization", AUTH.decode())]
    headers += [("cookie", COOKIE.decode()), ("x-api-key", KEYS[i % 2].decode())]
    return [*headers, ("user-agent", "test/1.0"), *extra.items()]


def client_stream(n: int = 3, **extra: str) -> tuple[h2.connection.H2Connection, bytes]:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    for i in range(n):
        c.send_headers(c.get_next_available_stream_id(), request(i, **extra), end_stream=True)
    return c, c.data_to_send()


def server_stream(client_bytes: bytes) -> bytes:
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    s.initiate_connection()
    s.receive_data(client_bytes)
    push = [(":method", "GET"), (":path", "/pushed"), (":scheme", "https")]
    push += [(":authority", "api.example"), ("cookie", COOKIE.decode())]
    s.push_stream(1, 2, push)
    for sid in (1, 3):
        s.send_headers(sid, [(":status", "200"), ("set-cookie", SET_COOKIE.decode())])
        s.send_data(sid, b"body bytes")
        s.send_headers(
            sid, [("x-api-key", KEYS[1].decode()), ("grpc-status", "0")], end_stream=True
        )
    return s.data_to_send()


def frames(stream: bytes, preface: bool) -> list[tuple[int, int, bytes]]:
    i = len(PREFACE) if preface else 0
    out = []
    while i < len(stream):
        length = int.from_bytes(stream[i : i + 3], "big")
        out.append((stream[i + 3], stream[i + 4], stream[i + 9 : i + 9 + length]))
        i += 9 + length
    assert i == len(stream)
    return out


def header_blocks(stream: bytes, preface: bool) -> list[bytes]:
    blocks, cur = [], bytearray()
    for ftype, flags, payload in frames(stream, preface):
        if ftype in (1, 5):
            start, pad = (1, payload[0]) if flags & 0x8 else (0, 0)
            start += 5 if ftype == 1 and flags & 0x20 else 4 if ftype == 5 else 0
            cur = bytearray(payload[start : len(payload) - pad])
        elif ftype == 9:
            cur += payload
        else:
            continue
        if flags & 0x4:
            blocks.append(bytes(cur))
    return blocks


def decode(stream: bytes, preface: bool) -> list[list[tuple[bytes, bytes]]]:
    """What a fresh decoder (Wireshark, say) makes of the stream's header blocks."""
    d = hpack.Decoder()
    return [
        [(bytes(n), bytes(v)) for n, v in d.decode(b, raw=True)]
        for b in header_blocks(stream, preface)
    ]


def mask(stream: bytes, preface: bool, cuts: list[int] = (), **kw) -> tuple[bytes, set[str]]:  # type: ignore[assignment]
    m = Http2HeaderMasker(kw.pop("names", DEFAULT_HEADERS), preface, **kw)
    out, hits, prev = bytearray(), set(), 0
    for cut in [*sorted(cuts), len(stream)]:
        data, h = m.feed(stream[prev:cut])
        out += data
        hits |= h
        prev = cut
    data, h = m.flush()
    assert m.held == 0
    return bytes(out + data), hits | h


def check_masked(original: bytes, masked: bytes, preface: bool) -> None:
    assert len(masked) == len(original)
    assert any(huff(secret) in original for secret in SECRETS)  # the check below means something
    for secret in SECRETS:
        assert secret not in masked
        assert huff(secret) not in masked
    before, after = decode(original, preface), decode(masked, preface)
    assert len(before) == len(after)
    for block_in, block_out in zip(before, after, strict=True):
        assert [n for n, _ in block_in] == [n for n, _ in block_out]
        for (name, value), (_, shown) in zip(block_in, block_out, strict=True):
            if name in SENSITIVE:
                assert shown == b"*" * len(shown) and shown and value != shown
            else:
                assert shown == value


def test_client_requests_are_masked_and_still_decode() -> None:
    _, stream = client_stream(3)
    masked, hits = mask(stream, preface=True)
    check_masked(stream, masked, preface=True)
    assert hits == {"header:authorization", "header:cookie", "header:x-api-key"}
    # A real HTTP/2 server accepts the masked stream as it is.
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    events = server.receive_data(masked)
    got = [dict(e.headers) for e in events if isinstance(e, h2.events.RequestReceived)]
    assert len(got) == 3
    assert all(g[b"authorization"].strip(b"*") == b"" for g in got)
    assert got[2][b":path"] == b"/r/2"


def test_later_requests_reference_the_dynamic_table() -> None:
    _, stream = client_stream(3)
    masked, _ = mask(stream, preface=True)
    blocks = header_blocks(masked, preface=True)
    # On its own, request 2 cannot decode: it indexes entries request 1 added
    # (the cookie, x-api-key's name) -- and in sequence they decode, masked.
    with pytest.raises(hpack.HPACKDecodingError):
        hpack.Decoder().decode(blocks[1])
    assert len(blocks[1]) < len(blocks[0])
    decoded = decode(masked, preface=True)
    assert dict(decoded[1])[b"x-api-key"].strip(b"*") == b""


def test_server_side_with_push_promise_and_trailers() -> None:
    _, client = client_stream(2)
    stream = server_stream(client)
    masked, hits = mask(stream, preface=False)
    check_masked(stream, masked, preface=False)
    assert {"header:set-cookie", "header:cookie", "header:x-api-key"} <= hits
    assert b"body bytes" in masked


def test_large_header_block_in_continuation_frames() -> None:
    big = "v" * 40000
    _, stream = client_stream(2, **{"x-big": big})
    assert 9 in {f[0] for f in frames(stream, True)}  # CONTINUATION frames were used
    masked, _ = mask(stream, preface=True)
    check_masked(stream, masked, preface=True)
    masked2, _ = mask(stream, preface=True, cuts=list(range(0, len(stream), 997)))
    assert masked2 == masked


def crafted(block: bytes, cuts: list[int], padded: bool = False, priority: bool = False) -> bytes:
    """A header block as HEADERS + CONTINUATION frames split at `cuts`."""
    edges = [0, *cuts, len(block)]
    pieces = [block[a:b] for a, b in itertools.pairwise(edges)]
    first = HeadersFrame(1, data=pieces[0])
    if padded:
        first.flags.add("PADDED")
        first.pad_length = 3
    if priority:
        first.flags.add("PRIORITY")
        first.depends_on, first.stream_weight = 0, 15
    out = [first] + [ContinuationFrame(1, data=p) for p in pieces[1:]]
    out[-1].flags.add("END_HEADERS")
    tail = DataFrame(1, data=b"after", flags=["END_STREAM"])
    return b"".join(f.serialize() for f in [*out, tail])


@pytest.mark.parametrize(("padded", "priority"), [(False, False), (True, True)])
def test_strings_split_across_continuation_frames_at_every_position(padded, priority) -> None:
    enc = hpack.Encoder()
    enc.encode([("x-api-key", KEYS[0])])  # x-api-key's name now in the dynamic table
    headers = [(":method", "POST"), ("cookie", COOKIE), ("x-api-key", KEYS[1]), ("a", "b")]
    block = enc.encode(headers, huffman=True)
    prelude = crafted(hpack.Encoder().encode([("x-api-key", KEYS[0])]), [])
    for cut in range(1, len(block)):
        stream = prelude + crafted(block, [cut], padded, priority)
        masked, hits = mask(stream, preface=False)
        check_masked(stream, masked, preface=False)
        assert hits == {"header:cookie", "header:x-api-key"}
        assert masked == mask(stream, preface=False, cuts=[cut + 20, cut + 30])[0]


def test_every_split_point_gives_the_same_output() -> None:
    _, stream = client_stream(2)
    whole, _ = mask(stream, preface=True)
    for cut in range(len(stream) + 1):
        assert mask(stream, preface=True, cuts=[cut])[0] == whole
    assert mask(stream, preface=True, cuts=list(range(len(stream))))[0] == whole


def test_header_block_is_held_until_complete() -> None:
    _, stream = client_stream(1)
    start = len(PREFACE)
    for ftype, _, payload in frames(stream, True):
        if ftype == 1:
            break
        start += 9 + len(payload)
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=True)
    out, _ = m.feed(stream[: start + 20])
    assert out == stream[: start + 9]  # frame headers carry no secret: never held back
    assert m.held == 11
    rest, hits = m.feed(stream[start + 20 :])
    assert len(out + rest) == len(stream) and m.held == 0 and hits


def test_flush_wipes_an_incomplete_block_and_the_rest_of_it() -> None:
    enc = hpack.Encoder()
    block = enc.encode([(":method", "GET"), ("authorization", AUTH)], huffman=True)
    stream = crafted(block, [5])
    cont_at = 9 + 5
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False)
    out, _ = m.feed(stream[:cont_at])
    assert out == stream[:9]
    flushed, hits = m.flush()
    assert hits == {"http2:incomplete-header-block"}
    assert flushed == bytes(5)
    later, hits = m.feed(stream[cont_at:])
    assert len(later) == len(stream) - cont_at and AUTH not in later and huff(AUTH) not in later
    assert hits == {"http2:incomplete-header-block"}
    assert later.endswith(DataFrame(1, data=b"after", flags=["END_STREAM"]).serialize())


def test_max_hold_forces_a_big_block_out_wiped() -> None:
    _, stream = client_stream(1, **{"x-big": "v" * 3000})
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=True, max_hold=512)
    out, hits = bytearray(), set()
    for off in range(0, len(stream), 100):
        data, h = m.feed(stream[off : off + 100])
        out += data
        hits |= h
        assert m.held <= 512
    assert len(out) == len(stream) and m.flush() == (b"", set())
    assert "http2:incomplete-header-block" in hits
    assert AUTH not in out and huff(AUTH) not in out


def test_another_frame_inside_a_header_block_ends_it_wiped() -> None:
    block = hpack.Encoder().encode([("cookie", COOKIE)], huffman=True)
    headers = HeadersFrame(1, data=block[:4]).serialize()
    data = DataFrame(1, data=b"interleaved").serialize()
    cont = ContinuationFrame(1, data=block[4:], flags=["END_HEADERS"]).serialize()
    masked, hits = mask(headers + data + cont, preface=False)
    assert masked == headers[:9] + bytes(4) + data + cont[:9] + bytes(len(block) - 4)
    assert hits == {"http2:incomplete-header-block", "http2:undecodable-header-block"}


def test_undecodable_block_is_wiped_and_table_distrusted() -> None:
    enc = hpack.Encoder()
    first = enc.encode([("x-custom", "one")], huffman=False)  # dynamic entry 62
    second = enc.encode([("x-custom", "two-secret")], huffman=False)  # name from entry 62
    bad = HeadersFrame(1, data=b"\xff\xff\xff\xff\xff\x7f", flags=["END_HEADERS"]).serialize()
    stream = crafted(first, []) + bad + crafted(second, [])
    masked, hits = mask(stream, preface=False)
    assert len(masked) == len(stream)
    assert b"two-secret" not in masked and b"one" in masked
    assert hits == {"http2:undecodable-header-block", "http2:unknown-header-name"}


def test_gap_inside_a_data_frame_keeps_sync_other_gaps_desync() -> None:
    block = hpack.Encoder().encode([("cookie", COOKIE)], huffman=True)
    data = DataFrame(1, data=b"x" * 100).serialize()
    stream = data + crafted(block, [])
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False)
    out, _ = m.feed(stream[:30])
    m.gap(50)
    rest, hits = m.feed(stream[80:])
    assert hits == {"header:cookie"}
    assert out + stream[30:80] + rest == mask(stream, preface=False)[0]
    assert decode(out + stream[30:80] + rest, False) == [[(b"cookie", b"*" * len(huff(COOKIE)))]]
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False)
    out, _ = m.feed(stream[:30])
    m.gap(100)  # runs past the DATA frame: no idea where frames are
    rest, hits = m.feed(stream[130:])
    assert rest == bytes(len(stream) - 130) and hits == {"http2:desync"}


def test_gap_during_a_header_block_wipes_what_was_held() -> None:
    block = hpack.Encoder().encode([("authorization", AUTH)], huffman=True)
    stream = crafted(block, [10])
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False)
    assert m.feed(stream[:15]) == (stream[:9], set())
    m.gap(3)
    assert m.held == 6
    out, hits = m.feed(stream[18:])
    # The record goes on with whole frames (CONTINUATION, DATA): framing is picked
    # up at the first of them; the byte before it and the block fragment it carries
    # (the HPACK state is gone with the gap) are zeroed, the DATA frame passes.
    cont = 9 + 10  # after the HEADERS frame and its 10 fragment bytes
    rest = len(block) - 10
    assert out == (
        bytes(6 + cont - 18) + stream[cont : cont + 9] + bytes(rest) + stream[cont + 9 + rest :]
    )
    assert hits == {
        "http2:incomplete-header-block",
        "http2:desync",
        "http2:hpack-state-unknown",
    }


def test_wrong_preface_desyncs() -> None:
    masked, hits = mask(b"GET / HTTP/1.1\r\n\r\n", preface=True)
    assert masked == bytes(18) and hits == {"http2:desync"}
    masked, hits = mask(PREFACE[:10] + b"X" * 10, preface=True)
    assert masked == PREFACE[:10] + bytes(10)


def test_table_size_updates_decode_one_instruction_at_a_time() -> None:
    enc = hpack.Encoder()
    enc.header_table_size = 256
    b1 = enc.encode([("cookie", COOKIE), ("x-api-key", KEYS[0])])
    enc.header_table_size = 0  # empties the table; later literals index again
    enc.header_table_size = 4096
    b2 = enc.encode([("cookie", COOKIE), ("x-api-key", KEYS[1]), ("x-api-key", KEYS[0])])
    assert b1[0] & 0xE0 == 0x20 and b2[0] & 0xE0 == 0x20 and b2[1] & 0xE0 == 0x20
    stream = crafted(b1, [3]) + crafted(b2, [])
    masked, hits = mask(stream, preface=False)
    check_masked(stream, masked, preface=False)
    assert hits == {"header:cookie", "header:x-api-key"}


def test_no_names_passes_everything() -> None:
    _, stream = client_stream(1)
    m = Http2HeaderMasker(frozenset(), preface=True)
    m.gap(5)
    assert m.feed(stream) == (stream, set()) and m.held == 0


# -- fuzzing -----------------------------------------------------------------


def _valid_stream() -> tuple[bytes, bytes]:
    _, stream = client_stream(2, **{"x-big": "w" * 300})
    return stream, server_stream(stream)


VALID_CLIENT, VALID_SERVER = _valid_stream()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cuts(rnd: random.Random, n: int) -> list[int]:
    return sorted(rnd.randrange(n + 1) for _ in range(rnd.randrange(1, 12)))


@FUZZ
@given(seed=st.integers(0, 2**32), server=st.booleans())
def test_random_splits_of_valid_streams_agree(seed: int, server: bool) -> None:
    stream, preface = (VALID_SERVER, False) if server else (VALID_CLIENT, True)
    rnd = random.Random(seed)
    whole, hits = mask(stream, preface)
    assert mask(stream, preface, _cuts(rnd, len(stream))) == (whole, hits)
    check_masked(stream, whole, preface)


@FUZZ
@given(data=st.binary(max_size=600), preface=st.booleans(), seed=st.integers(0, 2**32))
def test_random_bytes_never_raise(data: bytes, preface: bool, seed: int) -> None:
    whole, hits = mask(data, preface)
    assert len(whole) == len(data)
    cut, cut_hits = mask(data, preface, _cuts(random.Random(seed), len(data)))
    assert len(cut) == len(data)
    if "http2:desync" not in hits | cut_hits:  # framing is picked up at record starts
        assert cut == whole


@FUZZ
@given(seed=st.integers(0, 2**32), server=st.booleans(), max_hold=st.sampled_from([64, 1 << 20]))
def test_mutated_streams_never_raise(seed: int, server: bool, max_hold: int) -> None:
    rnd = random.Random(seed)
    stream = bytearray(VALID_SERVER if server else VALID_CLIENT)
    for _ in range(rnd.randrange(1, 6)):
        i = rnd.randrange(len(stream))
        if rnd.random() < 0.7:
            stream[i] = rnd.randrange(256)
        else:
            del stream[i : i + rnd.randrange(1, 40)]
    data = bytes(stream)
    whole, hits = mask(data, not server, max_hold=max_hold)
    assert len(whole) == len(data)
    cut, cut_hits = mask(data, not server, _cuts(rnd, len(data)), max_hold=max_hold)
    assert len(cut) == len(data)
    if "http2:desync" not in hits | cut_hits:  # framing is picked up at record starts
        assert cut == whole
    m = Http2HeaderMasker(DEFAULT_HEADERS, not server)
    out, _ = m.feed(data[: len(data) // 2])
    m.gap(rnd.randrange(0, 50))
    out += m.feed(data[len(data) // 2 :])[0] + m.flush()[0]
    assert len(out) == len(data)
