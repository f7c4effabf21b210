"""A capture run: load probes, attach to targets, drain events into sinks.

The loop is deliberately plain: wait a few ms, drain the ring a batch at a
time, release stale partial calls, repeat.  Attaching to the new targets that
exec/mmap events point at (ELF and Go analysis, bcc attach calls: tens of ms)
happens on a thread of its own, so the drain loop never waits for it.  All
decisions about bytes live in the sans-I/O pieces it wires together
(EventDecoder -> CallAssembler -> FlowTable -> Records).

With --workers N, those pieces run in N forked processes instead
(agent/capture/workers.py): the loop here only splits each batch by process and
hands the workers their share, and attaching stays here.
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

from agent.capture import heap
from agent.capture.attacher import TargetAttacher
from agent.capture.housekeeping import Housekeeping
from agent.capture.pipeline import EventPipeline
from agent.capture.shards import ShardRouter
from agent.capture.workers import PipelineWorker, WorkerPool
from agent.events.ring import RingBatch
from agent.flows.connection import KernelRegistration, WallClock
from agent.flows.resolve import SocketResolver
from agent.flows.table import FlowTable
from agent.health.liveness import Liveness
from agent.health.metrics import shed_summary
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


@dataclass
class CaptureOptions:
    pids: list[int] = field(default_factory=list)
    comms: list[str] = field(default_factory=list)
    max_capture: int = 1 << 20
    ringbuf_bytes: int = 64 << 20
    hold_new_libraries: bool = False  # bpf/process.c, agent/capture/attacher.py
    shed_fraction: float = 0.5  # ring fill above which new connections are shed
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
            hold_new_libraries=self.hold_new_libraries,
            shed_fraction=self.shed_fraction,
        )


def mono_to_wall_clock() -> WallClock:
    """Kernel timestamps are CLOCK_MONOTONIC; records carry wall-clock ns."""
    return WallClock(time.time_ns() - time.monotonic_ns())


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
class WorkerSetup:
    """--workers N: the pipeline runs in N processes (agent/capture/workers.py)."""

    count: int
    # Called in worker i after the fork: the outputs it writes to, its attribution
    # and its L7 stage (none of them is shared between processes).
    open_outputs: Callable[[int], tuple[list[Sink], Attribution | None, L7Stage | None]]
    # Called here once the workers are forked: the outputs of the stats record (a
    # gRPC channel must not exist before a fork).
    open_agent_outputs: Callable[[], list[Sink]]


@dataclass
class AgentStats:
    targets_attached: int = 0
    attach_failures: int = 0
    go_binaries_refused: int = 0  # Go programs we cannot probe safely (old ABI, not amd64)
    rescan_attached: int = 0  # files found by the periodic rescan, not by an event


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
        workers: WorkerSetup | None = None,
    ) -> None:
        """With `workers`, `sinks` should be empty and `attribution`/`l7` None: the
        workers write to outputs of their own, and this process writes the stats
        record to those of `workers.open_agent_outputs`."""
        self.options = options
        self.sinks = sinks
        # With workers, each worker numbers its records in a slot of its own, and
        # this writer (the stats record) in the last.
        stride = workers.count + 1 if workers is not None else 1
        self._out = RecordWriter(
            sinks, options.agent_id, options.node, attribution, l7,
            seq_slot=stride - 1, seq_stride=stride,
        )  # fmt: skip
        self._workers = workers
        self._pool: WorkerPool | None = None
        self._router: ShardRouter | None = None
        self._routed_events = 0
        self._program = program
        self._scanner = scanner or TargetScanner(exclude_pids={os.getpid()})
        self._wall = mono_to_wall_clock()
        self._resolver = resolver or SocketResolver()
        self._flows = FlowTable(self._resolver, self._wall)
        self._attacher = TargetAttacher(self._attach_pid, rescan_all=self._attach_all_new)
        self._pipeline = EventPipeline(
            self._out,
            self._flows,
            on_exec=self._attacher.request,
            on_hold=self._attacher.hold,
            register_socket=self._register_socket,
        )
        self.stats = AgentStats()
        self.stop_event = threading.Event()
        self.liveness = Liveness()

    # -- setup --------------------------------------------------------------

    def start(self) -> None:
        opts = self.options
        if self._program is None:
            self._program = BpfProgram(opts.probe_settings())
        program = self._program
        initial_pids = self._filtered_pids()
        if initial_pids is not None:
            program.allow_comms(opts.comms)
            program.allow_tgids(initial_pids)
        program.open_ring()

        libraries = self._scanner.system_libraries()
        libraries += self._scanner.scan_all(initial_pids)
        for lib in libraries:
            self._attach(lib)
        adopted = self._adopt_existing_connections(initial_pids)
        heap.settle_after_startup()  # before the fork: the workers inherit it
        if self._workers is not None:
            # Before any thread of ours starts: a fork copies only the calling thread.
            self._start_workers(self._workers, adopted)
        self._attacher.start()
        log.info("attached to %d file(s)", self.stats.targets_attached)
        self.liveness.mark_ready()
        if opts.ready_file:
            opts.ready_file.write_text(f"{os.getpid()}\n")

    def _adopt_existing_connections(self, pids: list[int] | None) -> dict[int, int]:
        """Have the kernel know the sockets open before we started; returns how
        many each process has."""
        own = os.getpid()
        adopted: dict[int, int] = {}
        for pid in list_pids() if pids is None else pids:
            if pid == own:
                continue
            for fd, info in self._resolver.open_sockets(pid).items():
                self._flows.adopt_existing_socket(pid, fd, info)
                adopted[pid] = adopted.get(pid, 0) + 1
        self._pipeline.push_kernel_registrations()
        return adopted

    def _start_workers(self, setup: WorkerSetup, adopted: dict[int, int]) -> None:
        self._router = ShardRouter(setup.count)
        self._router.assign(adopted)  # busy servers that predate us on different workers
        self._pool = WorkerPool(setup.count, self.options.poll_ms / 1000)
        self._pool.start(self._worker)
        self.sinks += setup.open_agent_outputs()
        self._out.sinks += self.sinks

    def _worker(self, index: int) -> PipelineWorker:
        """In worker `index`, after the fork: the pipeline over its own outputs.  The
        flow table is this process's copy (the adopted sockets); the kernel maps
        are shared, so the worker registers sockets itself."""
        assert self._workers is not None
        sinks, attribution, l7 = self._workers.open_outputs(index)
        writer = RecordWriter(
            sinks, self.options.agent_id, self.options.node, attribution, l7,
            seq_slot=index, seq_stride=self._workers.count + 1,
        )  # fmt: skip
        pipeline = EventPipeline(
            writer, self._flows, on_exec=_attached_elsewhere, on_hold=_attached_elsewhere,
            register_socket=self._register_socket,
        )  # fmt: skip
        return PipelineWorker(pipeline, Housekeeping(pipeline))

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
        pool = self._pool
        handle = self._handle_batch
        keeping = Housekeeping(
            None if pool is not None else self._pipeline, on_sweep=self._attacher.rescan
        )
        while not self.stop_event.is_set():
            self.liveness.beat()
            self._program.drain(self.options.poll_ms, handle)
            keeping.tick()
            if pool is not None:
                pool.collect()
            if deadline is not None and time.monotonic() >= deadline:
                break

    def _handle_batch(self, batch: RingBatch) -> None:
        if self._pool is None:
            self._pipeline.handle_batch(batch)
            return
        assert self._router is not None
        self._routed_events += len(batch)
        runs, counts, own = self._router.split(batch)
        if own:  # exec and hold events: attaching is ours (the pipeline's on_exec/on_hold)
            self._pipeline.handle_batch(RingBatch(batch.data, own))
        self._pool.send(batch.data, runs, counts)

    def close(self) -> None:
        """Drain what is left, write the stats record, detach everything."""
        program = self._program
        try:
            self._attacher.stop()
            if program is not None:
                program.drain(0, self._handle_batch)
                if self._pool is not None:
                    self._pool.finish()  # the workers write what they hold, then report
                else:
                    self._pipeline.flush_calls()
                stats = self.summary()
                self._out.write(Record(type="stats", ts_ns=time.time_ns(), stats=stats))
                _log_summary(stats)
        except BrokenPipeError:
            pass  # the reader is gone: nobody is left to tell
        finally:
            self._out.close()
            if program is not None:
                program.close()

    def summary(self) -> dict[str, int]:
        kernel = self._program.counters() if self._program else {}
        shed = shed_summary(kernel, self._program.shed_processes() if self._program else {})
        if self._pool is None:
            out = self._pipeline.summary()
            lost_here = 0
        else:
            # The workers' last reports (a second old at most), added up.
            out = self._pool.summary()
            out["events"] = self._routed_events
            lost_here = self._pool.lost_events
        out.update(
            {
                # Everything the kernel could not hand us, in events: the
                # contract's one number for "did we lose anything".
                "lost": kernel.get("lost_events", 0) + kernel.get("read_errors", 0) + lost_here,
                "targets_attached": self.stats.targets_attached,
                "attach_failures": self.stats.attach_failures + self._attacher.failures,
                "held_processes": self._attacher.holds,
                "hold_timeouts": self._attacher.hold_timeouts,
                "go_binaries_refused": self.stats.go_binaries_refused,
                "rescan_attached": self.stats.rescan_attached,
            }
        )
        if self._program is not None:
            out["ring_peak_pending_bytes"], out["ring_bytes"] = self._program.ring_fill()
            out.update(self._program.kernel_feature_stats())
        out.update({f"kernel_{k}": v for k, v in kernel.items() if k not in shed})
        out.update(shed)
        return out

    def _register_socket(self, reg: KernelRegistration) -> None:
        if self._program is not None:
            self._program.register_socket(reg)

    def _attach_all_new(self) -> None:
        """On the attacher's thread: TLS code that appeared without an event we saw."""
        for lib in self._scanner.scan_all(self._filtered_pids()):
            self.stats.rescan_attached += 1
            self._attach(lib)

    def _filtered_pids(self) -> list[int] | None:
        """The processes --pid/--comm name right now; None: no filter, every one."""
        if not self.options.filtered:
            return None
        return sorted(set(self.options.pids) | set(pids_with_comm(self.options.comms)))

    def _attach_pid(self, pid: int) -> None:
        """On the attacher's thread: probe whatever new TLS code `pid` brought."""
        for lib in self._scanner.scan_pid(pid):
            self._attach(lib)


def _attached_elsewhere(_pid: int) -> None:
    """In a worker: exec and hold events are the agent's, which attaches (ShardRouter)."""


def _log_summary(stats: dict[str, int]) -> None:
    """One line at exit on stderr, so loss is never silent, whatever the output
    (with --output none the stats record goes nowhere)."""
    loss = stats.get("lost", 0) or stats.get("shed_connections", 0)
    log.log(
        logging.WARNING if loss else logging.INFO,
        "capture summary: %d events, %d records, lost %d events, shed %d connections",
        stats.get("events", 0),
        stats.get("records", 0),
        stats.get("lost", 0),
        stats.get("shed_connections", 0),
    )
