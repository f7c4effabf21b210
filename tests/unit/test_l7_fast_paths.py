"""The shortcuts of the HTTP/1 record path in C, and that each gives what the long way
gives: the parser's and the masker's feed called as C functions (and the long way for a
masker whose feed is another), fields read and set in their slots (by name for anything
else), what the redaction rules say kept per rules object, header names matched by
words, a head's fields gathered at its size, a response's reason phrase reused."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from agent.l7._http1 import Http1Parser
from agent.l7._record_path import Connection
from agent.redact._headers import REDACTED, redact_exchange

from agent.l7.connection import L7Counters
from agent.l7.exchange import Exchange, HttpMessage
from agent.redact.http1_masker import Http1HeaderMasker
from agent.redact.rules import DEFAULT_RULES, NO_RULES, RedactionRules
from tests.unit.l7build import Conn

REQUEST = b"GET /a HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer t0k3n\r\n\r\n"
MASKED = REQUEST.replace(b"Bearer t0k3n", b"*" * len(b"Bearer t0k3n"))


def http1_connection(counters: L7Counters | None = None) -> Connection:
    conn = Connection(counters or L7Counters(), DEFAULT_RULES)
    conn.detecting = False
    conn.protocol = "http1"
    conn.request_direction = "egress"
    conn.parser = Http1Parser(4096)
    return conn


# -- the masker: C feed, or the one its class says -----------------------------


class _CountingMasker(Http1HeaderMasker):
    """Http1HeaderMasker whose feed is its own: the record path must call it."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        super().__init__(DEFAULT_RULES.header_names, DEFAULT_RULES.query_params)
        self.calls = 0

    def feed(self, data: bytes) -> tuple[bytes, set[str]]:
        self.calls += 1
        return super().feed(data)


class _DictMasker(Http1HeaderMasker):
    """Objects with a __dict__: one of them can carry a feed of its own."""

    def __init__(self) -> None:
        super().__init__(DEFAULT_RULES.header_names, DEFAULT_RULES.query_params)


class _BlocksMasker(Http1HeaderMasker):
    __slots__ = ()
    unknown_blocks = 3  # a class attribute other than 0: counted as any masker's


def test_http1_masker_goes_through_c_and_masks_as_its_feed() -> None:
    conn = http1_connection()
    masker = Http1HeaderMasker(DEFAULT_RULES.header_names, DEFAULT_RULES.query_params)
    conn.set_masker("egress", masker)
    (r,) = conn.on_data(Conn().data("egress", REQUEST))
    assert r.data == MASKED and r.redactions == ["header:authorization"]
    # the same bytes through the Python-level feed
    other = Http1HeaderMasker(DEFAULT_RULES.header_names, DEFAULT_RULES.query_params)
    assert other.feed(REQUEST) == (MASKED, {"header:authorization"})


def test_a_masker_that_overrides_feed_is_called_by_name() -> None:
    conn = http1_connection()
    masker = _CountingMasker()
    conn.set_masker("egress", masker)
    c = Conn()
    (r,) = conn.on_data(c.data("egress", REQUEST))
    assert masker.calls == 1 and r.data == MASKED
    # a feed set on the class later is seen too
    counting = _CountingMasker.feed
    _CountingMasker.feed = lambda self, data: (b"#" * len(data), {"custom"})  # type: ignore[method-assign]
    try:
        r2 = conn.on_data(c.data("egress", b"abc"))[0]  # (the parser fails on it)
    finally:
        _CountingMasker.feed = counting  # type: ignore[method-assign]
    assert r2.data == b"###" and r2.redactions == ["custom"]
    r3 = conn.on_data(c.data("egress", REQUEST))[0]
    assert masker.calls == 2 and r3.data == MASKED


def test_a_feed_in_the_objects_dict_is_called() -> None:
    conn = http1_connection()
    masker = _DictMasker()
    masker.feed = lambda data: (b"-" * len(data), set())  # type: ignore[method-assign]
    conn.set_masker("egress", masker)
    (r,) = conn.on_data(Conn().data("egress", REQUEST))
    assert r.data == b"-" * len(REQUEST) and r.redactions == []


def test_unknown_blocks_of_a_c_masker_class_are_counted() -> None:
    counters = L7Counters()
    conn = http1_connection(counters)
    conn.set_masker("egress", _BlocksMasker(DEFAULT_RULES.header_names))
    c = Conn()
    conn.on_data(c.data("egress", b"x"))
    conn.on_data(c.data("egress", b"y"))
    assert counters.header_blocks_masked_unknown == 3  # counted once, as it never grows


def test_masker_rules_by_length_first_and_last_byte() -> None:
    names = frozenset({"a", "ab", "abc", "x-ab", "cookie", "b"})
    masker = Http1HeaderMasker(names, frozenset({"t", "tok", "a_b"}))
    data = (
        b"AB: 1\r\nab : 2\r\nabcd: 3\r\nX-AB:4\r\nb:5\r\nc: 6\r\nCookie\t: 7\r\n"
        b"GET /?TOK=8&x=9;t=10&A_B=11&tokx=12 HTTP/1.1\r\n"
    )
    masked, hits = masker.feed(data)
    assert masked == (
        b"AB: *\r\nab : *\r\nabcd: 3\r\nX-AB:*\r\nb:*\r\nc: 6\r\nCookie\t: *\r\n"
        b"GET /?TOK=*&x=9;t=**&A_B=**&tokx=12 HTTP/1.1\r\n"
    )
    assert hits == {
        "header:ab",
        "header:x-ab",
        "header:b",
        "header:cookie",
        "query:tok",
        "query:t",
        "query:a_b",
    }
    # a name cut by the chunk's end, and a line that starts with no name's first byte
    m2 = Http1HeaderMasker(names)
    parts = [b"zzz: 1\r\nCoo", b"kie: secret\r\nq", b"ab: 2\r\n"]
    assert b"".join(m2.feed(p)[0] for p in parts) == b"zzz: 1\r\nCookie: ******\r\nqab: 2\r\n"


def test_a_chunk_without_hits_has_an_empty_set_and_hits_do_not_stick() -> None:
    masker = Http1HeaderMasker(DEFAULT_RULES.header_names, DEFAULT_RULES.query_params)
    assert masker.feed(b"Host: x\r\n") == (b"Host: x\r\n", set())
    assert masker.feed(b"Cookie: a\r\n") == (b"Cookie: *\r\n", {"header:cookie"})
    _, hits = masker.feed(b"Host: y\r\n")
    assert hits == set() and type(hits) is set


# -- the parser: C feed, names by words, fields gathered, reasons reused --------


def test_header_names_any_case_are_the_common_objects() -> None:
    p = Http1Parser()
    head = (
        b"GET / HTTP/1.1\r\nHOST: a\r\nhosT: b\r\nHosts: c\r\nte: d\r\nTE: e\r\n"
        b"x-forwarded-PROTO: f\r\nX-Forwarded-Proto2: g\r\nSTRICT-TRANSPORT-SECURITY: h\r\n"
        b"Access-Control-Allow-Origin: i\r\nAccess-Control-Allow-OriginX: j\r\n"
        b"Content-Lengtg: k\r\n\r\n"
    )
    assert p.feed("request", head, 1) == []
    (ex,) = p.feed("response", b"HTTP/1.1 204 No Content\r\n\r\n", 2)
    names = [n for n, _ in ex.request.headers]
    assert names == [
        "host",
        "host",
        "hosts",
        "te",
        "te",
        "x-forwarded-proto",
        "x-forwarded-proto2",
        "strict-transport-security",
        "access-control-allow-origin",
        "access-control-allow-originx",
        "content-lengtg",
    ]
    # the common ones are the parser's one (interned) object each
    assert names[0] is names[1] is sys.intern("host")
    assert names[5] is sys.intern("x-forwarded-proto")
    assert ex.request.authority == "a"


def test_more_fields_than_gathered_at_hand_keep_their_order() -> None:
    p = Http1Parser()
    fields = [(f"x-h{i}", f"v{i}") for i in range(70)]
    head = b"GET / HTTP/1.1\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in fields)
    assert p.feed("request", head + b"\r\n", 1) == []
    (ex,) = p.feed("response", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2)
    assert ex.request.headers == fields and type(ex.request.headers) is list


def test_reason_phrases_on_one_connection() -> None:
    p = Http1Parser()
    reasons = ["OK", "Not Found", "OK", "", "Ok", "OK"]
    got = []
    for i, reason in enumerate(reasons):
        p.feed("request", b"GET / HTTP/1.1\r\n\r\n", 2 * i)
        line = b"HTTP/1.1 200" + (b" " + reason.encode() if reason else b"")
        (ex,) = p.feed("response", line + b"\r\nContent-Length: 0\r\n\r\n", 2 * i + 1)
        got.append(ex.response.reason)
    assert got == reasons


def test_head_and_connect_are_known_by_their_method() -> None:
    p = Http1Parser()
    p.feed("request", b"HEAD / HTTP/1.1\r\n\r\n", 1)
    (ex,) = p.feed("response", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 2)
    assert ex.response.body == b"" and ex.response.complete  # HEAD: no body
    p.feed("request", b"CONNECT a:1 HTTP/1.1\r\n\r\n", 3)
    (ex,) = p.feed("response", b"HTTP/1.1 200 OK\r\n\r\n", 4)
    assert p.failed == "protocol switched to a CONNECT tunnel to a:1"


def test_times_of_a_message_in_one_chunk_and_in_two() -> None:
    p = Http1Parser()
    p.feed("request", b"GET / HTTP/1.1\r\n\r\n", 5)
    (ex,) = p.feed("response", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 6)
    assert (ex.request.ts_ns, ex.request.end_ts_ns) == (5, 5)
    assert (ex.response.ts_ns, ex.response.end_ts_ns) == (6, 6)
    p.feed("request", b"GET / HTTP/1.1\r\n\r\n", 7)
    assert p.feed("response", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no", 8) == []
    (ex,) = p.feed("response", b"k", 9)
    assert (ex.response.ts_ns, ex.response.end_ts_ns) == (8, 9)


def test_times_are_the_fed_chunks_int_and_other_times_new_ones() -> None:
    """A message emitted while a chunk is fed has that chunk's ts_ns int for the times
    that are that chunk's; times of earlier chunks, and an int subclass, are new ints of
    the same value; a bytearray chunk is read as bytes are."""
    p = Http1Parser()
    t1, t2, t3 = 10**12 + 1, 10**12 + 2, 10**12 + 3  # not small ints: made per value
    p.feed("request", bytearray(b"GET / HTTP/1.1\r\n\r\n"), t1)
    head = memoryview(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
    assert p.feed("response", head, t2) == []
    (ex,) = p.feed("response", b"k", t3)
    assert ex.request.ts_ns == ex.request.end_ts_ns == t1
    assert (ex.response.ts_ns, ex.response.end_ts_ns) == (t2, t3) and ex.response.end_ts_ns is t3
    assert ex.response.body == b"ok"

    class Ts(int):
        pass

    p.feed("request", b"GET / HTTP/1.1\r\n\r\n", Ts(t1))
    (ex,) = p.feed("response", b"HTTP/1.1 204 No Content\r\n\r\n", Ts(t2))
    assert type(ex.request.ts_ns) is int and type(ex.response.end_ts_ns) is int
    assert ex.response.ts_ns == ex.response.end_ts_ns == t2


def test_parser_failure_is_read_and_counted_through_c() -> None:
    counters = L7Counters()
    conn = http1_connection(counters)
    c = Conn()
    conn.on_data(c.data("egress", b"NOT A REQUEST\r\n\r\n"))
    assert conn.parser.failed is not None and counters.parse_failures == 1
    conn.on_data(c.data("egress", REQUEST))  # a failed parser is not fed, nor counted again
    assert counters.parse_failures == 1


# -- redaction: slots, rules kept per object, name verdicts ----------------------


def test_rules_read_per_rules_object() -> None:
    a = RedactionRules(header_names=frozenset({"x-a"}))
    b = RedactionRules(header_names=frozenset({"x-b", "host"}))
    for rules, want in [(a, "x-a"), (b, "x-b"), (a, "x-a"), (NO_RULES, None), (b, "x-b")]:
        msg = HttpMessage(authority="h", headers=[("x-a", "1"), ("x-b", "2"), ("X-A", "3")])
        ex = Exchange("http1", request=msg)
        redact_exchange(ex, rules)
        redacted = [n for n, v in ex.request.headers if v == "[REDACTED]"]
        if want == "x-a":
            assert redacted == ["x-a", "X-A"] and ex.redactions == ["header:x-a"]
        elif want == "x-b":
            assert redacted == ["x-b"] and ex.request.authority == "[REDACTED]"
            assert ex.redactions == ["header:host", "header:x-b"]
        else:
            assert redacted == [] and ex.redactions == []


def test_a_list_only_the_message_holds_is_redacted_in_place_a_shared_one_copied() -> None:
    """Redaction replaces a sensitive field in the headers list itself when nothing but
    the message holds the list (what the parsers hand out), and in a copy when another
    reference could see it; the redacted pair is the same either way, and a value
    that is "[REDACTED]" already is left as it is."""
    shared = [("host", "a"), ("authorization", "Bearer x"), ("cookie", "c=1")]
    before = list(shared)
    msg = HttpMessage(headers=shared)
    ex = Exchange("http1", request=msg)
    redact_exchange(ex, DEFAULT_RULES)
    assert shared == before and msg.headers is not shared  # `shared` is ours: copied
    assert msg.headers == [("host", "a"), ("authorization", REDACTED), ("cookie", REDACTED)]
    assert ex.redactions == ["header:authorization", "header:cookie"]

    ex = Exchange("http1", request=HttpMessage(headers=[("authorization", "t"), ("x", "y")]))
    ident = id(ex.request.headers)  # no reference kept: the message alone holds it
    redact_exchange(ex, DEFAULT_RULES)
    assert id(ex.request.headers) == ident  # the list itself, changed
    assert ex.request.headers == [("authorization", REDACTED), ("x", "y")]
    assert ex.redactions == ["header:authorization"]

    ex = Exchange("http1", request=HttpMessage(headers=[("authorization", REDACTED)]))
    redact_exchange(ex, DEFAULT_RULES)
    assert ex.request.headers == [("authorization", REDACTED)] and ex.redactions == []


def test_many_interned_names_past_the_verdicts_kept() -> None:
    rules = RedactionRules(header_names=frozenset({f"x-s{i}" for i in range(0, 300, 7)}))
    for _ in range(2):
        names = [sys.intern(f"x-s{i}") for i in range(300)]
        headers = [(n, "v") for n in names] + [("X-S7", "v"), (sys.intern("x-s0"), "v")]
        ex = Exchange("http1", request=HttpMessage(headers=headers))
        redact_exchange(ex, rules)
        masked = [n for n, v in ex.request.headers if v == "[REDACTED]"]
        assert masked == [f"x-s{i}" for i in range(0, 300, 7)] + ["X-S7", "x-s0"]


def test_exchanges_that_are_not_the_dataclasses_go_by_name() -> None:
    msg = SimpleNamespace(
        headers=[("authorization", "x")], trailers=[], target="/", authority="", method="GET"
    )
    ex = SimpleNamespace(request=msg, response=None, grpc=None, notes=[], redactions=())
    redact_exchange(ex, DEFAULT_RULES)
    assert msg.headers == [("authorization", "[REDACTED]")]
    assert ex.redactions == ["header:authorization"]


class _Message(HttpMessage):
    """A subclass whose headers are a property: read and set through it."""

    __slots__ = ("seen",)

    @property  # type: ignore[override]
    def headers(self):
        self.seen = getattr(self, "seen", 0) + 1
        return [("cookie", "c")]

    @headers.setter
    def headers(self, value) -> None:
        self.seen = -1


def test_a_field_that_is_a_property_in_a_subclass() -> None:
    plain = Exchange("http1", request=HttpMessage(headers=[("cookie", "c")]))
    redact_exchange(plain, DEFAULT_RULES)
    msg = _Message()
    ex = Exchange("http1", request=msg)
    redact_exchange(ex, DEFAULT_RULES)
    assert msg.seen == -1 and ex.redactions == ["header:cookie"]
    redact_exchange(plain, DEFAULT_RULES)  # and the dataclass again: its slot
    assert plain.request.headers == [("cookie", "[REDACTED]")]


def test_counters_that_are_not_ints_add_as_python_does() -> None:
    counters = L7Counters()
    counters.exchanges = 1.5  # type: ignore[assignment]
    counters.redacted_exchanges = 2**70
    conn = http1_connection(counters)
    c = Conn()
    conn.on_data(c.data("egress", REQUEST))
    conn.on_data(c.data("ingress", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    assert counters.exchanges == 2.5 and counters.redacted_exchanges == 2**70 + 1


class _Leaving:
    """A Python masker whose feed takes itself (and the parser) off the connection."""

    unknown_blocks = 0

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def feed(self, data: bytes) -> tuple[bytes, set[str]]:
        self.conn.set_masker("egress", None)
        self.conn.parser = None
        return b"?" * len(data), set()


def test_a_masker_that_takes_itself_away_while_it_runs() -> None:
    conn = http1_connection()
    conn.set_masker("egress", _Leaving(conn))
    (r,) = conn.on_data(Conn().data("egress", REQUEST))
    assert r.data == b"?" * len(REQUEST) and conn.masker("egress") is None


class _Name(str):
    """A header name whose lower() redacts another exchange by other rules meanwhile."""

    def lower(self) -> str:
        other = Exchange("http1", request=HttpMessage(headers=[("x-other", "v")]))
        redact_exchange(other, RedactionRules(header_names=frozenset({"x-other"})))
        assert other.request.headers == [("x-other", "[REDACTED]")]
        return str.lower(self)


def test_rules_read_again_when_a_name_brings_other_rules_in() -> None:
    headers = [(_Name("X-Mine"), "1"), ("x-mine", "2"), ("x-other", "3"), ("cookie", "4")]
    ex = Exchange("http1", request=HttpMessage(headers=headers))
    redact_exchange(ex, RedactionRules(header_names=frozenset({"x-mine"})))
    assert [v for _, v in ex.request.headers] == ["[REDACTED]", "[REDACTED]", "3", "4"]
    assert ex.redactions == ["header:x-mine"]
