"""HTTP/1.x exchanges from passively captured plaintext, parsed by h11.

Why this design:

* h11 is a complete, well-tested HTTP/1.1 state machine, but written for an
  endpoint, not an observer.  So each connection runs two of them: the
  client's bytes go into a server-role Connection (which parses requests), the
  server's into a client-role Connection (which parses responses).  How a
  response is framed depends on its request (HEAD, CONNECT, Upgrade, 1xx), so
  before each response the client-role machine is given a synthetic copy of
  the request it answers (its method and Upgrade header -- all h11 frames a
  response by; no body framing) and frames the response exactly as the real
  client did.  These are cached per (method, Upgrade) and fed to h11's state
  machine without serialising them (the bytes would be thrown away).
  `start_next_cycle()` (after a synthetic response, on the request side)
  carries the machines through keep-alive and pipelining.  Where h11 would stop (HTTP/1.0 or
  `Connection: close` peers that keep talking anyway, refused Upgrades), and
  whenever the leftovers are small -- a new Connection costs a tenth of a
  synthetic send() -- a fresh Connection takes the unparsed leftovers instead.
* HTTP/1 has no stream ids: requests pair with responses first-in-first-out,
  so one lost message would shift every later pairing.  A gap therefore ends
  the message in progress and the side resyncs only at a chunk that starts a
  new message; pairings that may be off are said so in `notes`.
* Timestamps: each side keeps (stream end offset, ts) per chunk; the length of
  h11's unparsed buffer tells where every event starts and ends in the
  stream, so a chunk that finishes one message and starts the next dates
  both correctly, even when h11 only parses the bytes later.
* Work is per event, never per byte; bodies keep only body_limit bytes.
"""

from __future__ import annotations

import re
from collections import deque

import h11

from agent.l7.exchange import Exchange, Headers, HttpMessage, Side

_MAX_HEAD = 1 << 20  # largest header block h11 will buffer
_MAX_PENDING = 512  # requests awaiting a response before the oldest is given up
_PEEK = 16384
_CHEAP_COPY = 4096  # leftovers copied into a fresh machine rather than cycling the old
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
_EOM = h11.EndOfMessage()
_FAKE_RESPONSE = h11.Response(status_code=200, headers=[(b"content-length", b"0")])
_NO_REQUEST = (b"GET", b"")
# Synthetic requests by (method, upgrade): h11 frames a response by its request's method
# and Upgrade header only, so one validated Request per pair serves every exchange.
_SYNTHETIC: dict[tuple[bytes, bytes], h11.Request] = {}
_MAX_SYNTHETIC = 256


def _synthetic_request(method: bytes, upgrade: bytes) -> h11.Request:
    req = _SYNTHETIC.get((method, upgrade))
    if req is None:
        headers = [(b"host", b"x"), (b"upgrade", upgrade)] if upgrade else [(b"host", b"x")]
        req = h11.Request(method=method, target=b"/", headers=headers)
        if len(_SYNTHETIC) >= _MAX_SYNTHETIC:
            _SYNTHETIC.clear()
        _SYNTHETIC[(method, upgrade)] = req
    return req


def looks_like_request_start(data: bytes) -> bool:
    """Whether `data` begins with an HTTP/1.x request line, or a plausible prefix of one."""
    head = data[:_PEEK]
    if _REQUEST_LINE.match(head) or _REQUEST_PREFIX.match(head):
        return True
    return head in _METHOD_PREFIXES


def looks_like_response_start(data: bytes) -> bool:
    """Whether `data` begins with "HTTP/1.0 " or "HTTP/1.1 " and a 3-digit status."""
    return _RESPONSE_START.match(data) is not None


def _headers(h: h11._headers.Headers) -> Headers:
    return [(n.lower().decode("latin-1"), v.decode("latin-1")) for n, v in h.raw_items()]


class _Ex:
    """An Exchange in the making, with what pairing needs."""

    __slots__ = ("ex", "line", "req_done", "resp_done")

    def __init__(self, ex: Exchange, line: tuple[bytes, bytes]) -> None:
        self.ex = ex
        self.line = line  # method, upgrade: to synthesise the request
        self.req_done = ex.request is None
        self.resp_done = False


class _Stream:
    """One direction: its h11 machine, chunk clock, message in progress, resync state."""

    def __init__(self, role: type[h11._util.Sentinel], name: str) -> None:
        self.role, self.name = role, name
        self.conn: h11.Connection | None = None
        self.fed = 0  # bytes given to conn (since the last resync)
        self.chunks: deque[tuple[int, int]] = deque()  # (end offset, ts) of fed chunks
        self.cur: _Ex | None = None  # exchange whose message this side is parsing
        self.msg: HttpMessage | None = None  # ... once its head is parsed
        self.body = bytearray()
        self.body_len = 0
        self.lost = self.dropped = 0  # bytes not captured / skipped while out of sync
        self.resynced = False  # notes owed to the next message
        self.fresh = False  # resynced, and no message head parsed since
        self.restart(b"")

    def restart(self, leftover: bytes) -> None:
        self.conn = h11.Connection(self.role, max_incomplete_event_size=_MAX_HEAD)
        if leftover:
            self.conn.receive_data(leftover)

    def add(self, data: bytes, ts: int) -> None:
        chunks = self.chunks
        pos = self.pos()  # drop chunks no later lookup can ask for (all end before pos-1)
        while len(chunks) > 1 and chunks[0][0] < pos:
            chunks.popleft()
        self.fed += len(data)
        chunks.append((self.fed, ts))
        self.conn.receive_data(data)

    def pos(self) -> int:
        """Stream offset of h11's first unparsed byte (h11 has no public O(1) way)."""
        return self.fed - len(self.conn._receive_buffer)

    def ts_at(self, off: int) -> int:
        """ts of the chunk carrying byte `off`; offsets asked must not decrease."""
        chunks = self.chunks
        while len(chunks) > 1 and chunks[0][0] <= off:
            chunks.popleft()
        return chunks[0][1]


class Http1Parser:
    """Turns one HTTP/1.x connection's two byte streams into Exchanges."""

    def __init__(self, body_limit: int = 4096) -> None:
        self.body_limit = max(0, body_limit)
        self.failed: str | None = None
        self._closed = False
        self._req = _Stream(h11.SERVER, "request")
        self._resp = _Stream(h11.CLIENT, "response")
        self._queue: deque[_Ex] = deque()  # not yet emitted, in stream_id order
        self._await: deque[_Ex | None] = deque()  # awaiting a response; None: request gap
        self._blocked: _Ex | None = None  # Upgrade/CONNECT request awaiting its verdict
        self._next_id = 1
        self._out: list[Exchange] = []

    # -- public API -----------------------------------------------------------

    def feed(self, side: Side, data: bytes, ts_ns: int) -> list[Exchange]:
        """Parse one captured chunk of `side`; return the exchanges it completed."""
        if self.failed is not None or self._closed or not data:
            return []
        st = self._req if side == "request" else self._resp
        try:
            if st.conn is None:  # out of sync: wait for a chunk that starts a message
                start = looks_like_request_start if st is self._req else looks_like_response_start
                if not start(data):
                    st.dropped += len(data)
                    return []
                st.restart(b"")
                st.fed, st.fresh, st.resynced = 0, True, True
                st.chunks.clear()
            st.add(data, ts_ns)
            self._pump(st)
        except Exception as exc:  # never raise into the capture path
            self._fail(f"internal error in HTTP/1 parser: {exc!r}", "parser error")
        return self._take()

    def gap(self, side: Side, length: int, ts_ns: int) -> list[Exchange]:
        """`length` bytes of `side` were not captured: end its message and resync."""
        if self.failed is not None or self._closed or length <= 0:
            return []
        st = self._req if side == "request" else self._resp
        try:
            if st.conn is None:
                st.lost += length
            else:
                self._desync(st, length)
            self._emit_ready()
        except Exception as exc:
            self._fail(f"internal error in HTTP/1 parser: {exc!r}", "parser error")
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
            if st.conn is not None:
                st.conn.receive_data(b"")  # EOF: completes read-until-close bodies
                self._pump(st, eof=True)
            self._flush("connection closed")
        except Exception as exc:
            self._fail(f"internal error in HTTP/1 parser: {exc!r}", "parser error")
        return self._take()

    # -- parsing ----------------------------------------------------------------

    def _pump(self, st: _Stream, eof: bool = False) -> None:
        try:
            if st is self._req:
                self._pump_requests(st)
            else:
                self._pump_responses(st, eof)
        except h11.ProtocolError as exc:
            if eof:
                return  # truncated by the close: _flush notes it
            if st.fresh:  # a resync on something that only looked like a message
                st.dropped += st.pos()  # _desync adds the unparsed rest
                self._desync(st, 0)
                return
            self._fail(f"HTTP/1 parse error in {st.name} stream: {exc}", f"parse error: {exc}")

    def _pump_requests(self, st: _Stream) -> None:
        conn = st.conn
        while self.failed is None:
            start = st.pos()
            ev = conn.next_event()
            kind = type(ev)
            if kind is h11.Data:
                self._body(st, ev.data)
            elif kind is h11.Request:
                msg = HttpMessage(ts_ns=st.ts_at(start), method=ev.method.decode("latin-1"),
                                  target=ev.target.decode("latin-1"),
                                  version=ev.http_version.decode("latin-1"),
                                  headers=_headers(ev.headers))  # fmt: skip
                msg.authority = msg.header("host") or ""
                up = (msg.header("upgrade") or "").encode("latin-1")
                x = _Ex(Exchange("http1", request=msg, stream_id=self._next_id), (ev.method, up))
                self._next_id += 1
                self._begin(st, x, msg)
                self._queue.append(x)
                self._await.append(x)
                self._limit_pending()
            elif kind is h11.EndOfMessage:
                x = self._end(st, ev)
                if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    self._blocked = x  # h11 holds later bytes until the response decides
                else:
                    self._cycle(st, _FAKE_RESPONSE)
                    conn = st.conn
                self._emit_ready()
            else:  # NEED_DATA, PAUSED (after Upgrade/CONNECT: bounded, unlike h11's buffer)
                if ev is h11.PAUSED and st.fed - st.pos() > _MAX_HEAD:
                    self._fail("request stream stalled behind an unanswered Upgrade", "stalled")
                return

    def _pump_responses(self, st: _Stream, eof: bool) -> None:
        conn = st.conn
        while self.failed is None:
            start = st.pos()
            if conn.our_state is h11.IDLE:
                if start >= st.fed:
                    return  # nothing buffered: no response begun
                self._start_response(st, conn, st.ts_at(start))
            ev = conn.next_event()
            kind = type(ev)
            if kind is h11.Data:
                self._body(st, ev.data)
            elif kind is h11.Response or kind is h11.InformationalResponse:
                switched = conn.their_state is h11.SWITCHED_PROTOCOL
                if kind is h11.InformationalResponse and not switched:
                    st.cur.ex.notes.append(f"{ev.status_code} {ev.reason.decode('latin-1')}")
                    continue
                msg = HttpMessage(ts_ns=st.ts_at(start), status=ev.status_code,
                                  reason=ev.reason.decode("latin-1"),
                                  version=ev.http_version.decode("latin-1"),
                                  headers=_headers(ev.headers))  # fmt: skip
                x = st.cur
                x.ex.response = msg
                self._begin(st, x, msg)
                if switched:  # 101 to an Upgrade, or 2xx to CONNECT: no longer HTTP/1
                    self._end(st, _EOM)
                    req = x.ex.request
                    to = msg.header("upgrade") or (req.header("upgrade") if req else None)
                    if to is None and req is not None and req.method == "CONNECT":
                        to = f"a CONNECT tunnel to {req.target}"
                    self._emit_ready()
                    self._fail(
                        f"protocol switched to {to or 'another protocol'}", "protocol switched"
                    )
            elif kind is h11.EndOfMessage:
                x = self._end(st, ev)
                if eof:
                    x.ex.notes.append("response body delimited by connection close")
                self._cycle(st, None)
                conn = st.conn
                if self._blocked is x:
                    self._unblock()
                self._emit_ready()
            else:  # NEED_DATA, PAUSED, ConnectionClosed
                return

    def _start_response(self, st: _Stream, conn: h11.Connection, ts: int) -> None:
        """Tell the response machine which request the response now starting answers."""
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
            x = _Ex(Exchange("http1", stream_id=self._next_id), _NO_REQUEST)
            self._next_id += 1
            self._queue.append(x)
            notes.append("no request seen for this response" + (" (request gap)" if aw else ""))
        x.ex.notes.extend(n for n in notes if n not in x.ex.notes)  # x may be re-paired
        # What send() does minus serialising bytes nobody reads (our_state is IDLE here).
        conn._process_event(h11.CLIENT, _synthetic_request(*x.line))
        conn._process_event(h11.CLIENT, _EOM)
        st.cur, st.msg = x, None

    def _begin(self, st: _Stream, x: _Ex, msg: HttpMessage) -> None:
        st.cur, st.msg = x, msg
        st.body = bytearray()
        st.body_len = 0
        st.fresh = False
        if st.resynced:
            lost = [f"{st.lost} bytes not captured"] if st.lost else []
            lost += [f"{st.dropped} bytes skipped"] if st.dropped else []
            x.ex.notes.append(
                f"{st.name} side resynced here" + (": " + ", ".join(lost) if lost else "")
            )
            st.resynced, st.lost, st.dropped = False, 0, 0

    def _body(self, st: _Stream, data: bytearray) -> None:
        st.body_len += len(data)
        room = self.body_limit - len(st.body)
        if room > 0:
            st.body += data if len(data) <= room else data[:room]

    def _end(self, st: _Stream, ev: h11.EndOfMessage | None) -> _Ex:
        """The message in progress ended: completely if `ev`, else cut short."""
        x, msg = st.cur, st.msg
        st.cur = st.msg = None
        if st is self._req:
            x.req_done = True
        else:
            x.resp_done = True
        if msg is not None:
            msg.body = bytes(st.body)
            msg.body_len = st.body_len
            msg.body_truncated = st.body_len > len(msg.body)
            st.body = bytearray()
            if ev is not None:
                msg.complete = True
                msg.end_ts_ns = st.ts_at(st.pos() - 1)
                msg.trailers = _headers(ev.headers) if ev.headers else []
        return x

    def _cycle(self, st: _Stream, fake: h11.Response | None) -> None:
        """Make st's machine ready for the next message."""
        conn = st.conn
        if conn.their_state is h11.DONE:
            if fake is not None:
                if st.fed - st.pos() <= _CHEAP_COPY:  # a new machine costs 1/10 of a send()
                    st.restart(conn.trailing_data[0])
                    return
                conn.send(fake)
                conn.send(_EOM)
            if conn.our_state is h11.DONE:
                conn.start_next_cycle()
                return
        # h11 would stop here (HTTP/1.0, Connection: close, refused Upgrade): start afresh
        st.restart(conn.trailing_data[0])

    def _unblock(self) -> None:
        """The Upgrade/CONNECT request was answered without switching: resume requests."""
        self._blocked = None
        st = self._req
        if st.conn is not None:
            self._cycle(st, None)
            self._pump(st)

    def _desync(self, st: _Stream, lost: int) -> None:
        """Stop parsing `st` until a chunk starts a new message (a gap, or a false resync)."""
        if st.msg is not None:
            self._end(st, None).ex.notes.append(f"{lost} bytes not captured in {st.name}")
        else:
            st.lost += lost
            st.dropped += st.fed - st.pos()  # a partial head
            if st.cur is not None:  # response head not seen: its request awaits again
                self._await.appendleft(st.cur)
                st.cur = None
        if st is self._req:
            self._blocked = None
            if not self._await or self._await[-1] is not None:
                self._await.append(None)
        st.conn = None
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
            self._out.append(x.ex)

    # -- emitting -------------------------------------------------------------

    def _emit_ready(self) -> None:
        q = self._queue
        while q and q[0].req_done and q[0].resp_done:
            self._out.append(q.popleft().ex)

    def _flush(self, why: str) -> None:
        """Emit every unfinished exchange, saying what is missing and why."""
        for st in (self._req, self._resp):
            if st.cur is not None:
                x = self._end(st, None)
                if st.name == "request" or x.ex.response is not None:
                    x.ex.notes.append(f"{st.name} incomplete: {why}")
        for x in self._queue:
            if x.ex.response is None:
                x.ex.notes.append(f"no response: {why}")
            self._out.append(x.ex)
        self._queue.clear()
        self._await.clear()
        self._blocked = None

    def _fail(self, reason: str, why: str) -> None:
        if self.failed is None:
            self.failed = reason
            self._flush(why)
            self._req.conn = self._resp.conn = None

    def _take(self) -> list[Exchange]:
        out, self._out = self._out, []
        return out
