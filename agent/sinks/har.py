"""HAR sink: exchange records as a HAR 1.2 file (`--output har`, `tlscap export --har`).

The file is valid JSON after every flush, not only at exit: entries are appended
over the closing `]}}` and the closing brackets are written again after them, in
one positioned write (pwrite) per flush.  So an agent stopped by SIGINT/SIGTERM
leaves a complete file (close() flushes), and one killed with SIGKILL or a power
cut leaves the file as of its last flush (at most `flush_interval` old) -- still
loadable.  Writing to stdout ("-") cannot seek: there the entries stream out and
the closing brackets come at close.

Other record types are ignored; exchanges whose request was not seen are skipped
and counted (har_skipped_exchanges).  The file holds captured plaintext: created
0600 whatever the umask, an existing file tightened to 0600.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, BinaryIO

import orjson

from agent.har.entries import har_entry, har_log_head
from agent.records.record import Record
from agent.sinks.base import OutputError, PeriodicFlusher
from agent.sinks.pcapng import open_private

_TRAILER = b"\n]}}\n"


def _json(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # lone surrogates (undecodable comm bytes): escaped by the stdlib
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _head() -> bytes:
    head = _json({"log": har_log_head()})
    assert head.endswith(b"}}")
    return head[:-2] + b',"entries":[\n'


class _TrailedFile:
    """Appends bytes before a trailer that is always on disk after them."""

    def __init__(self, stream: BinaryIO, seekable: bool) -> None:
        self.stream = stream
        self.seekable = seekable
        self._fd = stream.fileno()
        self._pending: list[bytes] = []
        self._end = 0  # where the trailer starts (seekable files)
        self.closed = False

    def start(self, head: bytes) -> None:
        self._pending.append(head)
        self.flush()

    def write(self, data: bytes) -> None:
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if self.seekable:
            out = data + _TRAILER
            written = 0
            while written < len(out):
                written += os.pwrite(self._fd, out[written:], self._end + written)
            self._end += len(data)
        else:
            self.stream.write(data)
            self.stream.flush()

    def finish(self) -> None:
        self.flush()
        if not self.seekable:
            self.stream.write(_TRAILER)
            self.stream.flush()
        self.closed = True


class HarSink:
    def __init__(self, stream: BinaryIO, owns_stream: bool, flush_interval: float = 0.5) -> None:
        try:
            seekable = stream.seekable()
        except (OSError, ValueError):
            seekable = False
        self._file = _TrailedFile(stream, seekable)
        self._stream = stream
        self._owns_stream = owns_stream
        self._file.start(_head())
        self._out = PeriodicFlusher(self._file, flush_interval)  # type: ignore[arg-type]
        self.entries = 0
        self.skipped = 0

    @classmethod
    def open(cls, path: str, flush_interval: float = 0.5) -> HarSink:
        """A sink writing the HAR file at `path` ("-": stdout); OutputError (an OSError)
        with a one-line message if it cannot be created."""
        if path == "-":
            return cls(sys.stdout.buffer, owns_stream=False, flush_interval=flush_interval)
        try:
            stream = open_private(path, buffering=0)
            return cls(stream, owns_stream=True, flush_interval=flush_interval)
        except OSError as e:
            err = OutputError(f"cannot write HAR to {path!r}: {e.strerror or e}")
            err.errno = e.errno
            raise err from e

    def write(self, record: Record) -> None:
        if record.type != "exchange":
            return
        entry = har_entry(record)
        if entry is None:
            self.skipped += 1
            return
        self._out.write((b",\n" if self.entries else b"") + _json(entry))  # type: ignore[arg-type]
        self.entries += 1

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._out.close()
            self._file.finish()
        finally:
            if self._owns_stream:
                self._stream.close()

    def stats(self) -> dict[str, int]:
        return {"har_entries": self.entries, "har_skipped_exchanges": self.skipped}

    def __enter__(self) -> HarSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
