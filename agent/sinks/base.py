"""What every sink is, and the buffered-write policy the text sinks share."""

from __future__ import annotations

import errno
import io
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO, runtime_checkable

from agent.records.record import Record

# Lines one writev(2) takes (Linux: 1024).
IOV_MAX = os.sysconf("SC_IOV_MAX")


@runtime_checkable
class Sink(Protocol):
    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class OutputError(OSError):
    """An output destination could not be opened; str() is a one-line message for the CLI."""


class PeriodicFlusher:
    """Writes text to a stream and flushes it at most every `interval` seconds.

    (Any object with write() and flush() will do: the store sink passes rows.
    write_lines() to a file descriptor buffers nothing: see there.)

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
        self._fd = _binary_fileno(stream)

    def write(self, text: str) -> None:
        with self._lock:
            self._check_open()
            self.stream.write(text)
            self._written()

    def write_lines(self, lines: list[bytes]) -> None:
        """Several lines of bytes in one go, each reaching the stream whole.

        A stream on a file descriptor (a file, a pipe, a tty) gets them straight
        from the list through writev(2), IOV_MAX lines a call: writelines() on a
        BufferedWriter is a Python call per line and a copy of each line (a
        base64 payload: kilobytes) into its buffer.  That is a system call per
        batch (one per ring drain, so a few hundred a second at most when batches
        are small), and nothing is left buffered: the flush policy has nothing to
        do.  A regular file's writev is one append under the inode lock, so
        capture workers appending to one file (O_APPEND) still leave it line by
        line.  Other streams (BytesIO) get writelines().  Joined first, a batch of
        data records (megabytes) would be a fresh allocation each time, and the
        page faults of that memory cost more system time than the lines' encoding
        (bench/README.md, "The stream masker in C, and the heap settled")."""
        with self._lock:
            self._check_open()
            if self._fd is None:
                self.stream.writelines(lines)
                self._written()
                return
            # What the stream holds (write()'s text, anyone's on stdout) goes first.
            self._flush_locked()
            for start in range(0, len(lines), IOV_MAX):
                _writev_all(self._fd, lines[start : start + IOV_MAX])

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


def _binary_fileno(stream: object) -> int | None:
    """The file descriptor under a binary stream; None for a text stream or one
    without a descriptor (BytesIO, the store sink's rows)."""
    if isinstance(stream, io.TextIOBase):
        return None
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def _writev_all(fd: int, lines: list) -> None:
    """All of `lines` (at most IOV_MAX) to `fd`, in order.

    A short count (a signal, a non-blocking pipe or tty that filled up, a full
    disk before the error) is not an error: the rest goes in the next call, from
    the first byte not written, so no line is lost or cut.  A non-blocking
    descriptor (stdout shared with a parent that set O_NONBLOCK) is waited on."""
    left = sum(map(len, lines))
    while left:
        try:
            written = os.writev(fd, lines)
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()
            continue
        if written == 0:  # no progress and no error: never seen, but never spin on it
            raise OSError(errno.EIO, "writev(2) wrote nothing")
        left -= written
        if left:
            lines = _unwritten(lines, written)


def _unwritten(lines: list, written: int) -> list:
    """What is left of `lines` after the first `written` bytes (a view of the
    line cut, not a copy)."""
    for i, line in enumerate(lines):
        if written < len(line):
            return [memoryview(line)[written:], *lines[i + 1 :]]
        written -= len(line)
    return []
