"""JSON-lines sink: one compact JSON object per Record (the DESIGN.md §5 contract).

Every line is pure ASCII: comm and other strings from the kernel may carry
undecodable bytes (surrogate escapes) that a UTF-8 file cannot hold, and ASCII
lines survive any consumer's decoding.

Data and exchange records are most of what a busy node writes, so their lines
are built in C, one call a line (agent/sinks/_json_lines.c): the identity fields,
which stay the same for every call of a connection, are encoded here once per
connection and kept (the C call checks they still match the record), a payload
is base64-encoded (AVX2, 24 bytes a step) straight into the line, and an HTTP exchange
is encoded in the same call (gRPC exchanges, and anything it does not take, go
through Exchange.to_json() and orjson).  Every other record is Record.to_json()
through orjson.  tests/unit/test_sinks.py checks that both give the same objects,
tests/unit/test_exchange_json.py that the C encoder gives json.dumps' bytes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from operator import attrgetter
from typing import Any, BinaryIO

import orjson

from agent.records.record import Record
from agent.sinks._json_lines import IDENTITY_FIELDS, data_line, encode_lines, exchange_line
from agent.sinks.base import OutputError, PeriodicFlusher

# Connections whose identity fragments are kept; past this the cache starts over.
IDENTITY_CACHE_SIZE = 16384

_identity_of = attrgetter(*IDENTITY_FIELDS)
# No connection's identity (equal to no field): a first record misses the cache.
_NO_IDENTITY: tuple[tuple, bytes, bytes] = ((object(),) * len(IDENTITY_FIELDS), b"", b"")


def _ascii_json(obj: Any) -> bytes:
    """Compact JSON, ASCII only: orjson, or the standard library for the rare
    text that is not ASCII (or holds lone surrogates, which orjson refuses)."""
    try:
        out = orjson.dumps(obj)
        if out.isascii():
            return out
    except TypeError:
        pass
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _fragment(obj: dict[str, Any]) -> bytes:
    """`"a":1,"b":2` - an object's members, to splice into a line."""
    return _ascii_json(obj)[1:-1]


class JsonLineEncoder:
    """Record -> one JSON line (bytes, newline included)."""

    def __init__(self) -> None:
        # conn_id -> (the identity values, their two encoded fragments)
        self._identities: dict[str, tuple[tuple, bytes, bytes]] = {}

    def encode(self, record: Record) -> bytes:
        kind = record.type
        if kind == "data":
            return self._line(data_line, record)
        if kind == "exchange" and record.exchange is not None:
            # One per HTTP exchange with L7 on, encoded in the same C call; TypeError:
            # one it does not take (gRPC, an odd field), whose member to_json() and a
            # JSON encoder make.
            try:
                return self._line(exchange_line, record, None)
            except TypeError:
                return self._line(exchange_line, record, _ascii_json(record.exchange.to_json()))
        return _ascii_json(record.to_json()) + b"\n"

    def encode_many(self, records: list[Record]) -> list[bytes]:
        """encode() for each of `records`, in one C call: data and exchange records of
        connections already seen are encoded there, encode() is called for the rest;
        a close record's connection is forgotten."""
        return encode_lines(records, self._identities, self.encode)

    def _line(self, encode: Callable[..., bytes | None], record: Record, *member: Any) -> bytes:
        cached = self._identities.get(record.conn_id, _NO_IDENTITY)
        line = encode(record, cached, *member)
        if line is None:  # a new connection, or its identity changed
            line = encode(record, self._identity_fragments(record), *member)
        return line  # type: ignore[return-value]

    def _identity_fragments(self, record: Record) -> tuple[tuple, bytes, bytes]:
        """The record's identity (IDENTITY_FIELDS) and its two encoded fragments,
        kept for its connection."""
        full = record.to_json()
        run = _fragment({"node": full["node"], "agent_id": full["agent_id"]})
        conn = _fragment(
            {k: full[k] for k in ("pid", "comm", "cgroup_id", "container_id", "pod", "source",
                                  "conn_id", "fd", "local", "remote", "role")}
        )  # fmt: skip
        if len(self._identities) >= IDENTITY_CACHE_SIZE:
            self._identities.clear()
        entry = self._identities[record.conn_id] = (_identity_of(record), run, conn)
        return entry


def encode_record(record: Record) -> bytes:
    """One JSON line, newline included (no cache: for tests and one-off use)."""
    return JsonLineEncoder().encode(record)


class JsonlSink:
    """Writes Records as JSON lines to a binary `stream`, flushing at most every
    `flush_interval` s.

    close() flushes; it closes the stream only if this sink opened it (`JsonlSink.open`).
    """

    def __init__(self, stream: BinaryIO, flush_interval: float = 0.1) -> None:
        self._out = PeriodicFlusher(stream, flush_interval)  # type: ignore[arg-type]
        self._encoder = JsonLineEncoder()
        self._owns_stream = False

    @classmethod
    def open(cls, path: str, append: bool = False, flush_interval: float = 0.1) -> JsonlSink:
        """A sink writing to the file at `path` (truncated unless `append`); "-" is stdout.

        The file holds captured plaintext: it is created 0600.  Raises
        OutputError (an OSError) with a one-line message if the file cannot be
        opened, e.g. its directory does not exist or is not writable.
        """
        if path == "-":
            return cls(sys.stdout.buffer, flush_interval)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        try:
            # Unbuffered: the lines go from their list to the kernel (writev, in
            # PeriodicFlusher.write_lines), never through a buffer.
            fd = os.open(path, flags, 0o600)
            stream = os.fdopen(fd, "ab" if append else "wb", buffering=0)
        except OSError as e:
            err = OutputError(f"cannot write JSON lines to {path!r}: {e.strerror or e}")
            err.errno = e.errno  # not .filename: OSError.__str__ would then reformat the message
            raise err from e
        sink = cls(stream, flush_interval)
        sink._owns_stream = True
        return sink

    def write(self, record: Record) -> None:
        self.write_many([record])

    def write_many(self, records: list[Record]) -> None:
        """The records' lines, one lock per batch; each line reaches the file whole
        (PeriodicFlusher.write_lines), which keeps capture workers' appends to one
        file line by line."""
        self._out.write_lines(self._encoder.encode_many(records))

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        try:
            self._out.close()
        finally:
            if self._owns_stream:
                self._out.stream.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
