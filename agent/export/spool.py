"""A bounded on-disk FIFO of record batches: where records wait while the collector is away.

Layout: `DIR/seg-000000001.spool`, `seg-000000002.spool`, ... oldest first.  A segment
is an 8-byte magic followed by frames:

    u32 payload length | u32 CRC-32 of payload | payload
    payload = u32 record count, then per record: u32 length | serialized tlscap.v1.Record

Records are opaque bytes here; the spool only needs their boundaries (to re-batch
them on replay) and their count (for honest loss accounting).  A frame is written
with one write(2), so an agent killed mid-write leaves at most one torn frame at
the end of the newest segment; opening the spool truncates it instead of failing.

Segments are the unit of delivery and of eviction: the exporter checks out the
oldest segment, sends its records, and acks it (the file is deleted) once the
collector has acknowledged all of them.  When the spool is full, whole oldest
segments are deleted and what they held is counted as lost, loudly.

The directory is 0700 and files 0600: they hold captured plaintext.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"TLSCSPL1"
_FRAME = struct.Struct("<II")
_U32 = struct.Struct("<I")
# A length field beyond this is corruption, not data (a record is at most a few MiB).
_MAX_FRAME = 1 << 30
_SEGMENT_NAME = re.compile(r"^seg-(\d{9,})\.spool$")
_LOCK_NAME = ".lock"


class SpoolError(OSError):
    """The spool directory cannot be used; str() is a one-line message for the CLI."""


class SpoolWriteError(OSError):
    """The disk refused a write (full, I/O error); `records_lost` were not stored."""

    def __init__(self, message: str, records_lost: int) -> None:
        super().__init__(message)
        self.records_lost = records_lost


@dataclass
class SpoolCheckout:
    """The records of one segment, lent to the exporter until ack() or release()."""

    segment: int
    records: list[bytes]


@dataclass
class _Segment:
    number: int
    path: Path
    bytes: int
    records: int
    checked_out: bool = False


def encode_frame(records: Sequence[bytes]) -> bytes:
    parts = [_U32.pack(len(records))]
    for record in records:
        parts.append(_U32.pack(len(record)))
        parts.append(record)
    payload = b"".join(parts)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _split(records: Sequence[bytes], frame_limit: int) -> list[Sequence[bytes]]:
    """Cut a batch into runs whose frames stay within frame_limit (one record at least)."""
    chunks: list[Sequence[bytes]] = []
    start = 0
    size = _FRAME.size + _U32.size
    for i, record in enumerate(records):
        grown = size + _U32.size + len(record)
        if i > start and grown > frame_limit:
            chunks.append(records[start:i])
            start, grown = i, _FRAME.size + 2 * _U32.size + len(record)
        size = grown
    if start < len(records):
        chunks.append(records[start:])
    return chunks


def _decode_payload(payload: memoryview) -> list[bytes]:
    (count,) = _U32.unpack_from(payload, 0)
    offset = _U32.size
    records = []
    for _ in range(count):
        (length,) = _U32.unpack_from(payload, offset)
        offset += _U32.size
        if offset + length > len(payload):
            raise ValueError("record runs past its frame")
        records.append(bytes(payload[offset : offset + length]))
        offset += length
    if offset != len(payload):
        raise ValueError("trailing bytes in frame")
    return records


@dataclass
class _ScanResult:
    records: list[bytes]  # empty unless decoding was asked for
    count: int
    good_end: int  # offset after the last intact frame
    problem: str | None  # why scanning stopped before the end of the data


def _scan_frames(data: bytes, *, decode: bool) -> _ScanResult:
    view = memoryview(data)
    offset = len(MAGIC)
    records: list[bytes] = []
    count = 0
    problem = None
    while offset < len(data):
        if len(data) - offset < _FRAME.size:
            problem = "torn frame header"
            break
        length, crc = _FRAME.unpack_from(view, offset)
        end = offset + _FRAME.size + length
        if length < _U32.size or length > _MAX_FRAME:
            problem = f"impossible frame length {length}"
            break
        if end > len(data):
            problem = "torn frame"
            break
        payload = view[offset + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            problem = "checksum mismatch"
            break
        try:
            if decode:
                batch = _decode_payload(payload)
                records.extend(batch)
                count += len(batch)
            else:
                count += _U32.unpack_from(payload, 0)[0]
        except (ValueError, struct.error) as exc:
            problem = f"malformed frame ({exc})"
            break
        offset = end
    return _ScanResult(records, count, offset, problem)


def _prepare_directory(directory: Path) -> None:
    try:
        if directory.exists() and not directory.is_dir():
            raise SpoolError(f"spool path {directory} exists and is not a directory")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except SpoolError:
        raise
    except OSError as exc:
        raise SpoolError(f"cannot create spool directory {directory}: {exc.strerror}") from exc
    try:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o077:
            # Captured plaintext must not be readable by other users of the node.
            try:
                directory.chmod(0o700)
                log.warning("spool directory %s was mode %o; tightened it to 700", directory, mode)
            except OSError as exc:
                log.warning(
                    "spool directory %s is mode %o and cannot be tightened: %s",
                    directory,
                    mode,
                    exc,
                )
        os.listdir(directory)
    except OSError as exc:
        raise SpoolError(f"cannot read spool directory {directory}: {exc.strerror}") from exc
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        raise SpoolError(f"spool directory {directory} is not readable and writable by this user")


class Spool:
    """Bounded on-disk FIFO of record batches; see the module docstring for the format.

    Thread-safe: the exporter's sender thread appends and replays, other threads
    read the counters.  Only one process may use a directory at a time.
    """

    def __init__(
        self, directory: str | os.PathLike[str], max_bytes: int, segment_bytes: int = 4 << 20
    ) -> None:
        if max_bytes <= len(MAGIC) + _FRAME.size:
            raise ValueError(f"spool max_bytes too small: {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Eviction deletes whole segments: keep them small against the bound so a
        # full spool gives up a quarter of itself at most, not everything.
        self.segment_bytes = max(len(MAGIC) + 1, min(segment_bytes, max_bytes // 4))
        self.dropped_records = 0
        self.dropped_bytes = 0
        self.corrupt_bytes = 0  # torn or damaged frames cut off (record count unknowable)
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}  # insertion order == age
        self._bytes = 0
        self._records = 0
        self._lent_records = 0  # in checked-out segments
        self._tail: _Segment | None = None
        self._tail_fd: int | None = None
        self._closed = False

        _prepare_directory(self.directory)
        self._lock_fd = self._take_lock()
        try:
            self._scan()
        except OSError as exc:
            os.close(self._lock_fd)
            raise SpoolError(f"cannot read spool directory {self.directory}: {exc}") from exc
        self._next_number = max(self._segments, default=0) + 1

    # -- counters -------------------------------------------------------------

    @property
    def records(self) -> int:
        """Records on disk, including those checked out for delivery."""
        return self._records

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def backlog_records(self) -> int:
        """Records on disk that are not checked out: what is still to be sent."""
        return self._records - self._lent_records

    def __len__(self) -> int:
        return self._records

    # -- writing --------------------------------------------------------------

    def append(self, records: Sequence[bytes]) -> None:
        """Store records at the tail, making room by evicting the oldest segments.

        A batch bigger than a segment is split over several frames, so that
        eviction stays fine-grained.  A single record bigger than the whole spool
        is dropped (and counted).  Raises SpoolWriteError if the disk refuses.
        """
        chunks = _split(records, self.segment_bytes - len(MAGIC))
        for i, chunk in enumerate(chunks):
            try:
                self._append_frame(chunk)
            except OSError as exc:
                lost = sum(len(c) for c in chunks[i:])
                raise SpoolWriteError(
                    f"cannot write to spool {self.directory}: {exc}", lost
                ) from exc

    def _append_frame(self, records: Sequence[bytes]) -> None:
        frame = encode_frame(records)
        with self._lock:
            self._check_open()
            if len(frame) + len(MAGIC) > self.max_bytes:
                self._count_drop(len(records), len(frame))
                log.warning(
                    "spool %s: a record of %d bytes is larger than the whole spool (%d bytes);"
                    " dropped it",
                    self.directory,
                    len(frame),
                    self.max_bytes,
                )
                return
            self._make_room(len(frame) + len(MAGIC))
            tail = self._tail
            if tail is None or (
                tail.bytes > len(MAGIC) and tail.bytes + len(frame) > self.segment_bytes
            ):
                tail = self._open_new_tail()
            assert self._tail_fd is not None
            written = os.write(self._tail_fd, frame)
            if written != len(frame):
                # A short write on a regular file means the disk is full: cut the torn
                # frame off again so the segment stays readable.
                os.ftruncate(self._tail_fd, tail.bytes)
                raise OSError(f"short write to {tail.path} ({written} of {len(frame)} bytes)")
            tail.bytes += len(frame)
            tail.records += len(records)
            self._bytes += len(frame)
            self._records += len(records)

    def _open_new_tail(self) -> _Segment:
        self._seal_tail()
        number = self._next_number
        self._next_number += 1
        path = self.directory / f"seg-{number:09d}.spool"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, MAGIC)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        segment = _Segment(number, path, len(MAGIC), 0)
        self._segments[number] = segment
        self._bytes += len(MAGIC)
        self._tail, self._tail_fd = segment, fd
        return segment

    def _seal_tail(self) -> None:
        if self._tail_fd is not None:
            try:
                os.fsync(self._tail_fd)
            finally:
                os.close(self._tail_fd)
        self._tail, self._tail_fd = None, None

    def _make_room(self, needed: int) -> None:
        while self._bytes + needed > self.max_bytes and self._segments:
            # Oldest first, but spare a segment that is being delivered right now
            # unless nothing else is left: its records are about to be safe.
            victim = next((s for s in self._segments.values() if not s.checked_out), None)
            if victim is None:
                victim = next(iter(self._segments.values()))
            self._evict(victim)

    def _evict(self, segment: _Segment) -> None:
        if segment is self._tail:
            self._seal_tail()
        self._forget(segment)
        self._count_drop(segment.records, segment.bytes)
        log.warning(
            "spool %s is full (limit %d bytes): deleted its oldest segment %s;"
            " %d records (%d bytes) are lost (%d lost so far)",
            self.directory,
            self.max_bytes,
            segment.path.name,
            segment.records,
            segment.bytes,
            self.dropped_records,
        )

    def _count_drop(self, records: int, nbytes: int) -> None:
        self.dropped_records += records
        self.dropped_bytes += nbytes

    def _forget(self, segment: _Segment) -> None:
        del self._segments[segment.number]
        if segment.checked_out:
            self._lent_records -= segment.records
        self._bytes -= segment.bytes
        self._records -= segment.records
        segment.path.unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------

    def checkout(self) -> SpoolCheckout | None:
        """The oldest segment not already checked out, or None if there is none.

        The records stay on disk until ack(); release() offers them again (after a
        failed delivery).  Checking out the segment being written seals it.
        """
        with self._lock:
            self._check_open()
            while True:
                segment = next((s for s in self._segments.values() if not s.checked_out), None)
                if segment is None:
                    return None
                if segment is self._tail:
                    self._seal_tail()
                records = self._read(segment)
                if records is None:
                    continue
                segment.checked_out = True
                self._lent_records += segment.records
                return SpoolCheckout(segment.number, records)

    def _read(self, segment: _Segment) -> list[bytes] | None:
        """The segment's records; None if it had to be dropped from the index."""
        try:
            data = segment.path.read_bytes()
        except FileNotFoundError:
            log.warning("spool segment %s vanished; %d records lost", segment.path, segment.records)
            self._count_drop(segment.records, segment.bytes)
            self._forget(segment)
            return None
        scan = _scan_frames(data, decode=True)
        if scan.problem is not None:
            # Damaged after we wrote it (disk, or someone else): keep what is intact.
            lost = segment.records - scan.count
            self._truncate(segment.path, data, scan, lost_records=lost)
            self._count_drop(lost, len(data) - scan.good_end)
            self._bytes -= segment.bytes - scan.good_end
            self._records -= lost
            segment.bytes, segment.records = scan.good_end, scan.count
        if not scan.records:
            self._forget(segment)
            return None
        return scan.records

    def ack(self, checkout: SpoolCheckout) -> None:
        """Every record of the checkout was delivered: delete its segment."""
        with self._lock:
            segment = self._segments.get(checkout.segment)
            if segment is not None:  # None: evicted meanwhile, already counted
                self._forget(segment)

    def release(self, checkout: SpoolCheckout) -> None:
        """Delivery failed: the segment will be offered again, still oldest first."""
        with self._lock:
            segment = self._segments.get(checkout.segment)
            if segment is not None and segment.checked_out:
                segment.checked_out = False
                self._lent_records -= segment.records

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._seal_tail()
            finally:
                os.close(self._lock_fd)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"spool {self.directory} is closed")

    def _take_lock(self) -> int:
        path = self.directory / _LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(
                f"cannot use spool directory {self.directory}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"spool directory {self.directory} is in use by another tlscap process"
            ) from None
        return fd

    def _scan(self) -> None:
        """Index the segments a previous run left, repairing a torn tail."""
        numbered = []
        for name in os.listdir(self.directory):
            match = _SEGMENT_NAME.match(name)
            if match:
                numbered.append((int(match.group(1)), self.directory / name))
        for number, path in sorted(numbered):
            data = path.read_bytes()
            if not data.startswith(MAGIC):
                if len(data) <= len(MAGIC) and MAGIC.startswith(data):
                    path.unlink()  # created, killed before the magic was complete: holds nothing
                    continue
                bad = path.with_suffix(".corrupt")
                path.rename(bad)
                log.warning(
                    "spool file %s is not a tlscap spool segment; moved it aside to %s",
                    path,
                    bad.name,
                )
                continue
            scan = _scan_frames(data, decode=False)
            if scan.problem is not None:
                self._truncate(path, data, scan, lost_records=None)
                self.corrupt_bytes += len(data) - scan.good_end
            if scan.count == 0:
                path.unlink()
                continue
            segment = _Segment(number, path, scan.good_end, scan.count)
            self._segments[number] = segment
            self._bytes += segment.bytes
            self._records += segment.records
        if self._records:
            log.info(
                "spool %s holds %d records (%d bytes) from an earlier run; they are sent first",
                self.directory,
                self._records,
                self._bytes,
            )

    def _truncate(
        self, path: Path, data: bytes, scan: _ScanResult, *, lost_records: int | None
    ) -> None:
        cut = len(data) - scan.good_end
        what = "" if lost_records is None else f", {lost_records} records lost"
        log.warning(
            "spool segment %s: %s at offset %d (the agent was probably stopped mid-write);"
            " truncated %d bytes%s",
            path.name,
            scan.problem,
            scan.good_end,
            cut,
            what,
        )
        os.truncate(path, scan.good_end)
