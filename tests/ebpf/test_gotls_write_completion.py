"""Go Write closed at its completion points (agent/probes/go_write_completion.py) on
its rarer paths: TLS 1.0 CBC's two writeRecordLocked calls per Write, and Writes that
fail (the peer reset the connection; then the connection closed). Each build is run
with the completion placement and with TLSCAP_PROBE_PLACEMENT=entry (every RET
probed, as before), both compared byte for byte with what the Writes returned."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import golang
from tests.ebpf.conftest import PROGRAMS
from tests.ebpf.test_gotls_capture import wait_until_probed

SOURCE = PROGRAMS / "go_tls_edges.go"
USED = "crypto/tls.(*Conn).Write completion points: writeRecordLocked(23) completion at"


@pytest.fixture(scope="session", params=["debian", "pypi"], ids=["go1.19", "go-current"])
def go_edges(request: pytest.FixtureRequest) -> Path:
    toolchain = golang.toolchains()[request.param]
    if toolchain is None:
        pytest.skip(golang.MISSING_REASON[request.param])
    return golang.build(toolchain, SOURCE)


@pytest.fixture(params=["auto", "entry"], ids=["completion", "forced-entry"])
def placement(request, monkeypatch) -> str:
    monkeypatch.setenv("TLSCAP_PROBE_PLACEMENT", request.param)
    return request.param


def run_probed(agent, binary: Path, mode: str) -> tuple:
    """(capture, the program's summary): the agent probes the program before it writes."""
    a = agent("--log-level", "debug")
    proc = subprocess.Popen([str(binary), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert json.loads(proc.stdout.readline())["pid"] == proc.pid
        wait_until_probed(a, binary)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    assert cap.stats["lost"] == 0 and cap.stats["decode_errors"] == 0
    return cap, json.loads(out.strip().splitlines()[-1])


def assert_placement(cap, placement: str) -> None:
    if placement == "entry":
        assert "Write completion not used: forced: TLSCAP_PROBE_PLACEMENT=entry" in cap.stderr
        assert USED not in cap.stderr
    else:
        assert USED in cap.stderr, "the completion points were not used"


def egress(cap, pid: int, local_port: int) -> list[dict]:
    return [r for r in cap.data(pid=pid, direction="egress") if r["local"]["port"] == local_port]


def test_tls10_cbc_split_writes_captured_exactly(agent, go_edges, placement):
    cap, got = run_probed(agent, go_edges, "tls10")
    assert_placement(cap, placement)
    assert got["version"] == 0x0301 and "CBC" in got["suite"], got  # TLS 1.0, CBC
    for role in ("client", "server"):
        records = egress(cap, got["pid"], got[f"{role}_port"])
        assert records and all(r["source"] == "gotls" and r["fd"] >= 0 for r in records)
        (conn_id,) = {r["conn_id"] for r in records}
        assert cap.stream(conn_id, "egress") == bytes.fromhex(got[f"{role}_written"]), role
    # The client's 7 Writes, each one record of its whole length (the first byte's
    # call only counted, as the RET of the entry placement sees the sum).
    client = egress(cap, got["pid"], got["client_port"])
    assert [r["len"] for r in client] == [c["n"] for c in got["client_calls"]]


def test_failed_writes_captured_once(agent, go_edges, placement):
    cap, got = run_probed(agent, go_edges, "failwrite")
    assert_placement(cap, placement)
    calls = got["client_calls"]
    # One Write written, one failed in writeRecordLocked (reset), two early returns.
    assert calls[0]["n"] == 3000 and "err" not in calls[0]
    assert [("err" in c) for c in calls[-3:]] == [True, True, True], calls
    written = bytes.fromhex(got["client_written"])
    records = egress(cap, got["pid"], got["client_port"])
    assert [r["len"] for r in records] == [c["n"] for c in calls if c["n"] > 0]
    (conn_id,) = {r["conn_id"] for r in records}
    assert cap.stream(conn_id, "egress") == written
    assert cap.stats["incomplete_calls"] == 0
