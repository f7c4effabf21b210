"""--workers N with --store and --otlp-endpoint: what is checked before the fork, and
real forked workers (agent/capture/workers.py) writing one SQLite store at once."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from agent.capture.workers import WorkerPool
from agent.cli.main import build_parser
from agent.cli.run import check_worker_outputs, worker_setup
from agent.collector.store import SCHEMA_VERSION
from agent.records.record import Record
from agent.records.writer import RecordWriter

AGENT_ID = "agent-under-test"
WORKERS = 2
STRIDE = WORKERS + 1  # the agent process's stats record numbers in the last slot
FRAMES = 60
PER_FRAME = 200


def parse(*argv: str):
    return build_parser().parse_args(["run", "--workers", str(WORKERS), *argv])


class StoreWriterBody:
    """A worker's pipeline cut down to its output end: each frame b"<n>" becomes
    PER_FRAME records written through the worker's own outputs (worker_setup's)."""

    def __init__(self, args, index: int) -> None:
        self.index = index
        sinks, attribution, l7 = worker_setup(args).open_outputs(index)
        self.writer = RecordWriter(
            sinks, AGENT_ID, "node", attribution, l7, seq_slot=index, seq_stride=STRIDE
        )

    def handle_frame(self, frame: bytearray) -> None:
        n = int(frame)
        self.writer.write_many(
            [
                Record("open", time.time_ns(), pid=self.index + 1, conn_id=f"{self.index}-{n}-{k}")
                for k in range(PER_FRAME)
            ]
        )

    def tick(self) -> None:
        pass

    def summary(self) -> dict[str, int]:
        return {"records": self.writer.records, **self.writer.sink_stats()}

    def finish(self) -> None:
        self.writer.close()


def test_two_workers_and_the_agent_write_one_store_and_lose_nothing(tmp_path: Path) -> None:
    store = tmp_path / "capture.db"
    args = parse("--store", str(store), "--k8s-metadata", "off", "--l7", "off")
    check_worker_outputs(args)  # creates the store, before any writer process exists
    pool = WorkerPool(WORKERS, poll_s=0.01)
    pool.start(lambda index: StoreWriterBody(args, index))
    # The agent process opens its outputs after the fork, and holds the store open
    # while the workers write, as CaptureSession does.
    agent_out = RecordWriter(
        worker_setup(args).open_agent_outputs(), AGENT_ID, "node",
        seq_slot=STRIDE - 1, seq_stride=STRIDE,
    )  # fmt: skip
    for n in range(FRAMES):
        frame = b"%d" % n
        pool.send(frame + frame, [[0, len(frame)], [len(frame), 2 * len(frame)]], [1, 1])
    pool.finish()
    # SQLite's companion files, there while the agent process holds the store open,
    # are private like the store itself: they hold captured plaintext too.
    for path in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
        assert path.stat().st_mode & 0o777 == 0o600, path
    summary = pool.summary()
    agent_out.write(Record("stats", time.time_ns(), stats=summary))
    agent_out.close()

    total = WORKERS * FRAMES * PER_FRAME
    assert summary["worker_failures"] == 0
    # Counted in each worker, added up: the stats record's and /metrics' number.
    assert summary["records"] == summary["store_records"] == total
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT agent_id, seq, type, pid, conn_id FROM records").fetchall()
    assert len(rows) == total + 1
    assert {agent_id for agent_id, *_ in rows} == {AGENT_ID}
    seqs = [seq for _, seq, *_ in rows]
    assert len(set(seqs)) == len(seqs)
    opens = [row for row in rows if row[2] == "open"]
    expected = {
        f"{i}-{n}-{k}" for i in range(WORKERS) for n in range(FRAMES) for k in range(PER_FRAME)
    }
    assert sorted(conn_id for *_, conn_id in opens) == sorted(expected)  # each once
    # Worker i numbers in slot i, the agent process in the last.
    assert all((seq - 1) % STRIDE == pid - 1 for _, seq, _, pid, _ in opens)
    (stats,) = [seq for _, seq, kind, *_ in rows if kind == "stats"]
    assert (stats - 1) % STRIDE == STRIDE - 1


def test_the_store_is_made_ready_before_the_fork_0600(tmp_path: Path) -> None:
    store = tmp_path / "capture.db"
    old_umask = os.umask(0o022)
    try:
        check_worker_outputs(parse("--store", str(store)))
    finally:
        os.umask(old_umask)
    assert store.stat().st_mode & 0o777 == 0o600  # captured plaintext
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_file_that_is_no_store_fails_before_the_fork_in_one_line(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(OSError, match="not a tlscap store") as caught:
        check_worker_outputs(parse("--store", str(other)))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--otlp-endpoint", "http://o:4317"], ValueError, "expected HOST:PORT"),
        (["--otlp-endpoint", "o:1", "--otlp-cert", "c.pem"], ValueError, "go together"),
        (
            ["--otlp-endpoint", "o:1", "--otlp-insecure", "--otlp-ca", "c"],
            ValueError,
            "contradicts",
        ),
        (["--otlp-endpoint", "o:1", "--otlp-ca", "/nonexistent/ca.pem"], OSError, "cannot read"),
        (["--otlp-insecure"], ValueError, "need --otlp-endpoint"),
    ],
)
def test_bad_otlp_settings_fail_before_the_fork(argv, error, message, monkeypatch) -> None:
    import agent.otlp.options

    def no_exporter_before_the_fork(_settings):
        raise AssertionError("a gRPC channel made before the fork")

    monkeypatch.setattr(agent.otlp.options, "open_otlp_sink", no_exporter_before_the_fork)
    with pytest.raises(error, match=message):
        check_worker_outputs(parse("--output", "none", *argv))


def test_good_otlp_settings_open_no_exporter_in_the_agent_process(
    tmp_path: Path, monkeypatch
) -> None:
    """The settings are checked (the CA read) before the fork, but the exporter, a gRPC
    channel, is each worker's: the agent process's outputs (its stats record, never
    an exchange) have none."""
    import agent.otlp.options

    def no_exporter_here(_settings):
        raise AssertionError("an OTLP exporter in the agent process")

    monkeypatch.setattr(agent.otlp.options, "open_otlp_sink", no_exporter_here)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    store = tmp_path / "s.db"
    args = parse("--otlp-endpoint", "o:4317", "--otlp-ca", str(ca), "--store", str(store))
    check_worker_outputs(args)
    sinks = worker_setup(args).open_agent_outputs()
    assert [type(sink).__name__ for sink in sinks] == ["StoreSink"]
    for sink in sinks:
        sink.close()
