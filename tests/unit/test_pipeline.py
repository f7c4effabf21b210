"""EventPipeline (raw records in, Records out) and TargetAttacher, without a kernel."""

from __future__ import annotations

import threading
import time

from agent.capture.attacher import TargetAttacher
from agent.capture.pipeline import EventPipeline
from agent.events import layout
from agent.flows.table import FlowTable, KernelRegistration
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


def make_pipeline() -> tuple[EventPipeline, ListSink, list[int], list[KernelRegistration]]:
    sink = ListSink()
    execs: list[int] = []
    registered: list[KernelRegistration] = []
    pipeline = EventPipeline(
        RecordWriter([sink], "agent", "node"),
        FlowTable(OneSocket(), lambda ns: ns),
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
    pipeline.handle_batch(batch)
    types = [r.type for r in sink.records]
    assert types == ["open", "data", "data", "close"]
    assert sink.records[2].data == big and sink.records[2].offset == 18
    assert [r.seq for r in sink.records] == [1, 2, 3, 4]
    assert pipeline.stats.events == len(batch)


def test_exec_events_go_to_the_attacher_and_bad_records_are_counted() -> None:
    pipeline, sink, execs, _ = make_pipeline()
    pipeline.handle_batch([proc_record(layout.EV_EXEC, tgid=77), b"\xff\xff", b""])
    assert execs == [77]
    assert pipeline.stats.decode_errors == 2
    assert sink.records == []


def test_unknown_socket_is_registered_with_the_kernel_once_per_batch() -> None:
    pipeline, sink, _, registered = make_pipeline()
    pipeline.handle_batch([data_record(b"x"), data_record(b"y", offset=1)])
    assert len(registered) == 1 and registered[0].tls_seen
    assert sink.records[1].remote == Endpoint("127.0.0.1", 443)


def test_partial_call_is_released_incomplete_by_flush() -> None:
    pipeline, sink, _, _ = make_pipeline()
    first = call_records(bytes(40000), ts_ns=5)[0]  # the rest of the call never comes
    pipeline.handle_batch([first])
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
