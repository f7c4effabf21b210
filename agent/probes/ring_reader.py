"""Read the kernel's BPF ring buffer directly through its memory mapping.

The shell around agent/events/ring.py: it maps the ring the way libbpf does
(the consumer page read-write, the producer page and the data area - mapped
twice in a row by the kernel - read-only), waits on the map's fd, and hands
whole batches of records to a Python function.  No ctypes callback per event:
that callback alone cost more than decoding the event.

The two positions are read and stored through agent/events/ring.py (C: an acquire
load and a release store, each one 8-byte access), never with `struct`: its '<Q'
writes a word one byte at a time, and a kernel producer that read a half-written
consumer position saw a full ring and refused records (bench/README.md, "A torn
consumer position").  The records' header words are loaded the same way
(walk_records).  The agent's probes are x86-64 only (bpf/gotls.c reads the amd64
register ABI), and so is this reader.
"""

from __future__ import annotations

import mmap
import os
import platform
import select
from collections.abc import Callable

from agent.events.ring import RingBatch, load_position, store_position, take_records

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Records handed over per call of the handler, at most: the consumer position
# advances after each batch, so the kernel gets room back while we work.
BATCH_BYTES = 4 << 20

BatchHandler = Callable[[RingBatch], None]


class RingReader:
    def __init__(self, map_fd: int, size: int) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError("the ring reader relies on x86-64 memory ordering")
        if size <= 0 or size & (size - 1) or size % PAGE_SIZE:
            raise ValueError(f"ring size {size} is not a power-of-two number of pages")
        self.size = size
        self._consumer = mmap.mmap(
            map_fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._producer = mmap.mmap(
            map_fd, PAGE_SIZE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE_SIZE
        )
        self._poll = select.poll()
        self._poll.register(map_fd, select.POLLIN)
        # The most bytes ever found waiting at the start of a drain: how close
        # the agent came to losing events (the ring is full at `size`).
        self.peak_pending = 0

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel wakes us (a burst past its wake-up mark) or the
        timeout passes.  The map's poll reports readable at once when records
        are waiting, so only an empty ring sleeps: events are submitted without
        wake-ups, and a quiet ring is drained every `timeout_ms`."""
        self._poll.poll(timeout_ms)

    def drain(self, handle: BatchHandler) -> int:
        """Hand every record written before the call to `handle`, in batches;
        returns the number of records.  A record's memory is reused by the kernel
        once `handle` returns: it must copy what it keeps.

        Records written meanwhile wait for the next call: a producer faster than
        us must not keep the caller from its other duties (stop requests, the
        liveness beat, stale calls)."""
        total = 0
        producer = load_position(self._producer, 0)
        consumer = load_position(self._consumer, 0)
        if producer - consumer > self.peak_pending:
            self.peak_pending = producer - consumer
        while True:
            consumer = load_position(self._consumer, 0)
            if consumer >= producer:
                return total
            # The data area follows the producer page in the mapping; the mmap
            # is read in place (slicing it copies a payload straight to bytes).
            taken_to, batch = take_records(
                self._producer, self.size, consumer, producer, BATCH_BYTES, base=PAGE_SIZE
            )
            if taken_to == consumer:
                return total  # the oldest record is still being written
            try:
                if batch.spans:
                    handle(batch)
            finally:
                store_position(self._consumer, 0, taken_to)
            total += len(batch)

    def close(self) -> None:
        self._producer.close()
        self._consumer.close()
