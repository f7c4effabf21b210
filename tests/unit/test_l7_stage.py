"""The L7 stage with hand-made records: detection, holding, release order, redaction
of raw records and exchanges, gaps, and fuzzing of the whole record path."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from agent.l7._record_path import Connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.l7.connection import L7Counters, L7Options
from agent.l7.exchange import Exchange, HttpMessage
from agent.l7.stage import L7Stage
from agent.records.record import Record
from agent.records.writer import RecordWriter
from agent.redact.rules import NO_RULES, build_rules
from tests.unit.l7build import Conn, run

SECRET = b"Bearer abc.def-123"


def stage(**kw) -> L7Stage:
    return L7Stage(L7Options(**kw))


REQUEST = b"GET /a HTTP/1.1\r\nHost: example\r\nAuthorization: " + SECRET + b"\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: sid=42\r\n\r\nhello"


def test_http1_exchange_and_masked_records_split_anywhere() -> None:
    for cut in range(1, len(REQUEST)):
        c = Conn()
        records = [
            c.data("egress", REQUEST[:cut]),
            c.data("egress", REQUEST[cut:]),
            c.data("ingress", RESPONSE),
            c.close(),
        ]
        out = run(stage(), records)
        data = [r for r in out if r.type == "data"]
        (ex,) = [r for r in out if r.type == "exchange"]
        assert out[-1].type == "close"
        # Every byte leaves, masked, at its own offset and length.
        assert b"".join(r.data for r in data[:2]) == REQUEST.replace(SECRET, b"*" * len(SECRET))
        assert [len(r.data) for r in data] == [r.captured_len for r in data]
        assert all(r.protocol == "http1" for r in data)
        assert ex.exchange.request.target == "/a"
        assert ex.exchange.response.status == 200
        assert ex.exchange.request.header("authorization") == "[REDACTED]"
        assert ex.exchange.response.header("set-cookie") == "[REDACTED]"
        assert ex.exchange.latency_ns == 2_000_000  # first request byte -> response end
        assert SECRET not in b"".join(r.data for r in data)


def test_no_redact_leaves_bytes_and_headers_alone() -> None:
    c = Conn()
    options = {"rules": build_rules([], [], [], disabled=True)}
    out = run(stage(**options), [c.data("egress", REQUEST), c.data("ingress", RESPONSE)])
    assert out[0].data == REQUEST and out[0].redactions == []
    (ex,) = [r for r in out if r.type == "exchange"]
    assert ex.exchange.request.header("authorization") == SECRET.decode()


def test_regex_rule_masks_payloads_and_bodies() -> None:
    rules = build_rules([], [], [r"card=\d{4}-\d{4}-\d{4}-\d{4}"])
    body = b"card=1234-5678-9012-3456"
    request = b"POST /pay HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    c = Conn()
    out = run(stage(rules=rules), [c.data("egress", request), c.data("ingress", RESPONSE)])
    assert b"1234-5678" not in out[0].data and len(out[0].data) == len(request)
    assert out[0].redactions == ["regex:card"]  # NAME=PATTERN
    (ex,) = [r for r in out if r.type == "exchange"]
    assert b"1234" not in ex.exchange.request.body


def _h2_conversation() -> tuple[bytes, bytes]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    client.initiate_connection()
    server.initiate_connection()
    c_out = bytearray()
    s_out = bytearray()
    for i, path in enumerate(("/x", "/y")):
        sid = client.get_next_available_stream_id()
        client.send_headers(
            sid,
            [(":method", "GET"), (":path", path), (":scheme", "https"),
             (":authority", "example"), ("authorization", SECRET.decode())],
            end_stream=True,
        )  # fmt: skip
        data = client.data_to_send()
        c_out += data
        for event in server.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, [(":status", str(200 + i))])
                server.send_data(event.stream_id, b"body" + path.encode(), end_stream=True)
        s_out += server.data_to_send()
    return bytes(c_out), bytes(s_out)


def test_http2_exchanges_and_header_blocks_masked() -> None:
    c_bytes, s_bytes = _h2_conversation()
    for cut in (3, 24, 30, 40, len(c_bytes) - 5):
        c = Conn()
        records = [
            c.data("egress", c_bytes[:cut]),
            c.data("egress", c_bytes[cut:]),
            c.data("ingress", s_bytes),
        ]
        out = run(stage(), records)
        exs = [r.exchange for r in out if r.type == "exchange"]
        assert [(e.request.target, e.response.status) for e in exs] == [("/x", 200), ("/y", 201)]
        assert all(e.request.header("authorization") == "[REDACTED]" for e in exs)
        data = [r for r in out if r.type == "data"]
        masked = b"".join(r.data for r in data if r.direction == "egress")
        assert len(masked) == len(c_bytes)
        # A fresh decoder (a Wireshark's view) reads the masked stream: stars, no secret.
        frames = _header_blocks(masked[24:])
        decoder = hpack.Decoder()
        seen = [dict(decoder.decode(block)) for block in frames]
        assert all(set(h["authorization"]) == {"*"} for h in seen)
        assert [r.offset for r in data if r.direction == "egress"] == [0, cut]


def _header_blocks(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 9 <= len(stream):
        length = int.from_bytes(stream[pos : pos + 3], "big")
        if stream[pos + 3] == 1:  # HEADERS, no padding/priority from h2 here
            out.append(stream[pos + 9 : pos + 9 + length])
        pos += 9 + length
    return out


def test_detection_holds_a_preface_prefix_then_releases_in_order() -> None:
    c_bytes, _ = _h2_conversation()
    c = Conn()
    s = stage()
    assert s.process(c.data("egress", c_bytes[:5])) == []  # "PRI *": might be HTTP/2
    out = s.process(c.data("egress", c_bytes[5:]))
    assert [r.offset for r in out if r.type == "data"] == [0, 5]
    assert all(r.protocol == "http2" for r in out)


def test_gap_is_marked_not_hidden() -> None:
    c = Conn()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
    out = run(
        stage(),
        [
            c.data("egress", b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n"),
            c.data("ingress", response[:45], lost=5),
            c.close(),
        ],
    )
    (ex,) = [r.exchange for r in out if r.type == "exchange"]
    assert ex.response is None or not ex.response.complete
    assert any("not captured" in n for n in ex.notes), ex.notes


def test_unknown_protocol_stays_raw_but_header_lines_are_still_masked() -> None:
    c = Conn()
    payload = b"\x00\x01binary\nAuthorization: " + SECRET + b"\n"
    out = run(stage(), [c.data("egress", payload), c.close()])
    assert [r.type for r in out] == ["data", "close"]
    assert out[0].protocol == "" and SECRET not in out[0].data
    assert len(out[0].data) == len(payload)


def test_midstream_http1_is_picked_up_at_a_request_line() -> None:
    c = Conn()
    c.offsets = {"egress": 5000, "ingress": 9000}
    out = run(stage(), [c.data("egress", b"tail of an old body"), c.data("egress", REQUEST),
                        c.data("ingress", RESPONSE)])  # fmt: skip
    assert [r.type for r in out].count("exchange") == 1
    assert out[0].protocol == ""  # before the request line: not known to be HTTP


def test_writer_flushes_the_stage_before_the_stats_record() -> None:
    written: list[Record] = []

    class Sink:
        def write(self, r: Record) -> None:
            written.append(r)

        def close(self) -> None:
            pass

    w = RecordWriter([Sink()], "a", "n", l7=stage())
    c = Conn()
    w.write(c.data("egress", REQUEST))  # an exchange pending: no response yet
    w.write(Record(type="stats", ts_ns=1, stats={"records": 0, "bytes": 0}))
    assert [r.type for r in written] == ["data", "exchange", "stats"]
    assert written[1].exchange.response is None
    assert written[-1].stats["l7_exchanges"] == 1
    assert written[-1].stats["records"] == 2
    assert [r.seq for r in written] == [1, 2, 3]


record_parts = st.lists(
    st.tuples(
        st.sampled_from(["egress", "ingress"]),
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from([REQUEST, RESPONSE, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"PR"]),
        ),
        st.integers(0, 3),  # skipped bytes (a gap before)
        st.integers(0, 2),  # bytes not captured after
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=record_parts, role=st.sampled_from(["client", "server", "unknown"]))
def test_fuzz_every_record_leaves_once_with_its_length(parts, role) -> None:
    c = Conn(role=role)
    records = [c.data(d, p, skip=skip, lost=lost) for d, p, skip, lost in parts]
    sent = [(r.direction, r.offset, r.captured_len) for r in records]
    out = run(stage(), [*records, c.close()])
    got = [(r.direction, r.offset, len(r.data)) for r in out if r.type == "data"]
    assert sorted(got) == sorted(sent)
    assert [r.type for r in out].count("close") == 1


class _ScriptedMasker:
    """Hands back the (masked bytes, rules) it is given per feed, whatever came in:
    a masker that holds bytes back and releases them in pieces of its own."""

    unknown_blocks = 0

    def __init__(self, script: list[tuple[bytes, set[str]]]) -> None:
        self.script = script

    def feed(self, data: bytes) -> tuple[bytes, set[str]]:
        return self.script.pop(0)

    def flush(self) -> tuple[bytes, set[str]]:
        return b"", set()


def test_decided_bytes_are_handed_out_across_and_within_pieces() -> None:
    conn = Connection(L7Counters(), NO_RULES)
    conn.detecting = False
    script = [(b"abc", set()), (b"", {"header:cookie"}), (b"defgh", set()), (b"", set())]
    conn.set_masker("egress", _ScriptedMasker([*script, (b"ijk", set())]))
    c = Conn()
    r1, r2, r3, r4 = (c.data("egress", p) for p in (b"1234", b"", b"56", b"78"))
    assert conn.on_data(r1) == []  # not decided yet
    assert conn.on_data(r2) == []  # in order, behind r1
    assert conn.held == 2 and conn.decided_bytes == (3, 0)
    # Joined across two pieces, the rest kept; then nothing; then within a piece.
    assert conn.on_data(r3) == [r1, r2, r3]
    assert (r1.data, r2.data, r3.data) == (b"abcd", b"", b"ef")
    # The rules stay with the decided bytes until they are all handed out.
    assert r1.redactions == r3.redactions == ["header:cookie"] and r2.redactions == []
    assert conn.on_data(r4) == [r4] and r4.data == b"gh"
    assert r4.redactions == ["header:cookie"]
    assert conn.held == 0 and conn.decided_bytes == (0, 0)
    r5 = c.data("egress", b"9ab")
    assert conn.on_data(r5) == [r5] and (r5.data, r5.redactions) == (b"ijk", [])


def test_a_batch_in_one_call_is_record_by_record() -> None:
    """process_many (the writer's one call per batch) gives what process() gives one
    record at a time: HTTP/1 and HTTP/2 connections interleaved, a close, and a
    connection evicted past max_connections in the middle of the batch."""

    def batch() -> list[Record]:  # fresh records for each run: the stage masks them
        h1, h2c, other = Conn("h1"), Conn("h2", role="server"), Conn("other")
        return [
            h2c.data("ingress", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            h1.data("egress", REQUEST[:10]),
            h1.data("egress", REQUEST[10:]),
            h1.data("ingress", RESPONSE),
            other.data("egress", b"\x16\x03\x01 not http"),  # the third: h2 is evicted
            other.close(),
            h1.close(),
        ]

    one_by_one = stage(max_connections=2)
    expected = run(one_by_one, batch())
    batched = stage(max_connections=2)
    out = batched.process_many(batch()) + batched.flush()
    assert [r.to_json() for r in out] == [r.to_json() for r in expected]
    assert batched.counters.as_dict() == one_by_one.counters.as_dict()
    assert batched.counters.connections_evicted == 1
    assert [r.type for r in out].count("exchange") == 1


def test_exchange_records_in_c_redact_count_and_time_each_exchange() -> None:
    """Connection._exchange_records (C: the record path's, and ConnectionL7.on_close's):
    each exchange redacted by the rules (through exchange.py's helpers too: a query,
    a regex in the notes), counted, and timed by its response's end, else start,
    else its request's, else the connection's latest record; an error in redaction
    reaches the caller."""
    counters = L7Counters()
    conn = Connection(counters, build_rules([], [], [r"card=\d{16}"]))
    last = Conn().data("egress", b"x")
    conn.last = last
    exchanges = [
        Exchange("http1", HttpMessage(ts_ns=5, end_ts_ns=6, target="/?token=abc"),
                 HttpMessage(ts_ns=7, end_ts_ns=8)),
        Exchange("http1", HttpMessage(ts_ns=5, end_ts_ns=6), HttpMessage(ts_ns=7)),
        Exchange("http1", HttpMessage(ts_ns=5, end_ts_ns=6), HttpMessage()),
        Exchange("http1", HttpMessage(ts_ns=5)),
        Exchange("http1", HttpMessage(), HttpMessage(), notes=["card=4111111111111111"]),
    ]  # fmt: skip
    records = conn._exchange_records(exchanges)
    assert [r.ts_ns for r in records] == [8, 7, 6, 5, last.ts_ns]
    assert [r.exchange for r in records] == exchanges
    assert all(r.type == "exchange" and r.conn_id == last.conn_id for r in records)
    assert exchanges[0].request is not None and exchanges[0].request.target == "/?token=***"
    assert exchanges[4].notes == ["card=****************"]
    assert (counters.exchanges, counters.redacted_exchanges) == (5, 2)
    # No rules: counted, not redacted.
    plain = Connection(L7Counters(), NO_RULES)
    plain.last = last
    ex = Exchange("http1", HttpMessage(target="/?token=abc", headers=[("cookie", "a")]))
    assert len(plain._exchange_records([ex])) == 1
    assert ex.request is not None and ex.request.target == "/?token=abc" and ex.redactions == []
    assert (plain.counters.exchanges, plain.counters.redacted_exchanges) == (1, 0)
    # An error inside redaction (a body that is not bytes, for the regex) propagates.
    with pytest.raises(TypeError):
        conn._exchange_records([Exchange("http1", HttpMessage(body="text"))])  # type: ignore[arg-type]
    # No data record yet: nothing to take an exchange record's identity from.
    with pytest.raises(AssertionError):
        Connection(L7Counters(), NO_RULES)._exchange_records([Exchange("http1")])


def test_a_kept_header_field_is_redacted_in_every_exchange() -> None:
    """The HTTP/1 parser hands a connection's repeated fields out as the same tuples;
    redacting one exchange must not change what the next one is given, so a
    sensitive field is redacted in each exchange, and a connection's records never
    carry its value."""
    c = Conn()
    request = b"GET /a HTTP/1.1\r\nHost: example\r\nUser-Agent: secret-agent/1.0\r\n\r\n"
    records = []
    for _ in range(3):
        records += [c.data("egress", request), c.data("ingress", RESPONSE)]
    out = run(stage(rules=build_rules(["user-agent"], [], [])), records)
    exchanges = [r.exchange for r in out if r.type == "exchange"]
    assert len(exchanges) == 3
    for ex in exchanges:
        assert ex.request.header("user-agent") == "[REDACTED]"
        assert ex.request.header("host") == "example"
        assert "header:user-agent" in ex.redactions
    assert all(b"secret-agent" not in r.data for r in out if r.type == "data")
