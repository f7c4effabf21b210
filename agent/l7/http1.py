"""HTTP/1.x exchanges from passively captured plaintext, parsed by llhttp (httptools).

Why this design:

* llhttp (Node's HTTP/1 parser, in C, through httptools) does the byte work:
  request/status lines, headers, Content-Length and chunked bodies, keep-alive.
  Each connection runs two parsers: the client's bytes go into a request
  parser, the server's into a response parser, and their callbacks build the
  messages.  Pure-Python h11 did the same job at ~100 µs per exchange; this
  is several times cheaper (bench/l7_cost.py).
* A response parser cannot be told which request a response answers, yet
  that decides its framing.  The pairing here knows, and decides:
  - a response to HEAD has no body whatever its headers say: it ends at its
    header block, where the parser is replaced by a fresh one.  To know where
    that is in a chunk, while a HEAD request is unanswered each response chunk
    is fed in pieces that end at blank lines (a header block ends at the first
    one), so "headers complete" always falls at the end of a piece;
  - 1xx responses are noted and the exchange waits for the final response
    (llhttp frames them as bodiless messages; so are 204 and 304);
  - 101, and 2xx to CONNECT: the exchange ends and parsing stops (the rest of
    the connection is another protocol);
  - a response without Content-Length or chunked framing is read until the
    connection closes; close() ends it (httptools has no end-of-input call).
  On the request side llhttp itself pauses after a CONNECT or Upgrade request:
  later bytes are held until the response says whether the protocol switched.
* HTTP/1 has no stream ids: requests pair with responses first-in-first-out,
  so one lost message would shift every later pairing.  A gap therefore ends
  the message in progress and the side resyncs only at a chunk that starts a
  new message; pairings that may be off are said so in `notes`.
* Timestamps: chunks are fed one at a time, so a callback dates its event by
  the chunk being fed: a chunk that finishes one message and starts the next
  dates both correctly.
* Notes and `failed` never quote captured bytes (they could carry a secret past
  redaction): parse errors are llhttp's fixed reason texts.
* Work is per event, never per byte; bodies keep only body_limit bytes.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from functools import partial

import httptools

from agent.l7.exchange import Exchange, Headers, HttpMessage, Side

_MAX_HEAD = 1 << 20  # largest header block followed
_MAX_PENDING = 512  # requests awaiting a response before the oldest is given up
_PEEK = 16384
# Distinct header names remembered lower-cased per stream (short ones: a few KiB at most).
_NAME_CACHE = 64
_NAME_CACHED_LEN = 64
_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT",
            b"TRACE", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK",
            b"UNLOCK", b"REPORT", b"SEARCH", b"MKCALENDAR", b"PURGE", b"QUERY")  # fmt: skip
_METHOD_PREFIXES = frozenset(m[:i] for m in _METHODS for i in range(1, len(m) + 1))
# An upper-case token (known method or extension), SP, target, SP, HTTP/1.x ...
_REQUEST_LINE = re.compile(rb"[A-Z][A-Z_-]{2,23} [!-~]+ HTTP/1\.[01]\r?\n")
# ... or a chunk that ends part-way through such a line.
_REQUEST_PREFIX = re.compile(
    rb"[A-Z][A-Z_-]{2,23} [!-~]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01]\r?)?)?)?)?)?)?)?)?)?\Z"
)
_RESPONSE_START = re.compile(rb"HTTP/1\.[01] [0-9]{3}")
# Where a header block (or a chunked body's trailer section) can end.
_BLANK_LINE = re.compile(rb"\n\r?\n")
# An observer follows what the peers accepted rather than enforce the RFC: peers that
# keep talking after "Connection: close" (or HTTP/1.0 without keep-alive), obs-fold
# header lines (joined with a space, as h11 did) and bare LF line ends in header blocks.
_LENIENCIES = {
    "lenient_keep_alive": True,
    "lenient_headers": True,
    "lenient_optional_cr_before_lf": True,
}


def looks_like_request_start(data: bytes) -> bool:
    """Whether `data` begins with an HTTP/1.x request line, or a plausible prefix of one."""
    head = data[:_PEEK]
    if _REQUEST_LINE.match(head) or _REQUEST_PREFIX.match(head):
        return True
    return head in _METHOD_PREFIXES


def looks_like_response_start(data: bytes) -> bool:
    """Whether `data` begins with "HTTP/1.0 " or "HTTP/1.1 " and a 3-digit status."""
    return _RESPONSE_START.match(data) is not None


def _first(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _framing(headers: Headers) -> bytes:
    """The header that frames a message's body ("" if none): to prime a parser with."""
    te = _first(headers, "transfer-encoding")
    if te is not None:
        return b"transfer-encoding: " + te.encode("latin-1")
    cl = _first(headers, "content-length")
    if cl is not None and cl.strip() not in ("", "0"):
        return b"content-length: " + cl.encode("latin-1")
    return b""


def _until_close(headers: Headers) -> bool:
    """Whether a response body with these headers runs to the connection's end (as llhttp
    frames it: Transfer-Encoding not ending in chunked, or no framing header at all)."""
    te = _first(headers, "transfer-encoding")
    if te is not None:
        return not te.rstrip(" \t").lower().endswith("chunked")
    return _first(headers, "content-length") is None


class _Stop(Exception):
    """Raised by a callback to end llhttp's work on the piece being fed, right there."""


class _Ex:
    """An Exchange in the making, with what pairing needs."""

    __slots__ = ("ex", "head", "method", "req_done", "resp_done")

    def __init__(self, ex: Exchange, method: str) -> None:
        self.ex = ex
        self.method = method  # of the request ("GET" when the request was not seen)
        self.head = method == "HEAD"
        self.req_done = ex.request is None
        self.resp_done = False


class _Stream:
    """One direction: its parser (the callbacks are these methods), message in progress,
    resync state.  The request and response subclasses differ in their first line."""

    name: Side
    parser_type: type

    def __init__(self, owner: Http1Parser) -> None:
        self.owner = owner
        self.parser = None  # None: out of sync, waiting for a chunk that starts a message
        self.ts = 0  # of the chunk being fed
        self.fed = 0  # bytes fed since the last resync
        self.piece_start = 0  # `fed` before the piece being fed
        self.tail = b""  # last bytes fed: a blank line can straddle two chunks
        self.cur: _Ex | None = None  # exchange whose message this side is parsing
        self.msg: HttpMessage | None = None  # ... once its head is parsed
        self.in_head = False
        self.head_from = 0  # `fed` at the start of the piece where the head began
        self.head_bytes = 0  # its bytes in later pieces (llhttp does not bound heads)
        self.begin_ts = 0
        # The request target / reason phrase, as llhttp hands it.  One list for good:
        # the subclasses hand llhttp its append as the on_url / on_status callback.
        self.text: list[bytes] = []
        self.headers: Headers = []
        self.trailers: Headers = []
        self.names: dict[bytes, str] = {}  # header names as sent -> lower-case
        self.body = bytearray()
        self.body_len = 0
        self.until_close = False  # the response in progress ends with the connection
        self.informational = False  # the response in progress is a 1xx
        self.stopped = False  # a callback raised _Stop
        self.lost = self.dropped = 0  # bytes not captured / skipped while out of sync
        self.resynced = False  # notes owed to the next message
        self.fresh = False  # resynced, and no message head parsed since
        self.bind_callbacks(owner)
        self.restart()

    def bind_callbacks(self, owner: Http1Parser) -> None:
        """Set the callbacks that only hand over as attributes going to their target
        directly: a Python call less each per message (llhttp looks them up when a
        parser is made)."""
        raise NotImplementedError

    def restart(self, protocol: object | None = None) -> None:
        self.parser = self.parser_type(protocol or self)
        self.parser.set_dangerous_leniencies(**_LENIENCIES)
        self.in_head = False

    # -- llhttp callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_from = self.piece_start
        self.head_bytes = 0
        self.begin_ts = self.ts
        self.text.clear()
        self.headers = []  # each message takes its list
        if self.trailers:  # rare: a message took it
            self.trailers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        # A connection sends the same few names again and again: each is decoded and
        # lower-cased once.
        lower = self.names.get(name)
        if lower is None:
            lower = self._new_name(name)
        # llhttp strips the whitespace before a value, not after it.
        field = (lower, value.decode("latin-1").rstrip(" \t"))
        (self.headers if self.in_head else self.trailers).append(field)

    def _new_name(self, name: bytes) -> str:
        lower = name.decode("latin-1").lower()
        if len(self.names) < _NAME_CACHE and len(name) <= _NAME_CACHED_LEN:
            self.names[name] = lower
        return lower

    def on_body(self, data: bytes) -> None:
        if self.msg is None:  # a 1xx response's body: not framed by HTTP
            return
        self.body_len += len(data)
        room = self.owner.body_limit - len(self.body)
        if room > 0:
            self.body += data if len(data) <= room else data[:room]


class _RequestStream(_Stream):
    name = "request"
    parser_type = httptools.HttpRequestParser

    def __init__(self, owner: Http1Parser) -> None:
        self.held: list[tuple[bytes, int]] | None = None  # blocked behind Upgrade/CONNECT
        self.held_size = 0
        self.last: _Ex | None = None  # the request parsed last
        self.body_reader: _UpgradeBody | None = None
        super().__init__(owner)

    def bind_callbacks(self, owner: Http1Parser) -> None:
        self.on_url = self.text.append
        self.on_headers_complete = partial(owner._request_head, self)
        self.on_message_complete = partial(owner._request_end, self)


class _ResponseStream(_Stream):
    name = "response"
    parser_type = httptools.HttpResponseParser

    def bind_callbacks(self, owner: Http1Parser) -> None:
        self.on_status = self.text.append
        self.on_headers_complete = partial(owner._response_head, self)
        self.on_message_complete = partial(owner._response_end, self)

    def on_message_begin(self) -> None:
        if self.cur is None:  # not the final response after a 1xx
            self.owner._start_response(self)
        _Stream.on_message_begin(self)


class _UpgradeBody:
    """Callbacks of a parser primed to read only the body of an Upgrade/CONNECT request.

    llhttp stops at such a request's header block, but a body it announces is
    sent before any switch (RFC 9110 7.8): it is read by a fresh parser given a
    synthetic head with the same framing, which stops at the body's end.
    """

    def __init__(self, st: _RequestStream) -> None:
        self.st = st
        self.counted = 0  # body bytes of the piece being fed (Content-Length framing)
        self.done = False

    def on_body(self, data: bytes) -> None:
        self.counted += len(data)
        self.st.on_body(data)

    def on_message_complete(self) -> None:
        self.done = self.st.stopped = True
        raise _Stop


class Http1Parser:
    """Turns one HTTP/1.x connection's two byte streams into Exchanges."""

    def __init__(self, body_limit: int = 4096) -> None:
        self.body_limit = max(0, body_limit)
        self.failed: str | None = None
        self._closed = False
        self._queue: deque[_Ex] = deque()  # not yet emitted, in stream_id order
        self._await: deque[_Ex | None] = deque()  # awaiting a response; None: request gap
        self._blocked: _Ex | None = None  # Upgrade/CONNECT request awaiting its verdict
        self._heads = 0  # HEAD exchanges not yet emitted: response chunks go in pieces
        self._next_id = 1
        self._out: list[Exchange] = []
        self._req = _RequestStream(self)
        self._resp = _ResponseStream(self)

    # -- public API -----------------------------------------------------------

    def feed(self, side: Side, data: bytes, ts_ns: int) -> list[Exchange]:
        """Parse one captured chunk of `side`; return the exchanges it completed."""
        if self.failed is not None or self._closed or not data:
            return []
        try:
            self._chunk(self._req if side == "request" else self._resp, data, ts_ns)
        except Exception as exc:  # never raise into the capture path
            self._internal_error(exc)
        return self._take()

    def gap(self, side: Side, length: int, ts_ns: int) -> list[Exchange]:
        """`length` bytes of `side` were not captured: end its message and resync."""
        if self.failed is not None or self._closed or length <= 0:
            return []
        st = self._req if side == "request" else self._resp
        try:
            if st.parser is None:
                st.lost += length
            else:
                self._desync(st, length)
            self._emit_ready()
        except Exception as exc:
            self._internal_error(exc)
        return self._take()

    def close(self, ts_ns: int) -> list[Exchange]:
        """The connection closed: end read-until-close bodies, return all unfinished.

        A read-until-close body's end_ts_ns is its last byte's chunk, not the close.
        """
        if self.failed is not None or self._closed:
            return []
        self._closed = True
        try:
            st = self._resp
            if st.parser is not None and st.msg is not None and st.until_close:
                x = self._end(st, complete=True)
                x.ex.notes.append("response body delimited by connection close")
                self._response_done(x)
            self._flush("connection closed")
        except Exception as exc:
            self._internal_error(exc)
        return self._take()

    # -- feeding ----------------------------------------------------------------

    def _chunk(self, st: _Stream, data: bytes, ts: int) -> None:
        if st.parser is None:  # out of sync: wait for a chunk that starts a message
            start = looks_like_request_start if st is self._req else looks_like_response_start
            if not start(data):
                st.dropped += len(data)
                return
            st.restart()
            st.fed, st.tail, st.fresh, st.resynced = 0, b"", True, True
        if st is self._req and st.held is not None:
            self._hold(st, data, ts)
            return
        if st is self._resp:
            careful = self._heads or self._blocked is not None
        else:
            careful = st.body_reader is not None
        if not careful:  # most chunks: fed whole
            st.tail = data[-2:]
            self._feed_piece(st, data, ts)
            return
        pieces = self._pieces(st, data)
        st.tail = data[-2:]
        for i, piece in enumerate(pieces):
            if st is self._req and st.body_reader is not None:
                st.body_reader.counted = 0
            self._feed_piece(st, piece, ts)
            if self.failed is not None or st.parser is None:
                return
            if st is self._req and st.held is not None:  # blocked part-way: the rest waits
                for rest in pieces[i + 1 :]:
                    self._hold(st, rest, ts)
                return

    @staticmethod
    def _pieces(st: _Stream, data: bytes) -> list[bytes]:
        """`data` cut after every blank line, so a header block (or a chunked body)
        that ends in it ends at the end of a piece."""
        shift = len(st.tail)
        cuts = [m.end() - shift for m in _BLANK_LINE.finditer(st.tail + data)]
        edges = [0, *(c for c in cuts if 0 < c < len(data)), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(edges)]

    def _feed_piece(self, st: _Stream, piece: bytes, ts: int) -> None:
        st.ts = ts
        st.piece_start = st.fed
        st.fed += len(piece)
        parser = st.parser
        in_head = st.in_head
        try:
            parser.feed_data(piece)
        except httptools.HttpParserUpgrade as up:  # after a CONNECT or Upgrade request
            self._block(st, piece[up.args[0] :], ts)
        except httptools.HttpParserCallbackError as exc:
            if not st.stopped:
                raise (exc.__context__ or exc) from None
            st.stopped = False
            self._stopped(st, parser, piece, ts)
        except httptools.HttpParserError as exc:
            self._parse_error(st, exc.args[0] if exc.args else "invalid HTTP/1")
            return
        if st.in_head and in_head:  # a head begun in an earlier piece goes on
            st.head_bytes += len(piece)
            if st.head_bytes > _MAX_HEAD:
                self._parse_error(st, f"header block larger than {_MAX_HEAD} bytes")

    def _stopped(self, st: _Stream, parser: object, piece: bytes, ts: int) -> None:
        """A callback stopped llhttp at the end of `piece` (a head it must not frame), or
        at the end of an Upgrade request's body."""
        if self.failed is not None or st.parser is not parser:
            return
        reader = st.body_reader if st is self._req else None
        if reader is None or not reader.done:  # a response to HEAD: next message afresh
            st.restart()
            return
        # The Upgrade/CONNECT request's body ended: what follows waits for the verdict.
        chunked = _first(st.last.ex.request.headers, "transfer-encoding") is not None
        at = len(piece) if chunked else reader.counted  # chunked: ends at a blank line
        st.body_reader = None
        self._end(st, complete=True)
        self._emit_ready()
        self._block(st, piece[at:], ts, body_read=True)

    def _hold(self, st: _RequestStream, data: bytes, ts: int) -> None:
        if data:
            st.held.append((data, ts))
            st.held_size += len(data)
        if st.held_size > _MAX_HEAD:
            self._fail("request stream stalled behind an unanswered Upgrade", "stalled")

    # -- requests -----------------------------------------------------------------

    def _request_head(self, st: _RequestStream) -> None:
        p = st.parser
        headers = st.headers
        msg = HttpMessage(ts_ns=st.begin_ts, method=p.get_method().decode("latin-1"),
                          target=b"".join(st.text).decode("latin-1"),
                          version=p.get_http_version(), headers=headers)  # fmt: skip
        msg.authority = _first(headers, "host") or ""
        x = _Ex(Exchange("http1", request=msg, stream_id=self._next_id), msg.method)
        self._next_id += 1
        self._heads += x.head
        st.in_head = False
        st.last = x
        self._begin(st, x, msg)
        self._queue.append(x)
        self._await.append(x)
        if len(self._queue) > _MAX_PENDING:
            self._limit_pending()

    def _request_end(self, st: _RequestStream) -> None:
        if st.parser.should_upgrade() and _framing(st.headers):
            return  # its body is still to come: _block reads it
        self._end(st, complete=True)
        self._emit_ready()

    def _block(self, st: _RequestStream, rest: bytes, ts: int, body_read: bool = False) -> None:
        """llhttp paused after a CONNECT/Upgrade request: hold what follows (after the
        request's body, if it announced one) until the response decides."""
        if not body_read:
            framing = _framing(st.last.ex.request.headers)
            if framing:
                st.body_reader = _UpgradeBody(st)
                st.restart(st.body_reader)
                st.parser.feed_data(b"PUT / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
                st.tail = b""
                if rest:
                    self._chunk(st, rest, ts)
                return
        self._blocked = st.last
        st.held, st.held_size = [], 0
        self._hold(st, rest, ts)

    def _unblock(self) -> None:
        """The Upgrade/CONNECT request was answered without switching: resume requests."""
        self._blocked = None
        st = self._req
        held, st.held = st.held, None
        if st.parser is None or held is None:
            return
        st.restart()
        st.tail = b""
        for data, ts in held:
            self._chunk(st, data, ts)
            if self.failed is not None:
                return

    # -- responses ----------------------------------------------------------------

    def _start_response(self, st: _ResponseStream) -> None:
        """Pair the response now starting with the request it answers."""
        aw = self._await
        notes = []
        ts = st.ts
        if aw and aw[0] is None:  # requests may have been lost in a request-side gap
            nxt = aw[1] if len(aw) > 1 else None
            if nxt is not None and (nxt.ex.request is None or nxt.ex.request.ts_ns <= ts):
                aw.popleft()
                notes.append("request side had a gap before this request; pairing may be off")
        if aw and aw[0] is not None:
            x = aw.popleft()
            if st.resynced:
                notes.append("response paired with the oldest unanswered request after a gap")
        else:
            x = _Ex(Exchange("http1", stream_id=self._next_id), "GET")
            self._next_id += 1
            self._queue.append(x)
            notes.append("no request seen for this response" + (" (request gap)" if aw else ""))
        if notes:
            x.ex.notes.extend(n for n in notes if n not in x.ex.notes)  # x may be re-paired
        st.cur, st.msg = x, None

    def _response_head(self, st: _ResponseStream) -> None:
        p = st.parser
        status = p.get_status_code()
        reason = b"".join(st.text).decode("latin-1")
        x = st.cur
        st.in_head = False
        if 100 <= status < 200 and status != 101:  # the final response is still to come
            x.ex.notes.append(f"{status} {reason}")
            st.informational = True
            return
        headers = st.headers
        msg = HttpMessage(ts_ns=st.begin_ts, status=status, reason=reason,
                          version=p.get_http_version(), headers=headers)  # fmt: skip
        x.ex.response = msg
        self._begin(st, x, msg)
        if status == 101 or (x.method == "CONNECT" and 200 <= status < 300):
            # Switched (to the Upgrade, or into a tunnel): no longer HTTP/1.
            self._end(st, complete=True)
            req = x.ex.request
            to = _first(headers, "upgrade") or (req.header("upgrade") if req else None)
            if to is None and req is not None and req.method == "CONNECT":
                to = f"a CONNECT tunnel to {req.target}"
            self._emit_ready()
            self._fail(f"protocol switched to {to or 'another protocol'}", "protocol switched")
            st.stopped = True
            raise _Stop
        if x.head:  # no body whatever the headers say; llhttp would wait for one
            self._response_done(self._end(st, complete=True))
            st.stopped = True
            raise _Stop
        st.until_close = status not in (204, 304) and _until_close(headers)

    def _response_end(self, st: _ResponseStream) -> None:
        if st.informational:
            st.informational = False
            return
        self._response_done(self._end(st, complete=True))
        if self.failed is not None:  # while resuming the requests behind an Upgrade
            st.stopped = True
            raise _Stop

    def _response_done(self, x: _Ex) -> None:
        if self._blocked is x:
            self._unblock()
        self._emit_ready()

    # -- messages -----------------------------------------------------------------

    def _begin(self, st: _Stream, x: _Ex, msg: HttpMessage) -> None:
        st.cur, st.msg = x, msg
        st.body.clear()  # its bytes went to the last message as a copy
        st.body_len = 0
        st.fresh = False
        if st.resynced:
            lost = [f"{st.lost} bytes not captured"] if st.lost else []
            lost += [f"{st.dropped} bytes skipped"] if st.dropped else []
            x.ex.notes.append(
                f"{st.name} side resynced here" + (": " + ", ".join(lost) if lost else "")
            )
            st.resynced, st.lost, st.dropped = False, 0, 0

    def _end(self, st: _Stream, complete: bool) -> _Ex:
        """The message in progress ended: completely, or cut short."""
        x, msg = st.cur, st.msg
        st.cur = st.msg = None
        st.until_close = False
        if st is self._req:
            x.req_done = True
        else:
            x.resp_done = True
        if msg is not None:
            if st.body:
                msg.body = bytes(st.body)
            msg.body_len = st.body_len
            msg.body_truncated = st.body_len > len(msg.body)
            if complete:
                msg.complete = True
                msg.end_ts_ns = st.ts
                if st.trailers:
                    msg.trailers, st.trailers = st.trailers, []
        return x

    # -- losing sync ------------------------------------------------------------------

    def _parse_error(self, st: _Stream, reason: str) -> None:
        if st.fresh:  # a resync on something that only looked like a message
            st.dropped += st.fed
            st.in_head = False  # all of it is counted already
            self._desync(st, 0)
            return
        self._fail(f"HTTP/1 parse error in {st.name} stream: {reason}", f"parse error: {reason}")

    def _desync(self, st: _Stream, lost: int) -> None:
        """Stop parsing `st` until a chunk starts a new message (a gap, or a false resync)."""
        if st.msg is not None:
            self._end(st, complete=False).ex.notes.append(f"{lost} bytes not captured in {st.name}")
        else:
            st.lost += lost
            if st.in_head:  # a partial head (counted from the piece it began in)
                st.dropped += st.fed - st.head_from
            if st.cur is not None:  # response head not seen: its request awaits again
                self._await.appendleft(st.cur)
                st.cur = None
        st.informational = False
        if st is self._req:
            if st.held is not None:
                st.dropped += st.held_size
                st.held = None
            st.body_reader = None
            self._blocked = None
            if not self._await or self._await[-1] is not None:
                self._await.append(None)
        st.parser = None
        st.resynced = True
        if self._blocked is not None and self._blocked.resp_done:
            self._unblock()  # its response was cut short: assume it did not switch

    def _limit_pending(self) -> None:
        """Give up on the oldest request when too many await a response (lost sync)."""
        q = self._queue
        while len(q) > _MAX_PENDING and q[0] is not self._resp.cur and q[0] is not self._req.cur:
            x = q.popleft()
            if x in self._await:
                self._await.remove(x)
            x.ex.notes.append("no response seen (too many unanswered requests)")
            self._emit(x)

    # -- emitting -------------------------------------------------------------

    def _emit(self, x: _Ex) -> None:
        self._heads -= x.head
        self._out.append(x.ex)

    def _emit_ready(self) -> None:
        q = self._queue
        while q and q[0].req_done and q[0].resp_done:
            self._emit(q.popleft())

    def _flush(self, why: str) -> None:
        """Emit every unfinished exchange, saying what is missing and why."""
        for st in (self._req, self._resp):
            if st.cur is not None:
                x = self._end(st, complete=False)
                if st.name == "request" or x.ex.response is not None:
                    x.ex.notes.append(f"{st.name} incomplete: {why}")
        for x in self._queue:
            if x.ex.response is None:
                x.ex.notes.append(f"no response: {why}")
            self._emit(x)
        self._queue.clear()
        self._await.clear()
        self._blocked = None

    def _fail(self, reason: str, why: str) -> None:
        if self.failed is None:
            self.failed = reason
            self._flush(why)
            self._req.parser = self._resp.parser = None

    def _internal_error(self, exc: BaseException) -> None:
        # The type only: an exception's text can quote captured bytes.
        self._fail(f"internal error in HTTP/1 parser: {type(exc).__name__}", "parser error")

    def _take(self) -> list[Exchange]:
        out, self._out = self._out, []
        return out
