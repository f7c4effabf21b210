"""Http2Parser against real HTTP/2 byte streams written by the h2 library."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import hpack
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.l7.exchange import Exchange
from agent.l7.http2 import PREFACE, Http2Parser, error_name

Event = tuple[str, bytes]


class Conversation:
    """An h2 client and server talking in memory; `events` is what a capture would see."""

    def __init__(self, client_settings: dict | None = None) -> None:
        self.client = H2Connection(H2Configuration(client_side=True))
        self.server = H2Connection(H2Configuration(client_side=False))
        self.events: list[Event] = []
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.server.initiate_connection()
        self.pump()

    def pump(self) -> None:
        """Deliver everything pending both ways, one captured chunk per write."""
        while True:
            moved = False
            for side, src, dst in (
                ("request", self.client, self.server),
                ("response", self.server, self.client),
            ):
                data = src.data_to_send()
                if data:
                    moved = True
                    self.events.append((side, data))
                    for event in dst.receive_data(data):
                        if isinstance(event, DataReceived) and event.flow_controlled_length:
                            dst.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id
                            )
            if not moved:
                return

    def request(self, path="/", method="GET", headers=(), body=b"", end=True, pump=True) -> int:
        sid = self.client.get_next_available_stream_id()
        base = [(":method", method), (":scheme", "https"), (":authority", "example.test")]
        self.client.send_headers(
            sid, [*base, (":path", path), *headers], end_stream=end and not body
        )
        if body:
            self.send(self.client, sid, body, end)
        if pump:
            self.pump()
        return sid

    def respond(self, sid, status=200, headers=(), body=b"", trailers=None, end=True) -> None:
        only_headers = end and not body and trailers is None
        self.server.send_headers(sid, [(":status", str(status)), *headers], end_stream=only_headers)
        if body:
            self.send(self.server, sid, body, end and trailers is None)
        if trailers is not None:
            self.server.send_headers(sid, trailers, end_stream=True)
        self.pump()

    def send(self, conn: H2Connection, sid: int, body: bytes, end: bool, piece: int = 0) -> None:
        """Send `body` in frames of at most `piece` bytes (default: the largest allowed)."""
        view = memoryview(body)
        while True:
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if piece:
                room = min(room, piece)
            take = view[:room]
            view = view[room:]
            conn.send_data(sid, take.tobytes(), end_stream=end and not view)
            self.pump()
            if not view:
                return


def run(
    events: list[Event],
    body_limit: int = 4096,
    close: bool = True,
    split: Callable[[int, bytes], list[bytes]] = lambda i, data: [data],
) -> list[Exchange]:
    """Parse a conversation; `split` cuts event i into captured chunks (same ts)."""
    parser = Http2Parser(body_limit=body_limit)
    out: list[Exchange] = []
    for i, (side, data) in enumerate(events):
        for piece in split(i, data):
            out += parser.feed(side, piece, (i + 1) * 1000)
    if close:
        out += parser.close(len(events) * 1000 + 1000)
    assert parser.failed is None
    return out


def feed_all(parser: Http2Parser, events: list[Event]) -> list[Exchange]:
    return [x for ts, (side, data) in enumerate(events, 1) for x in parser.feed(side, data, ts)]


def by_path(exchanges: list[Exchange]) -> dict[str, Exchange]:
    return {x.request.target: x for x in exchanges if x.request}


def test_get_with_response_body() -> None:
    conv = Conversation()
    sid = conv.request("/api/users?x=1", headers=[("accept", "application/json")])
    conv.respond(sid, headers=[("content-type", "application/json")], body=b'{"ok":true}')
    [x] = run(conv.events, close=False)
    assert x.protocol == "http2" and x.stream_id == sid and not x.notes
    req, resp = x.request, x.response
    assert [req.method, req.target, req.authority, req.version] == [
        *("GET", "/api/users?x=1", "example.test", "2")
    ]
    assert req.header("accept") == "application/json" and req.headers[0] == (":method", "GET")
    assert req.complete and req.body == b"" and req.end_ts_ns == req.ts_ns
    assert resp.status == 200 and resp.body == b'{"ok":true}' and resp.body_len == 11
    assert resp.complete and not resp.body_truncated
    assert resp.ts_ns > req.ts_ns and x.latency_ns == resp.end_ts_ns - req.ts_ns


def test_body_over_many_frames_and_chunks_with_limit() -> None:
    conv = Conversation()
    body = bytes(random.Random(1).randbytes(200_000))
    sid = conv.request("/upload", method="POST", end=False)
    conv.send(conv.client, sid, body, end=True, piece=1000)
    conv.respond(sid, body=body[:70_000])
    rechunk = lambda i, d: [d[k : k + 777] for k in range(0, len(d), 777)]  # noqa: E731
    [x] = run(conv.events, body_limit=5000, split=rechunk)
    assert x.request.body == body[:5000] and x.request.body_len == 200_000
    assert x.request.body_truncated and x.request.complete
    assert x.response.body == body[:5000] and x.response.body_len == 70_000
    [y] = run(conv.events, body_limit=1 << 20)
    assert y.request.body == body and not y.request.body_truncated
    for limit in (0, 1):
        [z] = run(conv.events, body_limit=limit)
        assert z.request.body == body[:limit] and z.response.body_len == 70_000


def test_concurrent_streams_interleaved() -> None:
    conv = Conversation()
    sids = {}
    for i in range(8):
        sids[i] = conv.request(f"/item/{i}", method="PUT", body=b"", end=False, pump=False)
    for round_ in range(3):
        for i in range(8):
            data = f"req{i}-{round_};".encode()
            conv.client.send_data(sids[i], data, end_stream=round_ == 2)
    conv.pump()
    for i in reversed(range(8)):
        conv.server.send_headers(sids[i], [(":status", str(200 + i))])
    for round_ in range(2):
        for i in range(8):
            conv.server.send_data(sids[i], f"resp{i}-{round_};".encode(), end_stream=round_ == 1)
            conv.pump()
    out = run(conv.events, close=False)
    assert len(out) == 8
    for i, x in by_path(out).items():
        n = int(i.rsplit("/", 1)[1])
        assert x.stream_id == sids[n] and x.response.status == 200 + n
        assert x.request.body == f"req{n}-0;req{n}-1;req{n}-2;".encode()
        assert x.response.body == f"resp{n}-0;resp{n}-1;".encode()


def test_hpack_dynamic_table_reuse() -> None:
    conv = Conversation()
    headers = [("x-tenant", "acme-corp"), ("authorization", "Bearer abc"), ("user-agent", "t/1")]
    starts = []
    for i in range(3):
        starts.append(len(conv.events))
        sid = conv.request(f"/r/{i}", headers=headers)
        conv.respond(sid, headers=[("x-served-by", "node-7"), ("cache-control", "no-store")])
    sizes = [len(conv.events[s][1]) for s in starts]
    assert sizes[1] < sizes[0]  # the 2nd request's block is mostly table indexes
    out = run(conv.events, close=False)
    assert [x.request.target for x in out] == ["/r/0", "/r/1", "/r/2"]
    for x in out:
        assert x.request.headers[-3:] == headers
        assert x.response.header("x-served-by") == "node-7"


def test_header_table_size_update_followed() -> None:
    conv = Conversation(client_settings={SettingCodes.HEADER_TABLE_SIZE: 256})
    for i in range(4):
        sid = conv.request(f"/s/{i}")
        conv.respond(sid, headers=[(f"x-h{j}", f"value-{i}-{j}" * 4) for j in range(6)])
    out = run(conv.events, close=False)
    assert [x.response.header("x-h5") for x in out] == [f"value-{i}-5" * 4 for i in range(4)]


def test_large_header_block_split_into_continuation() -> None:
    conv = Conversation()
    big = "".join(random.Random(2).choices("abcdefghijklmnopqrstuvwxyz0123456789", k=60_000))
    sid = conv.request("/big", headers=[("cookie", big)])
    conv.respond(sid, headers=[("x-echo", big)])
    stream, types, pos = b"".join(d for s, d in conv.events if s == "request"), [], len(PREFACE)
    while pos < len(stream):
        types.append(stream[pos + 3])
        pos += 9 + int.from_bytes(stream[pos : pos + 3], "big")
    assert types.count(9) >= 2  # CONTINUATION frames
    [x] = run(conv.events)
    assert x.request.header("cookie") == big and x.response.header("x-echo") == big


def test_crafted_padding_priority_and_continuation() -> None:
    enc_c, enc_s = hpack.Encoder(), hpack.Encoder()
    block = enc_c.encode([(":method", "POST"), (":path", "/p"), (":authority", "a"), ("x", "y")])
    h = HeadersFrame(1, data=block[:3], flags=["PADDED", "PRIORITY"], pad_length=7)
    h.depends_on, h.stream_weight = 0, 15
    c1 = ContinuationFrame(1, data=block[3:5])
    c2 = ContinuationFrame(1, data=block[5:], flags=["END_HEADERS"])
    d = DataFrame(1, data=b"hello", flags=["PADDED", "END_STREAM"], pad_length=20)
    request = PREFACE + b"".join(f.serialize() for f in (h, c1, c2, d))
    resp_block = enc_s.encode([(":status", "204")])
    response = HeadersFrame(1, data=resp_block, flags=["END_HEADERS", "END_STREAM"]).serialize()
    [x] = run([("request", request), ("response", response)], close=False)
    assert (x.request.method, x.request.target, x.request.header("x")) == ("POST", "/p", "y")
    assert x.request.body == b"hello" and x.request.body_len == 5
    assert x.response.status == 204 and x.response.complete


def test_padded_data_from_h2() -> None:
    conv = Conversation()
    sid = conv.request("/pad", method="POST", end=False)
    conv.client.send_data(sid, b"abc", pad_length=40)
    conv.client.send_data(sid, b"def", end_stream=True, pad_length=0)
    conv.pump()
    conv.respond(sid, body=b"ok")
    [x] = run(conv.events)
    assert x.request.body == b"abcdef" and x.request.body_len == 6


def _small_conversation() -> list[Event]:
    conv = Conversation()
    sid = conv.request("/a", method="POST", headers=[("x-k", "v")], body=b"hi", end=True)
    conv.respond(sid, headers=[("x-r", "1")], body=b"there", trailers=[("x-t", "2")])
    sid2 = conv.request("/a", headers=[("x-k", "v")])
    conv.respond(sid2, status=404)
    return conv.events


def test_every_split_position_parses_identically() -> None:
    events = _small_conversation()
    whole = run(events)
    assert len(whole) == 2
    for i, (_, data) in enumerate(events):
        for cut in range(1, len(data)):
            out = run(events, split=lambda j, d: [d[:cut], d[cut:]] if j == i else [d])  # noqa: B023
            assert out == whole, (i, cut)


def test_byte_at_a_time() -> None:
    events = _small_conversation()
    out = run(events, split=lambda i, d: [d[k : k + 1] for k in range(len(d))])
    assert out == run(events)


def test_trailers_both_ways() -> None:
    conv = Conversation()
    sid = conv.request("/t", method="POST", body=b"x", end=False)
    conv.client.send_headers(sid, [("x-req-trailer", "1")], end_stream=True)
    conv.pump()
    conv.respond(sid, body=b"y", trailers=[("x-checksum", "abc")])
    [x] = run(conv.events)
    assert x.request.trailers == [("x-req-trailer", "1")]
    assert x.response.trailers == [("x-checksum", "abc")] and x.response.complete


def test_informational_response_skipped() -> None:
    conv = Conversation()
    sid = conv.request("/up", method="POST", headers=[("expect", "100-continue")], end=False)
    conv.respond(sid, status=100, end=False)
    conv.send(conv.client, sid, b"data", end=True)
    conv.respond(sid, status=201, body=b"made")
    [x] = run(conv.events)
    assert x.response.status == 201 and x.response.body == b"made"
    assert x.notes == ["informational response 100 skipped"]


def test_rst_stream_from_client_and_server() -> None:
    conv = Conversation()
    a = conv.request("/slow")
    conv.respond(a, body=b"partial", end=False)
    conv.client.reset_stream(a, error_code=8)
    conv.pump()
    b = conv.request("/refused")
    conv.server.reset_stream(b, error_code=7)
    conv.pump()
    out = by_path(run(conv.events, close=False))
    slow, refused = out["/slow"], out["/refused"]
    assert slow.notes == ["stream reset by the client: CANCEL"]
    assert slow.response.body == b"partial" and not slow.response.complete
    assert slow.response.end_ts_ns == 0
    assert refused.response is None
    assert refused.notes == ["no response seen", "stream reset by the server: REFUSED_STREAM"]
    assert error_name(99) == "0x63"


def test_goaway_reports_unprocessed_streams() -> None:
    conv = Conversation()
    a = conv.request("/a")
    b = conv.request("/b")
    c = conv.request("/c")
    conv.respond(a, body=b"done-a", end=False)
    conv.server.close_connection(error_code=0, last_stream_id=a)
    conv.pump()
    parser = Http2Parser()
    out = feed_all(parser, conv.events)
    assert sorted(x.stream_id for x in out) == [b, c]
    assert all("GOAWAY (NO_ERROR) with last_stream_id 1" in x.notes[-1] for x in out)
    [rest] = parser.close(999)
    assert rest.stream_id == a and rest.response.body == b"done-a"
    assert "connection closed before the stream ended" in rest.notes


def test_server_push() -> None:
    conv = Conversation()
    sid = conv.request("/index.html")
    pushed = 2
    promise = [(":method", "GET"), (":scheme", "https"), (":authority", "x"), (":path", "/app.css")]
    conv.server.push_stream(sid, pushed, promise)
    conv.respond(sid, body=b"<html>")
    conv.respond(pushed, body=b"body{}")
    out = by_path(run(conv.events, close=False))
    assert out["/index.html"].response.body == b"<html>"
    css = out["/app.css"]
    assert css.stream_id == pushed and css.response.body == b"body{}"
    assert css.notes == ["server push, promised on stream 1"]


def test_early_response_waits_for_request_end() -> None:
    conv = Conversation()
    sid = conv.request("/stream", method="POST", body=b"part1", end=False)
    conv.respond(sid, status=413)
    parser, seen = Http2Parser(), len(conv.events)
    assert feed_all(parser, conv.events) == []
    conv.send(conv.client, sid, b"part2", end=True)
    [x] = feed_all(parser, conv.events[seen:])
    assert x.request.body == b"part1part2" and x.response.status == 413


def test_response_before_request_across_sides() -> None:
    conv = Conversation()
    a, b, c = conv.request("/a"), conv.request("/b"), conv.request("/c")
    conv.respond(b, body=b"bee", trailers=[("x-t", "2")])  # answered out of order
    conv.respond(a, status=404)
    conv.respond(c, status=500, end=False)
    conv.server.reset_stream(c, error_code=2)
    conv.pump()
    resp = [e for e in conv.events if e[0] == "response"]
    parser = Http2Parser()
    out = feed_all(parser, resp + [e for e in conv.events if e[0] == "request"])
    assert [(x.stream_id, x.request and x.request.target) for x in out] == [
        *((c, None), (a, "/a"), (b, "/b"))
    ]
    assert out[2].response.trailers == [("x-t", "2")] and not out[2].notes
    assert out[0].notes == ["request not seen", "stream reset by the server: INTERNAL_ERROR"]
    assert parser.close(10**6) == []  # /c's late request HEADERS did not open it again


def test_close_reports_unfinished() -> None:
    conv = Conversation()
    sid = conv.request("/pending")
    events = [*conv.events, ("response", DataFrame(sid, data=b"x" * 50).serialize()[:20])]
    parser = Http2Parser()
    assert feed_all(parser, events) == []
    [x] = parser.close(99)
    assert x.response is None and x.request.complete
    assert x.notes == [
        "no response seen",
        "connection closed before the stream ended",
        "connection closed in the middle of a response side frame",
    ]
    assert parser.close(100) == [] and parser.feed("request", b"x", 101) == []


def test_gap_fails_and_flushes() -> None:
    conv = Conversation()
    sid = conv.request("/g", method="POST", body=b"abc", end=False)
    parser = Http2Parser()
    feed_all(parser, conv.events)
    [x] = parser.gap("request", 1234, 50)
    assert parser.failed == "gap: HTTP/2 header compression state lost"
    assert x.stream_id == sid and x.request.body == b"abc" and not x.request.complete
    assert "gap: 1234 bytes lost on the request side; stream left unfinished" in x.notes
    assert parser.feed("request", b"more", 51) == [] and parser.close(52) == []


def test_garbage_fails_without_raising() -> None:
    parser = Http2Parser()
    assert parser.feed("request", b"GET / HTTP/1.1\r\n\r\n", 1) == []
    assert parser.failed and "preface" in parser.failed
    parser = Http2Parser()
    parser.feed("request", PREFACE[:10], 1)
    assert parser.failed is None
    parser.feed("request", b"XX", 2)
    assert parser.failed and "preface" in parser.failed
    # a HEADERS block that is not valid HPACK on the response side
    parser = Http2Parser()
    bad = HeadersFrame(1, data=b"\xff\xff\xff\xff\xff\x7f", flags=["END_HEADERS"]).serialize()
    assert parser.feed("response", bad, 1) == []
    assert parser.failed and parser.failed.startswith("HPACK decoding failed on the response side")
    # a PING of the wrong size, a DATA frame on stream 0, a stray CONTINUATION
    for frame in (
        b"\x00\x00\x03\x06\x00\x00\x00\x00\x00abc",
        b"\x00\x00\x01\x00\x00\x00\x00\x00\x00a",
        ContinuationFrame(1, data=b"", flags=["END_HEADERS"]).serialize(),
    ):
        parser = Http2Parser()
        parser.feed("response", frame, 1)
        assert parser.failed
    assert Http2Parser().feed("sideways", b"", 1) == []  # type: ignore[arg-type]


def test_failure_returns_open_exchanges_with_note() -> None:
    conv = Conversation()
    sid = conv.request("/open")
    parser = Http2Parser()
    feed_all(parser, conv.events)
    [x] = parser.feed("response", b"\x00\x00\x04\x06\x00\x00\x00\x00\x00abcd", 99)
    assert x.stream_id == sid and parser.failed.startswith("bad frame on the response side")
    assert x.notes[-1].startswith("HTTP/2 parsing stopped: bad frame")


def test_non_utf8_header_value_kept_as_replacement() -> None:
    enc = hpack.Encoder()
    block = enc.encode([(b":method", b"GET"), (b":path", b"/\xff"), (b"x-bin", b"\xc3\x28")])
    request = PREFACE + HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
    parser = Http2Parser()
    assert parser.feed("request", request, 1) == []
    [x] = parser.close(2)
    assert x.request.target == "/\ufffd" and parser.failed is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(["request", "response"]), st.binary(max_size=300))),
    st.booleans(),
)
def test_random_bytes_never_raise(chunks: list[Event], with_preface: bool) -> None:
    parser = Http2Parser(body_limit=64)
    if with_preface:
        parser.feed("request", PREFACE, 0)
    for ts, (side, data) in enumerate(chunks):
        assert isinstance(parser.feed(side, data, ts), list)
    assert isinstance(parser.close(10**9), list)
    assert not (parser.failed or "").startswith("internal error"), parser.failed


_VALID = _small_conversation()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_random_splits_parse_identically(cuts: list[int]) -> None:
    def split(i: int, data: bytes) -> list[bytes]:
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        return [data[lo:hi] for lo, hi in itertools.pairwise(points)]

    assert run(_VALID, split=split) == run(_VALID)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_streams_never_raise(flips: list[tuple[int, int]]) -> None:
    events = [(side, bytearray(data)) for side, data in _VALID]
    for where, value in flips:
        side, data = events[where % len(events)]
        data[(where // len(events)) % len(data)] = value
    parser = Http2Parser(body_limit=16)
    for ts, (side, data) in enumerate(events):
        assert isinstance(parser.feed(side, bytes(data), ts), list)
    assert isinstance(parser.close(10**9), list)
    assert not (parser.failed or "").startswith("internal error"), parser.failed


def test_malformed_data_frames_fail_as_hyperframe_says() -> None:
    """DATA frames are parsed without hyperframe: same verdicts, same messages."""
    from hyperframe.exceptions import HyperframeError
    from hyperframe.frame import Frame

    def header(length: int, flags: int, sid: int) -> bytes:
        return length.to_bytes(3, "big") + bytes([0, flags]) + sid.to_bytes(4, "big")

    cases = [
        header(3, 0, 0) + b"abc",  # stream 0
        header(0, 0x08, 1),  # PADDED, no pad length byte
        header(3, 0x08, 1) + b"\x03ab",  # pad as long as the body
        header(3, 0x08, 1) + b"\x02ab",  # pad fills the rest: valid, empty data
        header(2, 0x09, 0x80000001) + b"\x00z",  # reserved bit set: stream 1
    ]
    for raw in cases:
        try:
            frame, length = Frame.parse_frame_header(memoryview(raw[:9]))
            frame.parse_body(memoryview(raw[9 : 9 + length]))
            expected = None
        except HyperframeError as exc:
            expected = f"bad frame on the request side: {exc}"
        parser = Http2Parser()
        parser.feed("request", PREFACE + raw, 1)
        assert parser.failed == expected, raw


def test_malformed_header_frames_fail_as_hyperframe_says() -> None:
    """HEADERS and CONTINUATION frames are parsed without hyperframe: same verdicts
    (reported by hyperframe's exception names), same fragments."""
    from hyperframe.exceptions import HyperframeError
    from hyperframe.frame import Frame

    def frame(ftype: int, flags: int, sid: int, body: bytes) -> bytes:
        return len(body).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + body

    block = hpack.Encoder().encode([(":method", "GET"), (":path", "/x"), (":scheme", "https")])
    cases = [
        frame(1, 0x05, 0, block),  # stream 0
        frame(1, 0x0D, 1, b""),  # PADDED, no pad length byte
        frame(1, 0x0D, 1, b"\x05" + block[:4]),  # pad longer than the rest
        frame(1, 0x0D, 1, b"\x02" + block + b"\x00\x00"),  # padded: valid
        frame(1, 0x25, 1, b"\x00\x00\x00\x00"),  # PRIORITY, 4 bytes
        frame(1, 0x25, 1, b"\x00\x00\x00\x00\x10" + block),  # PRIORITY: valid
        frame(1, 0x2D, 1, b"\x03\x00\x00\x00\x00\x10" + block + b"\x00\x00\x00"),  # both
        frame(1, 0x2D, 1, b"\x03\x00\x00\x00\x00\x10\x00"),  # pad eats the priority
        frame(1, 0x05, 0x80000001, block),  # reserved bit set: stream 1
        frame(1, 0x01, 1, block[:3]) + frame(9, 0x04, 0, block[3:]),  # CONTINUATION, stream 0
        frame(1, 0x01, 1, block[:3]) + frame(9, 0x04, 1, block[3:]),  # continued: valid
    ]
    for raw in cases:
        expected = None
        fragment = b""
        pos = 0
        try:
            while pos < len(raw):
                f, length = Frame.parse_frame_header(memoryview(raw[pos : pos + 9]))
                f.parse_body(memoryview(raw[pos + 9 : pos + 9 + length]))
                fragment += f.data
                pos += 9 + length
        except HyperframeError as exc:
            expected = f"bad frame on the request side: {type(exc).__name__}"
        parser = Http2Parser()
        parser.feed("request", PREFACE + raw, 1)
        if expected is None:
            assert parser.failed is None, (raw, parser.failed)
            request = parser._streams[1].exchange.request
            path = dict(hpack.Decoder().decode(fragment)).get(":path", "")
            assert request is not None and request.target == path, raw
        else:
            assert parser.failed == expected, raw
