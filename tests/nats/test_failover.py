"""Collectors as stateless gateways, for real: a 3-node JetStream cluster (R3 stream),
two `tlscap collector` processes in front of it, an agent exporter (with its disk
spool) given both, and a steady record flow. SIGKILL a collector: the exporter fails
over to the other, and the stream holds every record exactly once. Restart a
collector a subscriber was reading from: it resumes from its cursor, no gap, no repeat.
"""

from __future__ import annotations

import threading
import time

import grpc

from agent.consumer.subscriber import subscribe
from agent.export.backoff import Backoff
from agent.records.filter import RecordFilter
from agent.records.record import Record
from tests.grpc.conftest import make_records, wait_for
from tests.nats.conftest import NatsServer
from tests.nats.test_jetstream import read_stream

MAX_RECORDS = 20_000


class Reader:
    """A live subscriber (the code `tlscap tail` runs) on one collector, on a thread."""

    def __init__(self, address: str) -> None:
        self.records: list[Record] = []
        self.cursors: list[int] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self.thread.start()

    def _run(self, address: str) -> None:
        try:
            for event in subscribe(
                lambda: grpc.insecure_channel(address),
                RecordFilter(),
                replay=True,
                live=True,
                stop=self.stop,
                backoff=Backoff(initial=0.1, maximum=0.5),
                on_cursor=self.cursors.append,
            ):
                if isinstance(event, Record):
                    self.records.append(event)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def test_killed_collector_agent_fails_over_and_subscriber_resumes(
    nats_cluster: list[NatsServer], nats_collector_process, exporters
) -> None:
    a = nats_collector_process(nats_cluster, "--replicas", "3").start()  # makes the stream
    b = nats_collector_process(nats_cluster, "--replicas", "3").start()
    reader = Reader(b.address)
    records = make_records(MAX_RECORDS, payload=200)
    exp = exporters([a.address, b.address], ack_timeout=10.0)  # starts on a
    stop_flow, done = threading.Event(), threading.Event()
    written = 0

    def steady_flow() -> None:  # ~1000 records/s until told to stop
        nonlocal written
        for i, r in enumerate(records):
            if stop_flow.is_set():
                break
            exp.write(r)
            written = i + 1
            if i % 20 == 19:
                time.sleep(0.02)
        done.set()

    threading.Thread(target=steady_flow, daemon=True).start()
    try:
        wait_for(lambda: exp.stats()["export_acked_records"] >= 300, 30, "flow through a")
        assert exp.stats()["export_failovers"] == 0
        a.kill()  # SIGKILL mid-stream: batches in flight, some maybe already published
        wait_for(lambda: exp.stats()["export_failovers"] == 1, 20, "failover to b")
        acked = exp.stats()["export_acked_records"]
        wait_for(lambda: exp.stats()["export_acked_records"] >= acked + 200, 30, "flow via b")
        a.start()  # back, same address

        # b restarts under the subscriber (and the agent, which goes back to a).
        seen = len(reader.records)
        assert seen > 0
        b.kill()
        wait_for(lambda: exp.stats()["export_failovers"] == 2, 20, "failover back to a")
        time.sleep(0.3)  # records flow into the stream while the subscriber has no collector
        b.start()
        acked = exp.stats()["export_acked_records"]
        wait_for(lambda: exp.stats()["export_acked_records"] >= acked + 200, 30, "more flow")
        stop_flow.set()
        assert done.wait(30)
        records = records[:written]
        total = len(records)
        wait_for(lambda: exp.stats()["export_acked_records"] >= total, 60, "every record acked")
        wait_for(lambda: exp._drained(), 30, "queue and spool empty")
        stats = exp.stats()
        assert stats["export_lost_records"] == 0 and stats["export_failovers"] == 2

        stored = read_stream(nats_cluster[0].url)
        ids = [headers["Nats-Msg-Id"] for _, headers, _, _ in stored]
        assert len(ids) == total  # no duplicates ...
        assert sorted(ids) == sorted(f"{r.agent_id}:{r.seq}" for r in records)  # ... no loss

        wait_for(lambda: len(reader.records) >= total, 60, "the subscriber to catch up")
        time.sleep(0.5)
        got = reader.records
        assert reader.error is None
        # Exactly the stream, in stream order: nothing missed or repeated across b's restart.
        assert len(got) == total
        order = {f"{r.agent_id}:{r.seq}": i for i, r in enumerate(records)}
        by_stream = sorted(stored, key=lambda m: m[3])
        assert [order[f"{r.agent_id}:{r.seq}"] for r in got] == [
            order[headers["Nats-Msg-Id"]] for _, headers, _, _ in by_stream
        ]
        assert reader.cursors == sorted(set(reader.cursors))  # cursors only move forward
    finally:
        reader.close()
