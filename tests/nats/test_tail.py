"""One JetStream node, end to end through the real programs' code: the agent's exporter
(with its spool) -> a collector with --backend nats -> the stream -> `tlscap tail` as a
subprocess. Exact records live; then replay from the cursor tail reported, and from a
time."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.records.record import Record
from tests.grpc.conftest import REPO, make_records, wait_for
from tests.nats.conftest import NatsServer


def tail(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", "tail", "--insecure", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def lines(path_or_text: Path | str) -> list[dict]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def last_cursor(stderr: str) -> int:
    found = re.findall(r"last cursor (\d+) \(resume with --after-cursor \1\)", stderr)
    assert found, stderr
    return int(found[-1])


def timed(records: list[Record], ts_ns: int) -> list[Record]:
    return [r.replace(ts_ns=ts_ns + i) for i, r in enumerate(records)]


def test_exporter_to_stream_to_tail_live_then_from_cursor_and_time(
    nats_server: NatsServer, nats_collector, exporters, tmp_path: Path
) -> None:
    server = nats_collector(nats_server, replay_clock_skew=0.0)
    out = tmp_path / "live.jsonl"
    live = subprocess.Popen(
        [sys.executable, "-m", "agent", "tail", "--insecure", "--collector", server.address,
         "--output", "jsonl", "--output-file", str(out)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: server.stats()["nats_consumers"] == 1, 30, "tail subscribed")
        exp = exporters(server.address)
        first = timed(make_records(80, payload=300), time.time_ns())
        for r in first:
            exp.write(r)
        wait_for(lambda: out.exists() and len(lines(out)) >= 80, 30, "tail to print 80")
        time.sleep(0.3)
    finally:
        live.send_signal(signal.SIGTERM)
        _, stderr = live.communicate(timeout=20)
    assert live.returncode == 0, stderr
    assert lines(out) == [r.to_json() for r in first]  # exact records, in order, once
    cursor = last_cursor(stderr)
    assert cursor == 80  # stream sequences

    time.sleep(1.1)
    since = time.time_ns()
    second = timed(make_records(40, payload=300, start_seq=81), since + 1000)
    for r in second:
        exp.write(r)
    wait_for(lambda: exp.stats()["export_acked_records"] == 120, 20, "second batch acked")

    # From the cursor: exactly what came after it.
    resumed = tail("--collector", server.address, "--after-cursor", str(cursor),
                   "--no-follow", "--output", "jsonl")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert lines(resumed.stdout) == [r.to_json() for r in second]
    assert last_cursor(resumed.stderr) == 120

    # From a time (Unix seconds).
    recent = tail("--collector", server.address, "--since", f"{since / 1e9:.6f}",
                  "--no-follow", "--output", "jsonl")  # fmt: skip
    assert recent.returncode == 0, recent.stderr
    assert lines(recent.stdout) == [r.to_json() for r in second]

    # The whole stream, and a cursor past its end: nothing.
    everything = tail("--collector", server.address, "--since", "all", "--no-follow",
                      "--output", "jsonl")  # fmt: skip
    assert lines(everything.stdout) == [r.to_json() for r in first + second]
    past = tail("--collector", server.address, "--after-cursor", "120", "--no-follow")
    assert past.returncode == 0 and past.stdout == ""


def test_after_cursor_needs_a_collector(tmp_path: Path) -> None:
    out = tail("--store", str(tmp_path / "x.db"), "--after-cursor", "5", "--no-follow")
    assert out.returncode != 0 and "--after-cursor needs --collector" in out.stderr
