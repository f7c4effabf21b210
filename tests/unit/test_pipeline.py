"""EventPipeline (raw records in, Records out) and TargetAttacher, without a kernel."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable

from agent.capture.attacher import TargetAttacher
from agent.capture.pipeline import EventPipeline
from agent.events import layout
from agent.events.ring import RingBatch
from agent.flows.connection import KernelRegistration, WallClock
from agent.flows.table import FlowTable
from agent.records.record import Endpoint, Record
from agent.records.writer import RecordWriter
from tests.unit.eventbuild import call_records, close_record, conn_v4, data_record, proc_record


class ListSink:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, record: Record) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


class Facts:
    local = Endpoint("127.0.0.1", 40000)
    remote = Endpoint("127.0.0.1", 443)
    role = "client"


class OneSocket:
    def resolve(self, pid: int, fd: int) -> Facts:
        return Facts()


def make_pipeline(
    wall: Callable[[int], int] = lambda ns: ns,
) -> tuple[EventPipeline, ListSink, list[int], list[KernelRegistration]]:
    sink = ListSink()
    execs: list[int] = []
    registered: list[KernelRegistration] = []
    pipeline = EventPipeline(
        RecordWriter([sink], "agent", "node"),
        FlowTable(OneSocket(), wall),
        on_exec=execs.append,
        register_socket=registered.append,
    )
    return pipeline, sink, execs, registered


def test_batch_of_calls_becomes_open_data_close_in_order() -> None:
    pipeline, sink, _, _ = make_pipeline()
    sock = conn_v4(("127.0.0.1", 443), ("127.0.0.1", 40000), gen=5)
    big = bytes(range(256)) * 100  # 25.6 KB: two chunks
    batch = [
        data_record(b"GET / HTTP/1.1\r\n\r\n", socket=sock, ts_ns=10),
        *call_records(big, socket=sock, ts_ns=20, offset=18),
        close_record(gen=5, ts_ns=30),
    ]
    pipeline.handle_batch(RingBatch.of(batch))
    types = [r.type for r in sink.records]
    assert types == ["open", "data", "data", "close"]
    assert sink.records[2].data == big and sink.records[2].offset == 18
    assert [r.seq for r in sink.records] == [1, 2, 3, 4]
    assert pipeline.stats.events == len(batch)


def test_exec_events_go_to_the_attacher_and_bad_records_are_counted() -> None:
    pipeline, sink, execs, _ = make_pipeline()
    pipeline.handle_batch(RingBatch.of([proc_record(layout.EV_EXEC, tgid=77), b"\xff\xff", b""]))
    assert execs == [77]
    assert pipeline.stats.decode_errors == 2
    assert sink.records == []


def test_unknown_socket_is_registered_with_the_kernel_once_per_batch() -> None:
    pipeline, sink, _, registered = make_pipeline()
    pipeline.handle_batch(RingBatch.of([data_record(b"x"), data_record(b"y", offset=1)]))
    assert len(registered) == 1 and registered[0].tls_seen
    assert sink.records[1].remote == Endpoint("127.0.0.1", 443)


def test_partial_call_is_released_incomplete_by_flush() -> None:
    pipeline, sink, _, _ = make_pipeline()
    first = call_records(bytes(40000), ts_ns=5)[0]  # the rest of the call never comes
    pipeline.handle_batch(RingBatch.of([first]))
    assert [r.type for r in sink.records] == []
    pipeline.flush_calls(older_than_mono_ns=6)
    assert [r.type for r in sink.records] == ["open", "data"]
    assert sink.records[1].captured_len == layout.CHUNK_SIZE and sink.records[1].truncated
    assert pipeline.calls.incomplete_calls == 1


def test_attacher_works_off_the_callers_thread_and_survives_errors() -> None:
    seen: list[tuple[int, str]] = []
    release = threading.Event()

    def attach(pid: int) -> None:
        release.wait(5)
        seen.append((pid, threading.current_thread().name))
        if pid == 2:
            raise OSError("process exited mid-attach")

    attacher = TargetAttacher(attach)
    attacher.start()
    started = time.monotonic()
    for pid in (1, 2, 3, 3):
        attacher.request(pid)  # never waits for the attach work
    assert time.monotonic() - started < 1
    release.set()
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    attacher.stop()
    assert [pid for pid, _ in seen][:1] == [1] and sorted(p for p, _ in seen) == [1, 2, 3]
    assert all(name == "tlscap-attach" for _, name in seen)
    assert attacher.failures == 1


def test_redaction_alone_is_skipped_when_no_sink_would_see_the_bytes() -> None:
    """--l7 off --output none: nothing leaves the agent, so masking is pure cost;
    with a sink, or with parsing on (its counters are on /metrics), the stage runs."""
    from agent.l7.connection import L7Options
    from agent.l7.stage import L7Stage

    redact_only = L7Options(parse=False)
    assert RecordWriter([], "a", "n", None, L7Stage(redact_only)).l7 is None
    assert RecordWriter([ListSink()], "a", "n", None, L7Stage(redact_only)).l7 is not None
    assert RecordWriter([], "a", "n", None, L7Stage(L7Options())).l7 is not None


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, want: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _state(pid) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _state(pid) == want


def test_held_process_is_attached_first_then_resumed() -> None:
    import signal
    import subprocess

    order: list[int] = []
    gate = threading.Event()

    def attach(pid: int) -> None:
        gate.wait(5)
        order.append(pid)

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)  # what bpf/process.c does
        _wait_state(sleeper.pid, "T")
        attacher = TargetAttacher(attach, hold_max=10)
        attacher.start()
        attacher.request(111)  # picked up first, blocks on the gate
        time.sleep(0.05)
        attacher.request(222)
        attacher.hold(sleeper.pid)  # jumps the queue ahead of 222
        gate.set()
        _wait_state(sleeper.pid, "S")
        attacher.stop()
        assert order[:2] == [111, sleeper.pid] and 222 in order
        assert (attacher.holds, attacher.hold_timeouts) == (1, 0)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_hold_never_outlasts_its_bound() -> None:
    import signal
    import subprocess

    stuck = threading.Event()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        _wait_state(sleeper.pid, "T")
        attacher = TargetAttacher(lambda pid: stuck.wait(5), hold_max=0.2)
        attacher.start()
        attacher.request(1)  # the attacher is busy for seconds with another process
        time.sleep(0.05)
        attacher.hold(sleeper.pid)
        _wait_state(sleeper.pid, "S", timeout=2)
        assert attacher.hold_timeouts == 1
        stuck.set()
        attacher.stop()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_rescan_runs_on_the_attacher_thread_after_queued_pids() -> None:
    done = threading.Event()
    seen: list[object] = []
    attacher = TargetAttacher(
        lambda pid: seen.append(pid), rescan_all=lambda: (seen.append("all"), done.set())
    )
    attacher.start()
    attacher.request(5)
    attacher.rescan()
    attacher.rescan()  # one pending rescan at a time
    assert done.wait(5)
    attacher.stop()
    assert seen == [5, "all"]


def test_sweep_behind_the_ring_leaves_an_exited_process_to_its_events() -> None:
    """tests/ebpf/test_go_idle_connections.py under load: the traced process sent
    its last requests and exited while the agent was more than a sweep interval
    behind.  /proc has no fds for it any more, so a sweep then finds every idle
    connection "closed"; the events still in the ring must decide instead: the
    late request stays on its connection and the exit closes it, nothing is
    counted as recovered, and the process is not forgotten while data remains."""
    pipeline, sink, _, _ = make_pipeline()
    forgotten: list[int] = []
    pipeline.writer.process_exited = forgotten.append  # type: ignore[method-assign]
    sock = conn_v4(("127.0.0.1", 51000), gen=5)
    pipeline.handle_batch(RingBatch.of([data_record(b"GET /r/1/1", socket=sock, ts_ns=1_000)]))
    sweep = {"is_socket": lambda pid, fd: False, "idle_ns": 10_000}
    pipeline.sweep_ended(lambda pid: True, 60_000, **sweep)  # a zombie: alive, no fds
    assert [r.type for r in sink.records] == ["open", "data"]
    pipeline.handle_batch(
        RingBatch.of(
            [
                data_record(b"GET /r/1/2", socket=sock, ts_ns=40_000, offset=10),
                proc_record(layout.EV_EXIT, ts_ns=50_000),
            ]
        )
    )
    pipeline.sweep_ended(lambda pid: False, 70_000, **sweep)
    pipeline.sweep_ended(lambda pid: False, 80_000, **sweep)
    assert [r.type for r in sink.records] == ["open", "data", "data", "close"]
    assert len({r.conn_id for r in sink.records}) == 1
    assert sink.records[2].data == b"GET /r/1/2" and sink.records[2].role == "client"
    stats = pipeline.flows.stats
    assert (stats.closes_recovered, stats.exits_recovered, stats.gaps) == (0, 0, 0)
    assert forgotten == [4242]  # by its exit event, once


def test_sweep_recovers_a_lost_close_a_sweep_later_and_keeps_the_process() -> None:
    pipeline, sink, _, _ = make_pipeline()
    forgotten: list[int] = []
    pipeline.writer.process_exited = forgotten.append  # type: ignore[method-assign]
    sock = conn_v4(("127.0.0.1", 51000), gen=5)
    pipeline.handle_batch(RingBatch.of([data_record(b"x", socket=sock, ts_ns=1_000)]))
    sweep = {"is_socket": lambda pid, fd: False, "idle_ns": 10_000}
    pipeline.sweep_ended(lambda pid: True, 20_000, **sweep)
    assert [r.type for r in sink.records] == ["open", "data"]
    pipeline.sweep_ended(lambda pid: True, 30_000, **sweep)
    assert [r.type for r in sink.records] == ["open", "data", "close"]
    assert pipeline.flows.stats.closes_recovered == 1
    assert forgotten == []  # the process lives on


def mixed_traffic() -> list[bytes]:
    """Ring records that take every turn out of the run of known calls and back:
    new connections, a second socket on a reused fd, a gap, a call in chunks with
    whole calls of another thread between them, a call without an fd, a comm that
    changes, a call of generation 0, closes."""
    a = conn_v4(("10.0.0.1", 443), ("10.0.0.9", 40000), gen=5)
    b = conn_v4(("10.0.0.2", 443), ("10.0.0.9", 40001), gen=6)
    a2 = conn_v4(("10.0.0.3", 443), ("10.0.0.9", 40002), gen=9)  # fd 7 again, later
    big = bytes(range(256)) * 100  # two chunks
    first, second = call_records(big, socket=b, fd=8, tid=51, ts_ns=40, offset=3)
    return [
        data_record(b"GET", socket=a, ts_ns=10),
        data_record(b"abc", socket=a, ts_ns=11, offset=3),
        data_record(b"xyz", socket=b, fd=8, tid=51, ts_ns=12),
        data_record(b"reply", socket=a, ts_ns=13, direction=layout.DIR_INGRESS),
        data_record(b"more", socket=a, ts_ns=14, offset=6, comm=b"curl-2"),
        first,
        data_record(b"between", socket=a, ts_ns=41, offset=10),  # while b's call is in pieces
        second,
        data_record(b"after", socket=a, ts_ns=42, offset=17 + 50),  # a gap of 50
        data_record(b"gen0", socket={"gen": 0}, ts_ns=43, offset=72),  # the kernel did not know it
        data_record(b"nofd", fd=-1, ssl=0x77, ts_ns=44),
        close_record(gen=5, ts_ns=50),
        data_record(b"new socket", socket=a2, ts_ns=60),
        data_record(b"on it", socket=a2, ts_ns=61, offset=10),
        data_record(b"b again", socket=b, fd=8, tid=51, ts_ns=62, offset=3 + len(big)),
    ]


def test_calls_on_known_connections_in_c_make_what_on_call_makes() -> None:
    """The run of calls on followed connections (agent/flows/_known_calls.c) gives the
    same records and counters as the general path given every event one by one, with
    a WallClock (whose offset the C step adds itself) as with any other clock."""
    results = []
    clocks: list[Callable[[int], int]] = [lambda ns: ns + 7, WallClock(7)]
    for wall, short_way in itertools.product(clocks, (True, False)):
        pipeline, sink, _, _ = make_pipeline(wall)
        if not short_way:
            pipeline.flows.on_known_calls = lambda events, start, out: start  # type: ignore[method-assign]
        for batch in (mixed_traffic()[:7], mixed_traffic()[7:]):
            pipeline.handle_batch(RingBatch.of(batch))
        results.append(([r.to_json() for r in sink.records], pipeline.summary()))
    (records, summary), *others = results
    assert all(other == (records, summary) for other in others)
    assert summary["flow_gaps"] == 1 and summary["flow_inferred_closes"] == 0
    # Every call but the fd-less one (held for its socket) is a record, the call in
    # chunks whole, once its last chunk came.
    lens = [r["len"] for r in records if r["type"] == "data"]
    assert lens == [3, 3, 3, 5, 4, 7, 25600, 5, 4, 10, 5, 7]
    assert [r["comm"] for r in records if r["type"] == "data"][4] == "curl-2"
    assert [r["type"] for r in records].count("open") == 3
