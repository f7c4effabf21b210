"""agent/sinks/_json_lines.c: an Exchange as compact JSON, byte for byte what
json.dumps(ex.to_json(), separators=(",", ":")) gives, and the JSON-lines
encoder's fallback to that Python path for what the C encoder does not take."""

from __future__ import annotations

import base64
import copy
import json
import random
import sys

import pytest
from agent.sinks._json_lines import exchange_json
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7.exchange import Exchange, GrpcCall, GrpcMessage, HttpMessage
from agent.l7.http1 import Http1Parser
from agent.records.record import Endpoint, Record
from agent.sinks.jsonl import JsonLineEncoder, _ascii_json


def reference(ex: Exchange) -> bytes:
    return json.dumps(ex.to_json(), separators=(",", ":")).encode()


def check(ex: Exchange) -> None:
    assert exchange_json(ex) == reference(ex)


def request(**changes) -> HttpMessage:
    msg = HttpMessage(
        ts_ns=1_733_450_000_123_456_789, end_ts_ns=1_733_450_000_123_556_789, method="GET",
        target="/index.html?q=1", authority="example.com:8443", version="1.1",
        headers=[("host", "example.com:8443"), ("user-agent", "curl/8.5"), ("accept", "*/*"),
                 ("authorization", "Bearer [REDACTED]"), ("x-empty", "")],
        complete=True,
    )  # fmt: skip
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


def response(**changes) -> HttpMessage:
    msg = HttpMessage(
        ts_ns=1_733_450_000_124_000_000, end_ts_ns=1_733_450_000_125_000_000, status=200,
        reason="OK", version="1.1",
        headers=[("content-type", "text/plain"), ("content-length", "1536")],
        body=bytes(range(256)) * 6, body_len=1536, complete=True,
    )  # fmt: skip
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


# -- hand-made exchanges ------------------------------------------------------------


@pytest.mark.parametrize(
    "ex",
    [
        Exchange("http1", request=request(), response=response(), stream_id=1),
        Exchange("http2", request=request(version="2"), response=None, stream_id=2**31 - 1),
        Exchange("http1", request=None, response=response(), notes=["response without request"]),
        Exchange("http1"),
        Exchange("http2", request=request(), response=response(end_ts_ns=0)),  # latency null
        # a response "before" its request: latency clamps to 0
        Exchange("http1", request=request(ts_ns=10**18), response=response(end_ts_ns=5)),
        Exchange("http1", request=request(body=b"", body_len=0), response=response(body=b"")),
        Exchange("http1", request=request(body=b"a"), response=response(body=b"ab")),
        Exchange("http1", request=request(body=b"abc"), response=response(body=b"abcd")),
        Exchange("http1", request=request(body=bytes(range(256)) * 400, body_len=10**9,
                                          body_truncated=True), response=response()),
        Exchange("http1", request=request(),
                 response=response(trailers=[("grpc-status", "0"), ("x-t", "v")],
                                   complete=False)),
        Exchange("http2", request=request(), response=response(), stream_id=7,
                 notes=["gap of 12 bytes", 'quote " and \\ backslash'],
                 redactions=["authorization", "cookie"]),
        Exchange("http1", request=request(method="", target="", authority="", headers=[]),
                 response=response(status=999, reason="", headers=[])),
        Exchange("http1", request=request(ts_ns=-5, end_ts_ns=2**63 - 1),
                 response=response(ts_ns=0, end_ts_ns=-(2**63), body_len=2**63 - 1)),
        Exchange("http1", request=request(target="/caf\u00e9/\u4e2d\u6587/\U0001f600",
                                          headers=[("x-ctl", "a\x00b\x01\x1f\x7f\x80\xff"),
                                                   ("x-esc", "\b\f\n\r\t\"\\/"),
                                                   ("x-sur", "bad\udcff\udc80\ud800")])),
        Exchange("http1", request=request(target="/" + "a" * 10_000 + "\n" + "b" * 5000)),
        Exchange("http1", request=request(target="\u00e9" * 5000 + "\U0001f600" * 3000)),
    ],
)  # fmt: skip
def test_hand_made_exchanges_match_json_dumps(ex: Exchange) -> None:
    check(ex)


def test_every_length_of_ascii_text_and_body_around_the_word_and_block_sizes() -> None:
    for n in range(0, 70):
        for text in ("x" * n, "x" * (n - 1) + '"' if n else "", "\x01" * n, "a\\" * (n // 2)):
            check(Exchange("http1", request=request(target=text, body=bytes(range(n)) * 3)))


def test_bodies_of_every_length() -> None:
    data = bytes(range(256)) * 2 + bytes(range(255, -1, -1))
    for n in range(len(data) + 1):
        check(Exchange("http1", response=response(body=data[:n], body_len=n)))
    check(Exchange("http1", response=response(body=data * 300)))


def test_a_parsed_http1_exchange() -> None:
    """The bench's exchange (bench/pipeline.py's http1 workload), parsed."""
    body = b"x" * 1500
    resp = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
    resp += b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(body) + body
    req = (
        b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nUser-Agent: wrk\r\n"
        b"Authorization: Bearer secret-token-abcdef\r\nAccept: */*\r\n\r\n"
    )
    parser = Http1Parser()
    assert parser.feed("request", req, 1000) == []
    (ex,) = parser.feed("response", resp, 2000)
    check(ex)
    assert exchange_json(ex) == _ascii_json(ex.to_json())  # what the sink wrote before


# -- generated exchanges ------------------------------------------------------------

# Any code point, lone surrogates included (hypothesis' default categories keep Cs;
# they reach us through surrogateescape), and text made mostly of the characters that
# take the encoder's other branches: ASCII (escaped or not), surrogates.
TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
ASCII_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=40)
SURROGATE_TEXT = st.text(
    st.one_of(
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
        st.sampled_from(["a", "\\", "\x80", "\U0001f600"]),
    ),
    max_size=12,
)
ANY_TEXT = st.one_of(TEXT, ASCII_TEXT, SURROGATE_TEXT)
INT = st.integers(min_value=0, max_value=2**63 - 1)
PAIRS = st.lists(st.tuples(ANY_TEXT, ANY_TEXT), max_size=6)

MESSAGES = st.builds(
    HttpMessage,
    ts_ns=INT, end_ts_ns=st.one_of(st.just(0), INT), method=ANY_TEXT, target=ANY_TEXT,
    authority=ANY_TEXT, status=st.integers(min_value=0, max_value=999), reason=ANY_TEXT,
    version=ANY_TEXT, headers=PAIRS, trailers=PAIRS, body=st.binary(max_size=200),
    body_len=INT, body_truncated=st.booleans(), complete=st.booleans(),
)  # fmt: skip
EXCHANGES = st.builds(
    Exchange,
    protocol=st.one_of(st.sampled_from(["http1", "http2"]), ANY_TEXT),
    request=st.one_of(st.none(), MESSAGES), response=st.one_of(st.none(), MESSAGES),
    stream_id=INT, notes=st.lists(ANY_TEXT, max_size=4), redactions=st.lists(ANY_TEXT, max_size=4),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(EXCHANGES)
def test_generated_exchanges_match_json_dumps(ex: Exchange) -> None:
    check(ex)


# -- what the C encoder leaves to the Python path -----------------------------------


def _record(ex: Exchange) -> Record:
    return Record(
        type="exchange", ts_ns=1_733_450_000_000_000_000, node="node-1", agent_id="agent-1",
        pid=4242, tid=4243, comm="nginx", cgroup_id=77, container_id="", pod=None,
        source="openssl", conn_id="c1", fd=9, local=Endpoint("10.0.0.1", 443),
        remote=Endpoint("10.0.0.2", 50000), role="server", seq=3, protocol="http1",
        exchange=ex,
    )  # fmt: skip


def python_path_line(record: Record) -> bytes:
    """The line as the encoder built it before the C encoder: to_json() and
    _ascii_json for the exchange, in the same template."""
    line = JsonLineEncoder().encode(record.replace(exchange=Exchange("http1")))
    head = line[: line.index(b',"exchange":')]
    return head + b',"exchange":' + _ascii_json(record.exchange.to_json()) + b"}\n"


def _grpc() -> Exchange:
    call = GrpcCall(service="pkg.Svc", method="Get", status=0,
                    request_messages=[GrpcMessage(False, 3, b"abc")])  # fmt: skip
    return Exchange("grpc", request=request(version="2"), response=response(), grpc=call)


class _SubExchange(Exchange):
    __slots__ = ()


FALLBACKS = {
    "grpc": _grpc,
    "huge int": lambda: Exchange("http1", request=request(body_len=2**64)),
    "huge negative int": lambda: Exchange("http1", stream_id=-(2**63) - 1),
    "huge latency": lambda: Exchange(
        "http1", request=request(ts_ns=-(2**63)), response=response(end_ts_ns=2**63 - 1)
    ),
    "non-str header name": lambda: Exchange("http1", request=request(headers=[(None, "x")])),
    "non-str header value": lambda: Exchange("http1", response=response(headers=[("a", 1)])),
    "header as a list": lambda: Exchange("http1", request=request(headers=[["host", "x"]])),
    "bool as int": lambda: Exchange("http1", stream_id=True),
    "int as bool": lambda: Exchange("http1", request=request(complete=1)),
    "bytearray body": lambda: Exchange("http1", request=request(body=bytearray(b"xyz"))),
    "tuple of notes": lambda: Exchange("http1", notes=("a", "b")),
    "non-str note": lambda: Exchange("http1", redactions=["a", 3]),
    "int subclass": lambda: Exchange("http1", stream_id=_Int(5)),
    "subclass": lambda: _SubExchange("http1", request=request()),
}


class _Int(int):
    pass


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_what_the_c_encoder_refuses_goes_the_python_way(name: str) -> None:
    ex = FALLBACKS[name]()
    with pytest.raises(TypeError):
        exchange_json(ex)
    record = _record(ex)
    assert JsonLineEncoder().encode(record) == python_path_line(record)


def test_what_neither_encodes_is_still_a_type_error() -> None:
    """bytes in a header: not JSON either way; the encoder raises as it did."""
    record = _record(Exchange("http1", request=request(headers=[(b"host", "x")])))
    with pytest.raises(TypeError):
        exchange_json(record.exchange)
    with pytest.raises(TypeError):
        JsonLineEncoder().encode(record)


def test_not_an_exchange_is_a_type_error() -> None:
    for obj in (None, 1, "x", {"protocol": "http1"}, request()):
        with pytest.raises(TypeError):
            exchange_json(obj)


def test_an_unset_slot_is_a_type_error() -> None:
    ex = Exchange("http1", request=request())
    del ex.notes
    with pytest.raises(TypeError):
        exchange_json(ex)
    msg = request()
    del msg.body
    with pytest.raises(TypeError):
        exchange_json(Exchange("http1", request=msg))


def test_the_encoders_exchange_line_is_the_python_paths() -> None:
    for ex in (
        Exchange("http1", request=request(), response=response(), stream_id=1),
        Exchange("http2", request=request(target="/\u00e9\udcff"), response=None),
    ):
        record = _record(ex)
        line = JsonLineEncoder().encode(record)
        assert line == python_path_line(record)
        assert json.loads(line) == record.to_json()


def test_the_input_is_left_alone() -> None:
    ex = Exchange("http1", request=request(), response=response(), notes=["n"])
    before = copy.deepcopy(ex)
    exchange_json(ex)
    assert ex == before


def test_every_ascii_character_at_every_position_of_a_word() -> None:
    """The 8-characters-at-a-time check: each character that json.dumps escapes is
    caught wherever it stands in a word or a short last word, and none other is."""
    for c in map(chr, range(128)):
        for n in range(1, 20):
            for at in range(n):
                check(Exchange("http1", notes=["a" * at + c + "b" * (n - at - 1)]))


@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "table"])
def test_base64_in_the_line_is_the_standard_librarys(simd: bool) -> None:
    """Both encoders, every length around the vector step (24 bytes, and a last one
    over the 24 that end with the last whole group) and its tail of 0..2 bytes, and
    buffers that are not bytes (a payload can be a memoryview)."""
    from agent.sinks._json_lines import _base64

    rng = random.Random(7)
    for n in [*range(0, 130), 4095, 4096, 4097, 16384, 65537]:
        data = rng.randbytes(n)
        assert _base64(data, simd) == base64.b64encode(data), n
        assert _base64(memoryview(data)[1:], simd) == base64.b64encode(data[1:]), n


def test_data_line_payload_is_base64_of_a_memoryview() -> None:
    """The first line of a connection goes through Record.to_json(), the next ones
    through the C encoder: both give the payload's base64."""
    data = bytes(range(256)) * 7
    record = _record(Exchange("http1")).replace(
        type="data", exchange=None, direction="egress", offset=0, len=len(data),
        captured_len=len(data), truncated=False, data=memoryview(data),
    )  # fmt: skip
    lines = JsonLineEncoder().encode_many([record, record.replace(offset=len(data))])
    assert [json.loads(line)["data_b64"] for line in lines] == [base64.b64encode(data).decode()] * 2


# -- numbers and text at their edges -------------------------------------------------


def _edge_ints() -> list[int]:
    """Every digit count's first and last value, every power of two's neighbours (the
    digit count comes from the bit length), both signs, and the 64-bit extremes."""
    near = {0, 2**63 - 1, -(2**63)}
    for k in range(20):
        near |= {10**k - 1, 10**k, 10**k + 1}
    for b in range(64):
        near |= {2**b - 1, 2**b, 2**b + 1}
    near |= {-v for v in near}
    return sorted(v for v in near if -(2**63) <= v < 2**63)


def test_ints_at_every_digit_count_and_bit_length_are_json_dumps() -> None:
    for v in _edge_ints():
        check(Exchange("http1", request=request(ts_ns=v, end_ts_ns=v, body_len=v), stream_id=v))
        check(Exchange("http1", response=response(ts_ns=v, status=v, body_len=v)))
    for v in (2**63, -(2**63) - 1, 2**64, 2**90):
        with pytest.raises(TypeError):
            exchange_json(Exchange("http1", stream_id=v))


def test_data_line_ints_at_every_digit_count_are_json_dumps() -> None:
    """The line's own numbers (ts_ns, seq, tid, offset, len, captured_len), each
    value written as json.dumps writes it, in the line's key order."""
    enc = JsonLineEncoder()
    base = _record(Exchange("http1")).replace(
        type="data", exchange=None, direction="egress", truncated=False, data=b"xyz"
    )
    for v in _edge_ints():
        record = base.replace(ts_ns=v, seq=v, tid=v, offset=v, len=v, captured_len=v)
        line = enc.encode(record)
        expected = record.to_json()
        ordered = {key: expected[key] for key in json.loads(line)}
        assert ordered == expected
        assert line == json.dumps(ordered, separators=(",", ":")).encode() + b"\n", v


ESCAPED = ['"', "\\", "\n", "\x00", "\x1f", "\x7f", "\t"]


def _text(n: int, at: int, c: str, how: int) -> str:
    """n characters with c at `at` (none if at == n), made so that the bytes before a
    str's characters (its header) differ: fresh, hashed, or interned."""
    text = "".join(["a" * at, c if at < n else "", "b" * (n - at - 1)])
    if how == 1:
        hash(text)
    elif how == 2:
        text = sys.intern(text)
    return text


def test_short_text_of_every_length_with_an_escape_at_every_position() -> None:
    """Every length around the 16-character check (whose bytes before a short
    string's start are its str's header), in every place a string goes: a field,
    a header name and value, a list; the check sees each escaped character wherever
    it stands, and the header's bytes never."""
    for n in range(41):
        for at in range(n + 1):
            for k, c in enumerate(ESCAPED):
                text = _text(n, at, c, k % 3)
                check(Exchange("http1", request=request(method=text, headers=[(text, text)]),
                               notes=[text, text]))  # fmt: skip


def test_text_around_the_short_limit() -> None:
    for n in (4095, 4096, 4097):
        for text in ("x" * n, '"' + "x" * (n - 1), "x" * (n - 1) + "\x7f"):
            check(Exchange("http1", request=request(target=text, headers=[("h", text)])))


def test_lines_whose_first_guess_is_far_off_are_exact() -> None:
    """A line that outgrows its first guess, and one far below it, are still exactly
    their bytes: the right length, the bytes object whole."""
    many = [("x-" + str(i), "\x01" * 200) for i in range(300)]  # grows: 6 bytes a character
    for ex in (Exchange("http1", request=request(headers=many)), Exchange("http1")):
        line = exchange_json(ex)
        assert line == reference(ex) and len(line) == len(reference(ex))
        assert hash(line) == hash(reference(ex)) and line[-1:] == b"}"
