"""JSON-lines sink: one compact JSON object per Record (the DESIGN.md §5 contract).

Every line is pure ASCII: comm and other strings from the kernel may carry
undecodable bytes (surrogate escapes) that a UTF-8 file cannot hold, and ASCII
lines survive any consumer's decoding.

Data and exchange records are most of what a busy node writes, so their lines
are built for speed: the identity fields, which stay the same for every call of
a connection, are encoded once per connection and kept, a payload goes through
SIMD base64 straight into the line, and an HTTP exchange is encoded by one C
call (agent/sinks/_exchange_json.c; gRPC exchanges, and anything it does not
take, go through Exchange.to_json() and orjson).  Every other record is
Record.to_json() through orjson.  tests/unit/test_sinks.py checks that both give
the same objects, tests/unit/test_exchange_json.py that the C encoder gives
json.dumps' bytes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, BinaryIO

import orjson
import pybase64

from agent.records.record import Record
from agent.sinks._exchange_json import exchange_json
from agent.sinks.base import OutputError, PeriodicFlusher

# Connections whose identity fragments are kept; past this the cache starts over.
IDENTITY_CACHE_SIZE = 16384
WRITE_BUFFER = 1 << 20

_DATA_LINE = (
    b'{"type":"data","ts_ns":%d,%s,"seq":%d,"tid":%d,%s,"direction":"%s","offset":%d,'
    b'"len":%d,"captured_len":%d,"truncated":%s,"data_b64":"%s","protocol":"%s",'
    b'"redactions":%s}\n'
)
_EXCHANGE_LINE = (
    b'{"type":"exchange","ts_ns":%d,%s,"seq":%d,"tid":%d,%s,"protocol":%s,"exchange":%s}\n'
)


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
            cached = self._identity(record)
            redactions = _ascii_json(record.redactions) if record.redactions else b"[]"
            return _DATA_LINE % (
                record.ts_ns, cached[1], record.seq, record.tid, cached[2],
                record.direction.encode() if record.direction else b"egress",
                record.offset, record.len, record.captured_len,
                b"true" if record.truncated else b"false",
                pybase64.b64encode(record.data), record.protocol.encode(), redactions,
            )  # fmt: skip
        if kind == "exchange" and record.exchange is not None:
            # One per HTTP exchange with L7 on: the connection's fragments again,
            # and the exchange in one C call; TypeError: one it does not take
            # (gRPC, an odd field), which to_json() and a JSON encoder do.
            cached = self._identity(record)
            try:
                exchange = exchange_json(record.exchange)
            except TypeError:
                exchange = _ascii_json(record.exchange.to_json())
            return _EXCHANGE_LINE % (
                record.ts_ns, cached[1], record.seq, record.tid, cached[2],
                _ascii_json(record.protocol), exchange,
            )  # fmt: skip
        return _ascii_json(record.to_json()) + b"\n"

    def _identity(self, record: Record) -> tuple[tuple, bytes, bytes]:
        """The record's connection identity, encoded: from the cache while it
        still matches the record."""
        identity = (
            record.node, record.agent_id, record.pid, record.comm, record.cgroup_id,
            record.container_id, record.pod, record.source, record.fd, record.local,
            record.remote, record.role,
        )  # fmt: skip
        cached = self._identities.get(record.conn_id)
        # Tuple comparison checks identity before equality: cheap when, as
        # usual, the record holds the very objects the connection holds.
        if cached is None or cached[0] != identity:
            cached = self._identity_fragments(record, identity)
        return cached

    def _identity_fragments(self, record: Record, identity: tuple) -> tuple[tuple, bytes, bytes]:
        full = record.to_json()
        run = _fragment({"node": full["node"], "agent_id": full["agent_id"]})
        conn = _fragment(
            {k: full[k] for k in ("pid", "comm", "cgroup_id", "container_id", "pod", "source",
                                  "conn_id", "fd", "local", "remote", "role")}
        )  # fmt: skip
        if len(self._identities) >= IDENTITY_CACHE_SIZE:
            self._identities.clear()
        entry = self._identities[record.conn_id] = (identity, run, conn)
        return entry

    def forget(self, conn_id: str) -> None:
        self._identities.pop(conn_id, None)


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
            # A large buffer: a 4 KiB payload makes a ~5.6 KB line, and an 8 KiB
            # buffer would cost a write(2) for nearly every line.
            fd = os.open(path, flags, 0o600)
            stream = os.fdopen(fd, "ab" if append else "wb", buffering=WRITE_BUFFER)
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
        """The records' lines, one lock and clock read per batch; each line goes into
        the stream's buffer whole (a buffer flush never splits one, which keeps
        capture workers' appends to one file line by line)."""
        encode = self._encoder.encode
        self._out.write_lines([encode(r) for r in records])
        for record in records:
            if record.type == "close":
                self._encoder.forget(record.conn_id)

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
