"""HTTP/2 ("h2" inside TLS) from a connection's two captured byte streams.

We are a passive third party: we see what the client wrote (the request side,
starting with the connection preface) and what the server wrote, in chunks of
any size, and can never ask either peer for anything.  That shapes the design:

* Frames come from `hyperframe` (it knows the padding/priority layouts).  Each
  side buffers at most one incomplete frame, kept as a list of chunks that is
  joined once when the frame is complete, so a 16 MiB frame arriving in 4 KiB
  chunks is not re-copied per chunk; complete frames are parsed straight out of
  the caller's chunk through a memoryview.
* HPACK is stateful per direction: one decoder per side, and *every* header
  block (HEADERS + CONTINUATION, PUSH_PROMISE) must be decoded in order, even
  for streams we no longer track, or the dynamic table desyncs.  For the same
  reason lost bytes (a gap) end the parse: the table cannot be recovered.  The
  decoder is shared with the connection's redaction masker, which needs the same
  fields (agent/l7/header_blocks.py): each block is decoded once.
  Table-size limits are the peers' business; ours are set high.
* A stream becomes an `Exchange` when it closes: both sides sent END_STREAM,
  or either reset it, or a GOAWAY says it was never processed, or the
  connection closed.  Waiting for both ends (not just the response's) keeps a
  request whose last bytes are delivered a little after the response -- the
  two sides are captured separately -- from being cut short.
* Nothing raises out of feed/gap/close: any malformed input sets `failed` and
  hands back the open exchanges with a note saying why.  Notes and `failed`
  never quote captured bytes (hpack's and hyperframe's error texts can): an
  error's type and our own fixed texts only.

gRPC (agent/l7/grpc.py) rides on top: a stream whose request content-type is
application/grpc* gets a `GrpcStream` fed the DATA payloads and HEADERS blocks.
"""

from __future__ import annotations

from hpack.exceptions import HPACKError
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import Frame

from agent.l7.exchange import Exchange, Headers, HttpMessage, Side
from agent.l7.grpc import GrpcStream, is_grpc_content_type
from agent.l7.header_blocks import BlockReader, HeaderBlockDecoder, text_fields
from agent.l7.http2_frames import FRAME_HEADER

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_HEADER = 9  # frame header bytes
MAX_HEADER_BLOCK = 1 << 24  # raw HPACK bytes in one HEADERS+CONTINUATION block
MAX_OPEN_STREAMS = 4096  # beyond this the oldest open stream is given up
_SIDE_INDEX = {"request": 0, "response": 1}
_PEER = ("client", "server")

_ERROR_NAMES = (
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
)

# Frame types (RFC 9113 section 6).
_DATA, _HEADERS, _RST_STREAM, _PUSH_PROMISE, _GOAWAY, _CONTINUATION = 0, 1, 3, 5, 7, 9
_END_HEADERS = 0x04
_WHOLE_BLOCK_FLAGS = 0x04 | 0x08 | 0x20  # END_HEADERS, PADDED, PRIORITY


def error_name(code: int) -> str:
    """RST_STREAM / GOAWAY error code -> its RFC name ("CANCEL"), or hex if unknown."""
    return _ERROR_NAMES[code] if 0 <= code < len(_ERROR_NAMES) else f"0x{code:x}"


class _Fail(Exception):
    """Parsing cannot go on; the message is the reason recorded in `failed`."""


class _Block:
    """A header block being assembled from HEADERS/PUSH_PROMISE + CONTINUATION."""

    __slots__ = ("end_stream", "parts", "promised", "size", "stream_id", "ts")

    def __init__(self, stream_id: int, end_stream: bool, promised: int, ts: int) -> None:
        self.stream_id = stream_id
        self.end_stream = end_stream
        self.promised = promised  # PUSH_PROMISE: the promised stream (0: a HEADERS block)
        self.ts = ts
        self.parts: list[bytes] = []
        self.size = 0


class _SideState:
    """One direction: its HPACK table, its partial frame, its open header block."""

    __slots__ = ("block", "blocks", "have", "need", "parts", "pending_ts", "preface_left")

    def __init__(self, preface: bool, blocks: BlockReader) -> None:
        self.blocks = blocks
        self.preface_left = len(PREFACE) if preface else 0
        self.parts: list[bytes] = []  # chunks of the incomplete frame at the stream's head
        self.have = 0  # their total length
        self.need = _HEADER  # bytes needed before another parse is worth trying
        self.pending_ts = 0  # time of the chunk that carried its first byte
        self.block: _Block | None = None


class _Stream:
    __slots__ = ("bodies", "ended", "exchange", "final_response", "grpc")

    def __init__(self, stream_id: int) -> None:
        self.exchange = Exchange("http2", stream_id=stream_id)
        self.bodies = (bytearray(), bytearray())  # kept body bytes per side
        self.ended = [False, False]  # END_STREAM seen per side
        self.final_response = False  # a non-1xx response HEADERS was seen
        self.grpc: GrpcStream | None = None


def _first(headers: Headers, name: str) -> str:
    for key, value in headers:
        if key == name:
            return value
    return ""


class Http2Parser:
    """Turns one HTTP/2 connection's two byte streams into Exchanges."""

    def __init__(
        self,
        body_limit: int = 4096,
        blocks: tuple[HeaderBlockDecoder, HeaderBlockDecoder] | None = None,
    ) -> None:
        """`blocks`: the (request, response) sides' HPACK decoding, when shared with the
        redaction maskers."""
        self.body_limit = max(0, body_limit)
        self.failed: str | None = None
        self._closed = False
        request, response = blocks or (HeaderBlockDecoder(), HeaderBlockDecoder())
        self._sides = (
            _SideState(preface=True, blocks=request.reader()),
            _SideState(preface=False, blocks=response.reader()),
        )
        self._streams: dict[int, _Stream] = {}  # open streams, oldest first
        self._max_id = [0, 0]  # highest stream id opened, by parity (even, odd)
        # Streams reported before their opening frame arrived (the response side ran ahead).
        self._closed_early: set[int] = set()

    # -- public API ------------------------------------------------------------------

    def feed(self, side: Side, data: bytes, ts_ns: int) -> list[Exchange]:
        """One captured chunk of `side`, in stream order; returns exchanges that closed."""
        if self.failed is not None or self._closed:
            return []
        out: list[Exchange] = []
        try:
            index = _SIDE_INDEX.get(side)
            if index is None:
                raise _Fail(f"unknown side {side!r}")
            st = self._sides[index]
            if st.preface_left or st.parts:
                self._feed(index, data, ts_ns, out)
            elif data:  # at a frame boundary (the usual chunk): its frames at once
                view = memoryview(data)
                consumed = self._frames(index, view, ts_ns, ts_ns, out)
                if consumed < len(view):
                    self._keep_rest(st, view, consumed, ts_ns, ts_ns)
        except _Fail as exc:
            return out + self._fail(str(exc))
        except Exception as exc:  # a bug here must not take the capture down
            # The type only: an exception's text can quote captured bytes.
            return out + self._fail(f"internal error: {type(exc).__name__}")
        return out

    def gap(self, side: Side, length: int, ts_ns: int) -> list[Exchange]:
        """`length` bytes of `side` were lost: HPACK state is gone, so parsing ends."""
        if self.failed is not None or self._closed:
            return []
        return self._fail(
            "gap: HTTP/2 header compression state lost",
            f"gap: {length} bytes lost on the {side} side; stream left unfinished",
        )

    def close(self, ts_ns: int) -> list[Exchange]:
        """The connection ended: every unfinished exchange, with notes on what is missing."""
        if self.failed is not None or self._closed:
            return []
        self._closed = True
        try:
            out = []
            mid = [name for name, st in zip(_SIDE_INDEX, self._sides, strict=True) if st.have]
            self._stop_decoding()
            for stream in list(self._streams.values()):
                notes = ["connection closed before the stream ended"]
                notes += [f"connection closed in the middle of a {n} side frame" for n in mid]
                out.append(self._emit(stream, notes))
            return out
        except Exception as exc:
            self.failed = f"internal error: {type(exc).__name__}"
            return []

    # -- bytes -> frames ---------------------------------------------------------------

    def _feed(self, index: int, data: bytes, ts: int, out: list[Exchange]) -> None:
        st = self._sides[index]
        view = memoryview(data)
        if st.preface_left:
            n = min(len(view), st.preface_left)
            start = len(PREFACE) - st.preface_left
            if view[:n] != PREFACE[start : start + n]:
                raise _Fail("request side does not begin with the HTTP/2 connection preface")
            st.preface_left -= n
            view = view[n:]
        if not view:
            return
        if st.parts:  # finish the frame already begun
            st.parts.append(view.tobytes())
            st.have += len(view)
            if st.have < st.need:
                return
            view = memoryview(b"".join(st.parts))
            first_ts = st.pending_ts
            st.parts, st.have = [], 0
        else:
            first_ts = ts
        consumed = self._frames(index, view, first_ts, ts, out)
        if consumed < len(view):
            self._keep_rest(st, view, consumed, first_ts, ts)

    @staticmethod
    def _keep_rest(st: _SideState, view: memoryview, consumed: int, first_ts: int, ts: int) -> None:
        """The incomplete frame at the end of `view` waits for the next chunk."""
        rest = view[consumed:].tobytes()
        st.parts, st.have = [rest], len(rest)
        st.pending_ts = first_ts if consumed == 0 else ts
        st.need = _HEADER
        if len(rest) >= _HEADER:
            st.need += int.from_bytes(rest[:3], "big")

    def _frames(
        self, index: int, view: memoryview, first_ts: int, ts: int, out: list[Exchange]
    ) -> int:
        """Handle every complete frame in `view`; return how many bytes they took."""
        pos, end = 0, len(view)
        unpack = FRAME_HEADER.unpack_from
        st = self._sides[index]
        while end - pos >= _HEADER:
            high, low, ftype, flags, sid = unpack(view, pos)
            body_end = pos + _HEADER + ((high << 16) | low)
            if body_end > end:
                break
            if ftype == _DATA:  # the bulk of most streams: no hyperframe object
                body = view[pos + _HEADER : body_end]
                self._data_frame(index, sid & 0x7FFFFFFF, flags, body, ts, out)
                pos = body_end
                continue
            fts = first_ts if pos == 0 else ts
            if (
                ftype == _HEADERS
                and flags & _WHOLE_BLOCK_FLAGS == _END_HEADERS
                and sid & 0x7FFFFFFF
                and st.block is None
            ):  # the usual HEADERS frame: a whole block, no padding or priority
                raw = view[pos + _HEADER : body_end].tobytes()
                self._headers(index, sid & 0x7FFFFFFF, flags & 0x01, 0, fts, raw, ts, out)
                pos = body_end
                continue
            if ftype in (_HEADERS, _CONTINUATION):  # every stream has them: neither
                body = view[pos + _HEADER : body_end]
                self._header_frame(index, ftype, flags, sid & 0x7FFFFFFF, body, fts, ts, out)
                pos = body_end
                continue
            try:
                frame, _ = Frame.parse_frame_header(view[pos : pos + _HEADER])
                frame.parse_body(view[pos + _HEADER : body_end])
            except HyperframeError as exc:
                side = ("request", "response")[index]
                raise _Fail(f"bad frame on the {side} side: {type(exc).__name__}") from None
            self._frame(index, frame, fts, ts, out)
            pos = body_end
        return pos

    # -- frames -> streams -------------------------------------------------------------

    def _frame(self, index: int, frame, fts: int, ts: int, out: list[Exchange]) -> None:
        st = self._sides[index]
        kind = frame.type
        if st.block is not None and kind != _CONTINUATION:
            raise _Fail(f"protocol error: frame type {kind} inside a header block")
        if kind == _DATA:
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                self._data(index, stream, frame.data, "END_STREAM" in frame.flags, ts, out)
        elif kind == _PUSH_PROMISE:  # (HEADERS and CONTINUATION: _header_frame)
            if index == 0:
                raise _Fail("protocol error: PUSH_PROMISE from the client")
            promised = frame.promised_stream_id
            st.block = _Block(frame.stream_id, "END_STREAM" in frame.flags, promised, fts)
            self._fragment(index, frame.data, "END_HEADERS" in frame.flags, ts, out)
        elif kind == _RST_STREAM:
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                note = f"stream reset by the {_PEER[index]}: {error_name(frame.error_code)}"
                out.append(self._emit(stream, [note]))
        elif kind == _GOAWAY:
            # Streams the GOAWAY's receiver opened above last_stream_id were never processed.
            parity = 1 if index == 1 else 0
            last = frame.last_stream_id
            note = (
                f"not processed: {_PEER[index]} sent GOAWAY ({error_name(frame.error_code)}) "
                f"with last_stream_id {last}"
            )
            for sid in [s for s in self._streams if s > last and s & 1 == parity]:
                out.append(self._emit(self._streams[sid], [note]))
        # SETTINGS, PING, WINDOW_UPDATE, PRIORITY and unknown types change nothing we report.

    def _data_frame(
        self, index: int, sid: int, flags: int, body: memoryview, ts: int, out: list[Exchange]
    ) -> None:
        """A DATA frame, checked as hyperframe would (same errors), then as in _frame."""
        bad = ""
        if not sid:
            bad = "Stream ID must be non-zero for DataFrame"
        elif flags & 0x08:  # PADDED
            if not body:
                bad = "Invalid Padding data"
            elif body[0] >= len(body):
                bad = "Padding is too long."
            else:
                body = body[1 : len(body) - body[0]]
        if bad:
            raise _Fail(f"bad frame on the {('request', 'response')[index]} side: {bad}")
        if self._sides[index].block is not None:
            raise _Fail(f"protocol error: frame type {_DATA} inside a header block")
        stream = self._streams.get(sid)
        if stream is not None:
            data = body if stream.grpc is None else body.tobytes()
            self._data(index, stream, data, bool(flags & 0x01), ts, out)

    def _header_frame(
        self,
        index: int,
        ftype: int,
        flags: int,
        sid: int,
        body: memoryview,
        fts: int,
        ts: int,
        out: list[Exchange],
    ) -> None:
        """A HEADERS or CONTINUATION frame, checked as hyperframe would (same verdicts,
        reported by its exception names), then as in _frame."""
        bad = ""
        if not sid:
            bad = "InvalidDataError"  # both need a stream
        elif ftype == _HEADERS:
            pad = 0
            if flags & 0x08:  # PADDED
                if body:
                    pad, body = body[0], body[1:]
                else:
                    bad = "InvalidFrameError"
            start = 0
            if flags & 0x20 and not bad:  # PRIORITY: 5 bytes before the fragment
                if len(body) < 5:
                    bad = "InvalidFrameError"
                start = 5
            if pad and pad >= len(body) and not bad:
                bad = "InvalidPaddingError"
            body = body[start : len(body) - pad]
        if bad:
            raise _Fail(f"bad frame on the {('request', 'response')[index]} side: {bad}")
        st = self._sides[index]
        if ftype == _HEADERS:
            if st.block is not None:
                raise _Fail(f"protocol error: frame type {ftype} inside a header block")
            st.block = _Block(sid, bool(flags & 0x01), 0, fts)
        elif st.block is None or st.block.stream_id != sid:
            raise _Fail("protocol error: CONTINUATION without a header block to continue")
        self._fragment(index, body.tobytes(), bool(flags & 0x04), ts, out)

    def _fragment(
        self, index: int, fragment: bytes, end_headers: bool, ts: int, out: list[Exchange]
    ) -> None:
        block = self._sides[index].block
        assert block is not None
        block.parts.append(fragment)
        block.size += len(fragment)
        if block.size > MAX_HEADER_BLOCK:
            raise _Fail(f"header block larger than {MAX_HEADER_BLOCK} bytes")
        if end_headers:
            self._sides[index].block = None
            raw = block.parts[0] if len(block.parts) == 1 else b"".join(block.parts)
            sid, end = block.stream_id, block.end_stream
            self._headers(index, sid, end, block.promised, block.ts, raw, ts, out)

    def _headers(
        self,
        index: int,
        sid: int,
        end_stream: bool | int,
        promised: int,
        block_ts: int,
        raw: bytes,
        ts: int,
        out: list[Exchange],
    ) -> None:
        """A whole header block `raw` of stream `sid` (`promised`: the stream a
        PUSH_PROMISE promised, else 0), begun at `block_ts`."""
        try:
            decoded = self._sides[index].blocks.decode(raw).fields
        except HPACKError as exc:
            side = ("request", "response")[index]
            # hpack's texts can quote header bytes: the error's type only.
            raise _Fail(f"HPACK decoding failed on the {side} side: {type(exc).__name__}") from None
        headers = text_fields(decoded)  # each as bytes.decode("utf-8", "replace")
        if promised:
            self._push(sid, promised, block_ts, headers, ts, out)
            return
        stream = self._streams.get(sid)
        if stream is None and (index == 1 or sid & 1):
            stream = self._open(sid, out, opener=index == 0)
        if stream is None:  # a stream already closed (or a client HEADERS on an even id)
            return
        if index == 0:
            self._request_headers(stream, headers, block_ts)
        else:
            self._response_headers(stream, headers, block_ts)
        if end_stream:
            self._end(index, stream, ts, out)

    def _open(self, sid: int, out: list[Exchange], opener: bool) -> _Stream | None:
        """A new stream, or None if `sid` was already reported.

        `opener`: the frame is the one that opens `sid` in its own side's order
        (client HEADERS for odd ids, PUSH_PROMISE for even ones).  Only those
        advance the high-water mark, so a response seen ahead of its request
        does not make the requests below it look stale.
        """
        if sid <= self._max_id[sid & 1]:
            return None  # closed and already reported
        if sid in self._closed_early:
            if opener:
                self._closed_early.discard(sid)
                self._max_id[sid & 1] = sid
            return None
        if opener:
            self._max_id[sid & 1] = sid
        stream = self._streams[sid] = _Stream(sid)
        if len(self._streams) > MAX_OPEN_STREAMS:
            oldest = self._streams[next(iter(self._streams))]
            note = f"more than {MAX_OPEN_STREAMS} open streams: given up on the oldest"
            out.append(self._emit(oldest, [note]))
        return stream

    def _request_headers(self, stream: _Stream, headers: Headers, ts: int) -> None:
        exchange = stream.exchange
        request = exchange.request
        if request is not None:
            if not stream.ended[0]:
                request.trailers.extend(headers)
            return
        first = dict(reversed(headers))  # each name's first value, built in C
        # Positional (ts_ns, end_ts_ns, method, target, authority, status, reason, version,
        # headers): cheaper than keywords, and made for every stream.
        request = exchange.request = HttpMessage(
            ts,
            0,
            first.get(":method", ""),
            first.get(":path", ""),
            first.get(":authority") or first.get("host", ""),
            0,
            "",
            "2",
            headers,
        )
        if is_grpc_content_type(first.get("content-type")):
            exchange.protocol = "grpc"
            stream.grpc = GrpcStream(request.target, self.body_limit)

    def _response_headers(self, stream: _Stream, headers: Headers, ts: int) -> None:
        exchange = stream.exchange
        if stream.final_response:
            if exchange.response is not None and not stream.ended[1]:
                exchange.response.trailers.extend(headers)
                if stream.grpc is not None:
                    stream.grpc.response_headers(headers)
            return
        text = _first(headers, ":status")
        status = int(text) if text.isdigit() and len(text) == 3 else 0
        if 100 <= status < 200:
            exchange.notes.append(f"informational response {status} skipped")
            return
        if not status:
            # Its length only: the value is captured bytes.
            exchange.notes.append(f"response :status ({len(text)} characters) is not a status code")
        stream.final_response = True
        exchange.response = HttpMessage(ts, 0, "", "", "", status, "", "2", headers)
        if stream.grpc is not None:
            stream.grpc.response_headers(headers)

    def _push(
        self, sid: int, promised: int, block_ts: int, headers: Headers, ts: int, out: list[Exchange]
    ) -> None:
        stream = self._open(promised, out, opener=True)
        if stream is None:
            return
        stream.exchange.request = HttpMessage(
            ts_ns=block_ts,
            end_ts_ns=ts,
            method=_first(headers, ":method"),
            target=_first(headers, ":path"),
            authority=_first(headers, ":authority"),
            version="2",
            headers=headers,
            complete=True,
        )
        stream.ended[0] = True
        stream.exchange.notes.append(f"server push, promised on stream {sid}")

    def _data(
        self, index: int, stream: _Stream, data: bytes, end: bool, ts: int, out: list[Exchange]
    ) -> None:
        exchange = stream.exchange
        message = exchange.response if index else exchange.request
        if message is not None and not stream.ended[index]:
            message.body_len += len(data)
            body = stream.bodies[index]
            room = self.body_limit - len(body)
            if room > 0 and data:
                body += data[:room] if len(data) > room else data
            grpc = stream.grpc
            if grpc is not None:
                (grpc.response if index else grpc.request).feed(data)
        elif message is None and data:
            exchange.notes.append(f"{len(data)} DATA bytes before the headers of their message")
        if end:
            self._end(index, stream, ts, out)

    def _end(self, index: int, stream: _Stream, ts: int, out: list[Exchange]) -> None:
        if stream.ended[index]:
            return
        stream.ended[index] = True
        exchange = stream.exchange
        message = exchange.response if index else exchange.request
        if message is not None:
            message.complete = True
            message.end_ts_ns = ts
        if stream.ended[0] and stream.ended[1]:
            out.append(self._emit(stream, []))

    # -- streams -> exchanges ----------------------------------------------------------

    def _emit(self, stream: _Stream, notes: list[str]) -> Exchange:
        """Take `stream` off the open list and finish its Exchange."""
        exchange = stream.exchange
        sid = exchange.stream_id
        self._streams.pop(sid, None)
        if sid > self._max_id[sid & 1]:
            if len(self._closed_early) >= MAX_OPEN_STREAMS:
                self._closed_early.clear()
            self._closed_early.add(sid)
        request, response = exchange.request, exchange.response
        if request is not None:
            request.body = body = bytes(stream.bodies[0])
            request.body_truncated = request.body_len > len(body)
        else:
            exchange.notes.append("request not seen")
        if response is not None:
            response.body = body = bytes(stream.bodies[1])
            response.body_truncated = response.body_len > len(body)
        else:
            exchange.notes.append("no response seen")
        exchange.notes.extend(notes)
        if stream.grpc is not None:
            response = exchange.response
            exchange.notes.extend(stream.grpc.finish(response is not None and response.complete))
            exchange.grpc = stream.grpc.call
        return exchange

    def _fail(self, reason: str, note: str | None = None) -> list[Exchange]:
        """Give up for good: record why, drop all state, return the open exchanges."""
        self.failed = reason
        streams, self._streams = list(self._streams.values()), {}
        self._stop_decoding()
        note = note or f"HTTP/2 parsing stopped: {reason}"
        out = []
        for stream in streams:
            try:
                out.append(self._emit(stream, [note]))
            except Exception:  # pragma: no cover - emitting is plain bookkeeping
                continue
        return out

    def _stop_decoding(self) -> None:
        """No more header blocks: the shared decoders keep none for us; buffers go."""
        for st in self._sides:
            st.blocks.close()
            st.parts, st.have, st.block = [], 0, None
