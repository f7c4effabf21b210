"""HTTP/1.x exchanges from passively captured plaintext, framed by agent/l7/_http1.c.

Why this design:

* A small C parser (agent/l7/_http1.c, one per direction) does the byte work:
  request/status lines, header blocks, Content-Length and chunked bodies (with
  trailers), bodies read until the connection closes.  One call hands back a
  whole message head as Python objects, one more the body's end with its
  first body_limit bytes; a message costs a few C calls, not the ~18 Python
  callbacks llhttp (through httptools) made, nor h11's pure-Python byte work.
* The parser stops after every head, so the pairing here, which knows which
  request a response answers, decides what framing alone cannot before the
  next byte is read:
  - a response to HEAD has no body whatever its headers say: no_body();
  - 1xx responses are noted and the exchange waits for the final response
    (the parser frames 1xx, 204 and 304 as bodiless);
  - 101, and 2xx to CONNECT: the exchange ends and parsing stops (the rest of
    the connection is another protocol);
  - a response without Content-Length or chunked framing is read until the
    connection closes; close() ends it.
  On the request side, after a CONNECT or Upgrade request (and its body, if it
  announced one) later bytes are held until the response says whether the
  protocol switched.
* HTTP/1 has no stream ids: requests pair with responses first-in-first-out,
  so one lost message would shift every later pairing.  A gap therefore ends
  the message in progress and the side resyncs only at a chunk that starts a
  new message; pairings that may be off are said so in `notes`.
* Timestamps: chunks are fed one at a time; a head is dated by the chunk that
  held its first byte, a message's end by the chunk that completed it.
* An observer follows what the peers accepted rather than enforce the RFC: it
  keeps parsing after "Connection: close" (or HTTP/1.0 without keep-alive),
  joins obs-fold header lines with a space (as h11 did) and takes bare LF line
  ends.  What llhttp refused is refused too (unknown methods, targets that are
  not visible ASCII, a CR not before its LF), so a resync on bytes that only
  look like a message fails rather than invents one.  A header block larger
  than _MAX_HEAD is a parse error.
* Notes and `failed` never quote captured bytes (they could carry a secret past
  redaction): parse errors are the C parser's fixed reason texts.
* Work is per message, never per byte in Python; bodies keep only body_limit bytes.
"""

from __future__ import annotations

import re
from collections import deque

from agent.l7._http1 import END, ERROR, HEAD, MAX_HEAD, MESSAGE, NEED, Http1Stream
from agent.l7.exchange import Exchange, Headers, HttpMessage, Side

_MAX_HEAD = MAX_HEAD  # largest header block followed (the C parser's bound)
_MAX_PENDING = 512  # requests awaiting a response before the oldest is given up
_PEEK = 16384
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
_NO_BODY = (b"", 0, None)  # what the END of a bodiless message would say


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


def _upgrades(method: str, headers: Headers) -> bool:
    """Whether a request may switch protocols (as llhttp decides): CONNECT, or an
    Upgrade header with "upgrade" among the Connection options."""
    if method == "CONNECT":
        return True
    if _first(headers, "upgrade") is None:
        return False
    return any(
        "upgrade" in (o.strip(" \t").lower() for o in value.split(","))
        for key, value in headers
        if key == "connection"
    )


class _Ex:
    """An Exchange in the making, with what pairing needs."""

    __slots__ = ("ex", "head", "method", "req_done", "resp_done", "upgrade")

    def __init__(self, ex: Exchange, method: str, upgrade: bool = False) -> None:
        self.ex = ex
        self.method = method  # of the request ("GET" when the request was not seen)
        self.head = method == "HEAD"
        self.upgrade = upgrade  # a CONNECT/Upgrade request: what follows waits for the verdict
        self.req_done = ex.request is None
        self.resp_done = False


class _Stream:
    """One direction: its C parser, the message in progress, resync state."""

    def __init__(self, name: Side, body_limit: int) -> None:
        self.name: Side = name
        self.parser = Http1Stream(name == "response", body_limit)
        self.synced = True  # False: waiting for a chunk that starts a message
        self.ts = 0  # of the chunk being fed
        self.fed = 0  # bytes fed since the last resync
        self.cur: _Ex | None = None  # exchange whose message this side is parsing
        self.msg: HttpMessage | None = None  # ... once its head is parsed
        self.lost = self.dropped = 0  # bytes not captured / skipped while out of sync
        self.resynced = False  # notes owed to the next message
        self.fresh = False  # resynced, and no message head parsed since
        # Requests only: bytes held behind a CONNECT/Upgrade request awaiting its verdict.
        self.held: list[tuple[bytes, int]] | None = None
        self.held_size = 0


class Http1Parser:
    """Turns one HTTP/1.x connection's two byte streams into Exchanges."""

    def __init__(self, body_limit: int = 4096) -> None:
        self.body_limit = max(0, body_limit)
        self.failed: str | None = None
        self._closed = False
        self._queue: deque[_Ex] = deque()  # not yet emitted, in stream_id order
        self._await: deque[_Ex | None] = deque()  # awaiting a response; None: request gap
        self._blocked: _Ex | None = None  # Upgrade/CONNECT request awaiting its verdict
        self._next_id = 1
        self._out: list[Exchange] = []
        self._req = _Stream("request", self.body_limit)
        self._resp = _Stream("response", self.body_limit)

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
            if not st.synced:
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
            if st.synced and st.msg is not None and st.parser.until_close:
                x = self._end(st, complete=True)
                x.ex.notes.append("response body delimited by connection close")
                self._response_done(x)
            self._flush("connection closed")
        except Exception as exc:
            self._internal_error(exc)
        return self._take()

    # -- feeding ----------------------------------------------------------------

    def _chunk(self, st: _Stream, data: bytes, ts: int) -> None:
        if not st.synced:  # out of sync: wait for a chunk that starts a message
            start = looks_like_request_start if st is self._req else looks_like_response_start
            if not start(data):
                st.dropped += len(data)
                return
            st.parser.reset()
            st.synced = st.fresh = st.resynced = True
            st.fed = 0
        if st.held is not None:
            self._hold(st, data, ts)
            return
        st.ts = ts
        st.fed += len(data)
        feed = st.parser.feed
        pos, end = 0, len(data)
        request = st is self._req
        while True:
            event, pos, value = feed(data, pos, ts)
            if event == NEED:
                return
            if event == END:
                x = self._end(st, True, value)
                if request:
                    self._request_done(st, x, data, pos, ts)
                else:
                    self._response_done(x)
            elif event in (HEAD, MESSAGE):
                if not request:
                    self._response_head(st, value, event == MESSAGE)
                elif event == HEAD:
                    self._request_head(value)
                else:  # a request without a body: it ended too
                    self._request_head(value)
                    self._request_done(st, self._end(st, True, _NO_BODY), data, pos, ts)
            elif event == ERROR:
                self._parse_error(st, value)
                return
            if self.failed is not None or not st.synced or st.held is not None:
                return
            if pos == end:
                return

    def _hold(self, st: _Stream, data: bytes, ts: int) -> None:
        if data:
            st.held.append((data, ts))
            st.held_size += len(data)
        if st.held_size > _MAX_HEAD:
            self._fail("request stream stalled behind an unanswered Upgrade", "stalled")

    # -- requests -----------------------------------------------------------------

    def _request_head(self, head: tuple) -> None:
        ts, method, target, version, headers = head
        st = self._req
        msg = HttpMessage(ts_ns=ts, method=method, target=target, version=version,
                          headers=headers)  # fmt: skip
        msg.authority = _first(headers, "host") or ""
        x = _Ex(Exchange("http1", request=msg, stream_id=self._next_id), method,
                _upgrades(method, headers))  # fmt: skip
        self._next_id += 1
        self._begin(st, x, msg)
        self._queue.append(x)
        self._await.append(x)
        if len(self._queue) > _MAX_PENDING:
            self._limit_pending()

    def _request_done(self, st: _Stream, x: _Ex, data: bytes, pos: int, ts: int) -> None:
        self._emit_ready()
        if x.upgrade and self.failed is None and st.synced:
            # What follows a CONNECT/Upgrade request waits for the response's verdict.
            self._blocked = x
            st.held, st.held_size = [], 0
            self._hold(st, data[pos:], ts)

    def _unblock(self) -> None:
        """The Upgrade/CONNECT request was answered without switching: resume requests."""
        self._blocked = None
        st = self._req
        held, st.held = st.held, None
        if not st.synced or held is None:
            return
        for i, (data, ts) in enumerate(held):
            self._chunk(st, data, ts)
            if self.failed is not None:
                return
            if st.held is not None:  # blocked again: the rest waits too
                for later, later_ts in held[i + 1 :]:
                    self._hold(st, later, later_ts)
                return

    # -- responses ----------------------------------------------------------------

    def _start_response(self, st: _Stream, ts: int) -> None:
        """Pair the response now starting with the request it answers."""
        aw = self._await
        notes = []
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

    def _response_head(self, st: _Stream, head: tuple, bodiless: bool) -> None:
        ts, status, reason, version, headers = head
        if st.cur is None:  # not the final response after a 1xx
            self._start_response(st, ts)
        x = st.cur
        if 100 <= status < 200 and status != 101:  # the final response is still to come
            x.ex.notes.append(f"{status} {reason}")
            return
        msg = HttpMessage(ts_ns=ts, status=status, reason=reason, version=version,
                          headers=headers)  # fmt: skip
        x.ex.response = msg
        self._begin(st, x, msg)
        if status == 101 or (x.method == "CONNECT" and 200 <= status < 300):
            # Switched (to the Upgrade, or into a tunnel): no longer HTTP/1.
            self._end(st, True, _NO_BODY)
            req = x.ex.request
            to = _first(headers, "upgrade") or (req.header("upgrade") if req else None)
            if to is None and req is not None and req.method == "CONNECT":
                to = f"a CONNECT tunnel to {req.target}"
            self._emit_ready()
            self._fail(f"protocol switched to {to or 'another protocol'}", "protocol switched")
            return
        if bodiless or x.head:  # a response to HEAD has no body whatever the headers say
            if not bodiless:
                st.parser.no_body()
            self._response_done(self._end(st, True, _NO_BODY))

    def _response_done(self, x: _Ex) -> None:
        if self._blocked is x:
            self._unblock()
        self._emit_ready()

    # -- messages -----------------------------------------------------------------

    def _begin(self, st: _Stream, x: _Ex, msg: HttpMessage) -> None:
        st.cur, st.msg = x, msg
        st.fresh = False
        if st.resynced:
            lost = [f"{st.lost} bytes not captured"] if st.lost else []
            lost += [f"{st.dropped} bytes skipped"] if st.dropped else []
            x.ex.notes.append(
                f"{st.name} side resynced here" + (": " + ", ".join(lost) if lost else "")
            )
            st.resynced, st.lost, st.dropped = False, 0, 0

    def _end(self, st: _Stream, complete: bool, done: tuple | None = None) -> _Ex:
        """The message in progress ended: completely (`done`: its body, body length and
        trailers as the parser reports them; None: what the parser holds), or cut short."""
        x, msg = st.cur, st.msg
        st.cur = st.msg = None
        if st is self._req:
            x.req_done = True
        else:
            x.resp_done = True
        if msg is not None:
            if done is None:
                body, body_len = st.parser.take_body()
                trailers = None
            else:
                body, body_len, trailers = done
            msg.body = body
            msg.body_len = body_len
            msg.body_truncated = body_len > len(body)
            if complete:
                msg.complete = True
                msg.end_ts_ns = st.ts
                if trailers:
                    msg.trailers = trailers
        return x

    # -- losing sync ------------------------------------------------------------------

    def _parse_error(self, st: _Stream, reason: str) -> None:
        if st.fresh:  # a resync on something that only looked like a message
            st.dropped += st.fed
            st.parser.reset()  # its partial head is counted already
            self._desync(st, 0)
            return
        self._fail(f"HTTP/1 parse error in {st.name} stream: {reason}", f"parse error: {reason}")

    def _desync(self, st: _Stream, lost: int) -> None:
        """Stop parsing `st` until a chunk starts a new message (a gap, or a false resync)."""
        if st.msg is not None:
            self._end(st, complete=False).ex.notes.append(f"{lost} bytes not captured in {st.name}")
        else:
            st.lost += lost
            st.dropped += st.parser.head_len  # a partial head
            if st.cur is not None:  # response head not seen: its request awaits again
                self._await.appendleft(st.cur)
                st.cur = None
        if st is self._req:
            if st.held is not None:
                st.dropped += st.held_size
                st.held = None
            self._blocked = None
            if not self._await or self._await[-1] is not None:
                self._await.append(None)
        st.parser.reset()
        st.synced = False
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
            self._req.synced = self._resp.synced = False

    def _internal_error(self, exc: BaseException) -> None:
        # The type only: an exception's text can quote captured bytes.
        self._fail(f"internal error in HTTP/1 parser: {type(exc).__name__}", "parser error")

    def _take(self) -> list[Exchange]:
        out, self._out = self._out, []
        return out
