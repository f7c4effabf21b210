"""The capture pipeline alone: raw ring bytes in, records out, no kernel.

    .venv/bin/python bench/pipeline.py [--events 100000] [--size 4096] [--rounds 5] [--json]

Builds ring-buffer bytes exactly as the kernel lays them out (8-byte record
headers, 8-byte alignment, data events made from agent/events/layout.py's ctypes
mirrors), then times the agent's own path over them on one core:
take_records -> EventPipeline (decode, calls, flows) -> RecordWriter -> sink.

Workloads, each in every mode, round-robin so noise hits all alike:
- raw:   --size byte payloads on 64 connections (what a busy TLS download looks like)
- http1: keep-alive HTTP/1.1 request (~200 B) and response (--size bytes) pairs on 64
         connections, each side as a server would see it; with L7 on, each pair is
         one exchange

Modes: `none` (records built, no sink), `jsonl` (JSON lines to a file, L7 off),
`jsonl_l7` (JSON lines, L7 parsing and redaction on: the default `tlscap run`).
Reported: events/s (ring records per second of CPU time) and, for http1,
exchanges/s.

`--workers N` runs the same path as `tlscap run --workers N`: this process reads the
ring and splits it by process (agent/capture/shards.py), N forked workers each run
the pipeline into a file of their own.  Reported then: events/s of wall-clock time
(the throughput several cores give) and CPU µs per event over all the processes.
The synthetic traffic comes from `--processes P` processes (connection i belongs to
process i mod P; default 1, as a single busy server).

`--instructions` counts instead of timing: each workload and mode runs under
valgrind's callgrind, and the CPU instructions of the run (less those of building
its input) are divided by its events.  The count does not move with the machine's
load, so a 5 % change between two checkouts shows, where timings on these shared
VMs vary by 25 %.  Slow (~50x): use `--events 5000`.  Another checkout's code:
PYTHONPATH=/path/to/it (the path in use is printed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # also puts the repository on sys.path

import agent
from agent.capture.pipeline import EventPipeline
from agent.events import layout
from agent.events.ring import RingBatch, take_records
from agent.flows.table import FlowTable
from agent.l7.connection import L7Options
from agent.l7.stage import L7Stage
from agent.records.writer import RecordWriter
from agent.sinks.jsonl import JsonlSink
from tests.unit.eventbuild import conn_v4, data_record

CONNECTIONS = 64
MODES = ("none", "jsonl", "jsonl_l7")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per event under callgrind instead of timing",
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of modes")
    p.add_argument("--workloads", default="raw,http1", help="comma-separated: raw,http1")
    p.add_argument("--workers", type=int, default=0, help="0: in this process (default)")
    p.add_argument("--processes", type=int, default=1, help="processes the traffic is from")
    # One run of one workload and mode, inside valgrind ("setup": the input alone).
    p.add_argument("--child", nargs=3, metavar=("WORKLOAD", "MODE", "WHAT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ring_bytes(events: list[bytes]) -> tuple[bytes, int, int]:
    """The events as one ring's data area (large enough to hold them all), its
    size and the producer position after the last event."""
    out = bytearray()
    for raw in events:
        out += len(raw).to_bytes(4, "little") + bytes(4) + raw
        out += bytes(-len(out) % 8)
    size = 1 << max(12, (len(out) - 1).bit_length())
    return bytes(out) + bytes(size - len(out)), size, len(out)


def _socket(i: int) -> dict:
    return conn_v4(("127.0.0.1", 443), ("127.0.0.1", 40000 + i), gen=1000 + i, role=2)


def raw_events(n: int, size: int, processes: int = 1) -> list[bytes]:
    # Random bytes, but the same ones every run: the L7 stage's masker looks for header
    # lines in a connection of unknown protocol, and its work (hence --instructions)
    # follows what the bytes happen to hold.
    payload = random.Random(size).randbytes(size)
    offsets = [0] * CONNECTIONS
    out = []
    for i in range(n):
        c = i % CONNECTIONS
        out.append(
            data_record(payload, tgid=100 + c % processes, tid=100, fd=10 + c, ts_ns=1_000_000 + i,
                        ssl=0x1000 + c, offset=offsets[c], socket=_socket(c), comm=b"nginx")
        )  # fmt: skip
        offsets[c] += size
    return out


def http1_events(n: int, size: int, processes: int = 1) -> list[bytes]:
    """n events: n/2 request/response pairs, seen from the server."""
    body = b"x" * size
    response = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
    response += b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % size + body
    request = (
        b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nUser-Agent: wrk\r\n"
        b"Authorization: Bearer secret-token-abcdef\r\nAccept: */*\r\n\r\n"
    )
    offsets = [[0, 0] for _ in range(CONNECTIONS)]
    out = []
    for i in range(n // 2):
        c = i % CONNECTIONS
        for direction, data in ((layout.DIR_INGRESS, request), (layout.DIR_EGRESS, response)):
            out.append(
                data_record(data, tgid=100 + c % processes, tid=100, fd=10 + c,
                            ts_ns=1_000_000 + 2 * i + direction, ssl=0x1000 + c,
                            offset=offsets[c][direction], direction=direction,
                            socket=_socket(c), comm=b"nginx")
            )  # fmt: skip
            offsets[c][direction] += len(data)
    return out


def bench_pipeline(mode: str, out_path: Path) -> tuple[EventPipeline, L7Stage | None]:
    sinks = []
    if mode != "none":
        sinks.append(JsonlSink.open(str(out_path)))
    l7 = L7Stage(L7Options()) if mode == "jsonl_l7" else None
    writer = RecordWriter(sinks, "bench-agent", "bench-node", None, l7)
    flows = FlowTable(resolver=_NoProc(), mono_to_wall=_wall_clock())
    pipeline = EventPipeline(writer, flows, on_exec=lambda pid: None, register_socket=print)
    return pipeline, l7


def ring_batches(ring: bytes, size: int, producer: int) -> Iterator[RingBatch]:
    """The ring's records a drain at a time, as the agent takes them (`ring` is
    bytes, as the agent reads its mmap: a slice is a payload copy)."""
    pos = 0
    while pos < producer:
        pos_next, batch = take_records(ring, size, pos, producer, 4 << 20)
        if pos_next == pos:
            break
        yield batch
        pos = pos_next


def settle_heap() -> None:
    """The collector as the agent sets it once started (agent/capture/heap.py), so
    the input's objects are out of its way too; an older checkout (PYTHONPATH=...)
    without that module gets them frozen the way this bench always did."""
    try:
        from agent.capture.heap import settle_after_startup
    except ImportError:
        gc.collect()
        gc.freeze()
    else:
        settle_after_startup()


def run_once(ring: bytes, size: int, producer: int, mode: str, out_path: Path) -> dict:
    pipeline, l7 = bench_pipeline(mode, out_path)
    writer = pipeline.writer
    start = time.process_time()
    events = 0
    for batch in ring_batches(ring, size, producer):
        pipeline.handle_batch(batch)
        events += len(batch)
    writer.close()
    cpu = time.process_time() - start
    stats = l7.stats() if l7 else {}
    return {"events": events, "cpu_s": cpu, "exchanges": stats.get("l7_exchanges", 0)}


def run_workers(
    ring: bytes, size: int, producer: int, mode: str, out_dir: Path, workers: int
) -> dict:
    """The ring read here and split by process, the pipeline in `workers` processes."""
    # Here, not at the top: older checkouts (PYTHONPATH=...) have no workers.
    from agent.capture.housekeeping import Housekeeping
    from agent.capture.shards import ShardRouter
    from agent.capture.workers import PipelineWorker, WorkerPool

    def body(index: int) -> PipelineWorker:
        pipeline, _ = bench_pipeline(mode, out_dir / f"worker{index}-{mode}.jsonl")
        return PipelineWorker(pipeline, Housekeeping(pipeline))

    router = ShardRouter(workers)
    pool = WorkerPool(workers, poll_s=0.005)
    pool.start(body)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    events = 0
    for batch in ring_batches(ring, size, producer):
        runs, counts, _ = router.split(batch)
        pool.send(batch.data, runs, counts)
        events += len(batch)
    pool.finish()  # waits for every worker to finish its share
    wall = time.perf_counter() - wall0
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu0
    cpu += (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    summary = pool.summary()
    if summary["events"] != events or summary["worker_failures"]:
        raise bl.BenchError(f"workers handled {summary['events']} of {events} events: {summary}")
    return {"events": events, "cpu_s": cpu, "wall_s": wall,
            "exchanges": summary.get("l7_exchanges", 0)}  # fmt: skip


def _wall_clock():
    """The agent's kind of clock (a WallClock, which the flow table's C step adds
    itself), at offset 0; a plain function in an older checkout (PYTHONPATH=...)."""
    try:
        from agent.flows.connection import WallClock
    except ImportError:
        return lambda ns: ns
    return WallClock(0)


class _NoProc:
    """The synthetic sockets are fully known to the 'kernel': /proc is never asked."""

    def resolve(self, pid: int, fd: int) -> None:
        raise AssertionError("the pipeline bench should never need /proc")


def workload_events(name: str, args: argparse.Namespace) -> list[bytes]:
    if name == "raw":
        return raw_events(args.events, args.size, args.processes)
    return http1_events(args.events, min(args.size, 1500), args.processes)


_COLLECTED = re.compile(rb"Collected : (\d+)")


def instructions(args: argparse.Namespace, workload: str, mode: str, what: str) -> int:
    """Instructions callgrind counts for one child run."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           __file__, "--events", str(args.events), "--size", str(args.size),
           "--child", workload, mode, what]  # fmt: skip
    # A fixed hash seed: dict and set layouts, hence the instructions, repeat.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, capture_output=True, check=False, env=env)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise bl.BenchError(f"callgrind run failed ({done.returncode}): {done.stderr[-800:]!r}")
    return int(found.group(1))


def main_instructions(args: argparse.Namespace, workloads: list[str], modes: list[str]) -> int:
    if shutil.which("valgrind") is None:
        raise bl.BenchError("--instructions needs valgrind (`make setup` installs it)")
    print(f"agent package: {Path(agent.__file__).parent}")
    print(f"pipeline under callgrind, {args.events} events of {args.size} B")
    print(f"{'workload':8} {'mode':9} {'instructions/event':>19}")
    for workload in workloads:
        setup = instructions(args, workload, "none", "setup")
        for mode in modes:
            per_event = (instructions(args, workload, mode, "run") - setup) / args.events
            print(f"{workload:8} {mode:9} {per_event:19.0f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = bl.comma_list(args.modes)
    names = bl.comma_list(args.workloads)
    if args.child:
        workload, mode, what = args.child
        ring, size, producer = ring_bytes(workload_events(workload, args))
        # The input's objects out of the collector's way: a full collection over
        # them, landing in one run and not in the other, would swamp the count.
        settle_heap()
        if what == "run":
            with bl.scratch_dir() as tmp:
                run_once(ring, size, producer, mode, tmp / "out.jsonl")
        return 0
    if args.instructions:
        return main_instructions(args, names, modes)
    rings = {name: ring_bytes(workload_events(name, args)) for name in names}
    settle_heap()
    samples: dict[tuple[str, str], list[dict]] = {}
    with bl.scratch_dir() as tmp:
        for rnd in range(args.rounds):
            order = modes[rnd % len(modes) :] + modes[: rnd % len(modes)]
            for workload, (ring, size, producer) in rings.items():
                for mode in order:
                    if args.workers:
                        r = run_workers(ring, size, producer, mode, tmp, args.workers)
                    else:
                        out = tmp / f"{workload}-{mode}.jsonl"
                        r = run_once(ring, size, producer, mode, out)
                    samples.setdefault((workload, mode), []).append(r)
    rows = []
    # In one process, throughput is events per second of its CPU; with workers, per
    # second of wall-clock time (what the cores together give), and the CPU cost per
    # event is over every process.
    per = "wall_s" if args.workers else "cpu_s"
    for (workload, mode), rs in samples.items():
        ev_rate = bl.median([r["events"] / r[per] for r in rs])
        ex_rate = bl.median([r["exchanges"] / r[per] for r in rs])
        cpu_us = bl.median([r["cpu_s"] / r["events"] * 1e6 for r in rs])
        rows.append({"workload": workload, "mode": mode, "events_per_s": ev_rate,
                     "us_per_event": cpu_us, "exchanges_per_s": ex_rate})  # fmt: skip
    if args.json:
        print(json.dumps({"rows": rows, "machine": bl.machine_info()}, indent=2))
        return 0
    how = f"{args.workers} workers, events/s of wall-clock time" if args.workers else "1 process"
    print(f"pipeline, {args.events} events of {args.size} B from {args.processes} process(es),"
          f" {how}, {args.rounds} rounds (median)")  # fmt: skip
    print(f"{'workload':8} {'mode':9} {'events/s':>10} {'CPU us/ev':>9} {'exchanges/s':>12}")
    for r in rows:
        print(
            f"{r['workload']:8} {r['mode']:9} {r['events_per_s']:10.0f} "
            f"{r['us_per_event']:9.2f} {r['exchanges_per_s']:12.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
