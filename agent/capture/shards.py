"""Split a ring batch between worker processes, a process's events to one worker.

Pure: a batch in, each worker's share of it out, so it is tested without a
kernel or a process.  The drain loop (agent/capture/workers.py) reads the ring
and sends each worker its share as one frame; the worker turns the frame back
into a batch and runs the whole pipeline on it (decode, calls, flows, L7, sinks).

Why by process and not by connection: what the pipeline remembers is per
process - its sockets by fd, its TLS objects by pointer, a memory-BIO object's
later binding to a socket, the connections an exit closes - and every event
carries the process (tgid) at the same place, while only data events name a
connection.  A process's events staying on one worker keep their order and need
no state shared between workers.  The cost: one very busy process is one
worker's load; a node's traffic is spread over many processes.

A worker's share of a batch is sent as it lies in the ring: runs of whole ring
records (8-byte header, record, padding to 8), so the drain loop copies nothing
itself (the runs go to the worker's pipe with one writev) and the worker reads
its frame with the ring's own walker, `take_records`.
"""

from __future__ import annotations

import struct

from agent.events import layout
from agent.events.ring import HEADER_SIZE, RingBatch, take_records

_KIND_TGID = struct.Struct("<II")  # every event starts with its kind, then its tgid
# Process events the drain loop acts on itself: probing a new program (exec, and a
# library mapped in) and a process the kernel stopped until it is probed.
ATTACH_KINDS = frozenset({layout.EV_EXEC, layout.EV_EXEC_MAP, layout.EV_HOLD})


class ShardRouter:
    """Gives each process a worker on its first event (round robin, so two busy
    processes land on two workers) and keeps it there until the process exits."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"need at least one worker, got {workers}")
        self.workers = workers
        self._assigned: dict[int, int] = {}
        self._next = 0

    def worker_of(self, tgid: int) -> int:
        worker = self._assigned.get(tgid)
        if worker is None:
            worker = self._assigned[tgid] = self._next
            self._next = (self._next + 1) % self.workers
        return worker

    def assign(self, weights: dict[int, int]) -> None:
        """Give each process known before any event (weight: its connections) a
        worker, heaviest first to the least loaded, so that busy servers started
        before the agent land on different workers."""
        load = [0] * self.workers
        for tgid, weight in sorted(weights.items(), key=lambda item: (-item[1], item[0])):
            if tgid not in self._assigned:
                worker = self._assigned[tgid] = load.index(min(load))
                load[worker] += weight

    def processes(self, worker: int) -> set[int]:
        """The processes given to `worker` so far (and not exited)."""
        return {tgid for tgid, w in self._assigned.items() if w == worker}

    def split(self, batch: RingBatch) -> tuple[list[list[int]], list[int], list[int]]:
        """For each worker, where its records lie in `batch.data` as runs of whole
        ring records (flat: start, end, start, end...) and how many records they
        hold; and the spans of the records the drain loop must act on itself
        (ATTACH_KINDS), which go to their worker too.

        The batch must lie as the ring lays it out (take_records, RingBatch.of): a
        record's header in the 8 bytes before it.  A record too short to name its
        process goes to worker 0, whose decoder counts and logs it like any other
        record it cannot read."""
        runs: list[list[int]] = [[] for _ in range(self.workers)]
        counts = [0] * self.workers
        own: list[int] = []
        data, spans = batch.data, batch.spans
        unpack, assigned = _KIND_TGID.unpack_from, self._assigned
        exit_kind = layout.EV_EXIT
        last_worker, last_end = -1, -1
        for i in range(0, len(spans), 2):
            start, length = spans[i], spans[i + 1]
            if length < _KIND_TGID.size:
                worker = 0
            else:
                kind, tgid = unpack(data, start)
                worker = assigned.get(tgid)
                if worker is None:
                    worker = self.worker_of(tgid)
                if kind in ATTACH_KINDS:
                    own += (start, length)
                elif kind == exit_kind:
                    del assigned[tgid]  # its pid may come back as another process
            counts[worker] += 1
            head = start - HEADER_SIZE
            end = start + ((length + 7) & ~7)
            if worker == last_worker and head == last_end:
                runs[worker][-1] = end  # the run goes on
            else:
                runs[worker] += (head, end)
                last_worker = worker
            last_end = end
        return runs, counts, own


def frame_of(data: bytes, runs: list[int]) -> bytes:
    """The frame a worker gets for `runs` of `data` (tests; the pool writes the runs
    to its pipe without joining them)."""
    return b"".join(data[runs[i] : runs[i + 1]] for i in range(0, len(runs), 2))


def frame_batch(frame: bytes | bytearray) -> RingBatch:
    """A worker's frame (the runs ShardRouter.split gave it, back to back) as a
    batch of its records, in order."""
    size = 1 << max(len(frame) - 1, 0).bit_length()  # the walker wants a power of two
    try:
        end, batch = take_records(frame, size, 0, len(frame), len(frame))
    except ValueError:  # a record running past the frame's end
        end = -1
    if end != len(frame):
        raise ValueError(f"frame of {len(frame)} bytes ends inside a record")
    return batch
