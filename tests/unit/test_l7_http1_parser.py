"""The C framing parser under agent.l7.http1 (agent.l7._http1.Http1Stream), alone."""

from __future__ import annotations

import pytest
from agent.l7._http1 import END, ERROR, HEAD, MAX_HEAD, MESSAGE, NEED, Http1Stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

Event = tuple[int, object]


def run(parser: Http1Stream, chunks: list[bytes], ts: int = 7) -> list[Event]:
    """Every event of feeding `chunks` in turn (NEED left out); stops at an error."""
    out: list[Event] = []
    for data in chunks:
        pos = 0
        while True:
            event, pos, value = parser.feed(data, pos, ts)
            assert 0 <= pos <= len(data)
            if event == NEED:
                assert pos == len(data)
                break
            out.append((event, value))
            if event == ERROR:
                return out
    return out


def requests(chunks: list[bytes], body_limit: int = 4096) -> list[Event]:
    return run(Http1Stream(False, body_limit), chunks)


def responses(chunks: list[bytes], body_limit: int = 4096) -> list[Event]:
    return run(Http1Stream(True, body_limit), chunks)


def splits(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(1, len(data))]


GET = b"GET /api/users?x=1 HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\n\r\n"
GET_HEAD = (7, "GET", "/api/users?x=1", "1.1", [("host", "api.example.com"), ("accept", "*/*")])
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
OK_HEAD = (7, 200, "OK", "1.1", [("content-type", "text/plain"), ("content-length", "5")])
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"5;name=value;x\r\nhello\r\n"
    b"A ; ext\r\n, world!!!\r\n"
    b"0\r\nX-Checksum: abc \r\nX-Other:def\r\n\r\n"
)


def test_request_head_in_one_call() -> None:
    assert requests([GET]) == [(MESSAGE, GET_HEAD)]


def test_response_head_and_body() -> None:
    assert responses([OK]) == [(HEAD, OK_HEAD), (END, (b"hello", 5, None))]


@pytest.mark.parametrize("data", [GET, OK, CHUNKED])
def test_split_at_every_byte_gives_the_same_events(data: bytes) -> None:
    parse = responses if data.startswith(b"HTTP") else requests
    whole = parse([data])
    for chunks in splits(data):
        assert parse(chunks) == whole, chunks
    assert parse([data[i : i + 1] for i in range(len(data))]) == whole


def test_head_is_dated_by_the_chunk_of_its_first_byte() -> None:
    p = Http1Stream(False, 100)
    assert p.feed(GET[:10], 0, 1) == (NEED, 10, None)
    assert p.head_len == 10
    event, pos, head = p.feed(GET[10:], 0, 2)
    assert (event, pos, head[0]) == (MESSAGE, len(GET) - 10, 1)
    assert p.head_len == 0


def test_chunked_body_with_extensions_and_trailers() -> None:
    (head, end) = responses([CHUNKED])
    assert head[0] == HEAD and head[1][4] == [("transfer-encoding", "gzip, chunked")]
    assert end == (END, (b"hello, world!!!", 15, [("x-checksum", "abc"), ("x-other", "def")]))


def test_chunked_without_trailers_and_bare_lf() -> None:
    data = b"POST / HTTP/1.1\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n"
    assert requests([data])[1] == (END, (b"abc", 3, None))


def test_content_length_bodies_pipelined_in_one_chunk() -> None:
    data = (
        b"".join(
            b"POST /%d HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (i, i) + b"x" * i for i in range(5)
        )
        + GET
    )
    events = requests([data])
    assert [e for e, _ in events] == [MESSAGE, HEAD, END, HEAD, END, HEAD, END, HEAD, END, MESSAGE]
    assert [v[1] for e, v in events if e == END] == [1, 2, 3, 4]
    assert [v[2] for e, v in events if e != END] == ["/0", "/1", "/2", "/3", "/4", "/api/users?x=1"]


def test_body_over_the_limit_is_counted_not_kept() -> None:
    body = bytes(range(256)) * 40
    data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert responses(chunks, body_limit=100)[-1] == (END, (body[:100], len(body), None))
    assert responses(chunks, body_limit=0)[-1] == (END, (b"", len(body), None))
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"".join(b"%x\r\n" % 256 + body[i : i + 256] + b"\r\n" for i in range(0, 10240, 256))
    last = responses([chunked + b"0\r\n\r\n"], body_limit=300)[-1]
    assert last == (END, (body[:300], 10240, None))


def test_obs_fold_and_whitespace() -> None:
    data = b"GET / HTTP/1.1\r\nX-A:  padded \t\r\nX-B: one\r\n two\r\n\t three \r\nX-C:\r\n\r\n"
    ((_, head),) = requests([data])
    assert head[4] == [("x-a", "padded"), ("x-b", "one two three"), ("x-c", "")]


def test_values_are_latin1_and_names_lower_case() -> None:
    data = b"HTTP/1.0 404 Nicht Gef\xfcnden\r\nX-Caf\xe9: ok\r\n\r\n"
    ((event, value),) = responses([data])
    assert event == ERROR  # a name is a token
    data = b"HTTP/1.0 404 Nicht Gef\xfcnden\r\nContent-LENGTH: 0\r\nX-V: caf\xe9\r\n\r\n"
    ((event, value),) = responses([data])
    assert event == MESSAGE
    assert value == (7, 404, "Nicht Gefünden", "1.0", [("content-length", "0"), ("x-v", "café")])


def test_a_repeated_field_is_the_same_tuple_unless_it_may_hold_a_secret() -> None:
    """Head after head on one connection, a common header field with the same bytes is
    the tuple parsed before; a changed value, a folded one, a long one, a name that may
    carry a credential or a URL, and an uncommon name are parsed anew."""
    long = b"a" * 300
    head = (
        b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: wrk\r\nAuthorization: Bearer t\r\n"
        b"Referer: /x?t=1\r\nAccept: " + long + b"\r\nX-Id: 7\r\nCache-Control: a,\r\n b\r\n\r\n"
    )
    parser = Http1Stream(False, 4096)
    (_, first), (_, second) = run(parser, [head, head.replace(b"wrk", b"curl")])
    assert first[4] == [*second[4][:1], ("user-agent", "wrk"), *second[4][2:]]
    same = [a is b for a, b in zip(first[4], second[4], strict=True)]
    # host, user-agent, authorization, referer, accept (long), x-id, cache-control (folded)
    assert same == [True, False, False, False, False, False, False]
    ((_, third),) = run(parser, [head.replace(b"wrk", b"curl")])
    assert third[4][1] is second[4][1]  # the new value is the one kept now
    ((_, fresh),) = run(Http1Stream(False, 4096), [head])
    assert fresh[4][0] is not first[4][0] and fresh[4] == first[4]  # per parser


def test_a_reset_forgets_the_kept_fields() -> None:
    parser = Http1Stream(False, 4096)
    ((_, first),) = run(parser, [GET])
    parser.reset()
    ((_, second),) = run(parser, [GET])
    assert second[4] == first[4] and second[4][0] is not first[4][0]


def test_response_framing() -> None:
    def kinds(head: bytes) -> list[int]:
        return [e for e, _ in responses([head])]

    assert kinds(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n") == [MESSAGE]
    assert kinds(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n") == [MESSAGE]
    assert kinds(b"HTTP/1.1 100 Continue\r\n\r\n") == [MESSAGE]
    assert kinds(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n") == [MESSAGE]
    assert kinds(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == [MESSAGE]
    p = Http1Stream(True, 10)
    assert run(p, [b"HTTP/1.1 200 OK\r\n\r\nuntil", b" close"])[0][0] == HEAD
    assert p.until_close and p.take_body() == (b"until clos", 11)
    p = Http1Stream(True, 10)
    run(p, [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"])
    assert p.until_close


def test_transfer_encoding_wins_over_content_length() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert responses([data + b"1\r\na\r\n0\r\n\r\n"])[-1] == (END, (b"a", 1, None))


def test_no_body_after_a_head() -> None:
    p = Http1Stream(True, 10)
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n" + OK
    event, pos, _ = p.feed(data, 0, 1)
    assert event == HEAD
    p.no_body()
    assert run(p, [data[pos:]]) == [(HEAD, OK_HEAD), (END, (b"hello", 5, None))]


def test_reset_forgets_a_partial_message() -> None:
    p = Http1Stream(False, 10)
    run(p, [b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"])
    assert p.take_body() == (b"abc", 3)
    p.reset()
    assert run(p, [GET]) == [(MESSAGE, GET_HEAD)]


@pytest.mark.parametrize(
    "data",
    [
        b"get / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded-first: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n: no name\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
    ],
)
def test_request_parse_errors(data: bytes) -> None:
    events = requests([data])
    assert events[-1][0] == ERROR, events
    why = events[-1][1]
    assert isinstance(why, str) and why.isascii()


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"HTTP/1.1200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nAuthorization Bearer s3cr3t\r\n\r\n",
    ],
)
def test_response_parse_errors_never_quote_the_input(data: bytes) -> None:
    ((event, why),) = responses([data])
    assert event == ERROR and "s3cr3t" not in why and "SSH" not in why and "OK" not in why
    p = Http1Stream(True, 1)
    run(p, [data])
    assert p.feed(OK, 0, 1)[0] == ERROR  # failed until reset
    p.reset()
    assert run(p, [OK])[0] == (HEAD, OK_HEAD)


def test_garbage_fails_before_a_line_end() -> None:
    assert requests([b"\x16\x03\x01\x02\x00"])[-1][0] == ERROR
    assert responses([b"SSH-2.0"])[-1][0] == ERROR
    assert requests([b"GET / HTTP/1.1\r\nbad header"])[-1][0] == ERROR
    assert requests([b"GET / HTTP/1.1\r\nHost: a\r"]) == []  # still plausible


def test_oversize_head_is_an_error() -> None:
    line = b"X-Filler: " + b"a" * 16384 + b"\r\n"
    events = requests([b"GET / HTTP/1.1\r\n"] + [line] * (MAX_HEAD // len(line) + 1))
    assert events == [(ERROR, "header block larger than 1048576 bytes")]
    one = b"GET / HTTP/1.1\r\n" + line * (MAX_HEAD // len(line) + 1) + b"\r\n"
    assert requests([one]) == [(ERROR, "header block larger than 1048576 bytes")]
    long_trailer = b"0\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert responses([head, long_trailer])[-1] == (ERROR, "header block larger than 1048576 bytes")


def test_big_head_under_the_limit_parses() -> None:
    cookie = b"a" * 700_000
    data = b"GET / HTTP/1.1\r\nCookie: " + cookie + b"\r\n\r\n"
    whole = requests([data])
    assert whole[0][1][4] == [("cookie", cookie.decode())]
    assert requests([data[i : i + 16384] for i in range(0, len(data), 16384)]) == whole


def test_feed_checks_its_arguments() -> None:
    p = Http1Stream(False, 10)
    with pytest.raises(ValueError):
        p.feed(b"abc", 4, 0)
    with pytest.raises(ValueError):
        p.feed(b"abc", -1, 0)
    with pytest.raises(TypeError):
        p.feed(b"abc", 0)
    with pytest.raises(TypeError):
        p.feed("text", 0, 0)
    assert p.feed(memoryview(GET), 0, 7) == (MESSAGE, len(GET), GET_HEAD)


# -- properties ------------------------------------------------------------------

VALID = [GET, OK, CHUNKED, b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 204 No\r\n\r\n",
         b"POST /u HTTP/1.0\nContent-Length: 3\n\nabc"]  # fmt: skip


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, byte in edits:
        if out:
            out[at % len(out)] = byte
    return bytes(out)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    st.lists(
        st.binary(max_size=80)
        | st.sampled_from(VALID)
        | st.builds(
            mutate,
            st.sampled_from(VALID),
            st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
        ),
        max_size=12,
    ),
    st.integers(0, 50),
    st.data(),
)
def test_random_and_mutated_input(
    response: bool, chunks: list[bytes], limit: int, data: st.DataObject
) -> None:
    p = Http1Stream(response, limit)
    for chunk in chunks:
        pos = 0
        while True:
            event, pos, value = p.feed(chunk, pos, 1)
            assert 0 <= pos <= len(chunk)
            if event == END:
                body, body_len, trailers = value
                assert len(body) <= limit and body_len >= len(body)
                assert trailers is None or all(isinstance(n, str) for n, _ in trailers)
            if event in (HEAD, MESSAGE):
                assert all(n == n.lower() and isinstance(v, str) for n, v in value[4])
            if event == ERROR:
                assert isinstance(value, str)
                if data.draw(st.booleans()):
                    p.reset()
                break
            if event == NEED:
                break
            if event == HEAD and data.draw(st.booleans()):
                p.no_body()
    body, body_len = p.take_body()
    assert len(body) <= limit and body_len >= len(body)
    assert p.head_len <= MAX_HEAD
