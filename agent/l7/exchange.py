"""What the protocol parsers produce: one request and its response, as data.

An Exchange is the unit people reason in ("GET /api/users -> 200 in 3.2 ms"):
the parsers in this package turn a connection's two byte streams into
Exchanges, and the record pipeline carries each one as a record of type
"exchange" beside the raw data records it was parsed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pybase64

Protocol = Literal["http1", "http2", "grpc"]
# Which of a connection's two byte streams: the one carrying requests (written by
# the client) or the one carrying responses.
Side = Literal["request", "response"]

Headers = list[tuple[str, str]]


def _pairs(headers: Headers) -> list[list[str]]:
    """Headers as JSON arrays (lists, as a JSON round trip gives them back)."""
    return [[name, value] for name, value in headers] if headers else []


# Slots: several of these are made (and read by redaction and to_json) per exchange.
@dataclass(slots=True)
class HttpMessage:
    """One HTTP request or response (HTTP/1.x or one HTTP/2 stream's side).

    Header names are lower-case (HTTP/2 requires it; HTTP/1 names are
    case-insensitive) and keep their order and repeats.  HTTP/2 pseudo-headers
    (":method", ":path", ":status", ...) stay in `headers` too, as sent.
    """

    ts_ns: int = 0  # time of the record carrying the message's first byte
    end_ts_ns: int = 0  # time of the record that completed it (0: never completed)
    method: str = ""  # requests
    target: str = ""  # requests: the request-target / :path
    authority: str = ""  # requests: Host / :authority
    status: int = 0  # responses
    reason: str = ""  # responses (HTTP/1 only)
    version: str = ""  # "1.0", "1.1", "2"
    headers: Headers = field(default_factory=list)
    trailers: Headers = field(default_factory=list)
    # Body after transfer decoding (de-chunked); not content-decoded (gzip stays gzip).
    body: bytes = b""  # the first body_limit bytes of it
    body_len: int = 0  # the whole body's length as seen
    body_truncated: bool = False  # body holds less than body_len
    complete: bool = False  # the message's end was seen

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "ts_ns": self.ts_ns,
            "end_ts_ns": self.end_ts_ns,
            "method": self.method,
            "target": self.target,
            "authority": self.authority,
            "status": self.status,
            "reason": self.reason,
            "version": self.version,
            "headers": _pairs(self.headers),
            "trailers": _pairs(self.trailers),
            "body_b64": pybase64.b64encode(self.body).decode("ascii"),
            "body_len": self.body_len,
            "body_truncated": self.body_truncated,
            "complete": self.complete,
        }


@dataclass
class GrpcMessage:
    """One length-prefixed gRPC message (5-byte prefix + body)."""

    compressed: bool
    length: int  # the length the prefix declares
    data: bytes  # its first body_limit bytes (still compressed if compressed)

    def to_json(self) -> dict[str, Any]:
        return {
            "compressed": self.compressed,
            "length": self.length,
            "data_b64": pybase64.b64encode(self.data).decode("ascii"),
        }


@dataclass
class GrpcCall:
    """gRPC on top of an HTTP/2 exchange (content-type application/grpc*)."""

    service: str = ""  # "pkg.Service", from :path "/pkg.Service/Method"
    method: str = ""  # "Method"
    status: int | None = None  # grpc-status (trailers, or headers of a trailers-only reply)
    message: str = ""  # grpc-message, percent-decoded
    request_messages: list[GrpcMessage] = field(default_factory=list)
    response_messages: list[GrpcMessage] = field(default_factory=list)

    @property
    def full_method(self) -> str:
        """ "pkg.Service/Method": what `--grpc-method` filters match."""
        return f"{self.service}/{self.method}"

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "method": self.method,
            "status": self.status,
            "message": self.message,
            "request_messages": [m.to_json() for m in self.request_messages],
            "response_messages": [m.to_json() for m in self.response_messages],
        }


@dataclass(slots=True)
class Exchange:
    """A request paired with its response on one connection.

    Either side may be None: a request still unanswered when the connection
    closed, or a response whose request was never seen (capture began
    mid-connection, or a gap).  `notes` says why, in words; nothing the
    parser could not see is invented.
    """

    protocol: Protocol
    request: HttpMessage | None = None
    response: HttpMessage | None = None
    stream_id: int = 0  # HTTP/2 stream id; HTTP/1: the exchange's number on the connection
    grpc: GrpcCall | None = None
    notes: list[str] = field(default_factory=list)  # gaps, truncation, parse errors, ...
    redactions: list[str] = field(default_factory=list)  # redaction rules that changed it

    @property
    def latency_ns(self) -> int | None:
        """From the request's first byte to the response's last (None if either is unseen)."""
        if self.request is None or self.response is None or not self.response.end_ts_ns:
            return None
        return max(0, self.response.end_ts_ns - self.request.ts_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "stream_id": self.stream_id,
            "latency_ns": self.latency_ns,
            "request": self.request.to_json() if self.request else None,
            "response": self.response.to_json() if self.response else None,
            "grpc": self.grpc.to_json() if self.grpc else None,
            "notes": list(self.notes),
            "redactions": list(self.redactions),
        }
