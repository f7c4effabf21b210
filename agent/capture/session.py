"""A capture run: load probes, attach to targets, drain events into sinks.

The loop is deliberately plain: drain the ring (a few ms), attach to any new
targets that exec/mmap events pointed at, release stale partial calls, repeat.
All decisions about bytes live in the sans-I/O pieces it wires together
(decode -> CallAssembler -> FlowTable -> Records).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.events.calls import CallAssembler, TlsCall
from agent.events.decode import DataChunk, DecodeError, ProcessEvent, SocketClosed, decode_event
from agent.flows.resolve import SocketResolver
from agent.flows.table import FlowTable
from agent.health.liveness import Liveness
from agent.k8s.attribution import Attribution
from agent.l7.stage import L7Stage
from agent.probes.bpf_program import BpfProgram, ProbeSettings
from agent.probes.go_binary import GoBinaryError, GoBinaryUnsupported, analyze_go_tls
from agent.probes.gotls import attach_gotls
from agent.probes.library_probes import attach_library
from agent.probes.targets import TargetScanner, TlsLibrary, list_pids
from agent.records.record import Record
from agent.records.writer import RecordWriter, new_agent_id
from agent.sinks.base import Sink

log = logging.getLogger(__name__)

# A partial call whose remaining chunks have not come after this long never
# will (the kernel stopped sending it when the ring was full).
STALE_CALL_NS = 500_000_000


@dataclass
class CaptureOptions:
    pids: list[int] = field(default_factory=list)
    comms: list[str] = field(default_factory=list)
    max_capture: int = 1 << 20
    ringbuf_bytes: int = 64 << 20
    duration: float | None = None
    ready_file: Path | None = None
    poll_ms: int = 5
    node: str = field(default_factory=socket.gethostname)
    # One id per agent run: sequence numbers restart with each run, so the
    # (agent_id, seq) pair a collector de-duplicates on must change too.
    agent_id: str = field(default_factory=new_agent_id)

    @property
    def filtered(self) -> bool:
        return bool(self.pids or self.comms)

    def probe_settings(self) -> ProbeSettings:
        """What the BPF program is compiled with, for this run."""
        return ProbeSettings(
            self_tgid=os.getpid(),
            filtered=self.filtered,
            max_capture=self.max_capture,
            ringbuf_bytes=self.ringbuf_bytes,
        )


def mono_to_wall_clock() -> Callable[[int], int]:
    """Kernel timestamps are CLOCK_MONOTONIC; records carry wall-clock ns."""
    offset = time.time_ns() - time.monotonic_ns()
    return lambda mono_ns: mono_ns + offset


def pids_with_comm(comms: Iterable[str], proc_root: str = "/proc") -> list[int]:
    wanted = {c[:15] for c in comms}  # the kernel keeps 15 characters of a comm
    found = []
    for pid in list_pids(proc_root):
        try:
            with open(f"{proc_root}/{pid}/comm") as f:
                if f.read().strip() in wanted:
                    found.append(pid)
        except OSError:
            continue  # exited while we looked
    return found


@dataclass
class AgentStats:
    events: int = 0
    decode_errors: int = 0
    targets_attached: int = 0
    attach_failures: int = 0
    go_binaries_refused: int = 0  # Go programs we cannot probe safely (old ABI, not amd64)


class CaptureSession:
    def __init__(
        self,
        options: CaptureOptions,
        sinks: list[Sink],
        *,
        program: BpfProgram | None = None,
        scanner: TargetScanner | None = None,
        resolver: SocketResolver | None = None,
        attribution: Attribution | None = None,
        l7: L7Stage | None = None,
    ) -> None:
        self.options = options
        self.sinks = sinks
        self._out = RecordWriter(sinks, options.agent_id, options.node, attribution, l7)
        self._program = program
        self._scanner = scanner or TargetScanner(exclude_pids={os.getpid()})
        self._wall = mono_to_wall_clock()
        self._calls = CallAssembler()
        self._resolver = resolver or SocketResolver()
        self._flows = FlowTable(self._resolver, self._wall)
        self._rescan: set[int] = set()
        self.stats = AgentStats()
        self.stop_event = threading.Event()
        self.failure: Exception | None = None
        self.liveness = Liveness()

    # -- setup --------------------------------------------------------------

    def start(self) -> None:
        opts = self.options
        if self._program is None:
            self._program = BpfProgram(opts.probe_settings())
        program = self._program
        initial_pids: list[int] | None = None
        if opts.filtered:
            initial_pids = sorted(set(opts.pids) | set(pids_with_comm(opts.comms)))
            program.allow_comms(opts.comms)
            program.allow_tgids(initial_pids)
        program.open_ring(self._on_event)

        libraries = self._scanner.system_libraries()
        libraries += self._scanner.scan_all(initial_pids)
        for lib in libraries:
            self._attach(lib)
        self._adopt_existing_connections(initial_pids)
        log.info("attached to %d file(s)", self.stats.targets_attached)
        self.liveness.mark_ready()
        if opts.ready_file:
            opts.ready_file.write_text(f"{os.getpid()}\n")

    def _adopt_existing_connections(self, pids: list[int] | None) -> None:
        own = os.getpid()
        for pid in list_pids() if pids is None else pids:
            if pid == own:
                continue
            for fd, info in self._resolver.open_sockets(pid).items():
                self._flows.adopt_existing_socket(pid, fd, info)
        self._push_kernel_registrations()

    def _attach(self, lib: TlsLibrary) -> None:
        assert self._program is not None
        if lib.kind == "go":
            attached = self._attach_go(lib)
            if attached is None:
                return  # not a failure: a Go program without crypto/tls, or refused (logged)
        else:
            attached = attach_library(self._program, lib)
        if attached:
            self.stats.targets_attached += 1
            log.info("probing %s (%s: %s)", lib.path, lib.kind, ", ".join(attached))
        else:
            self.stats.attach_failures += 1

    def _attach_go(self, lib: TlsLibrary) -> list[str] | None:
        assert self._program is not None
        try:
            target = analyze_go_tls(lib.host_path)
        except GoBinaryError as exc:
            if isinstance(exc, GoBinaryUnsupported):
                self.stats.go_binaries_refused += 1
                log.warning("%s: not probed: %s", lib.path, exc)
            else:
                log.debug("%s: not probed: %s", lib.path, exc)
            return None
        log.debug(
            "%s: Go %s, functions from %s, struct offsets from %s",
            lib.path,
            target.version.raw,
            target.functions_from,
            target.offsets.source,
        )
        return attach_gotls(self._program, lib.host_path, target)

    # -- the loop -----------------------------------------------------------

    def run(self) -> None:
        """Capture until stop_event is set or the duration has passed."""
        assert self._program is not None
        deadline = None
        if self.options.duration is not None:
            deadline = time.monotonic() + self.options.duration
        while not self.stop_event.is_set():
            self.liveness.beat()
            self._program.drain(self.options.poll_ms)
            self._attach_new_targets()
            self._emit(self._calls.flush(older_than_mono_ns=time.monotonic_ns() - STALE_CALL_NS))
            if deadline is not None and time.monotonic() >= deadline:
                break
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Drain what is left, write the stats record, detach everything."""
        program = self._program
        try:
            if program is not None:
                program.drain(0)
                self._emit(self._calls.flush())
                self._write(Record(type="stats", ts_ns=time.time_ns(), stats=self.summary()))
        except BrokenPipeError:
            pass  # the reader is gone: nobody is left to tell
        finally:
            self._out.close()
            if program is not None:
                program.close()

    def summary(self) -> dict[str, int]:
        kernel = self._program.counters() if self._program else {}
        out = {
            "events": self.stats.events,
            "records": self._out.records,
            "bytes": self._out.data_bytes,
            # Everything the kernel could not hand us, in events: the
            # contract's one number for "did we lose anything".
            "lost": kernel.get("lost_events", 0) + kernel.get("read_errors", 0),
            "decode_errors": self.stats.decode_errors,
            "incomplete_calls": self._calls.incomplete_calls,
            "targets_attached": self.stats.targets_attached,
            "attach_failures": self.stats.attach_failures,
            "go_binaries_refused": self.stats.go_binaries_refused,
        }
        out.update({f"kernel_{k}": v for k, v in kernel.items()})
        out.update({f"flow_{k}": v for k, v in self._flows.stats.as_dict().items()})
        out.update(self._out.sink_stats())
        return out

    # -- events -------------------------------------------------------------

    def _on_event(self, raw: bytes) -> None:
        # Called from bcc through ctypes, which would print and swallow an
        # exception: stop the run instead, and let run() raise it.
        try:
            self._handle_event(raw)
        except Exception as exc:
            if self.failure is None:
                self.failure = exc
            self.stop_event.set()

    def _handle_event(self, raw: bytes) -> None:
        self.stats.events += 1
        try:
            event = decode_event(raw)
        except DecodeError as exc:
            self.stats.decode_errors += 1
            log.warning("dropping undecodable event: %s", exc)
            return
        if isinstance(event, DataChunk):
            self._emit(self._calls.feed(event))
        elif isinstance(event, SocketClosed):
            self._emit_records(self._flows.on_close(event))
        elif isinstance(event, ProcessEvent):
            if event.kind == "exit":
                self._emit_records(self._flows.on_exit(event.tgid, event.ts_mono_ns))
                self._out.process_exited(event.tgid)
            else:
                self._rescan.add(event.tgid)

    def _emit(self, calls: list[TlsCall]) -> None:
        for call in calls:
            self._emit_records(self._flows.on_call(call))

    def _emit_records(self, records: list[Record]) -> None:
        for record in records:
            self._write(record)
        self._push_kernel_registrations()

    def _push_kernel_registrations(self) -> None:
        """Carry out what the flow table asked of the kernel."""
        registrations = self._flows.kernel_registrations
        if registrations and self._program is not None:
            for reg in registrations:
                self._program.register_socket(reg)
            registrations.clear()

    def _write(self, record: Record) -> None:
        self._out.write(record)

    def _attach_new_targets(self) -> None:
        if not self._rescan:
            return
        pids, self._rescan = self._rescan, set()
        for pid in pids:
            for lib in self._scanner.scan_pid(pid):
                self._attach(lib)
