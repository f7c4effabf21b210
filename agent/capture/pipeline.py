"""The capture path's pure core: ring-buffer records in, Records out.

    records -> EventDecoder -> CallAssembler -> FlowTable -> RecordWriter

Sans-I/O: the session (agent/capture/session.py) feeds it batches from the
ring and carries out what it asks of the outside world - attach to a process
that exec'd, tell the kernel about a socket - through the two callables it is
given.  bench/pipeline.py drives it with synthetic ring bytes to measure the
hot path without a kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.capture import heap
from agent.events.calls import CallAssembler
from agent.events.decode import EventDecoder, ProcessEvent, SocketBound, SocketClosed, TlsCall
from agent.events.ring import RingBatch
from agent.flows.connection import KernelRegistration
from agent.flows.table import FlowTable
from agent.records.record import Record
from agent.records.writer import RecordWriter

log = logging.getLogger(__name__)


@dataclass
class PipelineStats:
    events: int = 0
    decode_errors: int = 0


class EventPipeline:
    def __init__(
        self,
        writer: RecordWriter,
        flows: FlowTable,
        *,
        on_exec: Callable[[int], None],
        register_socket: Callable[[KernelRegistration], None],
        on_hold: Callable[[int], None] | None = None,
    ) -> None:
        self.writer = writer
        self.flows = flows
        self.calls = CallAssembler()
        self.stats = PipelineStats()
        self._decoder = EventDecoder()
        self._on_exec = on_exec
        self._on_hold = on_hold or on_exec
        self._register_socket = register_socket

    def handle_batch(self, batch: RingBatch) -> None:
        """Decode and pass on one batch; its memory may be reused afterwards."""
        self.stats.events += len(batch)
        out: list[Record] = []  # handed to the writer in one go
        extend = out.extend
        on_call = self.flows.on_call
        calls = self.calls
        events = self._decoder.decode_batch(batch)
        on_known_calls = self.flows.on_known_calls
        i, n = 0, len(events)
        while i < n:
            if not calls.holds_pieces:
                # The usual event, a whole call on a connection already followed,
                # a run of them at a time in C; the others one by one below.
                i = on_known_calls(events, i, out)
                if i == n:
                    break
            event = events[i]
            i += 1
            kind = type(event)
            if kind is TlsCall:
                if calls.passes_through(event):  # type: ignore[arg-type]
                    extend(on_call(event))  # type: ignore[arg-type]
                else:
                    for call in calls.feed(event):  # type: ignore[arg-type]
                        extend(on_call(call))
            elif kind is SocketClosed:
                extend(self.flows.on_close(event))  # type: ignore[arg-type]
            elif kind is SocketBound:
                extend(self.flows.on_bind(event))  # type: ignore[arg-type]
            elif kind is ProcessEvent:
                # An exit makes the writer forget the process: what came before it
                # goes out first, while its pod is still known.
                self._write_all(out)
                out.clear()
                self._on_process_event(event)  # type: ignore[arg-type]
            else:
                self.stats.decode_errors += 1
                log.warning("dropping undecodable event: %s", event)
        self._write_all(out)
        self.push_kernel_registrations()
        heap.collect_between_batches()  # the batch's objects are gone now

    def flush_calls(self, older_than_mono_ns: int | None = None) -> None:
        """Release partial calls whose missing chunks will not come, and records
        that waited as long for their socket (all at exit)."""
        for call in self.calls.flush(older_than_mono_ns):
            self._write_all(self.flows.on_call(call))
        self._write_all(self.flows.release_held(older_than_mono_ns))

    def sweep_ended(
        self,
        alive: Callable[[int], bool],
        ts_mono_ns: int,
        is_socket: Callable[[int, int], bool] | None = None,
        idle_ns: int = 0,
    ) -> None:
        """Close what processes that ended unseen left open (FlowTable.sweep_ended),
        and, given `is_socket`, connections idle for `idle_ns` whose socket is gone
        without a close we saw (FlowTable.sweep_closed).

        Call it between drains, with `ts_mono_ns` taken before it: what one call
        finds gone in /proc is closed by a later one, once the events sent before
        it have been handled (the ring may hold a process's last calls and its
        exit long after /proc has let go of it)."""
        ended = self.flows.sweep_ended(alive, ts_mono_ns)
        closed = []
        if is_socket is not None:
            closed = self.flows.sweep_closed(is_socket, ts_mono_ns - idle_ns, ts_mono_ns)
        self._write_all(ended + closed)
        # Only the processes that ended: a connection closed unseen leaves its
        # process alive.
        for pid in {record.pid for record in ended}:
            self.writer.process_exited(pid)
        self.push_kernel_registrations()

    def summary(self) -> dict[str, int]:
        """The pipeline's counters for the stats record and /metrics (the session
        adds the kernel's; with workers, each worker sends its own)."""
        writer = self.writer
        return {
            "events": self.stats.events,
            "records": writer.records,
            "bytes": writer.data_bytes,
            "decode_errors": self.stats.decode_errors,
            "incomplete_calls": self.calls.incomplete_calls,
            **{f"flow_{k}": v for k, v in self.flows.stats.as_dict().items()},
            **writer.sink_stats(),
        }

    def push_kernel_registrations(self) -> None:
        """Carry out what the flow table asked of the kernel."""
        registrations = self.flows.kernel_registrations
        if registrations:
            for reg in registrations:
                self._register_socket(reg)
            registrations.clear()

    def _on_process_event(self, event: ProcessEvent) -> None:
        if event.kind == "exit":
            self._write_all(self.flows.on_exit(event.tgid, event.ts_mono_ns))
            self.writer.process_exited(event.tgid)
        elif event.kind == "hold":
            self._on_hold(event.tgid)  # the kernel stopped it: probe it, then resume it
        else:
            self._on_exec(event.tgid)

    def _write_all(self, records: list[Record]) -> None:
        if records:
            self.writer.write_many(records)
