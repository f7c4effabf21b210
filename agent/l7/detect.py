"""Which application protocol a connection speaks, from its first bytes.

We see no TLS handshake (the probes sit above it), so ALPN is not ours to read;
the first plaintext bytes say as much: an HTTP/2 client opens with the fixed
connection preface, an HTTP/1 client with a request line.  A connection whose
first bytes we did not see (capture began mid-connection) can still be found to
be HTTP/1 at a later request or status line, and HTTP/2 at a record that is a
run of plausible frames (agent/l7/http2_frames.py).  Such HTTP/2 is not parsed
(its header compression state began before we looked, so no header block can be
decoded) but its framing is followed, for redaction: every header block is
masked whole.
"""

from __future__ import annotations

from enum import Enum

from agent.l7.http1 import looks_like_request_start, looks_like_response_start
from agent.l7.http2 import PREFACE


class Verdict(Enum):
    HTTP1 = "http1"
    HTTP2 = "http2"
    UNKNOWN = "unknown"  # not HTTP as far as we can tell: stays raw records
    NEED_MORE = "need-more"  # a prefix of the HTTP/2 preface: wait for more bytes
    HTTP2_MIDSTREAM = "http2-midstream"  # HTTP/2 frames, but not from the connection's start


def classify_request_start(first: bytes, at_stream_start: bool) -> Verdict:
    """The verdict for the first bytes we saw of a connection's request side."""
    if at_stream_start:
        if first.startswith(PREFACE):
            return Verdict.HTTP2
        if len(first) < len(PREFACE) and PREFACE.startswith(first):
            return Verdict.NEED_MORE
    if looks_like_request_start(first):
        return Verdict.HTTP1
    return Verdict.UNKNOWN


def classify_response_start(first: bytes) -> Verdict:
    """The verdict when the response side spoke first (or is all we have)."""
    return Verdict.HTTP1 if looks_like_response_start(first) else Verdict.UNKNOWN


def looks_like_settings_frame(first: bytes) -> bool:
    """An HTTP/2 SETTINGS frame header on stream 0 (what an HTTP/2 server sends first)."""
    return (
        len(first) >= 9
        and first[3] == 0x4
        and int.from_bytes(first[5:9], "big") & 0x7FFFFFFF == 0
        and int.from_bytes(first[0:3], "big") % 6 == 0  # settings are 6 bytes each
    )
