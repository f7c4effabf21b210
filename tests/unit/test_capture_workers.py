"""WorkerPool with real forked processes (no kernel needed), and the seq numbers of
several writers sharing one agent_id."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.capture.workers import WorkerPool
from agent.records.record import Record
from agent.records.writer import RecordWriter


class FileBody:
    """Appends every frame it gets to a file of its own; b"die" kills the worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.frames = 0
        self.finished = 0

    def handle_frame(self, frame: bytearray) -> None:
        if frame == b"die":
            os._exit(3)
        with self.path.open("ab") as f:
            f.write(bytes(frame) + b"\n")
        self.frames += 1

    def tick(self) -> None:
        pass

    def summary(self) -> dict[str, int]:
        return {"frames": self.frames, "finished": self.finished}

    def finish(self) -> None:
        self.finished = 1


def bodies_in(tmp_path: Path):
    return lambda index: FileBody(tmp_path / f"worker{index}")


def send(pool: WorkerPool, *frames: bytes) -> None:
    """Frame i to worker i (the pool sends runs of one buffer, as the ring holds them)."""
    data = b"".join(frames)
    runs: list[list[int]] = []
    at = 0
    for frame in frames:
        runs.append([at, at + len(frame)] if frame else [])
        at += len(frame)
    pool.send(data, runs, [len(f) for f in frames])


def test_frames_reach_their_worker_in_order_and_counters_add_up(tmp_path: Path) -> None:
    pool = WorkerPool(2, poll_s=0.01)
    pool.start(bodies_in(tmp_path))
    for n in range(50):
        send(pool, b"a%d" % n, b"b%d" % n)
    send(pool, b"", b"only-b")  # an empty frame is not sent
    pool.finish()
    assert (tmp_path / "worker0").read_bytes() == b"".join(b"a%d\n" % n for n in range(50))
    assert (tmp_path / "worker1").read_bytes().endswith(b"b49\nonly-b\n")
    assert pool.summary() == {
        "frames": 101, "finished": 2, "workers": 2, "worker_failures": 0,
        "worker_lost_events": 0,
    }  # fmt: skip


def test_a_frame_of_more_runs_than_one_writev_takes_and_more_bytes_than_the_pipe_holds(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 << 20)
    runs = [n for i in range(0, len(data), 1024) for n in (i, i + 1000)]  # 3,072 runs
    pool = WorkerPool(1, poll_s=0.01)
    pool.start(bodies_in(tmp_path))
    pool.send(data, [runs], [len(runs) // 2])
    pool.finish()
    expected = b"".join(data[runs[i] : runs[i + 1]] for i in range(0, len(runs), 2))
    assert (tmp_path / "worker0").read_bytes() == expected + b"\n"
    assert pool.summary()["frames"] == 1


def test_a_dead_worker_is_logged_and_what_it_would_have_got_counted_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = WorkerPool(2, poll_s=0.01)
    pool.start(bodies_in(tmp_path))
    send(pool, b"die", b"fine")
    deadline = time.monotonic() + 10
    while pool.summary()["worker_failures"] == 0 and time.monotonic() < deadline:
        pool.collect()
        time.sleep(0.01)
    send(pool, b"1234567", b"y")  # 7 "events" for the dead worker
    pool.finish()
    summary = pool.summary()
    assert summary["worker_lost_events"] == 7
    assert summary["worker_failures"] >= 1
    assert "capture worker 0 is gone" in caplog.text
    assert (tmp_path / "worker1").read_bytes() == b"fine\ny\n"


def test_writers_sharing_an_agent_id_number_records_in_their_own_slots() -> None:
    seqs = []
    for slot in range(3):
        writer = RecordWriter([], "agent", "node", seq_slot=slot, seq_stride=3)
        records = [Record("open", 1) for _ in range(4)]
        writer.write_many(records[:1])
        writer.write_many(records[1:])
        seqs += [r.seq for r in records]
        assert writer.records == 4
    assert sorted(seqs) == list(range(1, 13))  # unique, none 0
    with pytest.raises(ValueError):
        RecordWriter([], "agent", "node", seq_slot=3, seq_stride=3)


# Outputs several processes can write at once (one ordered writer is not needed).
EVERY_SHARED_OUTPUT = ["--output", "jsonl", "--output-file", "f", "--store", "s"]
EVERY_SHARED_OUTPUT += ["--otlp-endpoint", "o:1", "--collector", "c:1"]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--workers", "2", "--output", "jsonl", "--output-file", "f"], None),
        (["--workers", "4", "--output", "none"], None),
        (["--workers", "1"], None),  # text to the terminal: no workers, no problem
        (["--workers", "0"], "between 1 and 64"),
        (["--workers", "65", "--output", "none"], "between 1 and 64"),
        (["--workers", "2"], "needs --output jsonl with --output-file"),
        (["--workers", "2", "--output", "jsonl"], "needs --output jsonl with --output-file"),
        (["--workers", "2", "--output", "pcapng", "--output-file", "f"], "needs --output"),
        (["--workers", "2", "--collector", "c:1", "--insecure"], None),
        (["--workers", "2", "--output", "none", "--store", "s"], None),
        (["--workers", "2", "--store", "s"], None),  # --store alone: output none
        (["--workers", "2", "--otlp-endpoint", "o:1", "--otlp-insecure"], None),
        (["--workers", "2", *EVERY_SHARED_OUTPUT], None),
        # One ordered writer only: still refused, whatever else is given.
        (["--workers", "2", "--output", "text", "--output-file", "f", "--store", "s"], "needs"),
        (["--workers", "2", "--output", "har", "--output-file", "f"], "needs --output"),
    ],
)
def test_workers_need_outputs_each_worker_can_open_for_itself(argv, problem) -> None:
    from agent.cli.main import build_parser
    from agent.cli.run import workers_problem

    args = build_parser().parse_args(["run", *argv])
    found = workers_problem(args)
    assert found == problem if problem is None else problem in found


def test_worker_outputs_are_checked_before_the_fork_and_the_file_started_empty(
    tmp_path: Path,
) -> None:
    from agent.cli import tls_options
    from agent.cli.main import build_parser
    from agent.cli.run import check_worker_outputs, worker_setup

    out = tmp_path / "capture.jsonl"
    out.write_text("left from an earlier run\n")
    argv = ["run", "--workers", "2", "--output", "jsonl", "--output-file", str(out),
            "--spool-dir", str(tmp_path / "spool")]  # fmt: skip
    args = build_parser().parse_args(argv)
    check_worker_outputs(args)
    assert out.read_bytes() == b""
    # Each worker appends to the file (and would spool in <spool-dir>/worker-<i>).
    setup = worker_setup(args)
    for index in range(2):
        sinks, attribution, _ = setup.open_outputs(index)
        for sink in sinks:
            sink.write_many([Record("open", index)])
            sink.close()
        attribution.close()
    assert len(out.read_text().splitlines()) == 2
    token = tmp_path / "token"
    token.write_text("t")
    argv = ["run", "--workers", "2", "--collector", "c:1", "--insecure",
            "--collector-token-file", str(token)]  # fmt: skip
    insecure_token = build_parser().parse_args(argv)
    with pytest.raises(tls_options.TlsConfigError, match="needs TLS"):
        check_worker_outputs(insecure_token)


def test_spools_of_workers_this_run_does_not_have_are_named(tmp_path: Path) -> None:
    from agent.cli.run import stale_worker_spools

    for name, files in (("worker-0", 1), ("worker-1", 1), ("worker-2", 0), ("worker-3", 2)):
        (tmp_path / name).mkdir()
        for n in range(files):
            (tmp_path / name / f"segment-{n}").write_bytes(b"x")
    (tmp_path / "segment-0").write_bytes(b"the agent process's own")
    assert stale_worker_spools(tmp_path, 2) == [tmp_path / "worker-3"]  # worker-2 is empty
    assert stale_worker_spools(tmp_path, 0) == [tmp_path / f"worker-{n}" for n in (0, 1, 3)]
    assert stale_worker_spools(tmp_path / "missing", 1) == []
