"""gRPC over the HTTP/2 parser: method, length-prefixed messages, status."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7.exchange import GrpcMessage
from agent.l7.grpc import (
    GrpcMessageReader,
    GrpcStream,
    decode_grpc_message,
    is_grpc_content_type,
    split_path,
)
from tests.unit.test_l7_http2 import Conversation, run

GRPC_REQ = [("content-type", "application/grpc"), ("te", "trailers")]
GRPC_RESP = [("content-type", "application/grpc+proto")]


def frame(payload: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(payload)) + payload


def test_helpers() -> None:
    assert split_path("/helloworld.Greeter/SayHello") == ("helloworld.Greeter", "SayHello")
    assert split_path("/a.b.C/M?x=1") == ("a.b.C", "M")
    assert split_path("/nope") == ("", "/nope")
    assert split_path("") == ("", "")
    for ok in (
        "application/grpc",
        "application/grpc+proto",
        "Application/GRPC+json",
        "application/grpc; charset=utf-8",
    ):
        assert is_grpc_content_type(ok), ok
    for bad in (None, "", "application/json", "application/grpc-web", "application/grpcx"):
        assert not is_grpc_content_type(bad), bad
    assert decode_grpc_message("a%20b%3A%E2%9C%93+c") == "a b:\u2713+c"
    assert decode_grpc_message("100%zz done") == "100%zz done"
    assert decode_grpc_message("%FF") == "\ufffd"


def test_reader_across_payload_boundaries() -> None:
    messages = [b"", b"x", b"hello world" * 30, b"\x00" * 5, b"z" * 1000]
    stream = b"".join(frame(m, compressed=i == 2) for i, m in enumerate(messages))
    whole = GrpcMessageReader(body_limit=100)
    whole.feed(stream)
    expected = [GrpcMessage(i == 2, len(m), m[:100]) for i, m in enumerate(messages)]
    assert whole.messages == expected and whole.notes("response") == []
    for step in (1, 2, 3, 5, 7, 64):
        reader = GrpcMessageReader(body_limit=100)
        for i in range(0, len(stream), step):
            reader.feed(stream[i : i + step])
        assert reader.messages == expected, step


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.binary(max_size=50)), max_size=10),
    st.lists(st.integers(min_value=0, max_value=600), max_size=12),
    st.integers(min_value=0, max_value=60),
)
def test_reader_any_split(msgs: list[tuple[bool, bytes]], cuts: list[int], limit: int) -> None:
    stream = b"".join(frame(m, c) for c, m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    reader = GrpcMessageReader(body_limit=limit)
    for lo, hi in itertools.pairwise(points):
        reader.feed(stream[lo:hi])
    assert reader.messages == [GrpcMessage(c, len(m), m[:limit]) for c, m in msgs]


def test_reader_limits_and_incomplete() -> None:
    reader = GrpcMessageReader(body_limit=4, max_messages=3)
    reader.feed(b"".join(frame(bytes([i]) * 10) for i in range(5)))
    assert [m.data for m in reader.messages] == [b"\0" * 4, b"\1" * 4, b"\2" * 4]
    assert reader.dropped == 2
    reader.feed(frame(b"abcdefgh")[:7])
    assert reader.notes("request") == [
        "grpc: 2 more request messages not kept (first 3 kept)",
        "grpc: request message incomplete (2 of 8 bytes seen)",
    ]
    reader = GrpcMessageReader()
    reader.feed(b"\x00\x00")
    assert reader.notes("response") == ["grpc: response stream ended inside a message prefix"]


def test_stream_status_sources() -> None:
    call = GrpcStream("/svc.S/M")
    call.response_headers([(":status", "200"), ("grpc-status", "oops")])
    call.response_headers([("grpc-status", "5"), ("grpc-message", "not%20found")])
    notes = call.finish(True)
    assert (call.call.status, call.call.message) == (5, "not found")
    assert notes == ["grpc: grpc-status (4 characters) is not a number"]
    bare = GrpcStream("weird")
    assert bare.finish(True) == [
        "grpc: :path (5 characters) is not /service/method",
        "grpc: response ended without grpc-status",
    ]


def test_unary_call() -> None:
    conv = Conversation()
    sid = conv.request("/helloworld.Greeter/SayHello", "POST", GRPC_REQ, frame(b"\x0a\x03bob"))
    conv.respond(
        sid,
        headers=GRPC_RESP,
        body=frame(b"\x0a\x09hello bob"),
        trailers=[("grpc-status", "0"), ("grpc-message", "")],
    )
    [x] = run(conv.events, close=False)
    assert x.protocol == "grpc" and not x.notes
    g = x.grpc
    assert (g.service, g.method, g.full_method, g.status, g.message) == (
        "helloworld.Greeter",
        "SayHello",
        "helloworld.Greeter/SayHello",
        0,
        "",
    )
    assert g.request_messages == [GrpcMessage(False, 5, b"\x0a\x03bob")]
    assert g.response_messages == [GrpcMessage(False, 11, b"\x0a\x09hello bob")]
    assert x.response.trailers == [("grpc-status", "0"), ("grpc-message", "")]
    assert x.request.body == frame(b"\x0a\x03bob")  # the raw HTTP/2 body is kept too
    assert x.to_json()["grpc"]["status"] == 0


def test_server_streaming_messages_split_across_frames() -> None:
    conv = Conversation()
    sid = conv.request("/feed.Ticker/Watch", "POST", GRPC_REQ, frame(b"sub"))
    replies = [f"tick-{i}-".encode() * (i * 40 + 1) for i in range(12)]
    stream = b"".join(frame(r) for r in replies)
    conv.server.send_headers(sid, [(":status", "200"), *GRPC_RESP])
    conv.send(conv.server, sid, stream, end=False, piece=333)  # frames cut mid-message
    conv.server.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    conv.pump()
    [x] = run(conv.events, body_limit=200, close=False)
    msgs = x.grpc.response_messages
    assert [m.length for m in msgs] == [len(r) for r in replies]
    assert [m.data for m in msgs] == [r[:200] for r in replies]
    assert x.grpc.status == 0 and x.response.body_len == len(stream)
    assert x.response.body_truncated and not x.notes


def test_trailers_only_error() -> None:
    conv = Conversation()
    sid = conv.request("/pkg.Svc/Missing", "POST", GRPC_REQ, frame(b""))
    conv.respond(
        sid,
        headers=[
            *GRPC_RESP,
            ("grpc-status", "12"),
            ("grpc-message", "unknown%20method%20%E2%80%9CMissing%E2%80%9D"),
        ],
    )
    [x] = run(conv.events, close=False)
    assert x.grpc.status == 12 and x.grpc.message == "unknown method \u201cMissing\u201d"
    assert x.grpc.response_messages == [] and x.response.trailers == [] and not x.notes
    assert x.grpc.request_messages == [GrpcMessage(False, 0, b"")]


def test_many_messages_are_capped_and_noted() -> None:
    conv = Conversation()
    sid = conv.request("/s.S/Bulk", "POST", GRPC_REQ, b"".join(frame(b"m") for _ in range(130)))
    conv.respond(sid, headers=GRPC_RESP, trailers=[("grpc-status", "0")])
    [x] = run(conv.events, close=False)
    assert len(x.grpc.request_messages) == 100
    assert x.notes == ["grpc: 30 more request messages not kept (first 100 kept)"]


def test_reset_call_notes_cut_message() -> None:
    conv = Conversation()
    sid = conv.request("/s.S/Chat", "POST", GRPC_REQ, frame(b"hello"), end=False)
    conv.respond(sid, headers=GRPC_RESP, body=frame(b"0123456789")[:9], end=False)
    conv.client.reset_stream(sid, error_code=8)
    conv.pump()
    [x] = run(conv.events, close=False)
    assert x.grpc.status is None
    assert x.notes == [
        "stream reset by the client: CANCEL",
        "grpc: response message incomplete (4 of 10 bytes seen)",
    ]


@pytest.mark.parametrize("ctype", ["application/grpc-web", "application/json"])
def test_not_grpc_stays_http2(ctype: str) -> None:
    conv = Conversation()
    sid = conv.request("/a.B/C", "POST", [("content-type", ctype)], frame(b"x"))
    conv.respond(sid, headers=[("grpc-status", "0")])
    [x] = run(conv.events, close=False)
    assert x.protocol == "http2" and x.grpc is None
