"""HTTP/1 header masking: values masked at the same length, whatever the chunking,
checked against a simple whole-stream reference."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from agent.redact._stream_masker import StreamMasker
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.redact.http1_masker import Http1HeaderMasker
from agent.redact.rules import DEFAULT_HEADERS, DEFAULT_QUERY_PARAMS, mask_query_values

REQUEST = (
    b"POST /login HTTP/1.1\r\n"
    b"Host: api.example\r\n"
    b"Authorization: Bearer s3cr3t-t0k3n\r\n"
    b"COOKIE:  a=1; b=2\r\n"
    b"X-Api-Key\t :\tkey-123\r\n"
    b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
    b"X-Authorization-Not: visible\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
    b"hello"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Set-Cookie: sid=abc; HttpOnly\r\n"
    b"Set-Cookie: other=def\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
)


def masked_whole(data: bytes, names: frozenset[str] = DEFAULT_HEADERS) -> tuple[bytes, set[str]]:
    return Http1HeaderMasker(names).feed(data)


def masked_split(data: bytes, cuts: list[int], names=DEFAULT_HEADERS) -> tuple[bytes, set[str]]:
    m = Http1HeaderMasker(names)
    out, hits, prev = bytearray(), set(), 0
    for cut in [*sorted(cuts), len(data)]:
        chunk, h = m.feed(data[prev:cut])
        assert len(chunk) == cut - prev
        out += chunk
        hits |= h
        prev = cut
    return bytes(out), hits


def reference(data: bytes, names: frozenset[str] = DEFAULT_HEADERS) -> bytes:
    """The same rules, line by line over the whole stream."""
    alternatives = b"|".join(re.escape(n.encode()) for n in names)
    start = re.compile(rb"(?i)(?:" + alternatives + rb")[ \t]*:[ \t]*")
    out, folding = [], False
    for line in data.split(b"\n"):
        m = start.match(line)
        if folding and line[:1] in (b" ", b"\t"):
            keep = len(line) - len(line.lstrip(b" \t"))
        elif m:
            keep = m.end()
        else:
            out.append(line)
            folding = False
            continue
        folding = True
        value = bytes(b if b == 0x0D else 0x2A for b in line[keep:])
        out.append(line[:keep] + value)
    return b"\n".join(out)


def test_request_headers_masked() -> None:
    out, hits = masked_whole(REQUEST)
    assert len(out) == len(REQUEST)
    assert b"Authorization: " + b"*" * len(b"Bearer s3cr3t-t0k3n") + b"\r\n" in out
    assert b"COOKIE:  " + b"*" * len(b"a=1; b=2") + b"\r\n" in out
    assert b"X-Api-Key\t :\t" + b"*" * len(b"key-123") + b"\r\n" in out
    assert b"Proxy-Authorization: " + b"*" * len(b"Basic dXNlcjpwYXNz") + b"\r\n" in out
    assert b"X-Authorization-Not: visible\r\n" in out
    assert b"Host: api.example\r\n" in out and out.endswith(b"\r\n\r\nhello")
    assert hits == {
        "header:authorization",
        "header:cookie",
        "header:x-api-key",
        "header:proxy-authorization",
    }
    assert out == reference(REQUEST)


def test_response_set_cookie_masked() -> None:
    out, hits = masked_whole(RESPONSE)
    assert out.count(b"Set-Cookie: ") == 2 and b"sid=" not in out and b"other" not in out
    assert hits == {"header:set-cookie"}


def test_obs_fold_continuation_lines_are_masked() -> None:
    data = b"Authorization: Bearer\r\n  part-two\r\n\tpart-three\r\nX-Other: kept\r\n kept-fold\r\n"
    out, _ = masked_whole(data)
    assert out == (
        b"Authorization: ******\r\n  ********\r\n\t**********\r\nX-Other: kept\r\n kept-fold\r\n"
    )


def test_bare_lf_bare_cr_and_empty_values() -> None:
    data = b"cookie: a\rb\nauthorization:\r\n secret-fold\nx: y\n"
    out, _ = masked_whole(data)
    assert out == b"cookie: *\r*\nauthorization:\r\n ***********\nx: y\n"


def test_over_redaction_of_a_body_line_is_accepted() -> None:
    out, _ = masked_whole(b"\r\n\r\nbody line\ncookie: in the body\n")
    assert out.endswith(b"cookie: ***********\n")


def test_configured_names_only() -> None:
    names = frozenset({"x-secret"})
    out, hits = masked_whole(b"Authorization: visible\r\nX-Secret: hidden\r\n", names)
    assert out == b"Authorization: visible\r\nX-Secret: ******\r\n"
    assert hits == {"header:x-secret"}
    assert masked_whole(REQUEST, frozenset()) == (REQUEST, set())


def test_every_split_point_and_every_pair() -> None:
    for data in (REQUEST, RESPONSE):
        whole, hits = masked_whole(data)
        for cut in range(len(data) + 1):
            assert masked_split(data, [cut]) == (whole, hits)
        assert masked_split(data, list(range(len(data)))) == (whole, hits)
    short = b"Cookie :\t x\r\n folded\r\nauthorization: y\r\n"
    whole, _ = masked_whole(short)
    for a, b in itertools.combinations(range(len(short) + 1), 2):
        assert masked_split(short, [a, b])[0] == whole


def test_gap_in_an_uninteresting_line_skips_to_the_next_line() -> None:
    m = Http1HeaderMasker(DEFAULT_HEADERS)
    assert m.feed(b"X-Other: abc")[0] == b"X-Other: abc"
    m.gap()
    # "cookie: x" here is mid-line after the gap: not a header start.
    assert m.feed(b"cookie: x\r\ncookie: y\r\n")[0] == b"cookie: x\r\ncookie: *\r\n"


def test_gap_in_a_value_keeps_masking_to_the_end_of_the_line() -> None:
    m = Http1HeaderMasker(DEFAULT_HEADERS)
    assert m.feed(b"Cookie: abc")[0] == b"Cookie: ***"
    m.gap()
    assert m.feed(b"def\r\nHost: h\r\n")[0] == b"***\r\nHost: h\r\n"
    m = Http1HeaderMasker(DEFAULT_HEADERS)
    m.feed(b"Cookie: abc\r\n")
    m.gap()  # a fold line may have begun in the gap
    assert m.feed(b"def\r\nHost: h\r\n")[0] == b"***\r\nHost: h\r\n"


def test_gap_during_a_name_forgets_it() -> None:
    m = Http1HeaderMasker(DEFAULT_HEADERS)
    m.feed(b"Autho")
    m.gap()
    assert m.feed(b"rization: x\r\n")[0] == b"rization: x\r\n"


def test_long_whitespace_before_the_colon_across_chunks() -> None:
    data = b"Cookie" + b" " * 5000 + b":  v1\r\n"
    assert masked_split(data, [3, 6, 100, 4000, 5006])[0] == data[:-4] + b"**\r\n"


def test_throughput_on_a_large_body_is_reasonable() -> None:
    rnd = random.Random(3)
    body = bytes(rnd.choice(b"abcdefgh ijk\n") for _ in range(1 << 20))
    out, hits = masked_split(REQUEST + body, list(range(0, len(body), 16384)))
    assert len(out) == len(REQUEST) + len(body) and hits


# -- fuzzing -----------------------------------------------------------------

TOKENS = [b"Authorization", b"cookie", b"Set-Cookie", b"X-API-KEY", b"host", b":", b" ", b"\t"]
TOKENS += [b"\r", b"\n", b"\r\n", b"value", b"auth", b"x", b"*", b"\x00\xff"]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(TOKENS), max_size=60), seed=st.integers(0, 2**32))
def test_random_streams_match_the_reference_however_split(parts: list[bytes], seed: int) -> None:
    data = b"".join(parts)
    rnd = random.Random(seed)
    cuts = [rnd.randrange(len(data) + 1) for _ in range(rnd.randrange(6))]
    out, _ = masked_split(data, cuts)
    assert out == reference(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), seed=st.integers(0, 2**32))
def test_random_bytes_keep_length_and_split_independence(data: bytes, seed: int) -> None:
    rnd = random.Random(seed)
    cuts = [rnd.randrange(len(data) + 1) for _ in range(rnd.randrange(6))]
    out, _ = masked_split(data, cuts)
    assert out == masked_whole(data)[0] == reference(data)


def test_a_long_last_line_then_a_header_split_at_every_point() -> None:
    """The chunk's last line is only tested at its start (not searched through): a
    long body line, then lines cut anywhere, still match the reference."""
    body = b"x" * 300 + b"Authorization is not a header here"
    data = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" + body + b"\nCookie \t: a=1\r\n \tfold\r\n"
    )
    for cut in range(len(data) + 1):
        assert masked_split(data, [cut])[0] == reference(data)


def test_chunk_ending_in_a_name_and_whitespace_after_a_long_line() -> None:
    m = Http1HeaderMasker(DEFAULT_HEADERS)
    first, _ = m.feed(b"y" * 100 + b"\nSet-Cookie \t ")
    second, hits = m.feed(b": sid=1\r\nok")
    assert first == b"y" * 100 + b"\nSet-Cookie \t "
    assert second == b": *****\r\nok"
    assert hits == {"header:set-cookie"}


def test_maskers_of_one_set_of_names_keep_their_own_state() -> None:
    a, b = Http1HeaderMasker(DEFAULT_HEADERS), Http1HeaderMasker(set(DEFAULT_HEADERS))
    assert a.feed(b"Cookie: x")[0] == b"Cookie: *"
    assert b.feed(b"more\r\n")[0] == b"more\r\n"  # b is at a line start, not in a value
    assert a.feed(b"yz\r\n")[0] == b"**\r\n"


# -- query parameters, and the C type under the masker --------------------------------

QUERY_TOKENS = [b"?", b"&", b";", b"=", b"#", b"'", b" ", b"\n", b"a", b"b", b"token",
                b"Access_Token", b"sig", b"X-Amz-Signature", b"passwd", b"password",
                b"id_token", b"xtoken"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(QUERY_TOKENS), max_size=60), seed=st.integers(0, 2**32))
def test_query_values_however_split_match_the_whole_stream(parts: list[bytes], seed: int) -> None:
    """A name in one record and its "=" or value in the next (the masker keeps the
    stream's tail), a value cut by a record's end: the same bytes and rules as the
    one-shot mask_query_values over the whole stream."""
    data = b"".join(parts)
    rnd = random.Random(seed)
    cuts = sorted(rnd.randrange(len(data) + 1) for _ in range(rnd.randrange(8)))
    m = Http1HeaderMasker(frozenset(), DEFAULT_QUERY_PARAMS)
    out, hits, prev = bytearray(), set(), 0
    for cut in [*cuts, len(data)]:
        chunk, h = m.feed(data[prev:cut])
        out += chunk
        hits |= h
        prev = cut
    assert (bytes(out), hits) == mask_query_values(data, DEFAULT_QUERY_PARAMS)


def test_query_value_cut_by_a_gap_is_masked_to_its_end() -> None:
    m = Http1HeaderMasker(frozenset(), DEFAULT_QUERY_PARAMS)
    assert m.feed(b"GET /?access_token=abc") == (
        b"GET /?access_token=***",
        {"query:access_token"},
    )
    m.gap(100)  # fail closed: the value may go on after the hole
    assert m.feed(b"def&x=1 HTTP/1.1") == (b"***&x=1 HTTP/1.1", {"query:access_token"})
    m.gap()  # the name before a hole is forgotten: "token" + "=abc" is no match
    assert m.feed(b"&token")[0] == b"&token"
    m.gap()
    assert m.feed(b"=abc")[0] == b"=abc"


def test_a_one_byte_chunk_masked_leaves_the_shared_byte_alone() -> None:
    """CPython shares one object per one-byte bytes value: the masker copies before
    it writes, or every b"a" in the process would become b"*"."""
    m = Http1HeaderMasker(DEFAULT_HEADERS)
    m.feed(b"Cookie: ")
    chunk = b"xa"[1:]
    assert m.feed(chunk) == (b"*", {"header:cookie"})
    assert chunk == b"a" and bytes([0x61]) == b"a"


def test_buffers_other_than_bytes_give_bytes() -> None:
    for kind in (bytearray, memoryview):
        out, hits = Http1HeaderMasker(DEFAULT_HEADERS, DEFAULT_QUERY_PARAMS).feed(
            kind(b"Cookie: a\r\nGET /?sig=1 x")
        )
        assert type(out) is bytes and out == b"Cookie: *\r\nGET /?sig=* x"
        assert hits == {"header:cookie", "query:sig"}
    unchanged = b"Host: example\r\n"
    assert Http1HeaderMasker(DEFAULT_HEADERS).feed(unchanged)[0] is unchanged


def test_stream_masker_refuses_names_it_cannot_match() -> None:
    for bad in ((b"Cookie",), (b"a b",), (b"x:y",), (b"",), ("cookie",)):
        with pytest.raises((ValueError, TypeError)):
            StreamMasker(bad, (), ("header:x", "mid"))
    with pytest.raises(ValueError):
        StreamMasker((b"cookie",), (), ("header:cookie",))  # the mid-stream rule missing


def test_binary_chunks_of_every_size_keep_their_length() -> None:
    rnd = random.Random(5)
    m = Http1HeaderMasker(DEFAULT_HEADERS, DEFAULT_QUERY_PARAMS)
    for size in (0, 1, 2, 15, 16, 17, 4095, 4096, 4097, 70000):
        data = rnd.randbytes(size)
        out, _ = m.feed(data)
        assert len(out) == size


def test_names_and_line_ends_around_sixteen_byte_steps() -> None:
    """A line's first word is searched for its end 16 bytes a step: names of 15, 16, 17
    and 32 bytes, ended by each of ":", SP, HT, CR and LF at and around a step's edge,
    in any case, and split anywhere between two chunks, mask as byte by byte."""
    names = frozenset({"a" * 15, "b" * 16, "c" * 17, "d" * 32, "x-api-key"})
    lines = []
    for name in sorted(names):
        for end in (b": v1\r\n", b" : v2\r\n", b"\t: v3\r\n", b"\r\n", b"\n"):
            lines += [name.encode() + end, name.upper().encode() + end]
        lines.append(name.encode() + b"z: not-this\r\n")  # longer: another name
        lines.append(name.encode()[:-1] + b": nor-this\r\n")  # shorter
    data = b"".join(lines)
    whole, hits = masked_whole(data, names)
    assert b"v1" not in whole and b"v2" not in whole and b"v3" not in whole
    assert whole.count(b"not-this") == 5 and whole.count(b"nor-this") == 5
    assert len(whole) == len(data) and hits
    for cut in range(0, len(data), 7):
        masker = Http1HeaderMasker(names)
        first, h1 = masker.feed(data[:cut])
        second, h2 = masker.feed(data[cut:])
        assert first + second == whole and h1 | h2 == hits
