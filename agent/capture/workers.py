"""Worker processes: the capture pipeline on more than one core (`--workers N`).

One core runs out first in Python: decoding, flows, HTTP parsing and JSON lines
cost tens of µs per event.  With workers, the drain loop only reads the ring and
sends each record, as bytes, to the worker of its process (agent/capture/shards.py);
each worker runs the whole pipeline of agent/capture/pipeline.py for its share and
writes to outputs of its own, opened in the worker.  The kernel, the probes and
the attaching stay in the one agent process.

Workers are forked once probes are attached and the connections that predate the
agent are adopted (both before any thread of the session starts), so each starts
with the flow table and the kernel map state as they are then.  A worker ignores
SIGINT/SIGTERM: the agent stops it by closing its pipe, after the last drain, and
waits for its final counters.  A worker that dies is logged; the events sent to it
from then on are counted as lost (`worker_lost_events`), never dropped silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from agent.capture.housekeeping import Housekeeping
from agent.capture.pipeline import EventPipeline
from agent.capture.shards import frame_batch

log = logging.getLogger(__name__)

# How often a worker sends its counters (the stats record's and /metrics' source).
REPORT_INTERVAL_S = 1.0
# How long the agent waits at exit for a worker to write what it holds.
FINISH_TIMEOUT_S = 60.0
# A worker's pipe holds this much before the drain loop waits for the worker (the
# kernel's default 64 KiB would make it wait at every batch of 4 KiB calls).
PIPE_BYTES = 1 << 20
_FRAME_HEADER = struct.Struct("<Q")
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class PipelineWorker:
    """What runs inside one worker process: the pipeline over its frames."""

    def __init__(self, pipeline: EventPipeline, housekeeping: Housekeeping) -> None:
        self.pipeline = pipeline
        self.housekeeping = housekeeping

    def handle_frame(self, frame: bytearray) -> None:
        self.pipeline.handle_batch(frame_batch(frame))

    def tick(self) -> None:
        """Between frames: release stale partial calls, sweep now and then."""
        self.housekeeping.tick()

    def summary(self) -> dict[str, int]:
        return self.pipeline.summary()

    def finish(self) -> None:
        """The agent is stopping: write out everything held, close the outputs."""
        self.pipeline.flush_calls()
        self.pipeline.writer.close()


class FrameWriter:
    """The agent's end of a worker's pipe: a frame is its length, then its bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep 64 KiB
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def send(self, data: Any, runs: list[int]) -> None:
        """The runs (start, end, ...) of `data` as one frame, written straight from
        `data` (the ring) to the pipe."""
        view = memoryview(data)
        try:
            parts = [view[runs[i] : runs[i + 1]] for i in range(0, len(runs), 2)]
            size = sum(runs[i + 1] - runs[i] for i in range(0, len(runs), 2))
            _write_all(self.fd, [_FRAME_HEADER.pack(size), *parts])
            for part in parts:
                part.release()
        finally:
            view.release()

    def close(self) -> None:
        os.close(self.fd)


class FrameReader:
    """A worker's end of its pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def poll(self, timeout_s: float) -> bool:
        """Whether a frame (or the pipe's end) is there to read."""
        return bool(self._poll.poll(int(timeout_s * 1000)))

    def recv(self) -> bytearray | None:
        """The next frame; None once the agent closed the pipe."""
        header = _read_exact(self.fd, _FRAME_HEADER.size)
        if header is None:
            return None
        (size,) = _FRAME_HEADER.unpack(header)
        frame = _read_exact(self.fd, size)
        if frame is None:
            raise EOFError(f"the pipe ended inside a frame of {size} bytes")
        return frame


def _write_all(fd: int, parts: list[Any]) -> None:
    while parts:
        chunk = parts[:_IOV_MAX]
        written = os.writev(fd, chunk)
        total = sum(len(p) for p in chunk)
        if written == total:
            del parts[: len(chunk)]
            continue
        # A partial write (a signal came in the middle): go on from where it stopped.
        rest: list[Any] = []
        for i, part in enumerate(chunk):
            if written >= len(part):
                written -= len(part)
                continue
            rest = [memoryview(part)[written:], *chunk[i + 1 :]]
            break
        parts[: len(chunk)] = rest


def _read_exact(fd: int, size: int) -> bytearray | None:
    """`size` bytes from `fd`; None if it ends before the first byte."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            if got == 0:
                return None
            raise EOFError(f"the pipe ended after {got} of {size} bytes")
        got += n
    view.release()
    return buf


class WorkerPool:
    def __init__(self, count: int, poll_s: float) -> None:
        self.count = count
        self._poll_s = poll_s
        self._frames: list[FrameWriter | None] = []
        self._reports: list[Connection | None] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._summaries: list[dict[str, int]] = []
        self.lost_events = 0  # sent to a worker that had died
        self.failures = 0  # workers that died or did not finish

    def start(self, make_body: Callable[[int], PipelineWorker]) -> None:
        """Fork `count` workers; `make_body(i)` runs in worker i, after the fork."""
        context = multiprocessing.get_context("fork")
        for index in range(self.count):
            frames_in, frames_out = os.pipe()
            reports_in, reports_out = context.Pipe(duplex=False)
            # The worker must not hold the write ends of its own pipe or of its
            # siblings' (it would never see its pipe close), nor the agent's read ends.
            fds = [frames_out, *(w.fd for w in self._frames if w is not None)]
            conns = [reports_in, *(c for c in self._reports if c is not None)]
            process = context.Process(
                target=_worker_main,
                args=(index, frames_in, reports_out, fds, conns, make_body, self._poll_s),
                name=f"tlscap-worker-{index}",
                daemon=True,
            )
            process.start()
            os.close(frames_in)
            reports_out.close()
            self._frames.append(FrameWriter(frames_out))
            self._reports.append(reports_in)
            self._processes.append(process)
            self._summaries.append({})
        log.info("capture pipeline running in %d worker processes", self.count)

    def send(self, data: Any, runs: list[list[int]], events: list[int]) -> None:
        """Worker i's runs of `data` (ShardRouter.split) to worker i, `events[i]`
        records in them.  Blocks while a worker's pipe is full: the ring then fills,
        and the kernel sheds new connections or counts its loss."""
        for index, worker_runs in enumerate(runs):
            if not worker_runs:
                continue
            writer = self._frames[index]
            if writer is None:
                self.lost_events += events[index]
                continue
            try:
                writer.send(data, worker_runs)
            except OSError as exc:  # BrokenPipeError: the worker is gone
                self._lose(index, f"cannot send to it: {exc}")
                self.lost_events += events[index]

    def collect(self) -> None:
        """Take the counters workers have sent (never waits)."""
        for index, conn in enumerate(self._reports):
            if conn is None:
                continue
            try:
                while conn.poll(0):
                    self._summaries[index] = conn.recv()
            except (EOFError, OSError):
                self._reports[index] = None
                if self._frames[index] is not None:
                    self._lose(index, "it exited")

    def summary(self) -> dict[str, int]:
        """Every worker's last counters, added up, and the pool's own."""
        total: dict[str, int] = {}
        for summary in self._summaries:
            for key, value in summary.items():
                total[key] = total.get(key, 0) + value
        total["workers"] = self.count
        total["worker_failures"] = self.failures
        total["worker_lost_events"] = self.lost_events
        return total

    def finish(self) -> None:
        """Close every worker's pipe and wait for its final counters."""
        for index, writer in enumerate(self._frames):
            if writer is not None:
                writer.close()
                self._frames[index] = None
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        for index, process in enumerate(self._processes):
            conn = self._reports[index]
            while conn is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not conn.poll(left):
                    log.error("worker %d did not finish in %.0f s", index, FINISH_TIMEOUT_S)
                    self.failures += 1
                    process.kill()
                    break
                try:
                    self._summaries[index] = conn.recv()
                except (EOFError, OSError):
                    break  # its last report came before
            process.join(timeout=max(deadline - time.monotonic(), 1.0))
            if process.exitcode not in (0, None):
                log.error("worker %d exited with status %s", index, process.exitcode)
                self.failures += 1
            if conn is not None:
                conn.close()
            self._reports[index] = None

    def _lose(self, index: int, why: str) -> None:
        log.error("capture worker %d is gone (%s): its events are counted as lost", index, why)
        self.failures += 1
        writer = self._frames[index]
        self._frames[index] = None
        if writer is not None:
            writer.close()


def _worker_main(
    index: int,
    frames_fd: int,
    reports: Connection,
    inherited_fds: list[int],
    inherited_conns: list[Connection],
    make_body: Callable[[int], PipelineWorker],
    poll_s: float,
) -> None:
    # The terminal's SIGINT reaches the whole process group; the agent decides when
    # a worker stops (its pipe closes), after the last events reached it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for fd in inherited_fds:
        os.close(fd)
    for conn in inherited_conns:
        conn.close()
    frames = FrameReader(frames_fd)
    # A report is sent only when the pipe has room for it: the agent may be blocked
    # writing to this worker's full frame pipe, and a worker blocked on its report
    # pipe in turn would never read that pipe again.  Only the latest report counts.
    with contextlib.suppress(OSError):
        fcntl.fcntl(reports.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    room = select.poll()
    room.register(reports.fileno(), select.POLLOUT)
    body = make_body(index)
    next_report = time.monotonic() + REPORT_INTERVAL_S
    while True:
        if frames.poll(poll_s):
            frame = frames.recv()
            if frame is None:
                break
            body.handle_frame(frame)
        body.tick()
        now = time.monotonic()
        if now >= next_report:
            next_report = now + REPORT_INTERVAL_S
            if room.poll(0):
                reports.send(body.summary())
    body.finish()
    reports.send(body.summary())
    reports.close()
