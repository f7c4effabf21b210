"""Ingest wire encoding and batching: pure functions over serialized records.

Records are serialized once, in the exporter's write(), and stay bytes from then
on (queue, spool, re-sends); these helpers build IngestBatch messages from them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def framed_size(record: bytes) -> int:
    """Bytes a serialized record takes inside an IngestBatch (tag + length + body)."""
    return 1 + len(_varint(len(record))) + len(record)


def encode_ingest_batch(batch_id: int, records: Sequence[bytes]) -> bytes:
    """A serialized tlscap.v1.IngestBatch built from already serialized records.

    Parsing the records back into messages only to serialize them again would
    double the exporter's CPU cost.  Field 1 = batch_id (varint), field 2 = records.
    """
    parts = [b"\x08", _varint(batch_id)]
    for record in records:
        parts.append(b"\x12")
        parts.append(_varint(len(record)))
        parts.append(record)
    return b"".join(parts)


def take_batch(source: deque[bytes], max_records: int, max_bytes: int) -> list[bytes]:
    """Pop the next batch off the left of `source`: at most max_records, at most
    max_bytes of framed records -- except that a first record bigger than that
    still goes, alone (it could never go otherwise)."""
    batch = [source.popleft()]
    size = framed_size(batch[0])
    while source and len(batch) < max_records:
        nxt = framed_size(source[0])
        if size + nxt > max_bytes:
            break
        batch.append(source.popleft())
        size += nxt
    return batch
