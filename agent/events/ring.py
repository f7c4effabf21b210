"""Walk the records of a BPF ring buffer, given its bytes and its two positions.

Pure: the shell (agent/probes/ring_reader.py) maps the kernel's ring into memory
and hands its data area here; tests hand in plain bytes.  Reading the ring
ourselves, a whole batch per call, replaces libbpf's consume loop, which calls
back into Python through ctypes once per event (several µs each).

The kernel's layout (kernel/bpf/ringbuf.c): positions only grow; a record starts
at `pos & (size - 1)` with an 8-byte header - its length, with a BUSY bit while
the producer is still writing it and a DISCARD bit when the producer gave it up -
and the next record starts at the header plus the length, rounded up to 8.  The
kernel maps the data area twice in a row so a record that wraps can be read in
one piece; a single mapping works too (the wrapped record is then joined here).
"""

from __future__ import annotations

import struct

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8

_HEADER = struct.Struct("<I")


def record_span(length_word: int) -> int:
    """How far a record with this header word moves the consumer position."""
    length = length_word & ~(BUSY_BIT | DISCARD_BIT)
    return (length + HEADER_SIZE + 7) & ~7


def take_records(
    data: memoryview | bytes,
    size: int,
    consumer: int,
    producer: int,
    max_bytes: int,
) -> tuple[int, list[memoryview | bytes]]:
    """The committed records in [consumer, producer), up to about `max_bytes` of ring.

    `data` is the ring's data area: `size` bytes (a power of two), or `2 * size`
    when the kernel's double mapping is passed.  Returns the position up to which
    the records were taken - the caller stores it as the new consumer position
    once it no longer needs the returned views - and the records' bodies, in
    order.  Discarded records are skipped; a record still being written (BUSY)
    stops the walk, so records are always handed over in order.
    """
    mask = size - 1
    limit = min(producer, consumer + max_bytes)
    mapped = len(data)
    out: list[memoryview | bytes] = []
    pos = consumer
    while pos < limit:
        at = pos & mask
        (word,) = _HEADER.unpack_from(data, at)
        if word & BUSY_BIT:
            break
        span = record_span(word)
        if not word & DISCARD_BIT:
            start = at + HEADER_SIZE
            end = start + (word & ~DISCARD_BIT)
            if end <= mapped:
                out.append(data[start:end])
            else:  # wraps past a single mapping: join its two halves
                out.append(bytes(data[start:mapped]) + bytes(data[: end - mapped]))
        pos += span
    return pos, out
