"""gRPC on top of one HTTP/2 stream: method name, messages, status.

gRPC adds three things to an HTTP/2 exchange, and this module reads each of
them from what the HTTP/2 parser (agent/l7/http2.py) hands it:

* the method, from ``:path`` ("/pkg.Service/Method");
* the messages, each framed by a 5-byte prefix (1 byte compressed flag, 4 bytes
  big-endian length) in the DATA payloads.  A message can span any number of
  DATA frames and a frame can hold many messages, so the framing is a small
  state machine fed payloads as they come (`GrpcMessageReader`);
* the outcome, ``grpc-status``/``grpc-message`` in the trailers -- or in the
  response HEADERS themselves when the server answers "trailers-only"
  (an error before any message).

It is sans-I/O: nothing here knows about frames, sockets or time, so it can be
driven and tested with plain byte strings.  Work is per message, not per byte:
each payload is consumed with slices, and only the first `body_limit` bytes of
a message are copied.
"""

from __future__ import annotations

import struct
from urllib.parse import unquote

from agent.l7.exchange import GrpcCall, GrpcMessage, Headers

# Messages kept per side of one call; a long stream keeps its first ones and counts the rest.
MAX_MESSAGES = 100

_PREFIX = 5
_PREFIX_STRUCT = struct.Struct(">BL")  # compressed flag, length


def is_grpc_content_type(value: str | None) -> bool:
    """application/grpc, application/grpc+proto, application/grpc;charset=...

    Not application/grpc-web*: its trailers travel inside the body, framed
    differently, so it stays plain HTTP/2.
    """
    if not value:
        return False
    value = value.strip().lower()
    if not value.startswith("application/grpc"):
        return False
    rest = value[len("application/grpc") :]
    return rest == "" or rest[0] in "+;"


def split_path(path: str) -> tuple[str, str]:
    """ "/pkg.Service/Method" -> ("pkg.Service", "Method"); anything else -> ("", path)."""
    path = path.split("?", 1)[0]
    if path.startswith("/"):
        service, sep, method = path[1:].rpartition("/")
        if sep and service and method:
            return service, method
    return "", path


def decode_grpc_message(value: str) -> str:
    """grpc-message is percent-encoded UTF-8 ('+' is not a space); bad escapes stay as sent."""
    if "%" not in value:
        return value
    return unquote(value, errors="replace")


class GrpcMessageReader:
    """Splits one direction's DATA payloads into length-prefixed gRPC messages.

    Keeps at most `max_messages` messages and `body_limit` bytes of each; the
    rest are counted (`dropped`) so nobody is misled about what was there.
    """

    __slots__ = (
        "_current",
        "_data",
        "_head",
        "_remaining",
        "body_limit",
        "dropped",
        "max_messages",
        "messages",
    )

    def __init__(self, body_limit: int = 4096, max_messages: int = MAX_MESSAGES) -> None:
        self.body_limit = max(0, body_limit)
        self.max_messages = max_messages
        self.messages: list[GrpcMessage] = []
        self.dropped = 0  # complete messages seen but not kept
        self._head = bytearray()  # a prefix split across payloads (< 5 bytes)
        self._current: GrpcMessage | None = None  # the message being filled
        self._data = bytearray()  # its kept bytes
        self._remaining = 0  # its bytes still to come

    def feed(self, data: bytes) -> None:
        """Consume one DATA payload (any size, any alignment with the messages)."""
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._current is None and not self._head and end - pos >= _PREFIX:
                flags, length = _PREFIX_STRUCT.unpack_from(view, pos)
                if pos + _PREFIX + length <= end:  # a whole message here (the usual case)
                    start = pos + _PREFIX
                    keep = length if length < self.body_limit else self.body_limit
                    data = view[start : start + keep].tobytes()
                    self._keep(GrpcMessage(bool(flags & 1), length, data))
                    pos = start + length
                    continue
            if self._current is None:
                need = _PREFIX - len(self._head)
                if self._head or end - pos < _PREFIX:
                    self._head += view[pos : pos + need]
                    pos += min(need, end - pos)
                    if len(self._head) < _PREFIX:
                        return
                    self._start(bytes(self._head))
                    self._head.clear()
                else:
                    self._start(view[pos : pos + _PREFIX])
                    pos += _PREFIX
                if self._remaining == 0:
                    self._finish_message()
                continue
            take = min(self._remaining, end - pos)
            room = self.body_limit - len(self._data)
            if room > 0:
                self._data += view[pos : pos + min(room, take)]
            pos += take
            self._remaining -= take
            if self._remaining == 0:
                self._finish_message()

    def _start(self, prefix: bytes | memoryview) -> None:
        length = int.from_bytes(prefix[1:5], "big")
        self._current = GrpcMessage(compressed=bool(prefix[0] & 1), length=length, data=b"")
        self._remaining = length

    def _finish_message(self) -> None:
        message = self._current
        assert message is not None
        message.data = bytes(self._data)
        self._data.clear()
        self._current = None
        self._keep(message)

    def _keep(self, message: GrpcMessage) -> None:
        if len(self.messages) < self.max_messages:
            self.messages.append(message)
        else:
            self.dropped += 1

    def notes(self, side: str) -> list[str]:
        """What the kept messages do not show: dropped ones, a message cut off."""
        notes = []
        if self.dropped:
            notes.append(
                f"grpc: {self.dropped} more {side} messages not kept "
                f"(first {self.max_messages} kept)"
            )
        if self._current is not None:
            seen = self._current.length - self._remaining
            notes.append(
                f"grpc: {side} message incomplete ({seen} of {self._current.length} bytes seen)"
            )
        elif self._head:
            notes.append(f"grpc: {side} stream ended inside a message prefix")
        return notes


class GrpcStream:
    """The gRPC view of one HTTP/2 stream; the HTTP/2 parser drives it.

    Call order: construct from the request's :path, then any number of
    `request_data` / `response_data`, `response_headers` (each HEADERS block of
    the response: the headers, then the trailers), and finally `finish`.
    """

    __slots__ = ("_notes", "call", "request", "response")

    def __init__(self, path: str, body_limit: int = 4096, max_messages: int = MAX_MESSAGES):
        service, method = split_path(path)
        self.call = GrpcCall(service=service, method=method)
        self.request = GrpcMessageReader(body_limit, max_messages)
        self.response = GrpcMessageReader(body_limit, max_messages)
        self._notes: list[str] = []
        if not service:
            self._notes.append(f"grpc: :path ({len(path)} characters) is not /service/method")

    def request_data(self, data: bytes) -> None:
        self.request.feed(data)

    def response_data(self, data: bytes) -> None:
        self.response.feed(data)

    def response_headers(self, headers: Headers) -> None:
        """A response HEADERS block: the first (maybe trailers-only) or the trailers."""
        status = message = None
        for name, value in headers:
            if name == "grpc-status" and status is None:
                status = value
            elif name == "grpc-message" and message is None:
                message = value
        if status is not None:
            text = status.strip()
            if text.isdigit():
                self.call.status = int(text)
            else:
                self._notes.append(f"grpc: grpc-status ({len(status)} characters) is not a number")
        if message is not None:
            self.call.message = decode_grpc_message(message)

    def finish(self, response_complete: bool) -> list[str]:
        """Fill the call's messages; return notes for the exchange."""
        self.call.request_messages = self.request.messages
        self.call.response_messages = self.response.messages
        notes = list(self._notes)
        notes += self.request.notes("request")
        notes += self.response.notes("response")
        if response_complete and self.call.status is None:
            notes.append("grpc: response ended without grpc-status")
        return notes
