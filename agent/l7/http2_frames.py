"""Is this an HTTP/2 frame header, and does a chunk of bytes start a run of frames?

Used where the HTTP/2 framing of a stream is not known: a connection first seen
mid-stream (the agent started after it, or its L7 state was evicted), and after a
gap or a malformed frame header.  Detection (agent/l7/detect.py) and the
redaction masker (agent/redact/http2_masker.py) pick the framing up again only at
the start of a captured record that is a run of plausible frames: 9-byte headers
of known types with the flags those types define, the reserved bit clear, stream
ids where the type needs one (and none where it must not), the fixed or minimum
lengths RFC 9113 gives (PRIORITY 5, RST_STREAM 4, PING 8, SETTINGS a multiple of
6, GOAWAY at least 8 ...) and a length within the default SETTINGS_MAX_FRAME_SIZE
(16384), the whole record framed exactly, or at least two frames before a cut.

Most libraries write whole frames per TLS write (nginx, h2, gRPC) and a TLS read
returns at most one TLS record, so most records start at a frame boundary.  Some
do not: Go's HTTP/2 writes through a 4 KiB buffer, and a large DATA frame spans
several records.  `find_frame_run` looks for the run inside such a record, where
a frame header can start (its length's high byte is 0); the bytes before it are
the tail of a frame of unknown type and stay masked.

In sync, `frame_header_problem` checks each header less strictly (RFC 9113 says
unknown flags and the reserved bit are ignored on receipt, and larger frames are
allowed once a peer's SETTINGS raised the limit): what a peer may send is allowed,
a header that cannot be right is a desync.
"""

from __future__ import annotations

import struct

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 5, 6, 7, 8, 9
KNOWN_TYPES = 10  # 0..9 are RFC 9113's

DEFAULT_MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE's initial value
HEADER = 9
# A frame header in one call: length (high byte, low 16 bits), type, flags, and the
# stream id with its reserved bit.
FRAME_HEADER = struct.Struct(">BHBBL")

# type: (flags the type defines, stream id: True needs one / False none / None any,
#        exact length or None, minimum length)
_RULES: dict[int, tuple[int, bool | None, int | None, int]] = {
    DATA: (0x09, True, None, 0),
    HEADERS: (0x2D, True, None, 0),
    PRIORITY: (0x00, True, 5, 5),
    RST_STREAM: (0x00, True, 4, 4),
    SETTINGS: (0x01, False, None, 0),
    PUSH_PROMISE: (0x0C, True, None, 4),
    PING: (0x01, False, 8, 8),
    GOAWAY: (0x00, False, None, 8),
    WINDOW_UPDATE: (0x00, None, 4, 4),
    CONTINUATION: (0x04, True, None, 0),
}


# Types whose only rule here is a stream id (no flags, length or stream rule beyond it).
STREAM_ONLY_TYPES = frozenset(
    t
    for t, (_, needs, exact, minimum) in _RULES.items()
    if needs is True and exact is None and not minimum
)


def frame_header_problem(ftype: int, flags: int, length: int, stream: int) -> bool:
    """Whether a frame header of a known type cannot be right (in sync; unknown
    types are the caller's business: their payload is not understood)."""
    if ftype in STREAM_ONLY_TYPES:  # most frames: checked at once
        return stream == 0
    rule = _RULES.get(ftype)
    if rule is None:
        return False
    _, needs_stream, exact, minimum = rule
    if (needs_stream is True and stream == 0) or (needs_stream is False and stream != 0):
        return True
    if (exact is not None and length != exact) or length < minimum:
        return True
    return ftype == SETTINGS and bool(length % 6 or (flags & 0x01 and length))


def plausible_frame_header(header: bytes | bytearray | memoryview) -> bool:
    """A strict check of one 9-byte frame header, for picking framing up."""
    length = (header[0] << 16) | (header[1] << 8) | header[2]
    ftype, flags = header[3], header[4]
    raw_stream = int.from_bytes(header[5:9], "big")
    rule = _RULES.get(ftype)
    if rule is None or raw_stream & 0x80000000 or length > DEFAULT_MAX_FRAME:
        return False
    if flags & ~rule[0] & 0xFF:
        return False
    return not frame_header_problem(ftype, flags, length, raw_stream)


def starts_frame_run(data: bytes | bytearray | memoryview, min_frames: int = 1) -> bool:
    """Whether `data` (one captured record, or the first bytes of a direction) is a
    run of plausible frames from its first byte: all of it framed exactly by at
    least `min_frames` frames, or at least two (and `min_frames`) whole frames
    before a frame the record cuts."""
    n = len(data)
    if n >= HEADER and (data[0] or data[1] > 0x40 or data[3] >= KNOWN_TYPES):
        # The first header's length or type is out of bounds: the usual answer for
        # the records of other protocols, on each of which this runs, so at once.
        return False
    pos = whole = 0
    while n - pos >= HEADER:
        header = data[pos : pos + HEADER]
        if not plausible_frame_header(header):
            return False
        end = pos + HEADER + ((header[0] << 16) | (header[1] << 8) | header[2])
        if end > n:
            return whole >= max(2, min_frames)
        pos = end
        whole += 1
    if pos == n:
        return whole >= min_frames
    return whole >= max(2, min_frames)


# Where a frame header can start: a length of at most 16384 (high byte 0, next at
# most 0x40) and a type RFC 9113 defines.
_CANDIDATE_LIMIT = 4096  # positions tried per record: bounds the cost on binary data


def find_frame_run(data: bytes | bytearray | memoryview) -> int | None:
    """The first offset at which `data` is a run of plausible frames (0 when it
    starts one, by the rules of `starts_frame_run`), or None.  Inside a record the
    evidence asked for is two whole frames: a false find in some other binary
    protocol would mask its bytes from then on.  Positions are tried only where a
    header can start, and at most _CANDIDATE_LIMIT of them."""
    if starts_frame_run(data):
        return 0
    raw = bytes(data)
    n = len(raw)
    pos = raw.find(0, 1)
    tried = 0
    while 0 <= pos <= n - HEADER and tried < _CANDIDATE_LIMIT:
        if raw[pos + 1] <= 0x40 and raw[pos + 3] < KNOWN_TYPES:
            tried += 1
            if starts_frame_run(memoryview(raw)[pos:], min_frames=2):
                return pos
        pos = raw.find(0, pos + 1)
    return None
