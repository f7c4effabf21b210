"""The gRPC exporter against a real gRPC server on loopback.

The collector here is a small fake (store keyed by (agent_id, seq), ack per
batch, switchable acking) so that the exporter's guarantees are tested on their
own: nothing lost across an outage, a restart or an agent restart, and every
drop counted.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from agent.export.backoff import Backoff
from agent.export.exporter import CHANNEL_OPTIONS, GrpcExporter
from agent.export.spool import Spool
from agent.records.record import Endpoint, Record
from agent.schema import pb, pb_grpc
from agent.schema.convert import from_pb, to_pb
from agent.schema.wire import encode_ingest_batch, framed_size, take_batch
from tests.grpc.conftest import wait_for

# -- helpers --------------------------------------------------------------------------


def make_records(
    n: int, agent_id: str = "agent-a", payload: int = 64, start: int = 1
) -> list[Record]:
    rng = random.Random(start)
    out = []
    for seq in range(start, start + n):
        data = f"{agent_id}:{seq}:".encode() + rng.randbytes(max(0, payload - 20))
        out.append(
            Record(
                type="data",
                ts_ns=1_800_000_000_000_000_000 + seq,
                agent_id=agent_id,
                node="node-1",
                seq=seq,
                pid=4242,
                tid=4243,
                comm="curl",
                source="openssl",
                conn_id=f"4242-5-{seq % 7}",
                fd=5,
                local=Endpoint("127.0.0.1", 50000),
                remote=Endpoint("127.0.0.1", 443),
                role="client",
                direction="egress" if seq % 2 else "ingress",
                offset=seq * payload,
                len=len(data) + 3,
                captured_len=len(data),
                truncated=True,
                data=data,
            )
        )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCollector(pb_grpc.CollectorServicer):
    """Stores records by (agent_id, seq) and acks each batch (unless told not to)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[tuple[str, int], pb.Record] = {}
        self.arrivals: list[tuple[str, int]] = []  # first arrival order
        self.received = 0
        self.duplicates = 0
        self.batch_sizes: list[tuple[int, int]] = []  # (records, serialized bytes)
        self.acking = threading.Event()
        self.acking.set()

    def Ingest(self, request_iterator, context):
        for batch in request_iterator:
            if any(not rec.agent_id for rec in batch.records):
                # As the real collector does: refuse the batch, end the stream.
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "record without agent_id")
            stored = dups = 0
            with self.lock:
                self.batch_sizes.append((len(batch.records), batch.ByteSize()))
                for rec in batch.records:
                    key = (rec.agent_id, rec.seq)
                    self.received += 1
                    if key in self.records:
                        dups += 1
                    else:
                        stored += 1
                        self.records[key] = rec
                        self.arrivals.append(key)
            self.duplicates += dups
            if self.acking.is_set():
                yield pb.IngestAck(batch_id=batch.batch_id, stored=stored, duplicates=dups)

    def count(self) -> int:
        with self.lock:
            return len(self.records)


class FakeServer:
    """A real gRPC server on 127.0.0.1 that can be stopped and started again on its port."""

    def __init__(self, servicer: FakeCollector, port: int = 0) -> None:
        self.servicer = servicer
        self.port = port
        self.server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_CollectorServicer_to_server(self.servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"cannot bind 127.0.0.1:{self.port}"
        self.port = port
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait(5)
            self.server = None


@pytest.fixture
def servers() -> Iterator[Callable[..., FakeServer]]:
    made: list[FakeServer] = []

    def make(
        servicer: FakeCollector | None = None, port: int = 0, start: bool = True
    ) -> FakeServer:
        srv = FakeServer(servicer or FakeCollector(), port)
        made.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in made:
        srv.stop()


@pytest.fixture
def exporters(tmp_path: Path) -> Iterator[Callable[..., GrpcExporter]]:
    made: list[GrpcExporter] = []

    def make(address: str, spool_dir: Path | None = None, **kw) -> GrpcExporter:
        kw.setdefault("backoff", Backoff(initial=0.05, maximum=0.5))
        kw.setdefault("spool_max_bytes", 64 << 20)
        exp = GrpcExporter(
            address,
            channel_factory=lambda: grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS)),
            spool_dir=spool_dir or tmp_path / "spool",
            **kw,
        )
        made.append(exp)
        return exp

    yield make
    for exp in made:
        exp.close(timeout=1.0)


def assert_delivered(fake: FakeCollector, records: list[Record]) -> None:
    with fake.lock:
        got = dict(fake.records)
    missing = [r.seq for r in records if (r.agent_id, r.seq) not in got]
    assert not missing, f"{len(missing)} records missing, first {missing[:5]}"
    for r in records:
        assert from_pb(got[(r.agent_id, r.seq)]) == r


def settled(exp: GrpcExporter) -> bool:
    """Nothing queued, spooled or in flight -- seen a few times, since the three
    counters are read at slightly different moments of the sender's work."""
    for _ in range(3):
        s = exp.stats()
        if s["export_queued_records"] or s["export_spooled_records"] or exp._in_flight:
            return False
        time.sleep(0.02)
    return True


# -- pure parts -----------------------------------------------------------------------


def test_encode_ingest_batch_is_a_real_ingest_batch() -> None:
    recs = make_records(3)
    wire = [to_pb(r).SerializeToString() for r in recs]
    for batch_id in (1, 127, 128, 300, 2**63 + 5):
        msg = pb.IngestBatch.FromString(encode_ingest_batch(batch_id, wire))
        assert msg.batch_id == batch_id
        assert [from_pb(m) for m in msg.records] == recs
        assert msg.ByteSize() == len(encode_ingest_batch(batch_id, wire))
    assert pb.IngestBatch.FromString(encode_ingest_batch(9, [])).records == []


def test_take_batch_respects_both_limits_and_sends_a_huge_record_alone() -> None:
    q = deque([b"a" * 10] * 5 + [b"b" * 1000] + [b"c" * 10] * 3)
    assert take_batch(q, max_records=3, max_bytes=10_000) == [b"a" * 10] * 3
    per = framed_size(b"a" * 10)
    assert take_batch(q, max_records=100, max_bytes=per * 2 + 5) == [b"a" * 10] * 2
    assert take_batch(q, max_records=100, max_bytes=100) == [b"b" * 1000]  # alone
    assert take_batch(q, max_records=100, max_bytes=100) == [b"c" * 10] * 3
    assert not q


# -- over the wire --------------------------------------------------------------------


def test_every_record_arrives_exactly_once(servers, exporters) -> None:
    srv = servers()
    exp = exporters(srv.address)
    recs = make_records(5000)
    for r in recs:
        exp.write(r)
    wait_for(lambda: srv.servicer.count() == 5000, 10, "5000 records at the collector")
    wait_for(lambda: settled(exp), 5, "all acks")
    s = exp.stats()
    exp.close()
    assert_delivered(srv.servicer, recs)
    assert srv.servicer.received == 5000 and srv.servicer.duplicates == 0
    assert s["export_sent_records"] == s["export_acked_records"] == 5000
    assert s["export_connected"] == 1
    assert s["export_lost_records"] == 0 and s["export_reconnects"] == 0
    assert all(k.startswith("export_") for k in s)
    assert len(srv.servicer.batch_sizes) < 5000  # batched, not one message per record


def test_batches_stay_under_the_byte_limit(servers, exporters) -> None:
    srv = servers()
    exp = exporters(srv.address, batch_max_bytes=20_000)
    recs = make_records(200, payload=900) + make_records(1, payload=50_000, start=201)
    for r in recs:
        exp.write(r)
    wait_for(lambda: srv.servicer.count() == 201, 10, "all records")
    assert_delivered(srv.servicer, recs)
    for n, size in srv.servicer.batch_sizes:
        assert n == 1 or size <= 20_000
    assert (1, srv.servicer.batch_sizes[-1][1]) == srv.servicer.batch_sizes[-1]


def test_collector_restart_mid_stream_loses_nothing(servers, exporters, caplog) -> None:
    caplog.set_level(logging.INFO, logger="agent.export")
    srv = servers()
    exp = exporters(srv.address)
    recs = make_records(5000)

    def writer() -> None:  # ~5 s of steady capture, across the outage
        for i in range(0, len(recs), 50):
            for r in recs[i : i + 50]:
                exp.write(r)
            time.sleep(0.05)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    wait_for(lambda: srv.servicer.count() >= 500, 5, "traffic before the outage")
    srv.stop()
    at_stop = srv.servicer.count()
    time.sleep(2.0)
    assert exp.stats()["export_connected"] == 0
    assert exp.stats()["export_spooled_records"] > 0  # what came meanwhile is on disk
    srv.start()  # same port
    t.join(15)
    wait_for(lambda: srv.servicer.count() == 5000, 15, "all records after the restart")
    wait_for(lambda: settled(exp), 5, "spool drained and acked")
    s = exp.stats()
    assert at_stop < 5000
    assert_delivered(srv.servicer, recs)
    assert s["export_spooled_records"] == 0 and s["export_spool_bytes"] == 0
    assert s["export_reconnects"] >= 1 and s["export_connected"] == 1
    assert s["export_acked_records"] >= 5000
    assert s["export_sent_records"] >= s["export_acked_records"]
    assert s["export_lost_records"] == 0
    # Duplicates are allowed (at least once); they are what was sent twice.
    assert srv.servicer.received == 5000 + srv.servicer.duplicates
    assert s["export_sent_records"] >= srv.servicer.received
    # One warning per state change, not one per retry.
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    reconnected = [r for r in caplog.records if "reconnected" in r.getMessage()]
    assert len(unreachable) == 1 and unreachable[0].levelno == logging.WARNING
    assert len(reconnected) == 1


def test_outage_for_the_whole_run_is_delivered_by_the_next_run(
    servers, exporters, tmp_path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    spool_dir = tmp_path / "spool"
    old = make_records(3000, agent_id="run-1")
    exp1 = exporters(address, spool_dir)
    for r in old:
        exp1.write(r)
    started = time.monotonic()
    exp1.close(timeout=2.0)
    assert time.monotonic() - started < 4.0
    s1 = exp1.stats()
    assert s1["export_spooled_records"] == 3000
    assert s1["export_acked_records"] == 0 and s1["export_connected"] == 0
    assert s1["export_lost_records"] == 0
    on_disk = Spool(spool_dir, max_bytes=64 << 20)  # really on disk, and unlocked
    assert on_disk.records == 3000
    on_disk.close()

    srv = servers(port=port)
    exp2 = exporters(address, spool_dir)
    assert exp2.stats()["export_spooled_records"] == 3000
    new = make_records(500, agent_id="run-2")
    for r in new:
        exp2.write(r)
    wait_for(lambda: srv.servicer.count() == 3500, 10, "old and new records")
    wait_for(lambda: settled(exp2), 5, "spool drained")
    exp2.close()
    assert_delivered(srv.servicer, old + new)
    # The earlier run's records keep their own identity, and go first.
    arrivals = srv.servicer.arrivals
    last_old = max(i for i, key in enumerate(arrivals) if key[0] == "run-1")
    first_new = min(i for i, key in enumerate(arrivals) if key[0] == "run-2")
    assert last_old < first_new
    assert not list(spool_dir.glob("seg-*.spool"))


def test_full_spool_drops_the_oldest_and_counts_exactly(servers, exporters, tmp_path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    spool_dir = tmp_path / "spool"
    recs = make_records(2000, payload=200)
    exp1 = exporters(address, spool_dir, spool_max_bytes=256 << 10)
    for r in recs:
        exp1.write(r)
    exp1.close(timeout=2.0)
    s1 = exp1.stats()
    dropped = s1["export_spool_dropped_records"]
    assert 0 < dropped < 1500  # the oldest lost, a spool's worth (~800) kept
    assert s1["export_spool_dropped_bytes"] > 0
    assert s1["export_queue_dropped"] == 0
    assert dropped + s1["export_spooled_records"] == 2000
    assert s1["export_lost_records"] == dropped

    srv = servers(port=port)
    exp2 = exporters(address, spool_dir, spool_max_bytes=256 << 10)
    wait_for(lambda: srv.servicer.count() == 2000 - dropped, 10, "the surviving records")
    wait_for(lambda: settled(exp2), 5, "spool drained")
    got = {seq for _, seq in srv.servicer.records}
    missing = {r.seq for r in recs} - got
    assert len(missing) == dropped
    assert missing == set(range(1, dropped + 1))  # the oldest went
    assert exp2.stats()["export_spool_dropped_records"] == 0


def test_queue_overflow_is_counted_exactly(servers, exporters) -> None:
    srv = servers()
    exp = exporters(srv.address, queue_max_records=100, autostart=False)
    recs = make_records(250)
    for r in recs:
        exp.write(r)  # the sender is not running: nothing leaves the queue
    s = exp.stats()
    assert s["export_queue_dropped"] == 150
    assert s["export_queued_records"] == 100
    assert s["export_lost_records"] == 150
    exp.start()
    wait_for(lambda: srv.servicer.count() == 100, 10, "the queued records")
    assert {seq for _, seq in srv.servicer.records} == set(range(1, 101))


def test_queue_byte_bound_still_takes_one_huge_record(exporters, tmp_path) -> None:
    exp = exporters(f"127.0.0.1:{free_port()}", queue_max_bytes=10_000, autostart=False)
    exp.write(make_records(1, payload=50_000)[0])
    exp.write(make_records(1, payload=100, start=2)[0])
    assert exp.stats()["export_queued_records"] == 1
    assert exp.stats()["export_queue_dropped"] == 1
    exp.close(timeout=1.0)
    assert exp.stats()["export_spooled_records"] == 1  # never started: spooled at close


def test_late_acks_time_out_then_everything_is_delivered(servers, exporters) -> None:
    fake = FakeCollector()
    fake.acking.clear()  # the collector takes batches but never answers
    srv = servers(fake)
    exp = exporters(srv.address, ack_timeout=0.5)
    recs = make_records(300)
    for r in recs:
        exp.write(r)
    wait_for(lambda: fake.count() == 300, 5, "records received (unacked)")
    # After the ack timeout the unacked batches are on disk, not lost in memory.
    wait_for(lambda: exp.stats()["export_spooled_records"] == 300, 5, "unacked batches spooled")
    fake.acking.set()
    wait_for(lambda: settled(exp), 10, "delivery once acks come")
    s = exp.stats()
    assert s["export_acked_records"] >= 300 and s["export_lost_records"] == 0
    assert s["export_reconnects"] >= 1


def test_close_never_hangs_on_a_silent_collector(servers, exporters) -> None:
    fake = FakeCollector()
    fake.acking.clear()
    srv = servers(fake)
    exp = exporters(srv.address)  # default ack timeout: 30 s
    recs = make_records(1000)
    for r in recs:
        exp.write(r)
    wait_for(lambda: fake.count() == 1000, 5, "records received")
    started = time.monotonic()
    exp.close(timeout=1.0)
    assert time.monotonic() - started < 3.0
    s = exp.stats()
    assert s["export_spooled_records"] == 1000  # unacked at exit: kept for the next run
    assert s["export_lost_records"] == 0


def test_write_after_close_is_an_error(exporters) -> None:
    exp = exporters(f"127.0.0.1:{free_port()}")
    exp.close(timeout=0.5)
    with pytest.raises(ValueError):
        exp.write(make_records(1)[0])


def test_stats_merge_into_a_session_summary(exporters) -> None:
    from agent.sinks.base import Sink

    exp = exporters(f"127.0.0.1:{free_port()}")
    assert isinstance(exp, Sink)
    assert set(exp.stats()) >= {
        "export_sent_records",
        "export_acked_records",
        "export_queue_dropped",
        "export_spool_dropped_records",
        "export_spooled_records",
        "export_reconnects",
        "export_connected",
    }


def test_spool_write_failures_are_counted_as_lost(exporters, monkeypatch, caplog) -> None:
    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Spool, "_open_new_tail", full)
    exp = exporters(f"127.0.0.1:{free_port()}")
    for r in make_records(300):
        exp.write(r)
    exp.close(timeout=1.0)
    s = exp.stats()
    assert s["export_spool_failed_records"] == 300
    assert s["export_lost_records"] == 300
    assert "No space left" in caplog.text


def poisoned(n: int, bad_seq: int) -> list[Record]:
    recs = make_records(n)
    recs[bad_seq - 1].agent_id = ""  # a record the collector refuses
    return recs


def check_rejection(fake: FakeCollector, exp: GrpcExporter, recs: list[Record], bad: int) -> None:
    s = exp.stats()
    got = {seq for _, seq in fake.records}
    assert bad not in got
    missing = {r.seq for r in recs} - got
    # Dropped is what was refused -- one batch -- and nothing else.
    assert len(missing) == s["export_rejected_records"] == s["export_lost_records"]
    assert 0 < len(missing) <= 512
    assert_delivered(fake, [r for r in recs if r.seq in got])


def test_a_batch_the_collector_refuses_is_dropped_and_counted(servers, exporters, caplog) -> None:
    srv = servers()
    exp = exporters(srv.address)
    recs = poisoned(2000, bad_seq=1500)
    for r in recs:
        exp.write(r)
    wait_for(lambda: exp.stats()["export_rejected_records"] > 0, 10, "the rejection")
    rejected = exp.stats()["export_rejected_records"]
    wait_for(lambda: srv.servicer.count() == 2000 - rejected, 10, "everything else delivered")
    wait_for(lambda: settled(exp), 10, "nothing left to send")
    check_rejection(srv.servicer, exp, recs, 1500)
    assert "rejected batch" in caplog.text
    assert "unreachable" not in caplog.text  # the collector is up; it said no


def test_a_refused_batch_from_the_spool_does_not_block_the_rest(
    servers, exporters, tmp_path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    recs = poisoned(2000, bad_seq=700)
    exp1 = exporters(address, tmp_path / "spool")
    for r in recs:
        exp1.write(r)
    exp1.close(timeout=1.0)
    assert exp1.stats()["export_spooled_records"] == 2000
    srv = servers(port=port)
    exp2 = exporters(address, tmp_path / "spool")
    wait_for(lambda: exp2.stats()["export_rejected_records"] > 0, 10, "the rejection")
    rejected = exp2.stats()["export_rejected_records"]
    wait_for(lambda: srv.servicer.count() == 2000 - rejected, 10, "everything else delivered")
    wait_for(lambda: settled(exp2), 10, "nothing left to send")
    check_rejection(srv.servicer, exp2, recs, 700)


def test_a_collector_back_while_closing_still_gets_the_records(servers, exporters) -> None:
    port = free_port()
    srv = servers(port=port, start=False)
    exp = exporters(srv.address)
    recs = make_records(500)
    for r in recs:
        exp.write(r)
    wait_for(lambda: exp.stats()["export_spooled_records"] == 500, 5, "records spooled")
    threading.Timer(0.7, srv.start).start()  # a rolling update, as the agent exits
    started = time.monotonic()
    exp.close(timeout=5.0)
    assert time.monotonic() - started < 4.0  # done once delivered, not at the deadline
    assert_delivered(srv.servicer, recs)
    assert exp.stats()["export_spooled_records"] == 0
