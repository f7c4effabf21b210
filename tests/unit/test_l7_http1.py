"""HTTP/1.x exchange parsing from captured plaintext (agent.l7.http1)."""

from __future__ import annotations

import dataclasses
import itertools
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.l7.exchange import Exchange, HttpMessage
from agent.l7.http1 import Http1Parser, looks_like_request_start, looks_like_response_start

# A step: (side, bytes or gap length, ts_ns).
Step = tuple[str, bytes | int, int]


def run(steps: list[Step], body_limit: int = 4096, close: bool = True) -> tuple[Http1Parser, list]:
    p = Http1Parser(body_limit=body_limit)
    out: list[Exchange] = []
    for side, data, ts in steps:
        if isinstance(data, int):
            out += p.gap(side, data, ts)
        else:
            out += p.feed(side, data, ts)
    if close:
        out += p.close(10**9)
    return p, out


def as_json(exchanges: list[Exchange]) -> list[dict]:
    return [e.to_json() for e in exchanges]


def split(steps: list[Step], cuts: list[list[int]]) -> list[Step]:
    """Each step's bytes cut at the given offsets (same ts for every piece)."""
    out: list[Step] = []
    for (side, data, ts), at in zip(steps, cuts, strict=True):
        edges = [0, *sorted(set(at)), len(data)]
        out += [(side, data[a:b], ts) for a, b in itertools.pairwise(edges) if b > a]
    return out


def req(method: str, target: str, headers: str = "", body: bytes = b"", v: str = "1.1") -> bytes:
    head = f"{method} {target} HTTP/{v}\r\nHost: api.example.com\r\n{headers}\r\n"
    return head.encode() + body


def resp(status: str, headers: str = "", body: bytes = b"", v: str = "1.1") -> bytes:
    return f"HTTP/{v} {status}\r\n{headers}\r\n".encode() + body


CURL = "User-Agent: curl/8.5.0\r\nAccept: */*\r\n"
USERS = b'[{"id":7,"name":"ada"}]'
CHUNKED_BODY = b'7\r\n[{"id":\r\n9\r\n7,"x":1}]\r\n0\r\nX-Checksum: abc\r\n\r\n'

# curl-like keep-alive: GET, POST with a body, DELETE; a chunked and a 204 response.
KEEPALIVE: list[Step] = [
    ("request", req("GET", "/api/users", CURL), 1_000),
    ("response", resp("200 OK", f"Content-Length: {len(USERS)}\r\n", USERS), 3_000),
    ("request", req("POST", "/api/users", CURL + "Content-Length: 12\r\n", b'{"name":"x"}'), 5_000),
    ("response", resp("201 Created", "Transfer-Encoding: chunked\r\n", CHUNKED_BODY), 9_000),
    ("request", req("DELETE", "/api/users/7", CURL), 10_000),
    ("response", resp("204 No Content", "Content-Length: 0\r\n"), 10_500),
]

PIPELINED: list[Step] = [
    ("request", req("GET", "/a") + req("HEAD", "/b") + req("GET", "/c"), 100),
    ("response", resp("200 OK", "Content-Length: 1\r\n", b"A")
     + resp("200 OK", "Content-Length: 5000\r\n")  # HEAD: no body despite the length
     + resp("200 OK", "Transfer-Encoding: chunked\r\n", b"1\r\nC\r\n0\r\n\r\n"), 200),
]  # fmt: skip

CONTINUE: list[Step] = [
    ("request", req("PUT", "/upload", "Expect: 100-continue\r\nContent-Length: 5\r\n"), 10),
    ("response", resp("100 Continue"), 20),
    ("request", b"hello", 30),
    ("response", resp("200 OK", "Content-Length: 2\r\n", b"ok"), 40),
]

UNTIL_CLOSE: list[Step] = [
    ("request", req("GET", "/old", v="1.0"), 10),
    ("response", resp("200 OK", "Server: old\r\n", b"first part,", v="1.0"), 20),
    ("response", b"second part", 30),
]

# HEAD responses framed as if they had a body, pipelined behind other responses.
HEADS: list[Step] = [
    ("request", req("HEAD", "/h1") + req("GET", "/g") + req("HEAD", "/h2") + req("HEAD", "/h3"), 1),
    ("response", resp("200 OK", "Transfer-Encoding: chunked\r\n")
     + resp("200 OK", "Content-Length: 4\r\n", b"body")
     + resp("200 OK", "Content-Length: 5000\r\n")
     + resp("200 OK", "Server: no framing at all\r\n"), 2),
]  # fmt: skip

UPGRADE = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n"
# An Upgrade request with a body, refused: the body is the request's, what follows is HTTP/1.
UPGRADE_BODY: list[Step] = [
    ("request", req("POST", "/up", UPGRADE + "Content-Length: 5\r\n", b"hello")
     + req("GET", "/next"), 1),
    ("response", resp("200 OK", "Content-Length: 1\r\n", b"a")
     + resp("200 OK", "Content-Length: 1\r\n", b"b"), 2),
]  # fmt: skip

CORPUS = {"keepalive": KEEPALIVE, "pipelined": PIPELINED, "continue": CONTINUE,
          "until_close": UNTIL_CLOSE, "heads": HEADS, "upgrade_body": UPGRADE_BODY}  # fmt: skip


def test_keepalive_three_requests() -> None:
    p, out = run(KEEPALIVE)
    assert p.failed is None
    assert [e.stream_id for e in out] == [1, 2, 3]
    assert [(e.request.method, e.request.target, e.response.status) for e in out] == [
        ("GET", "/api/users", 200),
        ("POST", "/api/users", 201),
        ("DELETE", "/api/users/7", 204),
    ]
    get, post, delete = out
    assert get.request.authority == "api.example.com"
    assert get.request.header("user-agent") == "curl/8.5.0"
    assert get.request.version == "1.1" and get.response.reason == "OK"
    assert get.response.body == USERS and get.response.body_len == len(USERS)
    assert post.request.body == b'{"name":"x"}' and post.request.complete
    assert post.response.body == b'[{"id":7,"x":1}]'
    assert post.response.trailers == [("x-checksum", "abc")]
    assert delete.response.body == b"" and delete.response.complete
    assert [e.latency_ns for e in out] == [2_000, 4_000, 500]
    assert all(not e.notes for e in out)


def test_exchanges_are_returned_by_the_chunk_that_completes_them() -> None:
    p = Http1Parser()
    assert p.feed("request", KEEPALIVE[0][1], 1) == []
    (done,) = p.feed("response", KEEPALIVE[1][1], 2)
    assert done.stream_id == 1
    assert p.close(3) == []


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_single_split_point_gives_the_same_result(name: str) -> None:
    steps = CORPUS[name]
    _, whole = run(steps)
    for i, (_, data, _) in enumerate(steps):
        for cut in range(1, len(data)):
            cuts = [[cut] if j == i else [] for j in range(len(steps))]
            assert as_json(run(split(steps, cuts))[1]) == as_json(whole), (i, cut)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_byte_by_byte_gives_the_same_result(name: str) -> None:
    steps = CORPUS[name]
    bytewise = split(steps, [list(range(len(d))) for _, d, _ in steps])
    assert as_json(run(bytewise)[1]) == as_json(run(steps)[1])


def test_pipelining_pairs_fifo_and_honours_head() -> None:
    p, out = run(PIPELINED)
    assert p.failed is None
    assert [(e.request.method, e.request.target, e.response.body) for e in out] == [
        ("GET", "/a", b"A"),
        ("HEAD", "/b", b""),
        ("GET", "/c", b"C"),
    ]
    assert out[1].response.header("content-length") == "5000" and out[1].response.complete
    assert all(e.request.ts_ns == 100 and e.response.end_ts_ns == 200 for e in out)


def test_deep_pipelining_in_single_chunks() -> None:
    n = 300  # many messages in one chunk each way
    reqs = b"".join(req("GET", f"/{i}", CURL) for i in range(n))
    resps = b"".join(resp("200 OK", "Content-Length: 3\r\n", b"%03d" % i) for i in range(n))
    p, out = run([("request", reqs, 1), ("response", resps, 2)])
    assert p.failed is None and len(out) == n
    assert all(
        e.request.target == f"/{i}" and e.response.body == b"%03d" % i for i, e in enumerate(out)
    )
    assert [e.stream_id for e in out] == list(range(1, n + 1))


def test_http10_request_without_host() -> None:
    p, (ex,) = run(
        [
            ("request", b"GET /legacy HTTP/1.0\r\n\r\n", 1),
            ("response", resp("200 OK", "Content-Length: 1\r\n", b"k", v="1.0"), 2),
        ]
    )
    assert p.failed is None and ex.request.authority == "" and ex.response.body == b"k"


def test_304_and_204_have_no_body() -> None:
    steps: list[Step] = [
        ("request", req("GET", "/x", 'If-None-Match: "e1"\r\n') + req("GET", "/y"), 1),
        ("response", resp("304 Not Modified", "Content-Length: 99\r\n")
         + resp("204 No Content") + b"", 2),
    ]  # fmt: skip
    p, out = run(steps)
    assert p.failed is None
    assert [(e.response.status, e.response.body_len, e.response.complete) for e in out] == [
        (304, 0, True),
        (204, 0, True),
    ]


def test_100_continue_is_skipped_with_a_note() -> None:
    p, out = run(CONTINUE)
    (ex,) = out
    assert p.failed is None
    assert ex.response.status == 200 and ex.response.body == b"ok"
    assert ex.request.body == b"hello"
    assert "100 Continue" in ex.notes
    assert ex.request.end_ts_ns == 30 and ex.response.ts_ns == 40


def test_chunked_request_body_is_dechunked() -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    _, (ex,) = run(
        [
            ("request", req("POST", "/c", "Transfer-Encoding: chunked\r\n", body), 1),
            ("response", resp("200 OK", "Content-Length: 0\r\n"), 2),
        ]
    )
    assert ex.request.body == b"hello world" and ex.request.body_len == 11


def test_read_until_close_finishes_at_close() -> None:
    p = Http1Parser()
    out = []
    for side, data, ts in UNTIL_CLOSE:
        out += p.feed(side, data, ts)
    assert out == []  # the body's end is only known at close
    (ex,) = p.close(99)
    assert ex.response.complete and ex.response.body == b"first part,second part"
    assert ex.response.version == "1.0" and ex.request.version == "1.0"
    assert ex.response.end_ts_ns == 30 and ex.latency_ns == 20
    assert "response body delimited by connection close" in ex.notes
    assert p.close(100) == [] and p.feed("response", b"more", 101) == []


def test_connection_close_and_http10_keepalive_continue() -> None:
    ka = "Connection: keep-alive\r\n"
    steps: list[Step] = [
        ("request", req("GET", "/1", ka, v="1.0"), 1),
        ("response", resp("200 OK", ka + "Content-Length: 1\r\n", b"1", v="1.0"), 2),
        ("request", req("GET", "/2", ka, v="1.0"), 3),
        ("response", resp("200 OK", ka + "Content-Length: 1\r\n", b"2", v="1.0"), 4),
        ("request", req("GET", "/3", "Connection: close\r\n"), 5),
        ("response", resp("200 OK", "Connection: close\r\nContent-Length: 1\r\n", b"3"), 6),
    ]
    p, out = run(steps, close=False)
    assert p.failed is None
    assert [(e.request.target, e.response.body) for e in out] == [
        ("/1", b"1"),
        ("/2", b"2"),
        ("/3", b"3"),
    ]
    assert p.close(7) == []


def test_101_upgrade_finishes_the_exchange_and_stops() -> None:
    up = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==\r\n"
    p = Http1Parser()
    assert p.feed("request", req("GET", "/chat", up) + b"\x81\x05hello", 1) == []
    (ex,) = p.feed("response", resp("101 Switching Protocols", up) + b"\x81\x02hi", 2)
    assert ex.response.status == 101 and ex.response.complete and ex.latency_ns == 1
    assert p.failed == "protocol switched to websocket"
    assert p.feed("request", b"\x81\x05again", 3) == [] and p.close(4) == []


def test_connect_tunnel_and_refused_connect() -> None:
    connect = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
    p = Http1Parser()
    p.feed("request", connect, 1)
    (ex,) = p.feed("response", resp("200 Connection established"), 2)
    assert ex.response.status == 200
    assert p.failed == "protocol switched to a CONNECT tunnel to db.internal:5432"

    p, out = run(
        [
            ("request", connect + req("GET", "/after"), 1),
            ("response", resp("407 Proxy Authentication Required", "Content-Length: 0\r\n"), 2),
            ("response", resp("200 OK", "Content-Length: 2\r\n", b"ok"), 3),
        ]
    )
    assert p.failed is None
    assert [(e.request.target, e.response.status) for e in out] == [
        ("db.internal:5432", 407),
        ("/after", 200),
    ]


def test_refused_upgrade_resumes_the_request_stream() -> None:
    h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n"
    p, out = run(
        [
            ("request", req("GET", "/", h2c) + req("GET", "/next"), 1),
            ("response", resp("200 OK", "Content-Length: 1\r\n", b"a"), 2),
            ("response", resp("200 OK", "Content-Length: 1\r\n", b"b"), 3),
        ]
    )
    assert p.failed is None
    assert [(e.request.target, e.response.body) for e in out] == [("/", b"a"), ("/next", b"b")]


def test_head_responses_end_at_their_header_block_whatever_their_framing() -> None:
    p, out = run(HEADS)
    assert p.failed is None
    assert [(e.request.target, e.response.body, e.response.complete) for e in out] == [
        ("/h1", b"", True),
        ("/g", b"body", True),
        ("/h2", b"", True),
        ("/h3", b"", True),
    ]
    assert out[2].response.header("content-length") == "5000"
    assert all(not e.notes for e in out)


def test_upgrade_request_body_is_read_before_the_verdict() -> None:
    p, (up, nxt) = run(UPGRADE_BODY)
    assert p.failed is None
    assert up.request.body == b"hello" and up.request.complete and up.response.body == b"a"
    assert nxt.request.target == "/next" and nxt.response.body == b"b"


def test_upgrade_request_with_a_chunked_body_then_switched() -> None:
    body = b"5\r\nhello\r\n0\r\n\r\n"
    p = Http1Parser()
    p.feed("request", req("POST", "/up", UPGRADE + "Transfer-Encoding: chunked\r\n", body), 1)
    assert p.feed("request", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 2) == []  # held
    (ex,) = p.feed("response", resp("101 Switching Protocols", UPGRADE) + b"\x00\x00", 3)
    assert ex.request.body == b"hello" and ex.request.end_ts_ns == 1
    assert ex.response.status == 101 and p.failed == "protocol switched to h2c"


def test_refused_connect_resumes_pipelined_head_requests() -> None:
    connect = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
    steps: list[Step] = [
        ("request", connect + req("HEAD", "/h") + req("GET", "/g"), 1),
        ("response", resp("407 Proxy Authentication Required", "Content-Length: 0\r\n")
         + resp("200 OK", "Content-Length: 50\r\n")
         + resp("200 OK", "Content-Length: 1\r\n", b"g"), 2),
    ]  # fmt: skip
    p, out = run(steps)
    assert p.failed is None
    assert [(e.request.method, e.response.status, e.response.body) for e in out] == [
        ("CONNECT", 407, b""),
        ("HEAD", 200, b""),
        ("GET", 200, b"g"),
    ]


def test_upgrade_verdict_awaited_too_long_stalls() -> None:
    p = Http1Parser()
    p.feed("request", req("CONNECT", "a:1"), 1)
    for i in range(70):
        p.feed("request", b"x" * 16384, 2 + i)
    assert p.failed == "request stream stalled behind an unanswered Upgrade"


def test_101_without_an_upgrade_request_still_switches() -> None:
    p = Http1Parser()
    p.feed("request", req("GET", "/"), 1)
    (ex,) = p.feed("response", resp("101 Switching Protocols") + b"\x81\x00", 2)
    assert ex.response.status == 101 and p.failed == "protocol switched to another protocol"


def test_early_hints_are_noted_and_the_final_response_paired() -> None:
    p, (ex,) = run(
        [
            ("request", req("GET", "/page"), 1),
            ("response", resp("103 Early Hints", "Link: </s.css>; rel=preload\r\n"), 2),
            ("response", resp("200 OK", "Content-Length: 2\r\n", b"ok"), 3),
        ]
    )
    assert p.failed is None and ex.notes == ["103 Early Hints"]
    assert ex.response.status == 200 and ex.response.ts_ns == 3 and ex.response.body == b"ok"


def test_transfer_coding_other_than_chunked_reads_until_close() -> None:
    p, (ex,) = run(
        [
            ("request", req("GET", "/z"), 1),
            ("response", resp("200 OK", "Transfer-Encoding: gzip\r\n", b"\x1f\x8b"), 2),
        ]
    )
    assert p.failed is None and ex.response.body == b"\x1f\x8b" and ex.response.complete
    assert "response body delimited by connection close" in ex.notes


def test_header_values_are_trimmed_and_obs_fold_joined() -> None:
    _, (ex,) = run([("request", req("GET", "/", "X-A:  padded \t\r\nX-B: one\r\n two\r\n"), 1)])
    assert ex.request.header("x-a") == "padded" and ex.request.header("x-b") == "one two"


def test_parse_error_notes_never_quote_the_bytes() -> None:
    secret = "Bearer s3cr3t-t0ken"
    p = Http1Parser()
    p.feed("request", req("GET", "/x"), 1)
    (ex,) = p.feed("response", f"HTTP/1.1 200 OK\r\nAuthorization {secret}\r\n\r\n".encode(), 2)
    assert p.failed == "HTTP/1 parse error in response stream: Invalid header token"
    assert all("s3cr3t" not in n for n in ex.notes)


def test_header_block_larger_than_the_limit_is_a_parse_error() -> None:
    p = Http1Parser()
    p.feed("request", b"GET / HTTP/1.1\r\n", 1)
    for i in range(80):
        p.feed("request", b"X-Filler: " + b"a" * 16384 + b"\r\n", 2 + i)
    assert p.failed is not None and "header block larger than" in p.failed


def test_gap_in_response_body_then_resync_at_next_response() -> None:
    steps: list[Step] = [
        ("request", req("GET", "/big"), 1),
        ("response", resp("200 OK", "Content-Length: 10000\r\n", b"x" * 3000), 2),
        ("response", 4000, 3),  # lost
        ("response", b"y" * 3000, 4),  # the rest of the body: not a message start
        ("request", req("GET", "/small"), 5),
        ("response", resp("200 OK", "Content-Length: 2\r\n", b"ok"), 6),
    ]
    p, (big, small) = run(steps)
    assert p.failed is None
    assert not big.response.complete and big.response.body_len == 3000
    assert big.response.end_ts_ns == 0 and big.latency_ns is None
    assert "4000 bytes not captured in response" in big.notes
    assert small.request.target == "/small" and small.response.body == b"ok"
    assert small.response.complete and small.latency_ns == 1
    assert any("resynced" in n and "3000 bytes skipped" in n for n in small.notes)
    assert any("oldest unanswered request" in n for n in small.notes)


def test_gap_in_request_body_then_resync() -> None:
    steps: list[Step] = [
        ("request", req("POST", "/up", "Content-Length: 100\r\n", b"a" * 40), 1),
        ("request", 30, 2),
        ("request", b"b" * 30, 3),
        ("response", resp("413 Too Large", "Content-Length: 0\r\n"), 4),
        ("request", req("GET", "/next"), 5),
        ("response", resp("200 OK", "Content-Length: 0\r\n"), 6),
    ]
    p, (up, nxt) = run(steps)
    assert p.failed is None
    assert up.request.body_len == 40 and not up.request.complete and up.response.status == 413
    assert "30 bytes not captured in request" in up.notes
    assert nxt.request.target == "/next" and nxt.response.status == 200
    assert any("request side resynced" in n and "30 bytes skipped" in n for n in nxt.notes)


def test_false_resync_is_abandoned_not_fatal() -> None:
    looks_like_a_request = b"GET / HTTP/1.1\r\nnot a header\r\n\r\n"
    steps: list[Step] = [
        ("request", req("POST", "/a", "Content-Length: 900\r\n", b"a" * 10), 1),
        ("request", 50, 2),
        ("request", looks_like_a_request, 3),
        ("request", req("GET", "/b"), 4),
        ("response", resp("200 OK", "Content-Length: 0\r\n") * 2, 5),
    ]
    p, (a, b) = run(steps)
    assert p.failed is None
    assert (a.request.target, b.request.target) == ("/a", "/b")
    assert f"request side resynced here: {len(looks_like_a_request)} bytes skipped" in b.notes


def test_response_for_a_request_lost_in_a_gap_is_not_misattributed() -> None:
    steps: list[Step] = [
        ("request", 500, 1),  # a whole request lost
        ("response", resp("200 OK", "Content-Length: 1\r\n", b"L"), 2),
        ("request", req("GET", "/seen"), 3),
        ("response", resp("200 OK", "Content-Length: 1\r\n", b"S"), 4),
    ]
    _, (lost, seen) = run(steps)
    assert lost.request is None and lost.response.body == b"L"
    assert any("no request seen" in n for n in lost.notes)
    assert seen.request.target == "/seen" and seen.response.body == b"S"


def test_response_without_request() -> None:
    p, (ex,) = run([("response", resp("200 OK", "Content-Length: 2\r\n", b"hi"), 5)])
    assert ex.request is None and ex.response.body == b"hi" and ex.response.complete
    assert ex.stream_id == 1 and ex.latency_ns is None
    assert "no request seen for this response" in ex.notes
    assert p.failed is None


@pytest.mark.parametrize(
    "steps",
    [
        [("request", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 1)],
        [
            ("request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1),
            ("response", b"SSH-2.0-OpenSSH\r\n\r\n", 2),
        ],
        [("request", b"get lowercase\r\n\r\n", 1)],
        [("request", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n", 1)],
    ],
)
def test_garbage_sets_failed_and_returns_pending(steps: list[Step]) -> None:
    p, out = run(steps, close=False)
    assert p.failed is not None and "parse error" in p.failed
    for e in out:
        assert any("parse error" in n for n in e.notes)
    assert p.feed("request", req("GET", "/"), 9) == [] and p.close(10) == []


def test_pending_exchange_returned_on_parse_error() -> None:
    p = Http1Parser()
    p.feed("request", req("GET", "/x"), 1)
    (ex,) = p.feed("response", b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n", 2)
    assert ex.request.target == "/x" and ex.response is None
    assert any(n.startswith("no response: parse error") for n in ex.notes)


def test_close_returns_unfinished_with_notes() -> None:
    p = Http1Parser()
    p.feed("request", req("GET", "/a") + req("POST", "/b", "Content-Length: 10\r\n", b"12345"), 1)
    p.feed("response", resp("200 OK", "Content-Length: 10\r\n", b"12"), 2)
    a, b = p.close(3)
    assert not a.response.complete and a.response.body == b"12"
    assert "response incomplete: connection closed" in a.notes
    assert not b.request.complete and b.request.body == b"12345" and b.response is None
    assert "request incomplete: connection closed" in b.notes
    assert "no response: connection closed" in b.notes


def test_body_limit_truncates_without_losing_the_length() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    p = Http1Parser(body_limit=100)
    p.feed("request", req("GET", "/blob"), 1)
    head = resp("200 OK", f"Content-Length: {len(body)}\r\n")
    out = p.feed("response", head, 2)
    for i in range(0, len(body), 16384):
        out += p.feed("response", body[i : i + 16384], 3 + i)
    (ex,) = out
    assert ex.response.body == body[:100] and ex.response.body_len == len(body)
    assert ex.response.body_truncated and ex.response.complete
    assert ex.response.end_ts_ns == 3 + len(body) - 16384


def test_timestamps_when_a_chunk_ends_one_message_and_starts_the_next() -> None:
    r1 = resp("200 OK", "Content-Length: 4\r\n", b"abcd")
    r2 = resp("200 OK", "Content-Length: 4\r\n", b"efgh")
    p = Http1Parser()
    p.feed("request", req("GET", "/1") + req("GET", "/2")[:10], 100)
    p.feed("request", req("GET", "/2")[10:], 150)
    out = p.feed("response", r1[:-2], 200)
    out += p.feed("response", r1[-2:] + r2[:5], 300)
    out += p.feed("response", r2[5:], 400)
    one, two = out
    assert (one.request.ts_ns, one.request.end_ts_ns) == (100, 100)
    assert (two.request.ts_ns, two.request.end_ts_ns) == (100, 150)
    assert (one.response.ts_ns, one.response.end_ts_ns) == (200, 300)
    assert (two.response.ts_ns, two.response.end_ts_ns) == (300, 400)
    assert (one.latency_ns, two.latency_ns) == (200, 300)


def test_big_header_block_parses() -> None:
    cookie = "a" * 700_000
    _, (ex,) = run(
        [
            ("request", req("GET", "/", f"Cookie: {cookie}\r\n"), 1),
            ("response", resp("200 OK", "Content-Length: 0\r\n"), 2),
        ]
    )
    assert ex.request.header("cookie") == cookie


def test_too_many_unanswered_requests_are_given_up() -> None:
    p = Http1Parser()
    out = p.feed("request", b"".join(req("GET", f"/{i}") for i in range(600)), 1)
    assert len(out) == 600 - 512 and out[0].request.target == "/0"
    assert "no response seen (too many unanswered requests)" in out[0].notes


def test_requests_given_up_between_two_gaps_leave_one_gap_and_pairing_goes_on() -> None:
    """A request given up for the pending limit while it stood between two request-side
    gaps: the gaps become one, and the next response pairs with the request after them
    (two gaps side by side once stopped every later pairing)."""
    p = Http1Parser()
    p.feed("request", req("GET", "/a"), 1)
    p.gap("request", 10, 2)
    p.feed("request", req("GET", "/b"), 3)
    p.gap("request", 10, 4)
    out = p.feed("request", b"".join(req("GET", f"/{i}") for i in range(512)), 5)
    assert [x.request.target for x in out] == ["/a", "/b"]
    out = p.feed("response", resp("200 OK", "Content-Length: 0\r\n"), 6)
    assert len(out) == 1 and out[0].request is not None and out[0].request.target == "/0"
    assert "request side had a gap before this request; pairing may be off" in out[0].notes


def test_exchanges_behind_a_response_read_until_close_stay_bounded() -> None:
    """A response without framing is read until the close; a client pipelining behind
    it (or a peer that only looks like one) must not grow the parser without bound:
    past the pending limit the oldest requests nobody is parsing are given up, ahead
    of the one still being read, which completes at the close."""
    p = Http1Parser()
    p.feed("request", req("GET", "/stream"), 1)
    assert p.feed("response", resp("200 OK", "Content-Type: text/plain\r\n"), 2) == []
    out = []
    for i in range(1000):
        out += p.feed("request", req("GET", f"/{i}"), 3 + i)
        out += p.feed("response", b"more body ", 3 + i)
    assert len(out) == 1000 - 511 and out[0].request.target == "/0"
    assert all(x.response is None for x in out)
    assert all("no response seen (too many unanswered requests)" in x.notes for x in out)
    rest = p.close(10**6)
    assert rest[0].request.target == "/stream" and rest[0].response.body_len == 10 * 1000
    assert len(rest) == 1 + 511


def test_responses_without_requests_stay_bounded_behind_an_unfinished_request() -> None:
    """Responses whose requests were never seen, queued behind a request whose body is
    still coming: past the pending limit they are given up (they are complete) ahead
    of it, so the queue stays bounded."""
    p = Http1Parser()
    p.feed("request", req("POST", "/upload", "Content-Length: 1000000000\r\n", b"x" * 100), 1)
    out = []
    for i in range(700):
        out += p.feed("response", resp("204 No Content"), 2 + i)
    assert len(out) == 700 - 1 - 511
    assert all(x.request is None and x.response.status == 204 for x in out)
    rest = p.close(10**6)
    assert rest[0].request.target == "/upload" and len(rest) == 1 + 511


def test_looks_like_request_start() -> None:
    yes_ = [b"GET / HTTP/1.1\r\n", b"PROPFIND /d HTTP/1.1\r\nDepth: 1", b"M-SEARCH * HTTP/1.1\r\n"]
    yes_ += [b"POST /api", b"GET ", b"GE", b"OPTIONS * HTTP/1.", b"DELETE /x HTTP/1.0\r"]
    for yes in yes_:
        assert looks_like_request_start(yes), yes
    no_ = [b"", b"get / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"GET / HTTP/2.0\r\n"]
    no_ += [b"\x16\x03\x01", b"PRI * HTTP/2.0\r\n", b"GET / FOO\r\n", b"XY", b"GET /a\x00b"]
    for no in no_:
        assert not looks_like_request_start(no), no


def test_looks_like_response_start() -> None:
    assert looks_like_response_start(b"HTTP/1.1 200 OK\r\n")
    assert looks_like_response_start(b"HTTP/1.0 404")
    for no in (b"HTTP/1.1 20", b"HTTP/2 200", b"http/1.1 200", b"GET / HTTP/1.1"):
        assert not looks_like_response_start(no), no


# -- properties ------------------------------------------------------------------

SIDES = st.sampled_from(["request", "response"])
CHUNK = st.binary(max_size=64) | st.sampled_from(
    [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"Content-Length: 3\r\n\r\n",
     b"Transfer-Encoding: chunked\r\n\r\n", b"5\r\nab", b"\r\n0\r\n\r\n", b"HTTP/1.1 101 x\r\n\r\n"]
)  # fmt: skip
ACTION = st.tuples(SIDES, CHUNK | st.integers(-1, 5000), st.integers(0, 10**6))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTION, max_size=25), st.integers(0, 64))
def test_random_input_never_raises(actions: list, limit: int) -> None:
    p = Http1Parser(body_limit=limit)
    out: list = []
    for side, data, ts in actions:
        out += p.gap(side, data, ts) if isinstance(data, int) else p.feed(side, data, ts)
    out += p.close(10**7)
    assert not (p.failed or "").startswith("internal error"), p.failed
    assert all(isinstance(e, Exchange) and e.protocol == "http1" for e in out)
    assert len({e.stream_id for e in out}) == len(out)
    assert all(len(e.request.body) <= limit for e in out if e.request)
    assert p.close(10**7) == []


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(CORPUS)), st.data())
def test_valid_streams_split_arbitrarily_parse_identically(name: str, data: st.DataObject) -> None:
    steps = CORPUS[name]
    cuts = [
        data.draw(st.lists(st.integers(1, max(1, len(d) - 1)), max_size=8)) for _, d, _ in steps
    ]
    assert as_json(run(split(steps, cuts))[1]) == as_json(run(steps)[1])


# -- the C implementation's own risks ----------------------------------------------


def test_exchanges_are_plain_dataclass_instances() -> None:
    """The parser fills HttpMessage's and Exchange's slots itself: what it makes equals
    what their constructors make, and is as mutable (redaction edits it)."""
    _, out = run(KEEPALIVE[:2])
    ex = out[0]
    made = Exchange(
        "http1",
        request=HttpMessage(ts_ns=1_000, end_ts_ns=1_000, method="GET", target="/api/users",
                            authority="api.example.com", version="1.1",
                            headers=[("host", "api.example.com"), ("user-agent", "curl/8.5.0"),
                                     ("accept", "*/*")], complete=True),
        response=HttpMessage(ts_ns=3_000, end_ts_ns=3_000, status=200, reason="OK",
                             version="1.1", headers=[("content-length", str(len(USERS)))],
                             body=USERS, body_len=len(USERS), complete=True),
        stream_id=1,
    )  # fmt: skip
    assert ex == made and repr(ex) == repr(made)
    assert ex.request.trailers is not ex.response.trailers  # fresh lists, as default_factory
    assert ex.notes is not ex.redactions
    ex.response.body = b""
    ex.notes.append("edited")
    assert dataclasses.replace(ex, stream_id=2).notes == ["edited"]


def test_internal_error_fails_without_raising() -> None:
    p = Http1Parser()
    assert p.feed("request", req("GET", "/a"), 1) == []
    out = p.feed("request", "GET / HTTP/1.1\r\n\r\n", 2)  # type: ignore[arg-type]
    assert p.failed == "internal error in HTTP/1 parser: TypeError"
    assert [(e.request.target, e.notes) for e in out] == [("/a", ["no response: parser error"])]
    assert p.feed("request", req("GET", "/b"), 3) == [] and p.close(4) == []


def test_no_reference_leaks_over_many_exchanges() -> None:
    """Shared objects the parser hands out (interned names, versions, singletons) keep
    their reference counts once its exchanges are dropped: no reference is lost."""
    shared = [sys.intern(s) for s in ("http1", "1.1", "GET", "host", "content-length", "")]
    shared += [b"", None, True, False]
    chunked = resp("200 OK", "Transfer-Encoding: chunked\r\n", CHUNKED_BODY)
    steps: list[Step] = []
    for i in range(300):
        steps += [("request", req("GET", f"/{i}", CURL), i), ("response", chunked, i)]
        if i % 50 == 0:  # gaps, resyncs, a CONNECT that does not switch, held requests
            steps += [("request", 7, i), ("response", 9, i), ("request", b"junk", i)]
            steps += [("request", req("CONNECT", "db:5432") + req("GET", "/held"), i)]
            steps += [("response", resp("407 No", "Content-Length: 0\r\n"), i)]
            steps += [("response", resp("200 OK", "Content-Length: 0\r\n"), i)]

    def counts() -> list[int]:
        for limit in (0, 5, 4096):
            p, out = run(steps, body_limit=limit)
            assert p.failed is None and len(out) > 300
            del p, out
        return [sys.getrefcount(o) for o in shared]

    warm = counts()  # the first pass fills caches
    assert counts() == warm
