"""What every sink is, and the buffered-write policy the text sinks share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO, runtime_checkable

from agent.records.record import Record


@runtime_checkable
class Sink(Protocol):
    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class OutputError(OSError):
    """An output destination could not be opened; str() is a one-line message for the CLI."""


class PeriodicFlusher:
    """Writes text to a stream and flushes it at most every `interval` seconds.

    (Any object with write() and flush() will do: the store sink passes rows.)

    A flush per record would cost a write(2) per TLS call; never flushing would
    leave `tail -f` (or a pipe reader) waiting for a 8 KiB buffer to fill.  So a
    write flushes if the last flush is `interval` old, and otherwise arms a timer
    so that the last lines of a burst still show up within `interval`.  The timer
    thread and the writer share a lock, so records are never interleaved or torn.
    """

    def __init__(
        self,
        stream: TextIO,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last_flush = clock()
        self._dirty = False
        self._timer: threading.Timer | None = None
        self._closed = False
        # A flush failing on the timer thread (EPIPE, ENOSPC) is re-raised to the
        # writer on its next call instead of dying silently in that thread.
        self._error: BaseException | None = None

    def write(self, text: str) -> None:
        with self._lock:
            self._check_open()
            self.stream.write(text)
            self._written()

    def write_lines(self, lines: list) -> None:
        """Several lines in one go, each handed to the stream as it is: joined first,
        a batch of data records (megabytes) would be a fresh allocation each time,
        and the page faults of that memory cost more system time than the lines'
        encoding (bench/README.md, "The stream masker in C, and the heap settled")."""
        with self._lock:
            self._check_open()
            self.stream.writelines(lines)
            self._written()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("write to a closed sink")
        self._raise_deferred()

    def _written(self) -> None:
        self._dirty = True
        elapsed = self._clock() - self._last_flush
        if elapsed >= self.interval:
            self._flush_locked()
        elif self._timer is None:
            self._timer = threading.Timer(self.interval - elapsed, self._on_timer)
            self._timer.daemon = True  # never keeps the process alive
            self._timer.start()

    def flush(self) -> None:
        with self._lock:
            self._raise_deferred()
            self._flush_locked()

    def close(self) -> None:
        """Flush what is buffered; the stream itself stays open (its owner closes it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._raise_deferred()
            self._flush_locked()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if not self._closed and self._dirty and self._error is None:
                try:
                    self._flush_locked()
                except Exception as e:
                    self._error = e

    def _raise_deferred(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _flush_locked(self) -> None:
        self.stream.flush()
        self._dirty = False
        self._last_flush = self._clock()
