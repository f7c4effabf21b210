"""Redaction of parsed exchanges: sensitive headers/trailers, regexes in values,
bodies and gRPC messages, derived fields, and the rule names recorded."""

from __future__ import annotations

import pytest

from agent.l7.exchange import Exchange, GrpcCall, GrpcMessage, HttpMessage
from agent.redact.exchange import REDACTED, redact_exchange
from agent.redact.rules import DEFAULT_RULES, RedactionRules, build_rules


def http1_exchange() -> Exchange:
    req = HttpMessage(
        method="POST",
        target="/login?card=4111111111111111",
        authority="api.example",
        version="1.1",
        headers=[
            ("host", "api.example"),
            ("authorization", "Bearer s3cr3t"),
            ("cookie", "a=1"),
            ("x-note", "card 4111111111111111"),
        ],
        body=b'{"card": "4111111111111111"}',
        body_len=28,
    )
    resp = HttpMessage(
        status=200,
        reason="OK",
        version="1.1",
        headers=[("set-cookie", "sid=1"), ("Set-Cookie", "sid=2"), ("content-type", "json")],
        trailers=[("x-api-key", "trailer-key")],
    )
    return Exchange("http1", request=req, response=resp, stream_id=1)


def test_default_rules_redact_sensitive_headers_and_trailers() -> None:
    ex = http1_exchange()
    redact_exchange(ex, DEFAULT_RULES)
    assert ex.request is not None and ex.response is not None
    assert dict(ex.request.headers)["authorization"] == REDACTED
    assert dict(ex.request.headers)["cookie"] == REDACTED
    assert dict(ex.request.headers)["host"] == "api.example"
    assert [v for _, v in ex.response.headers] == [REDACTED, REDACTED, "json"]
    assert ex.response.trailers == [("x-api-key", REDACTED)]
    # No regex rules: bodies and other values untouched.
    assert ex.request.body == b'{"card": "4111111111111111"}'
    assert ex.request.target == "/login?card=4111111111111111"
    assert ex.redactions == [
        "header:authorization",
        "header:cookie",
        "header:set-cookie",
        "header:x-api-key",
    ]


def test_regexes_mask_values_bodies_and_target_at_the_same_length() -> None:
    ex = http1_exchange()
    redact_exchange(ex, build_rules([], [], [r"card=\d{16}"]))
    assert ex.request is not None
    assert dict(ex.request.headers)["x-note"] == "card " + "*" * 16
    assert ex.request.body == b'{"card": "' + b"*" * 16 + b'"}'
    assert ex.request.body_len == 28 == len(ex.request.body)
    assert ex.request.target == "/login?card=" + "*" * 16
    assert "regex:card" in ex.redactions


def test_http2_pseudo_headers_and_derived_fields() -> None:
    req = HttpMessage(
        method="GET",
        target="/v1/items",
        authority="internal.example",
        version="2",
        headers=[(":method", "GET"), (":path", "/v1/items"), (":authority", "internal.example")],
    )
    ex = Exchange("http2", request=req, stream_id=3)
    redact_exchange(ex, build_rules([":authority", ":path"], [], []))
    assert req.headers == [(":method", "GET"), (":path", REDACTED), (":authority", REDACTED)]
    assert req.target == REDACTED and req.authority == REDACTED and req.method == "GET"
    assert ex.redactions == ["header::authority", "header::path"]


def test_grpc_messages_and_grpc_message_header() -> None:
    call = GrpcCall(
        service="pkg.Users",
        method="Get",
        status=5,
        message="user card=4111111111111111 not found",
        request_messages=[GrpcMessage(False, 20, b"\x0a\x10" + b"4111111111111111" + b"\x10\x01")],
        response_messages=[GrpcMessage(False, 3, b"\x08\x01\x10")],
    )
    resp = HttpMessage(
        status=200,
        version="2",
        trailers=[("grpc-status", "5"), ("grpc-message", "user card=4111111111111111 not found")],
    )
    ex = Exchange("grpc", response=resp, grpc=call)
    redact_exchange(ex, build_rules([], [], [r"card=\d{16}"]))
    assert call.request_messages[0].data == b"\x0a\x10" + b"*" * 16 + b"\x10\x01"
    assert call.response_messages[0].data == b"\x08\x01\x10"
    assert call.message == "user card=" + "*" * 16 + " not found"
    assert resp.trailers[1] == ("grpc-message", "user card=" + "*" * 16 + " not found")
    assert ex.redactions == ["regex:card"]
    redact_exchange(ex, build_rules(["grpc-message"], [], []))
    assert call.message == REDACTED and resp.trailers[1] == ("grpc-message", REDACTED)
    assert call.full_method == "pkg.Users/Get"
    assert ex.redactions == ["header:grpc-message", "regex:card"]


def test_non_latin1_values_keep_their_characters_outside_matches() -> None:
    req = HttpMessage(headers=[("x-user", "Jürgen ✓ token=abc123 ✓")])
    ex = Exchange("http2", request=req)
    redact_exchange(ex, build_rules([], [], [r"tok=token=\w+"]))
    assert req.headers == [("x-user", "Jürgen ✓ " + "*" * 12 + " ✓")]


def test_redactions_merge_sorted_without_duplicates_and_repeat_is_stable() -> None:
    ex = http1_exchange()
    ex.redactions = ["header:cookie", "aaa"]
    redact_exchange(ex, DEFAULT_RULES)
    first = list(ex.redactions)
    assert first == sorted(set(first)) and "aaa" in first
    redact_exchange(ex, DEFAULT_RULES)
    assert ex.redactions == first


def test_notes_are_regex_masked_too() -> None:
    ex = Exchange("http1", notes=["bad header line 'x: card=4111111111111111'"])
    redact_exchange(ex, build_rules([], [], [r"card=\d{16}"]))
    assert ex.notes == ["bad header line 'x: card=" + "*" * 16 + "'"]


def test_nothing_to_do_leaves_the_exchange_alone() -> None:
    ex = http1_exchange()
    before = ex.to_json()
    redact_exchange(ex, build_rules([], [], [], disabled=True))
    assert ex.to_json() == before
    ex = Exchange("http1")  # no request, no response
    redact_exchange(ex, DEFAULT_RULES)
    assert ex.redactions == []


def test_header_lists_are_replaced_not_changed_and_kept_when_nothing_matched() -> None:
    ex = http1_exchange()
    request_headers = ex.request.headers
    before = list(request_headers)
    plain = [("content-type", "json"), ("x-note", "fine")]
    ex.response.headers = plain
    redact_exchange(ex, DEFAULT_RULES)
    assert request_headers == before  # a new list carries the redacted values
    assert ex.request.headers is not request_headers
    assert ex.request.header("authorization") == REDACTED
    assert ex.response.headers is plain  # nothing to redact: the same list
    assert plain == [("content-type", "json"), ("x-note", "fine")]


def test_header_values_in_c_take_any_case_and_refuse_what_is_not_a_header() -> None:
    """agent/redact/_headers.c: names of any case (non-ASCII ones lowered as str.lower
    does), each rule reported once, a value already redacted not again, the derived
    fields too, both messages; a header that is not a (str, str) tuple is a
    TypeError, never a header let through."""
    names = frozenset({"cookie", "x-t\u00f6ken", ":path", "host", "set-cookie"})
    rules = RedactionRules(header_names=names)
    headers = [("Cookie", "a"), ("X-T\u00d6KEN", "b"), ("cookie", REDACTED), ("COOKIE", "c")]
    msg = HttpMessage(target="/x", authority="h", headers=headers, trailers=[("cookie", "t")])
    response = HttpMessage(status=200, headers=[("Set-Cookie", "s"), ("cookie", "r")])
    ex = Exchange("http1", request=msg, response=response, redactions=["regex:earlier"])
    redact_exchange(ex, rules)
    assert [v for _, v in msg.headers] == [REDACTED] * 4
    assert [n for n, _ in msg.headers] == [n for n, _ in headers]
    assert msg.trailers == [("cookie", REDACTED)] and (msg.target, msg.authority) == (REDACTED,) * 2
    assert response.headers == [("Set-Cookie", REDACTED), ("cookie", REDACTED)]
    assert ex.redactions == [
        "header::path", "header:cookie", "header:host", "header:set-cookie",
        "header:x-t\u00f6ken", "regex:earlier",
    ]  # fmt: skip
    # Nothing sensitive, or no messages at all: nothing reported, nothing replaced.
    plain = [("accept", "*/*")]
    ex = Exchange("http1", request=HttpMessage(headers=plain), response=None)
    redact_exchange(ex, RedactionRules(header_names=frozenset({"cookie"})))
    assert ex.request is not None and ex.request.headers is plain and ex.redactions == []
    ex = Exchange("http1")
    redact_exchange(ex, rules)
    assert ex.redactions == []
    for bad in ([("cookie",)], [["cookie", "a"]], [(b"cookie", "a")], [("cookie", None)]):
        with pytest.raises(TypeError):
            redact_exchange(Exchange("http1", HttpMessage(headers=bad)), rules)


def test_python_helpers_run_only_when_they_apply_and_their_errors_propagate() -> None:
    """The C redact_exchange calls exchange.py's helpers for query values (a "=" in
    the target), regexes and gRPC: each one's work shows, and an error inside one
    (here a body that is not bytes, or gRPC data that is not) reaches the caller."""
    rules = build_rules([], [], [r"card=\d{16}"])
    # Query values and the regexes together; the notes too.
    ex = http1_exchange()
    assert ex.request is not None
    ex.request.target = "/login?access_token=abc&card=4111111111111111"
    ex.notes = ["saw card=4111111111111111"]
    redact_exchange(ex, rules)
    assert ex.request.target == "/login?access_token=***&card=****************"
    assert ex.notes == ["saw card=****************"]
    assert "query:access_token" in ex.redactions and "regex:card" in ex.redactions
    # A gRPC exchange: its fields derived from sensitive headers.
    grpc = GrpcCall(service="pkg.S", method="M", message="card=4111111111111111")
    ex = Exchange("grpc", request=HttpMessage(target="/pkg.S/M"), grpc=grpc)
    redact_exchange(ex, build_rules([":path", "grpc-message"], [], []))
    assert (grpc.service, grpc.method, grpc.message) == (REDACTED,) * 3
    assert ex.redactions == ["header::path", "header:grpc-message"]
    # Errors inside the helpers propagate.
    ex = http1_exchange()
    assert ex.request is not None
    ex.request.body = "not bytes"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        redact_exchange(ex, rules)
    grpc = GrpcCall(request_messages=[GrpcMessage(False, 3, "abc")])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        redact_exchange(Exchange("grpc", grpc=grpc), rules)
    # A target that is not text: the query check's own error.
    with pytest.raises(TypeError):
        redact_exchange(Exchange("http1", HttpMessage(target=None)), DEFAULT_RULES)  # type: ignore[arg-type]
