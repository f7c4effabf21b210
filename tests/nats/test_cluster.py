"""A 3-node JetStream cluster (plain TCP routes on loopback), an R3 stream and two
collectors: one NATS server is SIGKILLed mid-stream and every record is still stored
exactly once and delivered to a live subscriber exactly once."""

from __future__ import annotations

import asyncio
import threading
import time

import nats
import nats.js.api

from tests.grpc.conftest import insecure, make_records, wait_for
from tests.nats.conftest import NatsServer, cluster_servers
from tests.nats.test_jetstream import read_stream


def stream_info(url: str) -> nats.js.api.StreamInfo:
    async def info() -> nats.js.api.StreamInfo:
        nc = await nats.connect(url)
        try:
            return await nc.jetstream().stream_info("TLSCAP")
        finally:
            await nc.close()

    return asyncio.run(info())


def stream_leader(url: str) -> str:
    return stream_info(url).cluster.leader


def test_r3_stream_survives_a_killed_server(
    nats_cluster: list[NatsServer], nats_collector, exporters, subscriber
) -> None:
    a = nats_collector(nats_cluster, replicas=3)
    b = nats_collector(nats_cluster, replicas=3)
    sub = subscriber(insecure(b.address))
    wait_for(lambda: b.stats()["nats_consumers"] == 1, 15, "subscriber on B")

    records = make_records(1200, payload=256)
    exp = exporters(a.address, ack_timeout=10.0)
    done = threading.Event()

    def steady_flow() -> None:
        for i, r in enumerate(records):
            exp.write(r)
            if i % 40 == 39:
                time.sleep(0.02)  # ~2000 records/s
        done.set()

    threading.Thread(target=steady_flow, daemon=True).start()
    wait_for(lambda: exp.stats()["export_acked_records"] >= 300, 30, "flow under way")
    leader_name = stream_leader(nats_cluster[0].url)
    victim = next(s for s in nats_cluster if s.name == leader_name)
    victim.kill()  # SIGKILL the stream leader mid-stream
    alive = [s for s in nats_cluster if s is not victim]

    assert done.wait(60)
    wait_for(lambda: exp.stats()["export_acked_records"] >= 1200, 90, "every record acked")
    stored = read_stream(alive[0].url)
    ids = sorted(headers["Nats-Msg-Id"] for _, headers, _, _ in stored)
    assert ids == sorted(f"{r.agent_id}:{r.seq}" for r in records)  # exactly once
    wait_for(lambda: len(sub.records()) >= 1200, 60, "the subscriber to catch up")
    time.sleep(0.5)
    got = sub.records()
    assert len(got) == 1200 and sorted(r.seq for r in got) == [r.seq for r in records]
    assert exp.stats()["export_lost_records"] == 0


def test_collector_waits_out_a_cluster_still_forming(tmp_path, nats_collector_process) -> None:
    """Two of three servers up: a meta leader exists but an R3 stream cannot be placed.
    The collector says so and keeps trying; once the third server joins it creates the
    stream and becomes ready, instead of exiting on its first answer."""
    servers = cluster_servers(tmp_path)
    try:
        for s in servers[:2]:
            s.start(wait=False)
        for s in servers[:2]:
            s.wait_healthy()
        collector = nats_collector_process(servers, "--replicas", "3").launch()
        wait_for(
            lambda: (
                "cannot create stream TLSCAP yet" in collector.log.read_text()
                or collector.proc.poll() is not None
            ),
            30,
            "the collector to meet the forming cluster",
        )
        assert collector.proc.poll() is None, collector.log.read_text()
        assert "no suitable peers" in collector.log.read_text()
        servers[2].start()
        collector.wait_ready(40)
        assert stream_info(servers[0].url).config.num_replicas == 3
    finally:
        for s in servers:
            s.stop()
