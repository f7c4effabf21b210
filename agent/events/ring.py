"""Walk the records of a BPF ring buffer, given its bytes and its two positions.

Pure: the shell (agent/probes/ring_reader.py) maps the kernel's ring into memory
and hands its data area here; tests hand in plain bytes.  Reading the ring
ourselves, a whole batch per call, replaces libbpf's consume loop, which calls
back into Python through ctypes once per event (several µs each).

The kernel's layout (kernel/bpf/ringbuf.c): positions only grow; a record starts
at `pos & (size - 1)` with an 8-byte header - its length, with a BUSY bit while
the producer is still writing it and a DISCARD bit when the producer gave it up -
and the next record starts at the header plus the length, rounded up to 8.  The
kernel maps the data area twice in a row, so a record that wraps past the end of
the ring reads on, in one piece, into the second mapping.

The walk itself is C (agent/events/_decode.c, walk_records): the Python loop it
replaced cost ~7.9k instructions per record, the C one ~0.3k (callgrind).  A
batch is the ring's bytes and where its records lie in them, not one object per
record: the decoder reads each header in place and copies only the payload, so a
record costs no slice object of its own (agent/events/decode.py).

`load_position` and `store_position` (C too) read and store the two positions, each
in one 8-byte access: the kernel reads the consumer position while we store it, and
a half-stored one made it refuse records (bench/README.md, "A torn consumer
position").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The positions: each one 8-byte access (the kernel reads them on other CPUs).
from agent.events._decode import load_position as load_position
from agent.events._decode import store_position as store_position
from agent.events._decode import walk_records

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8

_HEADER = struct.Struct("<I")


@dataclass(slots=True)
class RingBatch:
    """Records lying in `data`: the i-th starts at spans[2i] and is spans[2i+1]
    bytes long.  `data` is any buffer (the ring's mapping, or bytes in tests)."""

    data: Any
    spans: list[int]

    def __len__(self) -> int:
        return len(self.spans) // 2

    def bodies(self) -> list[bytes]:
        """Every record's bytes (tests and tools; the hot path reads in place)."""
        data, spans = self.data, self.spans
        return [bytes(data[spans[i] : spans[i] + spans[i + 1]]) for i in range(0, len(spans), 2)]

    @classmethod
    def of(cls, records: Sequence[bytes]) -> RingBatch:
        """A batch holding `records` laid out as the ring holds them: each after an
        8-byte header with its length, padded to 8 (tests, benchmarks, replays)."""
        spans: list[int] = []
        out = bytearray()
        for record in records:
            out += _HEADER.pack(len(record)) + bytes(4)
            spans += (len(out), len(record))
            out += record
            out += bytes(-len(out) % 8)
        return cls(bytes(out), spans)


def record_span(length_word: int) -> int:
    """How far a record with this header word moves the consumer position."""
    length = length_word & ~(BUSY_BIT | DISCARD_BIT)
    return (length + HEADER_SIZE + 7) & ~7


def take_records(
    data: Any,
    size: int,
    consumer: int,
    producer: int,
    max_bytes: int,
    base: int = 0,
) -> tuple[int, RingBatch]:
    """The committed records in [consumer, producer), up to about `max_bytes` of ring.

    `data` holds the ring's data area from offset `base`: `size` bytes (a power
    of two) followed by the same bytes again, as the kernel maps it; a single
    copy serves as long as no record wraps past its end (ValueError if one
    does).  Returns the position up to which the records were taken - the caller
    stores it as the new consumer position once it no longer needs the batch -
    and the batch, in order.  Discarded records are skipped; a record still being
    written (BUSY) stops the walk, so records are always handed over in order.
    """
    pos, spans = walk_records(data, size, consumer, producer, max_bytes, base)
    return pos, RingBatch(data, spans)
