"""Hand-built protobuf messages from already serialized records, and batching.

Records are serialized once (in the exporter's write(), or as received by the
collector) and stay bytes from then on: queue, spool, re-sends, the store.
Parsing them back into messages only to serialize them again would double the
CPU cost, so IngestBatch and RecordBatch are framed here directly.
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


def _framed(tag: bytes, records: Sequence[bytes], parts: list[bytes]) -> bytes:
    """`parts` followed by each record as a length-delimited field with `tag`."""
    for record in records:
        parts.append(tag)
        parts.append(_varint(len(record)))
        parts.append(record)
    return b"".join(parts)


def encode_ingest_batch(batch_id: int, records: Sequence[bytes]) -> bytes:
    """A serialized tlscap.v1.IngestBatch: field 1 = batch_id (varint), 2 = records."""
    return _framed(b"\x12", records, [b"\x08", _varint(batch_id)])


def encode_record_batch(records: Sequence[bytes]) -> bytes:
    """A serialized tlscap.v1.RecordBatch holding `records` (field 1), without cursor."""
    return _framed(b"\x0a", records, [])


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
