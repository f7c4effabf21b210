"""The collector's JetStream backend against one real nats-server (JetStream on).

Agents are the real gRPC exporter with its disk spool (agent/export); subscribers are
the gRPC subscriber `tlscap tail` uses; the stream is also read with nats-py directly,
as any NATS client would per docs/nats.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import nats
import pytest

from agent.collector.jetstream.backend import BackendError, JetStreamBackend
from agent.collector.jetstream.config import NatsConfig
from agent.collector.policy import parse_policy
from agent.consumer.subscriber import Missed, ReplayFinished, subscribe
from agent.export.spool import Spool
from agent.records.filter import RecordFilter
from agent.records.record import PodRef, Record
from agent.schema import pb, pb_grpc
from agent.schema.convert import from_pb, to_pb
from tests.grpc.conftest import insecure, make_records, wait_for
from tests.nats.conftest import NatsServer

STREAM = "TLSCAP"


def read_stream(url: str, stream: str = STREAM) -> list[tuple[str, dict, bytes, int]]:
    """(subject, headers, data, seq) of every message, read with nats-py directly."""

    async def read() -> list[tuple[str, dict, bytes, int]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            state = (await js.stream_info(stream)).state
            out = []
            for seq in range(state.first_seq, state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                out.append((msg.subject, dict(msg.headers or {}), msg.data, msg.seq))
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def stream_count(url: str) -> int:
    async def count() -> int:
        nc = await nats.connect(url)
        try:
            return (await nc.jetstream().stream_info(STREAM)).state.messages
        finally:
            await nc.close()

    return asyncio.run(count())


def varied_records(n: int, agent_id: str = "agent-v") -> list[Record]:
    """Records over two nodes (one with dots in its name), namespaces and types."""
    out = []
    for i, rec in enumerate(make_records(n, agent_id=agent_id)):
        node = ("n1", "node.two")[i % 2]
        pod = (PodRef("web-1", "shop"), PodRef("api-1", "pay"), None)[i % 3]
        kind = ("data", "open")[(i // 2) % 2]
        # Through the wire form once: open records carry no data fields.
        out.append(from_pb(to_pb(rec.replace(node=node, pod=pod, type=kind))))
    return out


def ingest(address: str, records: list[Record], batch_id: int = 1) -> pb.IngestAck:
    with grpc.insecure_channel(address) as ch:
        batch = pb.IngestBatch(batch_id=batch_id, records=[to_pb(r) for r in records])
        return next(iter(pb_grpc.CollectorStub(ch).Ingest(iter([batch]))))


def keys(records: list[Record]) -> list[tuple[str, int]]:
    return [(r.agent_id, r.seq) for r in records]


# -- ingest -----------------------------------------------------------------------------


def test_records_land_with_subjects_msg_ids_and_decodable_payloads(
    nats_server: NatsServer, nats_collector, exporters
) -> None:
    server = nats_collector(nats_server)
    records = varied_records(60)
    exp = exporters(server.address)
    for r in records:
        exp.write(r)
    wait_for(lambda: exp.stats()["export_acked_records"] == 60, 20, "records acked")

    stored = read_stream(nats_server.url)
    assert len(stored) == 60
    by_id = {(r.agent_id, r.seq): r for r in records}
    for subject, headers, data, _seq in stored:
        record = from_pb(pb.Record.FromString(data))  # the payload is the protobuf Record
        assert headers["Nats-Msg-Id"] == f"{record.agent_id}:{record.seq}"
        assert record == by_id[(record.agent_id, record.seq)]
        ns = record.pod.namespace if record.pod else "_"
        node = {"n1": "n1", "node.two": "node%2Etwo"}[record.node]
        assert subject == f"tlscap.v1.{node}.{ns}.{record.type}"
    assert server.stats()["nats_published"] == 60


def test_a_replayed_spool_adds_no_duplicates(
    nats_server: NatsServer, nats_collector, exporters, tmp_path: Path
) -> None:
    server = nats_collector(nats_server)
    records = make_records(40)
    wires = [to_pb(r).SerializeToString() for r in records]
    ack = ingest(server.address, records)
    assert (ack.stored, ack.duplicates) == (40, 0)
    # The agent did not see that ack (say): its spool still holds the same records,
    # agent_id:seq and all, and a new exporter run replays them.
    spool_dir = tmp_path / "agent-spool"
    spool = Spool(spool_dir, 64 << 20)
    spool.append(wires[:25])
    spool.append(wires[25:])
    spool.close()
    exp = exporters(server.address, spool_dir=spool_dir)
    wait_for(lambda: exp.stats()["export_spooled_records"] == 0, 20, "spool replayed")
    wait_for(lambda: exp.stats()["export_acked_records"] == 40, 20, "replay acked")
    assert stream_count(nats_server.url) == 40
    stats = server.stats()
    assert (stats["nats_published"], stats["nats_duplicates"]) == (40, 40)


def test_nats_down_means_unavailable_then_nothing_lost(
    nats_server: NatsServer, nats_collector, exporters
) -> None:
    server = nats_collector(nats_server, publish_timeout=2.0)
    records = make_records(300)
    exp = exporters(server.address, ack_timeout=10.0)
    for r in records[:100]:
        exp.write(r)
    wait_for(lambda: exp.stats()["export_acked_records"] == 100, 20, "first records")

    nats_server.stop()
    for r in records[100:200]:
        exp.write(r)
    wait_for(lambda: server.stats()["ingest_unavailable"] > 0, 20, "Ingest UNAVAILABLE")
    wait_for(lambda: exp.stats()["export_spooled_records"] > 0, 20, "the agent spooling")
    assert server.stats()["nats_publish_failures"] > 0

    nats_server.start()  # same port, same store directory
    for r in records[200:]:
        exp.write(r)
    wait_for(lambda: stream_count(nats_server.url) >= 300, 60, "every record stored")
    wait_for(lambda: exp.stats()["export_spooled_records"] == 0, 30, "spool drained")
    stored = read_stream(nats_server.url)
    ids = [headers["Nats-Msg-Id"] for _, headers, _, _ in stored]
    assert sorted(ids) == sorted(f"{a}:{s}" for a, s in keys(records))  # once each
    assert exp.stats()["export_lost_records"] == 0


def test_oversized_record_is_rejected_not_retried(nats_server: NatsServer, nats_collector) -> None:
    server = nats_collector(nats_server)
    big = make_records(1, payload=2 << 20)  # above the default 1 MiB max_payload
    with pytest.raises(grpc.RpcError) as err:
        ingest(server.address, big)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_payload" in err.value.details()


# -- subscribe --------------------------------------------------------------------------


def test_subscriber_on_collector_b_sees_records_ingested_via_a(
    nats_server: NatsServer, nats_collector, exporters, subscriber
) -> None:
    a = nats_collector(nats_server)
    b = nats_collector(nats_server)
    sub = subscriber(insecure(b.address))
    wait_for(lambda: b.stats()["nats_consumers"] == 1, 10, "subscriber on B")
    records = make_records(120)
    exp = exporters(a.address)
    for r in records:
        exp.write(r)
    wait_for(lambda: len(sub.records()) >= 120, 20, "records on B")
    time.sleep(0.3)
    assert sub.records() == records  # exactly, in order, once


def test_subject_filtered_subscribe(nats_server: NatsServer, nats_collector, subscriber) -> None:
    server = nats_collector(nats_server)
    records = varied_records(90)
    ingest(server.address, records)
    flt = RecordFilter(
        nodes=frozenset({"node.two"}),
        namespaces=frozenset({"shop"}),
        types=frozenset({"open"}),
    )
    sub = subscriber(insecure(server.address), flt, replay=True, live=False)
    sub.thread.join(20)
    want = [r for r in records if flt.matches(r)]
    assert want and sub.records() == want
    assert isinstance(sub.events[-1], ReplayFinished)


def test_policy_limits_a_consumer_to_its_namespaces(
    nats_server: NatsServer, nats_collector, subscriber
) -> None:
    policy = parse_policy('[consumers."*"]\nnamespaces = ["pay"]\n')
    server = nats_collector(nats_server, policy=policy)
    records = varied_records(60)
    ingest(server.address, records)
    sub = subscriber(insecure(server.address), replay=True, live=False)
    sub.thread.join(20)
    got = sub.records()
    assert got and all(r.pod is not None and r.pod.namespace == "pay" for r in got)
    assert len(got) == sum(1 for r in records if r.pod and r.pod.namespace == "pay")


def _subscribe_once(address: str, request: pb.SubscribeRequest) -> tuple[list[Record], int, int]:
    """(records, last cursor, replayed) of a replay-only Subscribe."""
    got, cursor, replayed = [], 0, -1
    with grpc.insecure_channel(address) as ch:
        for resp in pb_grpc.CollectorStub(ch).Subscribe(request, timeout=20):
            kind = resp.WhichOneof("event")
            if kind == "records":
                got += [from_pb(m) for m in resp.records.records]
                cursor = resp.records.cursor
            elif kind == "replay_done":
                replayed = resp.replay_done.replayed
    return got, cursor, replayed


def test_replay_from_cursor_then_live_without_gap_or_repeat(
    nats_server: NatsServer, nats_collector
) -> None:
    server = nats_collector(nats_server)
    first, second = make_records(30), make_records(20, start_seq=31)
    ingest(server.address, first)
    got, cursor, replayed = _subscribe_once(
        server.address, pb.SubscribeRequest(replay=True, live=False)
    )
    assert got == first and replayed == 30 and cursor == 30  # cursors are stream sequences
    ingest(server.address, second, batch_id=2)
    got, cursor, replayed = _subscribe_once(
        server.address, pb.SubscribeRequest(replay=True, live=False, after_cursor=cursor)
    )
    assert got == second and replayed == 20 and cursor == 50


def test_replay_from_a_time(nats_server: NatsServer, nats_collector) -> None:
    server = nats_collector(nats_server, replay_clock_skew=0.0)
    now = time.time_ns()
    early = [r.replace(ts_ns=now) for r in make_records(10)]
    ingest(server.address, early)
    time.sleep(1.1)
    since = time.time_ns()
    late = [r.replace(ts_ns=since + 1000) for r in make_records(10, start_seq=11)]
    ingest(server.address, late, batch_id=2)
    flt = pb.Filter(since_ns=since)
    got, _, replayed = _subscribe_once(
        server.address, pb.SubscribeRequest(filter=flt, replay=True, live=False)
    )
    assert got == late and replayed == 10


def test_replay_then_live_hands_over_exactly(
    nats_server: NatsServer, nats_collector, subscriber, exporters
) -> None:
    server = nats_collector(nats_server)
    history = make_records(50)
    ingest(server.address, history)
    sub = subscriber(insecure(server.address), replay=True, live=True)
    wait_for(lambda: any(isinstance(e, ReplayFinished) for e in sub.events), 20, "replay")
    fresh = make_records(50, start_seq=51)
    exp = exporters(server.address)
    for r in fresh:
        exp.write(r)
    wait_for(lambda: len(sub.records()) >= 100, 20, "live records")
    time.sleep(0.3)
    assert sub.records() == history + fresh


# -- startup ----------------------------------------------------------------------------


def test_nats_unreachable_at_start_is_a_clear_error(tmp_path: Path) -> None:
    from tests.nats.conftest import free_ports

    (port,) = free_ports(1)
    config = NatsConfig(servers=(f"nats://127.0.0.1:{port}",), insecure=True, connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(BackendError, match="cannot connect to NATS"):
        JetStreamBackend(config)
    assert time.monotonic() - started < 20


def test_stream_settings_are_applied_and_foreign_streams_refused(
    nats_server: NatsServer,
) -> None:
    base = NatsConfig(servers=(nats_server.url,), insecure=True)
    JetStreamBackend(base).close()
    # Idempotent; a changed limit updates the stream (and is logged).
    again = JetStreamBackend(replace(base, max_age=3600.0, max_bytes=64 << 20))
    info = again._call(again._js.stream_info(STREAM), 5)
    assert (info.config.max_age, info.config.max_bytes) == (3600.0, 64 << 20)
    assert info.config.duplicate_window == 900.0
    again.close()
    with pytest.raises(BackendError, match="not tlscap's"):
        JetStreamBackend(replace(base, subject_prefix="other.v1"))


def test_cli_refuses_plaintext_nats_without_opt_in(capsys) -> None:
    from agent.cli.main import main

    agent_log = logging.getLogger("agent")
    level = agent_log.level
    try:
        rc = main(["collector", "--insecure", "--backend", "nats://127.0.0.1:1"])
    finally:
        agent_log.setLevel(level)  # main() sets it: later tests' caplog would miss DEBUG
    assert rc != 0
    assert "--nats-insecure" in capsys.readouterr().err


# -- limits -----------------------------------------------------------------------------


def test_a_full_stream_drops_its_oldest_records_and_says_so(
    nats_server: NatsServer, nats_collector, exporters, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.collector.jetstream.backend")
    server = nats_collector(nats_server, max_bytes=64 << 10, prune_interval=0.2)
    records = make_records(200, payload=1024)
    exp = exporters(server.address)
    for r in records:
        exp.write(r)
    wait_for(lambda: exp.stats()["export_acked_records"] == 200, 20, "records acked")
    assert exp.stats()["export_lost_records"] == 0  # the agent did its part

    stored = read_stream(nats_server.url)
    kept = len(stored)
    assert 0 < kept < 200
    # The newest are kept, the oldest went.
    assert [h["Nats-Msg-Id"] for _, h, _, _ in stored] == [
        f"{r.agent_id}:{r.seq}" for r in records[200 - kept :]
    ]
    wait_for(lambda: server.stats().get("nats_stream_dropped") == 200 - kept, 10, "reported")
    assert server.stats()["nats_stream_messages"] == kept
    assert any("is full" in r.getMessage() for r in caplog.records)

    # A consumer resuming from a cursor the stream no longer has is told what it missed.
    stop = threading.Event()
    events = list(
        subscribe(
            lambda: grpc.insecure_channel(server.address),
            RecordFilter(),
            replay=True,
            live=False,
            stop=stop,
            after_cursor=10,
        )
    )
    assert events[0] == Missed(200 - kept - 10, 0, 0)
    assert [r.seq for r in events if isinstance(r, Record)] == [r.seq for r in records[-kept:]]


def test_a_malformed_record_is_invalid_argument(nats_server: NatsServer, nats_collector) -> None:
    server = nats_collector(nats_server)
    good = make_records(2)
    for bad in (pb.Record(agent_id="x", seq=1, type=99), pb.Record(seq=1, type=1)):
        batch = pb.IngestBatch(batch_id=7, records=[to_pb(good[0]), bad])
        with pytest.raises(grpc.RpcError) as err, grpc.insecure_channel(server.address) as ch:
            next(iter(pb_grpc.CollectorStub(ch).Ingest(iter([batch]))))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch 7, record 1" in err.value.details() or "agent_id" in err.value.details()
    assert stream_count(nats_server.url) == 0  # the whole batch is refused, nothing published
    assert ingest(server.address, good).stored == 2  # and the collector keeps serving
