"""JSON-lines sink: one compact JSON object per Record (the DESIGN.md §5 contract)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from agent.records.record import Record
from agent.sinks.base import OutputError, PeriodicFlusher


def encode_record(record: Record) -> str:
    """One JSON line, newline included.

    ensure_ascii stays on: comm and other strings from the kernel may carry
    undecodable bytes (surrogate escapes) that a UTF-8 file cannot hold, and pure
    ASCII lines survive any consumer's decoding.
    """
    return json.dumps(record.to_json(), separators=(",", ":")) + "\n"


class JsonlSink:
    """Writes Records as JSON lines to `stream`, flushing at most every `flush_interval` s.

    close() flushes; it closes the stream only if this sink opened it (`JsonlSink.open`).
    """

    def __init__(self, stream: TextIO, flush_interval: float = 0.1) -> None:
        self._out = PeriodicFlusher(stream, flush_interval)
        self._owns_stream = False

    @classmethod
    def open(cls, path: str, append: bool = False, flush_interval: float = 0.1) -> JsonlSink:
        """A sink writing to the file at `path` (truncated unless `append`); "-" is stdout.

        Raises OutputError (an OSError) with a one-line message if the file cannot
        be opened, e.g. its directory does not exist or is not writable.
        """
        if path == "-":
            return cls(sys.stdout, flush_interval)
        try:
            stream = open(path, "a" if append else "w", encoding="ascii", newline="\n")  # noqa: SIM115
        except OSError as e:
            err = OutputError(f"cannot write JSON lines to {path!r}: {e.strerror or e}")
            err.errno = e.errno  # not .filename: OSError.__str__ would then reformat the message
            raise err from e
        sink = cls(stream, flush_interval)
        sink._owns_stream = True
        return sink

    def write(self, record: Record) -> None:
        self._out.write(encode_record(record))

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
