"""The exporter given several collectors: it fails over from a dead or hung one to the
next, at once, and backs off only after a whole round failed. Real gRPC servers on
loopback (the fake collector of test_exporter.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.export.backoff import Backoff
from agent.export.exporter import CHANNEL_OPTIONS, GrpcExporter
from agent.export.targets import CollectorTargets
from tests.grpc.conftest import wait_for
from tests.grpc.test_exporter import (  # noqa: F401 - the servers fixture
    FakeCollector,
    free_port,
    make_records,
    servers,
)


@pytest.fixture
def failover_exporters(tmp_path: Path) -> Iterator[Callable[..., GrpcExporter]]:
    made: list[GrpcExporter] = []

    def make(addresses: list[str], **kw) -> GrpcExporter:
        kw.setdefault("backoff", Backoff(initial=0.05, maximum=0.5))
        exp = GrpcExporter(
            CollectorTargets(addresses, start=0),
            channel_factory=lambda e: grpc.insecure_channel(
                e.address, options=list(CHANNEL_OPTIONS)
            ),
            spool_dir=tmp_path / f"spool{len(made)}",
            spool_max_bytes=64 << 20,
            **kw,
        )
        made.append(exp)
        return exp

    yield make
    for exp in made:
        exp.close(timeout=1.0)


def delivered(*collectors: FakeCollector) -> set[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    for c in collectors:
        with c.lock:
            out |= set(c.records)
    return out


def test_a_dead_first_collector_is_skipped_without_backoff(
    servers,  # noqa: F811
    failover_exporters,
) -> None:
    live = servers()
    # A long backoff: only trying the next collector at once delivers in time.
    exp = failover_exporters(
        [f"127.0.0.1:{free_port()}", live.address], backoff=Backoff(initial=5.0, maximum=5.0)
    )
    records = make_records(50)
    for r in records:
        exp.write(r)
    wait_for(lambda: live.servicer.count() == 50, 3, "records on the live collector")
    assert exp.stats()["export_failovers"] == 0  # never acked anywhere else: no failover


def test_stopped_then_hung_collector_fail_over_with_nothing_lost(
    servers,  # noqa: F811
    failover_exporters,
    caplog,
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.export.exporter")
    a, b = servers(), servers()
    exp = failover_exporters([a.address, b.address], ack_timeout=1.0)
    records = make_records(600)
    for r in records[:200]:
        exp.write(r)
    # Acked, not only received: a failover is counted when a collector other than the
    # last one to ack starts acking, and an ack from a still in flight when a stops
    # would leave none before b's (the CI flake of 2026-12-05).
    wait_for(
        lambda: a.servicer.count() == 200 and exp.stats()["export_acked_records"] >= 200,
        10,
        "records acked by a",
    )

    a.stop()  # connection refused from now on
    for r in records[200:400]:
        exp.write(r)
    wait_for(lambda: exp.stats()["export_failovers"] == 1, 10, "failover to b")
    first = {(r.agent_id, r.seq) for r in records[:400]}
    wait_for(lambda: delivered(a.servicer, b.servicer) >= first, 10, "the first 400")
    assert any("failed over from collector" in r.getMessage() for r in caplog.records)

    a.start()  # back on its port
    b.servicer.acking.clear()  # b hangs: takes batches, never acks
    for r in records[400:]:
        exp.write(r)
    wait_for(lambda: exp.stats()["export_failovers"] == 2, 15, "ack timeout: back to a")
    want = {(r.agent_id, r.seq) for r in records}
    wait_for(lambda: delivered(a.servicer, b.servicer) >= want, 15, "every record")
    wait_for(lambda: exp.stats()["export_acked_records"] >= 600, 10, "acks")
    assert exp.stats()["export_lost_records"] == 0


def test_all_down_rounds_back_off_then_any_that_returns_is_used(
    servers,  # noqa: F811
    failover_exporters,
) -> None:
    a, b = servers(start=False), servers(start=False)
    a.port, b.port = free_port(), free_port()
    exp = failover_exporters([a.address, b.address], backoff=Backoff(initial=0.2, maximum=0.4))
    records = make_records(30)
    for r in records:
        exp.write(r)
    time.sleep(1.0)
    assert exp.stats()["export_spooled_records"] == 30
    b.start()
    wait_for(lambda: b.servicer.count() == 30, 5, "records on b once it is up")
