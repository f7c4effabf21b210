"""The collector over real loopback gRPC: ingest, store, fan-out, failures."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.collector.store import RecordStore
from agent.consumer.subscriber import ReplayFinished
from agent.export.exporter import GrpcExporter
from agent.records.filter import RecordFilter
from agent.schema import pb, pb_grpc
from agent.schema.convert import from_pb, to_pb
from tests.grpc.conftest import insecure, make_records, wait_for


def stored_records(path: Path) -> list:
    with RecordStore(path) as store:
        rows = []
        after = 0
        while batch := store.query(RecordFilter(), after_rowid=after, limit=5000):
            rows += batch
            after = batch[-1][0]
    return [from_pb(pb.Record.FromString(wire)) for _, wire in rows]


def exporter(address: str, tmp_path: Path, name: str, **kw) -> GrpcExporter:
    return GrpcExporter(
        address,
        channel_factory=insecure(address),
        spool_dir=tmp_path / f"spool-{name}",
        spool_max_bytes=kw.pop("spool_max_bytes", 64 << 20),
        **kw,
    )


def test_records_reach_live_and_replaying_subscribers_exactly(collector, subscriber, tmp_path):
    server = collector()
    live = subscriber(insecure(server.address))
    wait_for(lambda: server.service.counters["subscribers"] == 1, 10, "subscriber to register")
    sent = make_records(3000, payload=1024)
    exp = exporter(server.address, tmp_path, "a")
    for r in sent:
        exp.write(r)
    exp.close()
    wait_for(lambda: len(live.records()) >= len(sent), 20, "live records")
    assert live.records() == sent  # every field, every byte, in order, once

    replay = subscriber(insecure(server.address), replay=True, live=False)
    replay.thread.join(20)
    assert replay.error is None
    assert replay.records() == sent
    assert replay.events[-1] == ReplayFinished(len(sent))
    assert exp.stats()["export_acked_records"] == len(sent)


def test_filters_select_on_the_collector(collector, subscriber, tmp_path):
    server = collector()
    flt = RecordFilter(directions=frozenset({"ingress"}), nodes=frozenset({"n2"}))
    sub = subscriber(insecure(server.address), flt)
    wait_for(lambda: server.service.counters["subscribers"] == 1, 10, "subscriber to register")
    exp = exporter(server.address, tmp_path, "a")
    batch = make_records(100, node="n1") + make_records(100, agent_id="b", node="n2")
    for r in batch:
        exp.write(r)
    exp.close()
    want = [r for r in batch if r.node == "n2" and r.direction == "ingress"]
    wait_for(lambda: len(sub.records()) >= len(want), 10, "filtered records")
    time.sleep(0.3)  # nothing else may follow
    assert sub.records() == want


def test_collector_killed_and_restarted_mid_stream_loses_nothing(collector_process, tmp_path):
    coll = collector_process()
    n = 20_000
    sent = make_records(n, payload=256)
    exp = exporter(coll.address, tmp_path, "a")
    killed = threading.Event()

    def outage() -> None:
        time.sleep(0.8)
        coll.kill()  # SIGKILL: no goodbye, possibly mid-transaction
        killed.set()
        time.sleep(1.5)
        coll.start()  # same port, same store file

    t = threading.Thread(target=outage)
    t.start()
    for i, r in enumerate(sent):
        exp.write(r)
        if i % 500 == 499:
            time.sleep(0.1)  # ~4 s of steady traffic across the outage
    t.join()
    assert killed.is_set()
    exp.close(timeout=30)
    stats = exp.stats()
    assert coll.stop() == 0
    got = stored_records(coll.store)
    assert len(got) == n, stats
    assert sorted(got, key=lambda r: r.seq) == sent  # each exactly once, content equal
    assert stats["export_reconnects"] >= 1
    assert stats["export_queue_dropped"] == 0
    assert stats["export_spool_dropped_records"] == 0


def test_stalled_subscriber_does_not_block_ingest_or_others(collector, subscriber, tmp_path):
    server = collector(subscriber_queue=2000)
    fast = subscriber(insecure(server.address))
    channel = grpc.insecure_channel(server.address)
    stalled = pb_grpc.CollectorStub(channel).Subscribe(pb.SubscribeRequest(live=True))
    wait_for(lambda: server.service.counters["subscribers"] == 2, 10, "both subscribers")

    per_agent = 8000
    exporters = [exporter(server.address, tmp_path, name) for name in ("a", "b")]
    batches = [make_records(per_agent, agent_id=name, payload=512) for name in ("a", "b")]

    def push(exp: GrpcExporter, records: list) -> None:
        for i, r in enumerate(records):
            exp.write(r)
            if i % 400 == 399:
                time.sleep(0.1)  # ~4k records/s per agent: a pace the attentive reader keeps
        exp.close()

    pairs = zip(exporters, batches, strict=True)
    pushers = [threading.Thread(target=push, args=pair) for pair in pairs]
    for t in pushers:
        t.start()
    for t in pushers:
        t.join(60)
    total = 2 * per_agent
    # Ingest finished and the attentive subscriber got everything while the
    # other one read nothing at all.
    assert all(e.stats()["export_acked_records"] == per_agent for e in exporters)
    wait_for(lambda: len(fast.records()) >= total, 30, "the fast subscriber")
    assert sorted(fast.records(), key=lambda r: (r.agent_id, r.seq)) == batches[0] + batches[1]

    # The stalled one now reads: what it gets plus what it is told it missed
    # accounts for every record, and it was told.
    received, missed = 0, 0
    deadline = time.monotonic() + 30
    for response in stalled:
        kind = response.WhichOneof("event")
        if kind == "records":
            received += len(response.records.records)
        elif kind == "lagged":
            missed += response.lagged.missed
        if received + missed >= total or time.monotonic() > deadline:
            break
    stalled.cancel()
    channel.close()
    assert missed > 0
    assert received + missed == total


def test_subscriber_resumes_after_collector_restart(collector_process, subscriber, tmp_path):
    coll = collector_process()
    sub = subscriber(lambda: grpc.insecure_channel(coll.address))
    exp = exporter(coll.address, tmp_path, "a")
    first, second = make_records(500), make_records(500, start_seq=501)
    for r in first:
        exp.write(r)
    wait_for(lambda: len(sub.records()) >= 500, 20, "first half")
    coll.stop()
    coll.start()
    for r in second:
        exp.write(r)
    exp.close(timeout=20)
    wait_for(lambda: len(sub.records()) >= 1000, 30, "second half after the restart")
    time.sleep(0.3)
    assert sub.records() == first + second  # resumed at its cursor: nothing lost, nothing twice


def _ingest_once(channel: grpc.Channel, batch: pb.IngestBatch, timeout: float = 10) -> list:
    stub = pb_grpc.CollectorStub(channel)
    return list(stub.Ingest(iter([batch]), timeout=timeout))


def _serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service="tlscap.v1.Collector"), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_input_is_refused_and_the_collector_keeps_serving(collector):
    server = collector(max_message_bytes=1 << 20)
    channel = grpc.insecure_channel(server.address)
    good = pb.IngestBatch(batch_id=1, records=[to_pb(r) for r in make_records(3)])

    # A record no agent would send (unknown type): INVALID_ARGUMENT, saying where.
    bad = pb.IngestBatch(batch_id=2, records=[pb.Record(agent_id="x", seq=1, type=99)])
    with pytest.raises(grpc.RpcError) as err:
        _ingest_once(channel, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch 2, record 0" in err.value.details()

    # A record without its identity.
    anonymous = pb.IngestBatch(batch_id=3, records=[to_pb(make_records(1)[0])])
    anonymous.records[0].agent_id = ""
    with pytest.raises(grpc.RpcError) as err:
        _ingest_once(channel, anonymous)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Over the message size limit.
    huge = pb.IngestBatch(batch_id=4, records=[to_pb(make_records(1, payload=2 << 20)[0])])
    with pytest.raises(grpc.RpcError) as err:
        _ingest_once(channel, huge)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Bytes that are not a protobuf message at all.
    raw = channel.stream_stream("/tlscap.v1.Collector/Ingest")
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([b"\xff\xff\xff\xff garbage"]), timeout=10))
    assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)

    # A filter with an unknown enum value.
    with pytest.raises(grpc.RpcError) as err:
        next(
            pb_grpc.CollectorStub(channel).Subscribe(
                pb.SubscribeRequest(filter=pb.Filter(directions=[7]), live=True), timeout=10
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Garbage straight on the TCP port (not even HTTP/2).
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass

    # Still serving, and still storing.
    assert _serving(channel)
    acks = _ingest_once(channel, good)
    assert [(a.batch_id, a.stored, a.duplicates) for a in acks] == [(1, 3, 0)]
    assert _ingest_once(channel, good)[0].duplicates == 3  # a re-send is recognised
    channel.close()


def test_health_and_reflection_answer(collector):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    server = collector()
    channel = grpc.insecure_channel(server.address)
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tlscap.v1.Collector"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"tlscap.v1.Collector", "grpc.health.v1.Health"} <= services
    channel.close()
