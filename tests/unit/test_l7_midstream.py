"""Fail-closed redaction where the protocol state is unknown: HTTP/2 first seen
mid-stream, L7 state evicted, gaps, bad or unknown frames; credential query
parameters in HTTP/1 and HTTP/2 targets; notes that quote no captured bytes."""

from __future__ import annotations

import h2.config
import h2.connection
import hpack
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hyperframe.frame import DataFrame, HeadersFrame, WindowUpdateFrame

from agent.l7.connection import L7Options
from agent.l7.http2 import Http2Parser
from agent.l7.http2_frames import find_frame_run, starts_frame_run
from agent.l7.stage import L7Stage
from agent.records.record import Record
from agent.redact.http2_masker import Http2HeaderMasker
from agent.redact.rules import DEFAULT_HEADERS, DEFAULT_QUERY_PARAMS, DEFAULT_RULES, NO_RULES
from tests.unit.l7build import Conn, run

SECRET = b"Bearer s3cr3t-midstream-token-0123456789"
HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def _forms(secret: bytes) -> list[bytes]:
    """The secret as it may appear on the wire: plain, and Huffman-coded (whole,
    and without its last byte, which padding bits can change)."""
    coded = HUFFMAN.encode(secret)
    return [secret, coded, coded[:-1]]


def assert_no_secret(data: bytes, secret: bytes = SECRET) -> None:
    for form in _forms(secret):
        assert form not in data, form


def _ext(stream: int, body: bytes) -> bytes:
    """A frame of an extension type (0x42) RFC 9113 does not define."""
    return len(body).to_bytes(3, "big") + b"\x42\x00" + stream.to_bytes(4, "big") + body


def _client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.data_to_send()
    return conn


def _request(conn: h2.connection.H2Connection, secret: bytes, path: str = "/api") -> bytes:
    sid = conn.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "example"),
        (":path", path),
        ("authorization", secret.decode()),
        ("x-other", "visible-value"),
    ]
    conn.send_headers(sid, headers)
    conn.send_data(sid, b"body-bytes", end_stream=True)
    return conn.data_to_send()


def _egress(out: list[Record], conn_id: str = "c1") -> bytes:
    return b"".join(
        r.data for r in out if r.type == "data" and r.direction == "egress" and r.conn_id == conn_id
    )


# -- recognition ------------------------------------------------------------------


def test_frame_runs_are_recognised_and_text_is_not() -> None:
    client = _client()
    client.data_to_send()
    record = _request(client, SECRET)
    assert starts_frame_run(record)
    assert not starts_frame_run(record[5:])  # not at a frame boundary
    assert not starts_frame_run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not starts_frame_run(b"220 smtp.example ESMTP ready\r\n")
    unknown_type = _ext(1, b"x")
    assert not starts_frame_run(unknown_type)
    bad_window = bytes.fromhex("000005080000000000") + bytes(5)  # WINDOW_UPDATE of 5 bytes
    assert not starts_frame_run(bad_window)


def _frame_tail(size: int = 5000, keep: int = 2000) -> bytes:
    """The last `keep` bytes of a large DATA frame: what a record starts with when a
    writer (Go's 4 KiB buffer) cut the frame across TLS writes."""
    return DataFrame(1, data=b"z" * size).serialize()[-keep:]


def test_frame_run_is_found_inside_a_record_that_starts_in_a_frame() -> None:
    client = _client()
    frames = _request(client, SECRET)  # HEADERS + DATA: two whole frames
    tail = _frame_tail()
    assert not starts_frame_run(tail + frames)
    assert find_frame_run(tail + frames) == len(tail)
    assert find_frame_run(frames) == 0
    # Inside a record one frame is not evidence enough (other binary protocols).
    one = DataFrame(1, data=b"after").serialize()
    assert find_frame_run(tail + one) is None
    assert find_frame_run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is None
    assert find_frame_run(bytes(10_000)) is None  # zeros: candidates everywhere, no run


# -- the masker -------------------------------------------------------------------


def test_midstream_masker_wipes_header_blocks_keeps_framing_and_data() -> None:
    client = _client()
    _request(client, b"Bearer first")  # before we looked: its HPACK state is unknown
    record = _request(client, SECRET)
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False, midstream=True)
    out, hits = m.feed(record)
    out += m.flush()[0]
    assert len(out) == len(record)
    assert_no_secret(out)
    assert b"visible-value" not in out and b"body-bytes" in out
    assert hits == {"http2:hpack-state-unknown"} and m.unknown_blocks == 1
    # Frame headers are unchanged: the masked bytes frame exactly like the original.
    assert out[:9] == record[:9]


def test_desynced_masker_zeroes_until_a_record_frames_then_wipes_blocks() -> None:
    client = _client()
    first = _request(client, b"Bearer first")
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False, midstream=True)
    cut, hits = m.feed(first[7:])  # starts inside a frame: nothing can be framed
    assert cut == bytes(len(first) - 7) and hits == {"http2:desync"}
    again, _ = m.feed(_request(client, SECRET))
    assert_no_secret(again)
    assert b"body-bytes" in again


def test_synced_masker_checks_frame_types_and_sizes() -> None:
    settings = bytes.fromhex("000000040000000000")
    ext = _ext(0, SECRET)
    data = DataFrame(1, data=b"after").serialize()
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False)
    out, hits = m.feed(settings + ext + data)
    assert out == settings + ext[:9] + bytes(len(SECRET)) + data
    assert hits == {"http2:unknown-frame-type"}
    # A WINDOW_UPDATE claiming a length it cannot have: no frame is trusted after it.
    bad = bytes.fromhex("000030080000000001") + SECRET + bytes(48 - len(SECRET))
    m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False)
    out, hits = m.feed(bad)
    assert out == bytes(len(bad)) and hits == {"http2:desync"}
    # The same mistake after a gap: zeros, then framing picked up at the next record.
    good = WindowUpdateFrame(0, window_increment=1).serialize()
    assert m.feed(good)[0] == good


def test_path_query_credentials_masked_in_hpack_plain_and_huffman() -> None:
    token = b"tok-SECRET-4242"
    for huffman in (False, True):
        enc = hpack.Encoder()
        enc.huffman = huffman  # type: ignore[attr-defined]
        path = b"/s3/o?x=1&access_token=" + token + b"&X-Amz-Signature=abcdef"
        block = enc.encode([(b":method", b"GET"), (b":path", path)], huffman=huffman)
        frame = HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        m = Http2HeaderMasker(DEFAULT_HEADERS, preface=False, query_params=DEFAULT_QUERY_PARAMS)
        out, hits = m.feed(frame)
        assert len(out) == len(frame)
        assert {"query:access_token", "query:x-amz-signature"} <= hits
        assert_no_secret(out, token)
        seen = dict(hpack.Decoder().decode(out[9:], raw=True))
        if huffman:  # cannot be changed piecewise: all of it is masked
            assert set(seen[b":path"]) == {ord("*")}
        else:
            assert seen[b":path"] == b"/s3/o?x=1&access_token=" + b"*" * len(token) + (
                b"&X-Amz-Signature=******"
            )


# -- through the stage --------------------------------------------------------------


def test_connection_first_seen_midstream_is_masked_and_counted() -> None:
    client = _client()
    _request(client, b"Bearer before-the-agent")
    c = Conn()
    records = [c.data("egress", _request(client, SECRET)) for _ in range(3)]
    stage = L7Stage(L7Options())
    out = run(stage, records)
    data = [r for r in out if r.type == "data"]
    egress = _egress(out)
    assert len(egress) == sum(r.captured_len for r in records)
    assert_no_secret(egress)
    assert all(r.protocol == "http2" for r in data)
    stats = stage.stats()
    assert stats["l7_midstream_http2_connections"] == 1
    assert stats["l7_header_blocks_masked_unknown"] == 3
    assert stats["l7_redacted_records"] == 3


def test_connection_first_seen_inside_a_large_frame_leaks_nothing() -> None:
    client = _client()
    _request(client, b"Bearer before-the-agent")
    c = Conn()
    # Every record starts with the tail of a large DATA frame the writer cut.
    records = [
        c.data("egress", _frame_tail() + _request(client, SECRET), skip=7000 if i == 0 else 0)
        for i in range(3)
    ]
    stage = L7Stage(L7Options())
    out = run(stage, records)
    egress = _egress(out)
    assert len(egress) == sum(r.captured_len for r in records)
    assert_no_secret(egress)
    first = next(r for r in out if r.type == "data")
    assert first.data[:2000] == bytes(2000)  # a frame's tail, type unknown: zeroed
    assert b"body-bytes" in first.data  # framed from the HEADERS on: DATA kept
    assert stage.stats()["l7_midstream_http2_connections"] == 1


def test_evicted_http2_connection_is_picked_up_fail_closed() -> None:
    c = Conn("c1")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    preface = client.data_to_send()
    records = [c.data("egress", preface + _request(client, b"Bearer one"))]
    other = Conn("c2")
    records.append(other.data("egress", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))  # evicts c1
    # c1 goes on: a record cut inside a frame, then whole frames.
    second = _request(client, SECRET)
    records.append(c.data("egress", second[:20]))
    records.append(c.data("egress", second[20:]))
    records.append(c.data("egress", _request(client, SECRET)))
    stage = L7Stage(L7Options(max_connections=1))
    out = run(stage, records)
    egress = _egress(out)
    assert_no_secret(egress)
    assert b"body-bytes" in egress  # the last record was framed: its DATA is kept
    stats = stage.stats()
    assert stats["l7_connections_evicted"] >= 1
    assert stats["l7_midstream_http2_connections"] == 1


def test_evicted_http2_connection_without_rules_passes_its_bytes_on() -> None:
    """With redaction off there is nothing to mask: a connection evicted while it spoke
    HTTP/2 goes on as raw bytes (its masker once failed to start: no HPACK reader)."""
    c = Conn("c1")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    records = [c.data("egress", client.data_to_send() + _request(client, b"Bearer one"))]
    records.append(Conn("c2").data("egress", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))  # evicts c1
    later = _request(client, SECRET)
    records.append(c.data("egress", later))
    stage = L7Stage(L7Options(max_connections=1, rules=NO_RULES))
    out = run(stage, records)
    assert _egress(out).endswith(later)
    assert stage.stats()["l7_midstream_http2_connections"] == 1


def test_evicted_http1_connection_masks_the_line_it_resumes_in() -> None:
    c = Conn("c1")
    records = [c.data("egress", b"GET / HTTP/1.1\r\nAuthorization: Bearer ab")]
    records.append(Conn("c2").data("egress", b"GET / HTTP/1.1\r\n\r\n"))  # evicts c1
    records.append(c.data("egress", b"cdef-rest-of-secret\r\nX-Other: shown\r\n\r\n"))
    stage = L7Stage(L7Options(max_connections=1))
    out = run(stage, records)
    egress = _egress(out)
    assert b"rest-of-secret" not in egress and b"X-Other: shown" in egress
    assert stage.stats()["l7_midstream_unknown_connections"] == 1


def test_gap_in_http2_then_framing_picked_up_with_blocks_wiped() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    c = Conn()
    records = [c.data("egress", client.data_to_send() + _request(client, b"Bearer one"))]
    _request(client, b"Bearer lost")  # lost in the gap
    records.append(c.data("egress", _request(client, SECRET), skip=100))
    stage = L7Stage(L7Options())
    out = run(stage, records)
    last = [r for r in out if r.type == "data"][-1]
    assert_no_secret(last.data)
    assert b"body-bytes" in last.data
    assert stage.stats()["l7_header_blocks_masked_unknown"] == 1


def test_http1_request_line_and_exchange_target_query_masked() -> None:
    c = Conn()
    req = b"GET /cb?code=1&access_token=tok-SECRET-99&sig=zz HTTP/1.1\r\nHost: x\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    out = run(L7Stage(L7Options()), [c.data("egress", req), c.data("ingress", resp)])
    egress = _egress(out)
    assert b"tok-SECRET-99" not in egress and len(egress) == len(req)
    assert egress.startswith(b"GET /cb?code=1&access_token=*************&sig=** HTTP/1.1")
    (ex,) = [r.exchange for r in out if r.type == "exchange"]
    assert ex.request.target == "/cb?code=1&access_token=*************&sig=**"
    assert "query:access_token" in ex.redactions


# -- notes ---------------------------------------------------------------------------


def test_parser_notes_and_failures_quote_no_captured_bytes() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    preface = client.data_to_send()
    # A header block that does not decode, holding the secret as a literal.
    bad_block = b"\x00" + bytes([len(SECRET)]) + SECRET + b"\xff\xff\xff\xff\xff"
    frame = HeadersFrame(1, data=bad_block, flags=["END_HEADERS"]).serialize()
    parser = Http2Parser()
    parser.feed("request", preface + _request(client, b"Bearer x"), 1)
    parser.feed("request", frame, 2)
    assert parser.failed
    assert SECRET.decode() not in parser.failed
    # A non-numeric :status carrying a secret: the note gives its length only.
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    enc = hpack.Encoder()
    block = enc.encode([(b":status", SECRET)])
    resp = HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
    parser = Http2Parser()
    c2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c2.initiate_connection()
    exs = parser.feed("request", c2.data_to_send() + _request(c2, b"Bearer y"), 1)
    exs += parser.feed("response", resp, 2)
    notes = [n for e in exs for n in e.notes]
    assert notes and not any(SECRET.decode() in n for n in notes)
    assert DEFAULT_RULES.enabled
