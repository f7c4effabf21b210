"""`--workers 2` with `--store` and with `--otlp-endpoint`, for real: probes on curl and
Python clients of programs/http_server.py (Python ssl), two worker processes writing
one SQLite store / each exporting over an OTLP exporter of its own.

Every request must arrive complete and once: in the store, the same records as the
JSON lines file the workers wrote beside it; at the OTLP receiver, one span per
exchange.  The stats record adds up the workers' sink counters.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ebpf.conftest import REPO, TLSCAP, Capture, free_port, wait_for
from tests.ebpf.otlp_receiver import OtlpReceiver
from tests.ebpf.test_health_endpoint import scrape
from tests.ebpf.test_l7_capture import curl
from tests.ebpf.test_otlp_export import by_key, exchange_key, ours

WORKERS = 2
STRIDE = WORKERS + 1  # the agent process's stats record numbers in the last slot
PYTHON_GET = (
    "import ssl, sys, urllib.request\n"
    "ctx = ssl._create_unverified_context()\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], context=ctx).read().decode())\n"
)


@pytest.fixture
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.stop()


def make_requests(port: int, tag: str) -> list[str]:
    """Three curl and two Python client processes, one request each (new processes
    go to the workers in turn); the paths requested."""
    paths = []
    for n in range(3):
        path = f"/{tag}/curl-{n}"
        assert curl("--http1.1", f"https://127.0.0.1:{port}{path}") == f"you asked for {path}\n"
        paths.append(path)
    for n in range(2):
        path = f"/{tag}/python-{n}"
        out = subprocess.run(
            [sys.executable, "-c", PYTHON_GET, f"https://127.0.0.1:{port}{path}"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert out.stdout == f"you asked for {path}\n"
        paths.append(path)
    return paths


def our_exchanges(records: list[dict], port: int, tag: str) -> list[dict]:
    """Exchanges with our server (other programs on this machine may be busy)."""
    return [
        r for r in records
        if r["type"] == "exchange"
        and port in ((r["local"] or {}).get("port"), (r["remote"] or {}).get("port"))
        and (r["exchange"]["request"] or {}).get("target", "").startswith(f"/{tag}/")
    ]  # fmt: skip


def written_so_far(output: Path) -> list[dict]:
    """The JSON lines the workers have written by now (a line may be half-written)."""
    records = []
    for line in output.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def wait_for_metric(health_port: int, name: str, at_least: int) -> None:
    """/metrics adds up the workers' last reports (each sends one a second)."""
    wait_for(lambda: scrape(health_port).get(name, 0) >= at_least, 15, f"{name} >= {at_least}")


def check_each_request_once_and_complete(exchanges: list[dict], paths: list[str]) -> None:
    """One client and one server exchange per request, both messages whole."""
    got = sorted((r["exchange"]["request"]["target"], r["role"]) for r in exchanges)
    assert got == sorted((p, role) for p in paths for role in ("client", "server"))
    for r in exchanges:
        req, resp = r["exchange"]["request"], r["exchange"]["response"]
        assert req["method"] == "GET" and req["complete"], r
        assert resp["status"] == 200 and resp["complete"], r
        assert base64.b64decode(resp["body_b64"]) == f"you asked for {req['target']}\n".encode()
    clients = {r["comm"] for r in exchanges if r["role"] == "client"}
    assert "curl" in clients and len(clients) == 2, clients  # curl and python


def test_workers_write_one_store_every_record_once(agent, http_server, tmp_path: Path) -> None:
    port = http_server
    store = tmp_path / "capture.db"
    health = free_port()
    a = agent("--workers", str(WORKERS), "--store", str(store),
              "--health-listen", f"127.0.0.1:{health}")  # fmt: skip
    paths = make_requests(port, "store")
    # What both workers wrote by now, to the file and to the store alike.
    wait_for(lambda: len(our_exchanges(written_so_far(a.output), port, "store")) == 2 * len(paths),
             15, "the exchanges in the JSON lines file")  # fmt: skip
    wait_for_metric(health, "tlscap_store_records_total", len(written_so_far(a.output)))
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    assert store.stat().st_mode & 0o777 == 0o600  # captured plaintext

    out = subprocess.run(
        [*TLSCAP, "tail", "--store", str(store), "--since", "all", "--no-follow",
         "--output", "jsonl"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    stored = [json.loads(line) for line in out.stdout.splitlines()]  # `tail`: no stats
    # The same records as the JSON lines file, each once (the workers write in
    # parallel: the two orders may differ).
    local = [r for r in cap.records if r["type"] != "stats"]
    by_seq = {r["seq"]: r for r in stored}
    assert len(by_seq) == len(stored) == len(local)
    assert all(by_seq.get(r["seq"]) == r for r in local)
    assert len({r["agent_id"] for r in stored}) == 1
    # The agent process's stats record, numbered in its own slot.
    with sqlite3.connect(store) as db:
        ((stats_seq,),) = db.execute("SELECT seq FROM records WHERE type = 'stats'").fetchall()
    assert (stats_seq - 1) % STRIDE == STRIDE - 1

    exchanges = our_exchanges(stored, port, "store")
    check_each_request_once_and_complete(exchanges, paths)
    slots = {(r["seq"] - 1) % STRIDE for r in exchanges}
    assert slots == {0, 1}, f"exchanges from both workers expected, slots {slots}"
    # The raw plaintext too: every direction of every curl connection, without a gap.
    got = Capture(stored, "", 0)
    curl_conns = got.conns(comm="curl")
    assert len(curl_conns) == 3
    for conn in curl_conns:
        request = got.stream(conn, "egress")
        assert request.startswith(b"GET /store/curl-") and request.endswith(b"\r\n\r\n")
        path = request.split(b" ")[1]
        assert got.stream(conn, "ingress").endswith(b"\r\n\r\nyou asked for " + path + b"\n")
    s = cap.stats
    assert s["workers"] == WORKERS and s["worker_failures"] == 0, s
    # Each worker's count, added up: everything stored but the stats record.
    assert s["store_records"] == len(stored), s


def test_workers_export_spans_each_once(agent, http_server, receiver) -> None:
    port = http_server
    health = free_port()
    a = agent("--workers", str(WORKERS), "--otlp-endpoint", receiver.endpoint,
              "--otlp-insecure", "--health-listen", f"127.0.0.1:{health}")  # fmt: skip
    paths = make_requests(port, "otlp")
    wait_for_metric(health, "tlscap_otlp_spans_exported_total", 2 * len(paths))
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    exchanges = our_exchanges(cap.records, port, "otlp")
    check_each_request_once_and_complete(exchanges, paths)
    slots = {(r["seq"] - 1) % STRIDE for r in exchanges}
    assert slots == {0, 1}, f"exchanges from both workers expected, slots {slots}"
    # The workers closed their exporters before the agent exited: all is there.
    spans = [s for s in ours(receiver.wait_spans(len(exchanges)), port)
             if s.attrs.get("url.path", "").startswith("/otlp/")]  # fmt: skip
    assert len(spans) == len(exchanges)  # none twice
    got = by_key(spans)
    assert set(got) == {exchange_key(r) for r in exchanges}
    for r in exchanges:
        span = got[exchange_key(r)]
        assert span.attrs["url.path"] == r["exchange"]["request"]["target"]
        assert span.resource["process.pid"] == r["pid"]

    s = cap.stats
    assert s["workers"] == WORKERS and s["worker_failures"] == 0, s
    # The workers' final counters, added up: every span the receiver got (other
    # programs' exchanges on this machine included), none dropped, none queued.
    with receiver.lock:
        received = len(receiver.spans)
    assert s["otlp_spans_exported"] == received, (s, received)
    assert s["otlp_spans_dropped"] == s["otlp_export_failures"] == s["otlp_queue_depth"] == 0
    # One exporter per worker, none in the agent process (its stats record is no
    # exchange): each logs its own final numbers.
    finals = re.findall(r"OTLP export to \S+: (\d+) spans exported, 0 dropped", cap.stderr)
    assert len(finals) == WORKERS, cap.stderr
    assert sum(int(n) for n in finals) == received
