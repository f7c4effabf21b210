"""The command lines other tools script against: certs, collector, tail (real processes)."""

from __future__ import annotations

import base64
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from agent.cli import tls_options
from agent.export.exporter import GrpcExporter
from agent.sinks.store import StoreSink
from tests.grpc.conftest import REPO, make_records, wait_for

SYS_TGKILL = 234  # x86_64: a signal to one thread of another process

TLSCAP = [sys.executable, "-m", "agent"]


def tlscap(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TLSCAP, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_collector_refuses_to_start_without_choosing_security(tmp_path):
    out = tlscap("collector", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "s.db"))
    assert out.returncode == 2
    assert "--insecure" in out.stderr and "Traceback" not in out.stderr


def test_certs_collector_and_tail_with_mutual_tls(tmp_path):
    pki = tmp_path / "pki"
    out = tlscap("certs", "--dir", str(pki))
    assert out.returncode == 0, out.stderr
    assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    ready = tmp_path / "addr"
    tls = ["--tls-ca", str(pki / "ca.crt")]
    collector = subprocess.Popen(
        [*TLSCAP, "collector", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "c.db"),
         "--tls-cert", str(pki / "collector.crt"), "--tls-key", str(pki / "collector.key"),
         *tls, "--ready-file", str(ready)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or collector.poll() is not None, 30, "collector")
        address = ready.read_text().strip()
        agent_tls = tls_options.tls_settings_from_args(
            _ns(pki / "agent.crt", pki / "agent.key", pki / "ca.crt"), server=False
        )
        exp = GrpcExporter(
            address,
            channel_factory=lambda: tls_options.open_channel(address, agent_tls),
            spool_dir=tmp_path / "spool",
            spool_max_bytes=16 << 20,
        )
        # The default agent.crt is tlscap://agent/<this host>: records of this node only.
        node = socket.gethostname()
        sent = make_records(50, node=node)
        for r in sent:
            exp.write(r)
        exp.close(timeout=20)
        assert exp.stats()["export_acked_records"] == 50

        consumer = ["--tls-cert", str(pki / "consumer.crt"), "--tls-key", str(pki / "consumer.key")]
        out = tlscap("tail", "--collector", address, *consumer, *tls, "--since", "all",
                     "--no-follow", "--output", "jsonl", "--direction", "egress")  # fmt: skip
        assert out.returncode == 0, out.stderr
        got = jsonl(out.stdout)
        want = [r for r in sent if r.direction == "egress"]
        assert [g["seq"] for g in got] == [r.seq for r in want]
        assert [base64.b64decode(g["data_b64"]) for g in got] == [r.data for r in want]
        assert got[0]["node"] == node and got[0]["agent_id"] == "agent-a"

        # No client certificate: the collector refuses the consumer, and says why.
        out = tlscap("tail", "--collector", address, *tls, "--since", "all", "--no-follow")
        assert out.returncode == 2
        assert "subscription refused" in out.stderr
    finally:
        collector.terminate()
        collector.wait(20)


def _ns(cert: Path, key: Path, ca: Path):
    import argparse

    return argparse.Namespace(
        insecure=False, tls_cert=cert, tls_key=key, tls_ca=ca, tls_server_name=None
    )


def test_local_store_written_by_run_is_read_by_tail(tmp_path):
    store = tmp_path / "local.db"
    sink = StoreSink(store)
    sent = make_records(1200, payload=100)
    for r in sent:
        sink.write(r)
    sink.close()

    out = tlscap("tail", "--store", str(store), "--since", "all", "--no-follow",
                 "--output", "jsonl")  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = jsonl(out.stdout)
    assert [g["seq"] for g in got] == [r.seq for r in sent]
    assert got[5] == sent[5].to_json()

    text = tlscap("tail", "--store", str(store), "--since", "all", "--no-follow",
                  "--direction", "ingress", "--local-port", "50000")  # fmt: skip
    assert text.returncode == 0, text.stderr
    headers = [line for line in text.stdout.splitlines() if not line.startswith("  ")]
    assert len(headers) == len([r for r in sent if r.direction == "ingress"])
    assert all(" n1 curl[4242/4243] openssl ingress " in h for h in headers)


def test_collector_stops_on_sigterm_delivered_to_another_thread(tmp_path):
    """A process-directed SIGTERM may land on any thread (gRPC's do not block it);
    the collector's main thread must still see it and exit, not wait forever."""
    ready = tmp_path / "ready"
    collector = subprocess.Popen(
        [sys.executable, "-m", "agent", "collector", "--listen", "127.0.0.1:0", "--insecure",
         "--store", str(tmp_path / "s.db"), "--ready-file", str(ready)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or collector.poll() is not None, 30, "collector ready")
        assert collector.poll() is None
        others = sorted(int(t) for t in os.listdir(f"/proc/{collector.pid}/task"))
        others.remove(collector.pid)
        assert others, "the collector runs gRPC threads"
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(SYS_TGKILL, collector.pid, others[0], signal.SIGTERM) == 0
        assert collector.wait(20) == 0
    finally:
        if collector.poll() is None:
            collector.kill()
            collector.wait()
