"""The whole path for real: probes -> agent -> gRPC -> collector -> subscriber."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.ebpf.conftest import AGENT_START_TIMEOUT, REPO, TLSCAP, Capture, wait_for
from tests.ebpf.test_openssl_capture import curl_request, run_curl


def start_tlscap(*args: str, log) -> subprocess.Popen:
    return subprocess.Popen(
        [*TLSCAP, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL
    )


class Subscriber:
    """`tlscap tail` subscribed to a collector, writing JSON lines to a file."""

    def __init__(self, proc: subprocess.Popen, output: Path) -> None:
        self.proc = proc
        self.output = output

    def lines(self) -> list[dict]:
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text().splitlines() if line]

    def stop(self) -> list[dict]:
        """SIGINT (it flushes and exits 0); everything it received."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(20) == 0
        return self.lines()


@contextlib.contextmanager
def collector_with_subscriber(tmp_path: Path) -> Iterator[tuple[str, Subscriber]]:
    """A real collector (SQLite store) and `tlscap tail` subscribed to it: yields the
    collector's address and the subscriber, whose subscription is live by then."""
    ready = tmp_path / "collector.addr"
    logs = open(tmp_path / "tlscap.log", "w")  # noqa: SIM115
    collector = start_tlscap(
        "collector", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "store.db"),
        "--insecure", "--allow-anonymous-subscribe", "--ready-file", str(ready), log=logs,
    )  # fmt: skip
    tail = None
    try:
        # A tlscap process's start-up: the same allowance as the agent's (raised in
        # the emulated VMs of `make test-kernels`, where 30 s was not always enough).
        wait_for(
            lambda: ready.exists() or collector.poll() is not None,
            max(30.0, AGENT_START_TIMEOUT),
            "the collector",
        )
        address = ready.read_text().strip()
        tailed = tmp_path / "tail.jsonl"
        tail = start_tlscap(
            "tail", "--collector", address, "--insecure", "--output", "jsonl",
            "--output-file", str(tailed), log=logs,
        )  # fmt: skip
        time.sleep(1.0)  # the subscription is live before anything is captured
        yield address, Subscriber(tail, tailed)
    finally:
        for proc in (tail, collector):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
        logs.close()


def stop_and_compare_sources(a, subscriber: Subscriber) -> tuple[Capture, list, list]:
    """Stop the agent; (its capture, its records but the stats line, what the
    subscriber got once it had as many)."""
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    local = [r for r in cap.records if r["type"] != "stats"]
    assert local, "the agent captured nothing"
    wait_for(lambda: len(subscriber.lines()) >= len(local), 30, "the subscriber")
    return cap, local, subscriber.stop()


def test_subscriber_receives_exactly_what_the_agent_captured(agent, s_server, tmp_path):
    with collector_with_subscriber(tmp_path) as (address, subscriber):
        local_store = tmp_path / "local.db"
        a = agent(
            "--collector", address, "--insecure", "--spool-dir", str(tmp_path / "spool"),
            "--store", str(local_store),
        )  # fmt: skip
        port = s_server("127.0.0.1")
        run_curl("127.0.0.1", port, "/via-collector", tmp_path / "body")
        cap, local, remote = stop_and_compare_sources(a, subscriber)
    # Every field of every record, identities (node, agent id, seq) included.
    assert remote == local
    assert len({r["agent_id"] for r in remote}) == 1
    assert [r["seq"] for r in remote] == sorted(r["seq"] for r in remote)

    got = Capture(remote, "", 0)
    (client_conn,) = got.conns(comm="curl")
    request = curl_request("127.0.0.1", port, "/via-collector")
    assert got.stream(client_conn, "egress") == request
    assert got.stream(client_conn, "ingress").endswith((tmp_path / "body").read_bytes())
    # The agent's own store (`run --store`) holds the same, read by `tail --store`.
    out = subprocess.run(
        [*TLSCAP, "tail", "--store", str(local_store), "--since", "all", "--no-follow",
         "--output", "jsonl"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert [json.loads(line) for line in out.stdout.splitlines()] == local
    stats = cap.stats
    assert stats["export_queue_dropped"] == stats["export_spool_dropped_records"] == 0


def test_capture_workers_export_every_record_once(agent, s_server, tmp_path):
    """`--workers 2 --collector`: each worker streams its records with its own spool, the
    agent process the stats record; the subscriber gets every record once, one agent_id."""
    with collector_with_subscriber(tmp_path) as (address, subscriber):
        spool = tmp_path / "spool"
        a = agent("--collector", address, "--insecure", "--spool-dir", str(spool),
                  "--workers", "2")  # fmt: skip
        port = s_server("127.0.0.1")
        for n in range(3):
            run_curl("127.0.0.1", port, f"/workers-{n}", tmp_path / "body")
        cap, local, remote = stop_and_compare_sources(a, subscriber)
    # Workers write in parallel: the file's order and the collector's may differ;
    # each record is there once, with the same fields, under one agent_id.
    by_seq = {r["seq"]: r for r in remote}
    assert len(by_seq) == len(remote) == len(local)
    assert all(by_seq[r["seq"]] == r for r in local)
    assert len({r["agent_id"] for r in remote}) == 1
    slots = {(r["seq"] - 1) % 3 for r in local}
    assert slots == {0, 1}, f"records from both workers expected, slots {slots}"
    assert {p.name for p in spool.iterdir() if p.is_dir()} >= {"worker-0", "worker-1"}
    got = Capture(remote, "", 0)
    sent = {got.stream(conn, "egress") for conn in got.conns(comm="curl")}
    assert sent == {curl_request("127.0.0.1", port, f"/workers-{n}") for n in range(3)}
    stats = cap.stats
    assert stats["workers"] == 2 and stats["worker_failures"] == 0, stats
    assert stats["export_queue_dropped"] == stats["export_spool_dropped_records"] == 0
    assert stats["export_acked_records"] >= len(local), stats
