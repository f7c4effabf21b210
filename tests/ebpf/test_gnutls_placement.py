"""GnuTLS's receive probes on the internal worker (agent/probes/gnutls_worker.py) capture
exactly what the entry placement captures: a real GnuTLS client (programs/
gnutls_nonblocking.c: non-blocking socket, GNUTLS_E_AGAIN, gnutls_record_recv and
gnutls_record_recv_seq alternating, gnutls_bye reading an alert) run under both
placements, each capture compared byte for byte with what the server sent and with
the other placement's records."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ebpf.conftest import PROGRAMS
from tests.ebpf.test_probe_placement import placement  # noqa: F401  (fixture)

LIBGNUTLS = "/usr/lib/x86_64-linux-gnu/libgnutls.so.30"
WORKER = "gnutls_record_recv+gnutls_record_recv_seq"
PRIORITIES = [
    pytest.param("NORMAL:-VERS-ALL:+VERS-TLS1.3", id="tls1.3"),
    # TLS 1.2: the handshake reads the change cipher spec through the worker (type 20).
    pytest.param("NORMAL:-VERS-ALL:+VERS-TLS1.2", id="tls1.2"),
]
needs_libgnutls = pytest.mark.skipif(
    not Path(LIBGNUTLS).exists(), reason="libgnutls30 is not installed"
)


@pytest.fixture(scope="module")
def gnutls_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None or not Path("/usr/include/gnutls/gnutls.h").exists():
        pytest.skip("needs gcc and libgnutls28-dev")
    binary = tmp_path_factory.mktemp("gnutls") / "gnutls_nonblocking"
    subprocess.run(
        ["gcc", "-O1", "-o", str(binary), str(PROGRAMS / "gnutls_nonblocking.c"), "-lgnutls"],
        check=True, capture_output=True,
    )  # fmt: skip
    return binary


@needs_libgnutls
def test_libgnutls_placement_is_the_worker_unless_forced(placement):  # noqa: F811
    from agent.probes.elf_symbols import find_symbols
    from agent.probes.library_probes import PROBED_SYMBOLS, plan_library
    from agent.probes.targets import TlsLibrary

    path = str(Path(LIBGNUTLS).resolve())
    lib = TlsLibrary(path, path, 0, 0, "gnutls", frozenset(find_symbols(path, PROBED_SYMBOLS)))
    plan = {p.name: p for p in plan_library(lib)}
    if placement == "entry":
        assert {"gnutls_record_recv", "gnutls_record_recv_seq"} <= set(plan)
        assert {p.placement.kind for p in plan.values()} == {"entry"}
        assert plan["gnutls_record_recv"].single_stepped_uretprobe
    else:
        assert "gnutls_record_recv" not in plan and "gnutls_record_recv_seq" not in plan
        worker = plan[WORKER]
        assert worker.placement.kind == "worker" and not worker.single_stepped_uretprobe
        assert worker.point.entry_fn == "probe_gnutls_recv_worker_enter"
        assert isinstance(worker.where, int) and worker.where == worker.placement.address


def _run_client(binary: Path, truth_server, priority: str) -> tuple[dict, dict]:
    """The client against a held truth server: its first read finds nothing
    (GNUTLS_E_AGAIN) before the server may answer."""
    server = truth_server(body_size=40_000, hold=True)
    client = subprocess.Popen(
        [str(binary), "127.0.0.1", str(server.port), priority],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        server.wait_received()
        assert client.stdout.readline() == "waiting\n"
        server.release()
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, err
    [truth] = server.result()
    return json.loads(out.strip().splitlines()[-1]), truth


def _capture_once(agent, binary, truth_server, priority, mode, monkeypatch) -> list[tuple]:
    monkeypatch.setenv("TLSCAP_PROBE_PLACEMENT", mode)
    a = agent("--log-level", "debug")
    result, truth = _run_client(binary, truth_server, priority)
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    assert result["eagain"] >= 1 and result["recv"] > 1 and result["recv_seq"] > 1, result
    assert result["last"] == 0  # the stream ended with the server's close_notify

    (conn,) = cap.conns(pid=result["pid"])
    sent = base64.b64decode(truth["sent_b64"])
    assert hashlib.sha256(sent).hexdigest() == result["sha256"]
    assert cap.stream(conn, "egress") == base64.b64decode(truth["received_b64"])
    assert cap.stream(conn, "ingress") == sent
    ingress = cap.data(conn_id=conn, direction="ingress")
    # One record per read that returned data, in order; none for the GNUTLS_E_AGAIN
    # returns, the end of stream, the handshake's or gnutls_bye's reads.
    assert [r["len"] for r in sorted(ingress, key=lambda r: r["offset"])] == result["sizes"]
    records = cap.data(conn_id=conn)
    first = records[0]
    assert first["source"] == "gnutls" and first["role"] == "client"
    assert [first["local"]["ip"], first["local"]["port"]] == truth["peer"]
    assert first["remote"]["port"] > 0
    assert {r["fd"] for r in records} == {result["fd"]}
    assert cap.stats["lost"] == 0 and cap.stats["incomplete_calls"] == 0
    if mode == "entry":
        assert "gnutls_record_recv at gnutls_record_recv (entry): forced" in cap.stderr
    else:
        assert f"{WORKER} at 0x" in cap.stderr and "(worker)" in cap.stderr
    # The bodies are random per run, each compared with its own truth above.
    return [(r["direction"], r["offset"], r["len"], r["fd"], r["source"], r["role"])
            for r in records]  # fmt: skip


@needs_libgnutls
@pytest.mark.parametrize("priority", PRIORITIES)
def test_nonblocking_recv_and_recv_seq_same_capture_both_placements(
    agent, truth_server, gnutls_client, priority, monkeypatch
):
    placed = _capture_once(agent, gnutls_client, truth_server, priority, "auto", monkeypatch)
    entry = _capture_once(agent, gnutls_client, truth_server, priority, "entry", monkeypatch)
    assert placed == entry
