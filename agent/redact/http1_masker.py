"""Masking sensitive HTTP/1.x header values in a byte stream, chunk by chunk.

Data records are whatever one TLS library call wrote or read: a header line can
be split anywhere between two records (its name in one, the colon or the value
in the next, CR and LF apart), and records must leave the agent masked one by
one, in order, at their original length.  So this masker does not parse HTTP
messages: it is a small line-oriented state machine over the raw stream that
recognises, at every line start, "<sensitive name>[SP/HT]*:" and replaces the
value after it with b"*" up to the end of the line -- including obs-fold
continuation lines (lines starting with SP or HT right after such a value).

Why framing-independent: a parser that knows where the header section ends would
have to be as lenient as every server it watches, and any disagreement (a bare
LF, a smuggling attempt, a pipelined request it lost track of) would leak a
token.  Matching every line instead errs the other way: a body line that
happens to start like "Authorization:" is masked too.  That over-redaction is
accepted; under-redaction is not.

Masking rules, precisely:
- the value starts after the colon and the SP/HT that follow it;
- it ends at the LF ending the line; CR bytes are kept (so a bare CR inside a
  value does not end the masking early), every other byte becomes b"*";
- after gap() (bytes lost) the line position is unknown, so nothing matches until
  the next LF -- except that a value being masked when the gap came, or one whose
  line had just ended (a fold line may have started in the gap), goes on being
  masked until the next LF (fail closed).  A sensitive header whose *name* was
  lost in a gap cannot be recognised: that is the one thing a stream masker
  cannot do.

Query parameters (rules.DEFAULT_QUERY_PARAMS: access_token, X-Amz-Signature, ...)
are masked the same way, on every line (request lines, Referer/Location values,
form bodies): "[?&;]name=" followed by the value up to the next separator, also
when the name and the value fall in two records (_QueryMasker).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from agent.redact.rules import header_rule_name, query_pattern, query_rule_name

# States.
_SCAN = 0  # at a line start, nothing pending: search the chunk
_NAME = 1  # inside a line's first bytes, which may still become a sensitive name
_NAME_WS = 2  # a full sensitive name seen; SP/HT may follow before the colon
_VALUE_WS = 3  # after the colon (or at a fold line's start): skip SP/HT
_VALUE = 4  # masking up to the next LF
_AFTER_VALUE = 5  # at the start of the line after a masked value: a fold line?
_SKIP = 6  # inside an uninteresting line: wait for its LF

# Every byte becomes "*" except CR and LF.
_MASK = bytearray(b"*" * 256)
_MASK[0x0D] = 0x0D
_MASK[0x0A] = 0x0A
_MASK_TABLE = bytes(_MASK)

_WS = re.compile(rb"[ \t]*")


def _skip_ws(data: bytes, i: int) -> int:
    m = _WS.match(data, i)
    return i if m is None else m.end()


RULE_MIDSTREAM_LINE = "http1:midstream-line"

_FOLD = (0x20, 0x09)  # SP, HT: a line starting with one continues the value above


class _Matchers(NamedTuple):
    prefixes: frozenset[bytes]  # every prefix of every name, for a line start split across chunks
    longest: int  # the longest name's length
    rule_of: dict[bytes, str]  # name (lower-case bytes) -> the rule it is reported as
    at: re.Pattern[bytes] | None  # a sensitive header line at a position
    next: re.Pattern[bytes] | None  # the next one after a LF
    name_ws: re.Pattern[bytes] | None  # a chunk ending in "name[SP/HT]*"


@functools.lru_cache(maxsize=16)
def _matchers(names: frozenset[str]) -> _Matchers:
    """What a masker of `names` matches with.  Built once per set of names: a masker
    is made for each direction of every connection, and most connections are short."""
    lower = frozenset(n.lower() for n in names)
    encoded = sorted((n.encode("latin-1") for n in lower), key=len, reverse=True)
    prefixes = frozenset(n[:k] for n in encoded for k in range(len(n) + 1))
    rule_of = {n: header_rule_name(n.decode("latin-1")) for n in encoded}
    if not encoded:
        return _Matchers(prefixes, 0, rule_of, None, None, None)
    alternatives = rb"(?i:(" + b"|".join(re.escape(n) for n in encoded) + rb"))[ \t]*"
    # The value starts after the colon and the SP/HT that follow it.
    header = alternatives + rb":[ \t]*"
    # The look-ahead on the first byte fails most lines at once; the literal LF lets
    # the regex engine skip from line to line (about twice as fast as "^" in MULTILINE).
    first = {n[:1].lower() for n in encoded} | {n[:1].upper() for n in encoded}
    lead = rb"(?=[" + b"".join(re.escape(c) for c in sorted(first)) + rb"])"
    return _Matchers(
        prefixes,
        len(encoded[0]),
        rule_of,
        re.compile(lead + header),
        re.compile(rb"\n" + lead + header),
        re.compile(lead + alternatives + rb"\Z"),
    )


_QUERY_VALUE_END = re.compile(rb"[&#;\s\"'<>]")


def _holds_any(text: bytes, needles: tuple[bytes, ...]) -> bool:
    return any(needle in text for needle in needles)


class _QueryMasker:
    """Values of sensitive query parameters in a stream of chunks, masked in place.

    A "[?&;]name=" split across chunks is found through the tail of the previous
    chunk (the name is no secret: only bytes of the current chunk are changed);
    a value cut by a chunk's end goes on being masked in the next one."""

    def __init__(self, names: frozenset[str]) -> None:
        self._pattern = query_pattern(names)
        # The names' last four letters and "=", lower case: a chunk holding none of
        # them (most bodies, every binary payload) is passed over with C-speed
        # substring searches instead of the regex walking it byte by byte.  Short
        # needles: several names share one ("...token=").
        self._needles = tuple(sorted({n.lower().encode("latin-1")[-4:] + b"=" for n in names}))
        self._keep = 2 + max((len(n) for n in names), default=0)  # separator, name, "="
        self._tail = b""
        self._rule = ""  # the parameter whose value the last chunk ended in

    def feed(self, data: bytes, out: bytearray | None, hits: set[str]) -> bytearray | None:
        """Mask `data` into `out` (a copy made on the first change); returns it."""
        if self._pattern is None:
            return out
        n = len(data)
        i = 0
        if self._rule:
            m = _QUERY_VALUE_END.search(data)
            i = n if m is None else m.start()
            if i:
                out = bytearray(data) if out is None else out
                out[0:i] = b"*" * i
                hits.add(self._rule)
            if m is not None:
                self._rule = ""
        tail = self._tail
        # Every match holds "=" in this chunk (one whose "=" was in the tail was done
        # with the previous chunk): one memchr turns away most chunks (request heads
        # without a query, JSON and plain bodies) before any copy.
        if b"=" not in data:
            self._tail = data[-self._keep :] if n >= self._keep else (tail + data)[-self._keep :]
            return out
        base = len(tail)
        buf = tail + data if tail else data
        if not _holds_any(buf.lower(), self._needles):
            self._tail = buf[-self._keep :]
            return out
        for m in self._pattern.finditer(buf, base + i if i else 0):
            if m.end(1) < base:  # its "=" was in the previous chunk: done there
                continue
            start, end = max(m.start(2), base) - base, m.end(2) - base
            if end > start:
                out = bytearray(data) if out is None else out
                out[start:end] = b"*" * (end - start)
            if end == n:  # the value may go on in the next chunk
                self._rule = query_rule_name(m.group(1).decode("latin-1"))
            if end > start:
                hits.add(query_rule_name(m.group(1).decode("latin-1")))
        self._tail = buf[-self._keep :]
        return out

    def gap(self) -> None:
        self._tail = b""
        # A value being masked when bytes were lost goes on to its end (fail closed).


class Http1HeaderMasker:
    """One direction of one connection.  feed() returns each chunk masked (same
    length) at once; state carries across chunks at every byte position.

    Most chunks hold whole lines, so feed() finds complete "name: value" lines with
    one regex search each and looks byte by byte only at a line cut by the chunk's
    end (the _NAME and _NAME_WS states carry such a line into the next chunk)."""

    # Header blocks wiped unread: an HTTP/2 masker's count, never any here.
    unknown_blocks = 0

    def __init__(self, names: frozenset[str], query_params: frozenset[str] = frozenset()) -> None:
        self._query = _QueryMasker(query_params) if query_params else None
        (self._prefixes, self._longest, self._rule_of, self._at, self._next,
         self._name_ws) = _matchers(frozenset(names))  # fmt: skip
        self._state = _SCAN
        self._partial = b""  # _NAME: the line's bytes so far (lower-case)
        self._rule = ""  # the rule of the sensitive header whose value is being masked

    def gap(self, length: int = 0) -> None:
        """Bytes of the stream were lost (how many does not matter here): the line
        position is unknown.  Same signature as Http2HeaderMasker.gap."""
        if self._state in (_VALUE_WS, _VALUE, _AFTER_VALUE):
            self._state = _VALUE  # fail closed: mask on to the next LF
        else:
            self._state = _SKIP
        self._partial = b""
        if self._query is not None:
            self._query.gap()

    def start_midline(self) -> None:
        """The stream is picked up past its start, maybe inside a header value: mask
        up to the first line end (fail closed), reported as "http1:midstream-line"."""
        self._state = _VALUE
        self._rule = RULE_MIDSTREAM_LINE

    def flush(self) -> tuple[bytes, set[str]]:
        """Nothing is ever held here (Http2HeaderMasker holds header blocks)."""
        return b"", set()

    def feed(self, data: bytes) -> tuple[bytes, set[str]]:
        """`data` masked (same length), and the rule names that masked bytes of it."""
        data = bytes(data)
        hits: set[str] = set()
        out: bytearray | None = None  # a copy, made at the first masked byte
        if self._query is not None:
            out = self._query.feed(data, out, hits)
        if self._at is None or self._next is None:
            return (data if out is None else bytes(out)), hits
        n = len(data)
        i = 0
        while i < n:
            state = self._state
            if state == _SCAN:
                # i is a line start: test it, then every line after a LF.  The last
                # line (often most of the chunk: a body) is only tested at its start,
                # not searched through for a LF that is not there.
                m = self._at.match(data, i)
                if m is None:
                    last = data.rfind(b"\n", i)
                    if last >= 0:
                        m = self._next.search(data, i, last)
                        i = last + 1  # where the last line starts, if nothing matched
                        if m is None and i < n:
                            m = self._at.match(data, i)
                if m is None:
                    # No complete match; the last line may still become one.
                    self._line_end(data, i)
                    break
                self._rule = self._rule_of[m.group(1).lower()]
                i = m.end()
                self._state = _VALUE if i < n else _VALUE_WS
            elif state == _VALUE:
                nl = data.find(b"\n", i)
                end = n if nl < 0 else nl
                if end > i:
                    value = data[i:end]
                    masked = value.translate(_MASK_TABLE)
                    if masked != value:
                        hits.add(self._rule)
                    if out is None:
                        out = bytearray(data)
                    out[i:end] = masked
                if nl < 0:
                    break
                i = nl + 1
                if i == n:
                    self._state = _AFTER_VALUE
                elif data[i] in _FOLD:
                    self._state = _VALUE_WS
                else:
                    self._state = _SCAN
            elif state == _VALUE_WS:
                i = _skip_ws(data, i)
                if i < n:
                    self._state = _VALUE
            elif state == _AFTER_VALUE:
                self._state = _VALUE_WS if data[i] in _FOLD else _SCAN
            elif state == _NAME:
                i = self._name(data, i)
            elif state == _NAME_WS:
                j = _skip_ws(data, i)
                if j == n:
                    i = n
                elif data[j] == 0x3A:  # ":"
                    self._state, i = _VALUE_WS, j + 1
                else:
                    self._state, i = _SKIP, j
            else:  # _SKIP
                nl = data.find(b"\n", i)
                if nl < 0:
                    break
                self._state, i = _SCAN, nl + 1
        if out is None:
            return data, hits
        return bytes(out), hits

    def _line_end(self, data: bytes, i: int) -> None:
        """The state after the chunk's last line, data[i:], which holds no LF and no
        complete "name:" (the _SCAN search would have found one)."""
        tail_len = len(data) - i
        if tail_len == 0:
            self._state = _SCAN
        elif tail_len <= self._longest and data[i:].lower() in self._prefixes:
            self._state, self._partial = _NAME, data[i:].lower()
        elif (m := self._name_ws.match(data, i)) is not None:  # "name" and SP/HT so far
            self._rule = self._rule_of[m.group(1).lower()]
            self._state = _NAME_WS
        else:
            self._state = _SKIP

    def _name(self, data: bytes, i: int) -> int:
        """Go on with a line start that may become a sensitive name (at most a
        name's length of bytes is looked at); returns where to continue."""
        partial = self._partial
        n = len(data)
        while i < n:
            c = data[i]
            if c == 0x3A and partial in self._rule_of:  # "name:"
                self._rule = self._rule_of[partial]
                self._state = _VALUE_WS
                return i + 1
            if c in _FOLD and partial in self._rule_of:  # "name ... :"
                self._rule = self._rule_of[partial]
                self._state = _NAME_WS
                return i
            longer = partial + bytes((c | 0x20 if 0x41 <= c <= 0x5A else c,))
            if longer not in self._prefixes:
                self._state = _SKIP
                return i
            partial = longer
            i += 1
        self._partial = partial
        return n
