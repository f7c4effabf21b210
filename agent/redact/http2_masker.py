"""Masking sensitive header values inside an HTTP/2 byte stream, keeping it valid.

In HTTP/2 a header's name and value are HPACK-compressed: a value may be
Huffman-coded, and its name may be nothing but an index into a dynamic table
built from earlier header blocks of the same direction.  Header blocks can be
split across HEADERS/PUSH_PROMISE + CONTINUATION frames, and frames across TLS
records.  So no byte of a header block can be let out before the whole block is
seen: this masker is a streaming transducer that walks frames by their 9-byte
headers, passes everything outside header blocks on at once (DATA is most of the
volume) and holds each header block from its first frame to the frame with
END_HEADERS.

A complete block is decoded once, whole, by the direction's shared decoder
(agent/l7/header_blocks.py: the HTTP/2 parser reads the same decoded blocks),
which keeps the dynamic table in step with the peer's and tells each field's
name and where its value string is (RFC 7541 section 6).  A literal whose name
is sensitive has its value masked in place so that the stream stays valid
HPACK, at the same length: the H (Huffman) bit of the string's length prefix is
cleared (the length integer keeps its encoding) and the string's bytes become
b"*".  A decoder of the masked stream (Wireshark, or
anything fed the records) sees "****" where the secret was, and every other
header unchanged.

Fail closed, always with a rule name saying why:
- a block that never completes (another frame came before END_HEADERS, flush(),
  or more than `max_hold` bytes would be held) has its fragment bytes replaced
  with b"\\x00": "http2:incomplete-header-block"; CONTINUATION frames still to
  come of a block forced out that way are wiped as they pass;
- a block that does not decode (and a malformed padded/priority frame): the
  whole block is wiped, "http2:undecodable-header-block";
- after either, the dynamic table may no longer match the peer's: a literal
  whose name comes from the dynamic table has its value masked,
  "http2:unknown-header-name" (until a table size update to 0 empties it);
- after gap(), frame sync is lost, unless the lost bytes lay entirely within
  the payload of the current non-header frame (a DATA frame, typically), whose
  length says exactly where the next frame starts.  Without sync every byte is
  replaced with b"\\x00": "http2:desync".  Likewise when a client stream does
  not begin with the connection preface, and at a frame header that cannot be
  right (agent/l7/http2_frames.py: a type's fixed length or stream id rule
  broken) -- a frame header is held until all 9 bytes are checked;
- a frame of a type RFC 9113 does not define has its payload zeroed
  ("http2:unknown-frame-type"): nothing is passed that could not be framed;
- without sync, each new record (feed() call) is searched for a run of plausible
  frames (agent/l7/http2_frames.py); where one starts, framing is picked up (the
  bytes before it, a frame's tail, are zeroed), but the HPACK state is
  unknown (the blocks before were never decoded), so from then on the whole
  header block fragment of every HEADERS, PUSH_PROMISE and CONTINUATION frame is
  zeroed, lengths and framing kept: "http2:hpack-state-unknown", counted in
  `unknown_blocks`.  A masker made with `midstream` (a connection first seen in
  the middle) starts that way.

Credential query parameters in ":path" (rules.DEFAULT_QUERY_PARAMS) are masked
too: in a plain string, only the values' bytes become b"*"; a Huffman-coded
":path" cannot be changed piecewise at the same length, so all of it is masked
like a sensitive header value.

Frame headers, pad-length, priority and promised-stream fields and padding
(zeros, by RFC 9113) are never changed: the masked stream frames exactly like
the original.  Limitation: a masked Huffman value can decode to a different
length than the original, so a third-party decoder's dynamic table *size
accounting* may differ from the peer's (entries evicted at other times); the
masker's own decoder sees the original bytes and is not affected.
"""

from __future__ import annotations

from agent.l7.header_blocks import HeaderBlockDecoder
from agent.l7.http2_frames import (
    FRAME_HEADER,
    KNOWN_TYPES,
    STREAM_ONLY_TYPES,
    find_frame_run,
    frame_header_problem,
)
from agent.redact.rules import header_rule_name, mask_query_values, query_pattern

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

RULE_INCOMPLETE = "http2:incomplete-header-block"
RULE_UNDECODABLE = "http2:undecodable-header-block"
RULE_UNKNOWN_NAME = "http2:unknown-header-name"
RULE_DESYNC = "http2:desync"
RULE_UNKNOWN_FRAME = "http2:unknown-frame-type"
RULE_HPACK_UNKNOWN = "http2:hpack-state-unknown"

_HEADERS, _PUSH_PROMISE, _CONTINUATION = 0x1, 0x5, 0x9
_END_HEADERS, _PADDED, _PRIORITY = 0x4, 0x8, 0x20
_PAD_OR_PRIORITY = _PADDED | _PRIORITY
_STATIC_TABLE_LEN = 61
# Distinct field names remembered lower-cased, per masker (short ones: a few KiB at most).
_NAME_CACHE = 128
_NAME_CACHED_LEN = 64

# Where the walk is.
_PREFACE_MODE, _HEADER_MODE, _PAYLOAD_MODE, _DESYNC_MODE = range(4)
# What happens to the current frame's payload.
_PASS, _HOLD, _WIPE = range(3)


class Http2HeaderMasker:
    """One direction of one HTTP/2 connection (`preface`: the client's side).

    feed() returns the bytes decided so far (in order, masked; possibly fewer
    or more than were fed), flush() whatever is still held.  With no sensitive
    names at all it passes everything through untouched.
    """

    def __init__(
        self,
        names: frozenset[str],
        preface: bool,
        max_hold: int = 1 << 20,
        blocks: HeaderBlockDecoder | None = None,
        query_params: frozenset[str] = frozenset(),
        midstream: bool = False,
    ) -> None:
        """`blocks`: the direction's HPACK decoding, when shared with a parser;
        `query_params`: credential parameters masked in ":path"; `midstream`: the
        stream's start was not seen (framing is picked up, header blocks wiped)."""
        self._names = frozenset(n.lower() for n in names)
        self._name_of: dict[bytes, str] = {}  # raw field name -> lower-case str
        self._query = query_pattern(frozenset(q.lower() for q in query_params))
        self._query_names = frozenset(q.lower() for q in query_params)
        self._active = bool(self._names or self._query_names)
        self._max_hold = max_hold
        # Without rules nothing is decoded: no reader, so nothing is kept for one.
        self._blocks = (blocks or HeaderBlockDecoder()).reader() if self._active else None
        self._trusted = True  # the dynamic table is in step with the peer's
        self._hpack_unknown = midstream  # header blocks cannot be decoded: wipe them
        self.unknown_blocks = 0  # header blocks wiped because the HPACK state is unknown
        if midstream:
            self._mode = _DESYNC_MODE
            if self._blocks is not None:  # None without rules: nothing is decoded
                self._blocks.close()
        else:
            self._mode = _PREFACE_MODE if preface else _HEADER_MODE
        self._preface_pos = 0
        self._hdr = bytearray()  # the frame header being read
        # The current frame.
        self._ftype = self._flags = self._flen = self._fpos = 0
        self._role = _PASS
        self._wipe_rule = ""
        self._need_pad = False  # its Pad Length byte is still to come
        self._frag_lo = self._frag_hi = 0  # its header block fragment, in payload positions
        # The current header block.
        self._in_block = False
        self._block_stream = 0
        self._block_bad = False  # malformed frame: wipe it all
        self._discard = False  # rest of a block that was forced out: wipe as it passes
        self._held = bytearray()
        self._frags: list[tuple[int, int]] = []  # (offset in _held, length) of fragment bytes
        # Decided, not yet returned.
        self._out: list[bytes | memoryview] = []
        self._hits: set[str] = set()

    @property
    def held(self) -> int:
        """Bytes fed and not yet returned."""
        return len(self._held) + len(self._hdr) + sum(len(part) for part in self._out)

    def feed(self, data: bytes) -> tuple[bytes, set[str]]:
        """The bytes decided now (masked), and the rules that changed any of them."""
        if not self._active:
            self._out.append(data)
            return self._drain()
        if self._mode == _HEADER_MODE and not (
            self._hdr or self._in_block or self._hpack_unknown or self._out
        ):  # at a frame boundary, nothing held (the usual record): whole frames first
            pos = self._whole_frames(data, 0)
            if pos == len(data):
                out = self._out
                hits = self._hits
                self._out, self._hits = [], set()
                return bytes(out[0]) if out else b"", hits
        else:
            pos = 0
            if self._mode == _DESYNC_MODE:
                at = find_frame_run(data)
                if at is not None:
                    if at:  # the tail of a frame whose header was not seen: masked
                        self._out.append(bytes(at))
                        self._hits.add(RULE_DESYNC)
                        data = data[at:]
                    self._resync()
        n = len(data)
        view = memoryview(data)
        while pos < n:
            mode = self._mode
            if mode == _PAYLOAD_MODE:
                k = min(self._flen - self._fpos, n - pos)
                self._payload(data, view, pos, k)
                pos += k
                if self._fpos == self._flen:
                    self._frame_end()
            elif mode == _HEADER_MODE:  # a frame header is let out once checked
                if not self._hdr and n - pos >= 9:  # all of it here (the usual case)
                    if not self._in_block and not self._hpack_unknown:
                        done = self._whole_frames(data, pos)
                        if done != pos:
                            pos = done
                            continue
                    self._frame_start(data[pos : pos + 9])
                    pos += 9
                    continue
                k = min(9 - len(self._hdr), n - pos)
                self._hdr += data[pos : pos + k]
                pos += k
                if len(self._hdr) == 9:
                    header, self._hdr = bytes(self._hdr), bytearray()
                    self._frame_start(header)
            elif mode == _PREFACE_MODE:
                k = min(len(PREFACE) - self._preface_pos, n - pos)
                chunk = data[pos : pos + k]
                expected = PREFACE[self._preface_pos : self._preface_pos + k]
                same = 0
                while same < k and chunk[same] == expected[same]:
                    same += 1
                self._out.append(chunk[:same])
                pos += same
                self._preface_pos += same
                if same < k:
                    self._desync()
                elif self._preface_pos == len(PREFACE):
                    self._mode = _HEADER_MODE
            else:
                self._out.append(bytes(n - pos))
                self._hits.add(RULE_DESYNC)
                pos = n
        return self._drain()

    def flush(self) -> tuple[bytes, set[str]]:
        """Everything still held; an incomplete header block leaves wiped."""
        if self._in_block:
            self._release_incomplete(more_to_come=True)
        if self._hdr:  # a frame header never completed: unchecked bytes
            self._out.append(bytes(len(self._hdr)))
            self._hits.add(RULE_DESYNC)
            self._hdr = bytearray()
        return self._drain()

    def gap(self, length: int) -> None:
        """`length` bytes of the stream were lost (length <= 0: unknown)."""
        if not self._active or self._mode == _DESYNC_MODE:
            return
        in_frame = self._mode == _PAYLOAD_MODE and 0 < length <= self._flen - self._fpos
        if in_frame and self._role == _PASS:  # within a DATA (or other non-header) frame
            self._fpos += length
            if self._fpos == self._flen:
                self._frame_end()
            return
        self._desync()

    # -- frames ---------------------------------------------------------------

    def _drain(self) -> tuple[bytes, set[str]]:
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        hits = self._hits
        self._out, self._hits = [], set()
        return bytes(out), hits

    def _desync(self) -> None:
        if self._in_block:
            self._release_incomplete(more_to_come=False)
        if self._hdr:
            self._out.append(bytes(len(self._hdr)))
            self._hits.add(RULE_DESYNC)
            self._hdr = bytearray()
        self._mode = _DESYNC_MODE
        self._blocks.close()
        self._discard = False

    def _resync(self) -> None:
        """A record starts with a run of plausible frames: framing goes on from
        here, header blocks wiped (the HPACK state before is unknown)."""
        self._mode = _HEADER_MODE
        self._hdr = bytearray()
        self._hpack_unknown = True
        self._trusted = False
        self._in_block = self._discard = False

    def _whole_frames(self, data: bytes, pos: int) -> int:
        """The usual case, in one loop: frames lying whole in `data` from `pos`, outside
        any header block.  Frames other than header frames pass as they are; a HEADERS
        frame carrying a whole block (END_HEADERS, no padding or priority) is masked
        here.  The same result as the frame-by-frame path (_frame_start, _payload,
        _frame_end) without its per-frame state; returns where it stopped: at a frame
        it leaves to that path (a cut one, a CONTINUATION, PUSH_PROMISE, a padded or
        prioritised HEADERS, an unknown type, a header that cannot be right)."""
        n = len(data)
        start = pos
        unpack = FRAME_HEADER.unpack_from
        patched: bytearray | None = None  # a copy of data, once a block in it changed
        hold_limit = self._max_hold - 9  # a larger block would be released incomplete
        while n - pos >= 9:
            high, low, ftype, flags, stream = unpack(data, pos)
            flen = (high << 16) | low
            end = pos + 9 + flen
            if end > n:
                break
            if ftype in STREAM_ONLY_TYPES:
                if not stream & 0x7FFFFFFF:
                    break
            elif ftype >= KNOWN_TYPES or frame_header_problem(
                ftype, flags, flen, stream & 0x7FFFFFFF
            ):
                break
            if ftype == _HEADERS:
                if flags & _PAD_OR_PRIORITY or not flags & _END_HEADERS or flen > hold_limit:
                    break
                frag = self._walk(bytes(data[pos + 9 : end]))
                if frag is not None:
                    if patched is None:
                        patched = bytearray(data)
                    patched[pos + 9 : end] = frag
            elif ftype in (_PUSH_PROMISE, _CONTINUATION):
                break
            pos = end
        if pos != start:
            self._discard = False  # as _frame_start does at a frame that is no CONTINUATION
            if patched is not None:
                self._out.append(bytes(patched[start:pos]))
            else:
                self._out.append(data[start:pos] if start or pos != n else data)
        return pos

    def _frame_start(self, h: bytes) -> None:
        """The frame whose 9-byte header is `h` starts."""
        high, low, ftype, flags, stream = FRAME_HEADER.unpack(h)
        flen = (high << 16) | low
        stream &= 0x7FFFFFFF
        if frame_header_problem(ftype, flags, flen, stream):
            self._hdr = bytearray(h)
            self._desync()  # the held header leaves zeroed
            return
        self._ftype, self._flags, self._flen, self._fpos = ftype, flags, flen, 0
        continues = ftype == _CONTINUATION and stream == self._block_stream
        if self._in_block and not continues:
            self._release_incomplete(more_to_come=False)
        if self._discard and not continues:
            self._discard = False
        if self._in_block:
            self._hold(h)
        else:
            self._out.append(h)
        self._mode = _PAYLOAD_MODE
        if ftype >= KNOWN_TYPES:  # not understood: nothing of it is passed
            self._role, self._wipe_rule = _WIPE, RULE_UNKNOWN_FRAME
            self._need_pad = False
            self._frag_lo, self._frag_hi = 0, flen
            if flen == 0:
                self._frame_end()
            return
        if self._hpack_unknown and ftype in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
            self._role, self._wipe_rule = _WIPE, RULE_HPACK_UNKNOWN
            if ftype != _CONTINUATION:
                self.unknown_blocks += 1
        elif ftype == _CONTINUATION:
            if self._in_block:
                self._role = _HOLD
            else:
                self._role = _WIPE
                self._wipe_rule = RULE_INCOMPLETE if self._discard else RULE_UNDECODABLE
        elif ftype in (_HEADERS, _PUSH_PROMISE):
            self._in_block, self._block_stream, self._block_bad = True, stream, False
            self._role = _HOLD
        else:
            self._role = _PASS
            if flen == 0:
                self._frame_end()
            return
        lo = 0
        if ftype != _CONTINUATION and flags & _PADDED:
            lo += 1
        if ftype == _HEADERS and flags & _PRIORITY:
            lo += 5
        elif ftype == _PUSH_PROMISE:
            lo += 4
        self._need_pad = ftype != _CONTINUATION and bool(flags & _PADDED)
        if lo > flen:
            self._block_bad = True
            lo = 0 if self._role == _WIPE else flen
        self._frag_lo, self._frag_hi = lo, flen
        if flen == 0:
            self._frame_end()

    def _payload(self, data: bytes, view: memoryview, pos: int, k: int) -> None:
        fpos = self._fpos
        self._fpos = fpos + k
        role = self._role
        if role == _PASS:
            self._out.append(view[pos : pos + k])
            return
        if self._need_pad:  # fpos == 0: the Pad Length byte is here
            self._need_pad = False
            hi = self._flen - data[pos]
            if hi < self._frag_lo:
                self._block_bad = True
                hi = self._flen
            self._frag_hi = hi
        if role == _HOLD:
            base = len(self._held) - fpos  # where payload position 0 is in _held
            lo, hi = max(fpos, self._frag_lo), min(fpos + k, self._frag_hi)
            if hi > lo:
                self._frags.append((base + lo, hi - lo))
            self._hold(data[pos : pos + k])
            return
        # _WIPE: the fragment bytes become zeros (as in _wipe_held).
        seg = data[pos : pos + k]
        start = max(fpos, self._frag_lo) - fpos
        stop = min(fpos + k, self._frag_hi) - fpos
        if stop > start:
            seg = seg[:start] + bytes(stop - start) + seg[stop:]
            self._hits.add(self._wipe_rule)
        self._out.append(seg)

    def _hold(self, chunk: bytes) -> None:
        self._held += chunk
        if len(self._held) > self._max_hold:
            self._release_incomplete(more_to_come=True)

    def _frame_end(self) -> None:
        self._mode = _HEADER_MODE
        if self._ftype in (_HEADERS, _PUSH_PROMISE, _CONTINUATION) and self._flags & _END_HEADERS:
            if self._role == _HOLD:
                self._complete_block()
            self._discard = False

    # -- header blocks ----------------------------------------------------------

    def _wipe_held(self, rule: str) -> None:
        held = self._held
        for off, length in self._frags:
            held[off : off + length] = bytes(length)
        if self._frags:
            self._hits.add(rule)
        self._trusted = False

    def _emit_held(self) -> None:
        self._out.append(bytes(self._held))
        self._held = bytearray()
        self._frags = []
        self._in_block = False

    def _release_incomplete(self, more_to_come: bool) -> None:
        """The block will not complete here: its fragments leave wiped.  With
        `more_to_come` the rest of it is wiped as it passes (max_hold, flush)."""
        self._wipe_held(RULE_INCOMPLETE)
        self._emit_held()
        self._blocks.skip()
        if more_to_come:
            self._discard = True
            if self._mode == _PAYLOAD_MODE and self._role == _HOLD:
                self._role, self._wipe_rule = _WIPE, RULE_INCOMPLETE

    def _complete_block(self) -> None:
        if self._block_bad:
            self._blocks.skip()
            self._wipe_held(RULE_UNDECODABLE)
        else:
            held = self._held
            frags = self._frags
            if len(frags) == 1:
                off, length = frags[0]
                raw = bytes(held[off : off + length])
            else:
                raw = b"".join([held[off : off + length] for off, length in frags])
            frag = self._walk(raw)
            if frag is not None:
                p = 0
                for off, length in self._frags:
                    held[off : off + length] = frag[p : p + length]
                    p += length
        self._emit_held()

    def _walk(self, raw: bytes) -> bytearray | None:
        """A whole header block fragment with its sensitive values masked (a copy), or
        None when nothing in it changes."""
        try:
            # The shared decode says, field by field, where each value string is.
            block = self._blocks.decode(raw)
        except Exception:  # untrusted input: any failure wipes the block
            return self._wipe_fragment(raw)
        if block.emptied:  # a table size update to 0: the table is in step again
            self._trusted = True
        names = self._names
        query = self._query
        trusted = self._trusted
        fields = block.fields
        frag = None  # the copy, made at the first change
        # Only literals carry value bytes of their own: indexed fields have none here.
        for position, index, h_pos, start, stop in block.literals:
            raw_name, raw_value = fields[position]
            # Names are compared lower-case: a peer may send upper case, against the RFC.
            name = self._name_of.get(raw_name)
            if name is None:
                name = self._lower_name(raw_name)
            if name in names:
                rule = header_rule_name(name)
            elif name == ":path" and query is not None:
                if query.search(raw_value):  # most paths carry no credential
                    if frag is None:
                        frag = bytearray(raw)
                    self._mask_path(frag, h_pos, start, stop, raw_value)
                continue
            elif not trusted and index > _STATIC_TABLE_LEN:
                rule = RULE_UNKNOWN_NAME
            else:
                continue
            if stop > start:
                if frag is None:
                    frag = bytearray(raw)
                frag[h_pos] &= 0x7F
                frag[start:stop] = b"*" * (stop - start)
                self._hits.add(rule)
        return frag

    def _lower_name(self, raw_name: bytes) -> str:
        """`raw_name` as a lower-case str, remembered (a connection repeats its names)."""
        name = raw_name.decode("latin-1").lower()
        if len(self._name_of) < _NAME_CACHE and len(raw_name) <= _NAME_CACHED_LEN:
            self._name_of[raw_name] = name
        return name

    def _mask_path(
        self, frag: bytearray, h_pos: int, start: int, stop: int, decoded: bytes
    ) -> bool:
        """Mask credential query values of a ":path" literal in place, keeping HPACK
        valid at the same length: only the values of a plain string, all of a
        Huffman-coded one (its bytes do not map to characters)."""
        masked, hits = mask_query_values(decoded, self._query_names)
        if not hits:
            return False
        if frag[h_pos] & 0x80:  # Huffman-coded
            frag[h_pos] &= 0x7F
            frag[start:stop] = b"*" * (stop - start)
        else:
            frag[start:stop] = masked
        self._hits |= hits
        return True

    def _wipe_fragment(self, raw: bytes) -> bytearray:
        """A block that does not decode: all of it goes, and the table is not trusted."""
        if raw:
            self._hits.add(RULE_UNDECODABLE)
        self._trusted = False
        return bytearray(len(raw))
