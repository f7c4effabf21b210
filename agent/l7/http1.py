"""HTTP/1.x exchanges from passively captured plaintext: the design; the code is C.

Http1Parser (framing and pairing) is agent/l7/_http1.c's; this module keeps the
checks for a chunk that starts a message (agent/l7/detect.py's too, and the C
parser's when it resyncs) and says why the parser is as it is.

Why this design:

* Everything is C: the Python version of the pairing cost about four times the
  framing's CPU per exchange.  An exchange in the making is kept in C and
  becomes Exchange and HttpMessage objects (agent/l7/exchange.py) only when it
  is emitted, one call each.
* A framing parser (one per direction, also alone as _http1.Http1Stream) does the byte work:
  request/status lines, header blocks, Content-Length and chunked bodies (with
  trailers), bodies read until the connection closes.  One call hands back a
  whole message head as Python objects, one more the body's end with its
  first body_limit bytes; a message costs a few C calls, not the ~18 Python
  callbacks llhttp (through httptools) made, nor h11's pure-Python byte work.
* The framing stops after every head, so the pairing, which knows which
  request a response answers, decides what framing alone cannot before the
  next byte is read:
  - a response to HEAD has no body whatever its headers say;
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
  than MAX_HEAD (1 MiB) is a parse error.
* Notes and `failed` quote captured bytes only to name a protocol event: a 1xx
  status's reason phrase, the protocol an Upgrade switched to, a CONNECT
  tunnel's target.  Parse errors are the C parser's fixed reason texts, and no
  header value or body byte is ever quoted (the regex rules mask notes too).
* Bounded: bodies keep only body_limit bytes, bytes held behind an Upgrade at
  most MAX_HEAD, and more than MAX_PENDING (512) exchanges queued (requests
  awaiting a response, exchanges waiting behind one still being read) give up
  the oldest that neither side is parsing.
"""

from __future__ import annotations

import re

from agent.l7._http1 import Http1Parser

__all__ = ["Http1Parser", "looks_like_request_start", "looks_like_response_start"]

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


def looks_like_request_start(data: bytes) -> bool:
    """Whether `data` begins with an HTTP/1.x request line, or a plausible prefix of one."""
    head = data[:_PEEK]
    if _REQUEST_LINE.match(head) or _REQUEST_PREFIX.match(head):
        return True
    return head in _METHOD_PREFIXES


def looks_like_response_start(data: bytes) -> bool:
    """Whether `data` begins with "HTTP/1.0 " or "HTTP/1.1 " and a 3-digit status."""
    return _RESPONSE_START.match(data) is not None
