"""NSS/NSPR: NSS's own tstclnt against a Python server that reports what it really
received and sent, NSS's selfserv/vfyserv talking to each other, and NSPR programs whose
plaintext descriptors must never be recorded as TLS.

Every test runs twice: with the probes where the agent places them (NSS's SSL-layer
methods ssl_Read/ssl_Write/ssl_Recv/ssl_Send in libssl3, found by
agent/probes/nss_methods.py; NSPR's PR_* functions left unprobed) and with
TLSCAP_PROBE_PLACEMENT=entry (PR_Write/PR_Send/PR_Read/PR_Recv on TLS layers only)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ebpf.conftest import assert_client_capture, free_port, wait_for_port

needs_nss_tools = pytest.mark.skipif(
    shutil.which("tstclnt") is None or shutil.which("httpserv") is None,
    reason="NSS's tstclnt/httpserv are not installed; `make setup` adds libnss3-tools",
)
pytestmark = needs_nss_tools

PLACEMENTS = [pytest.param("auto", id="placed"), pytest.param("entry", id="forced-entry")]
LIBSSL3 = "/usr/lib/x86_64-linux-gnu/libssl3.so"


@pytest.fixture(params=PLACEMENTS)
def placement(request, monkeypatch) -> str:
    """The agent started by the test inherits this placement switch."""
    monkeypatch.setenv("TLSCAP_PROBE_PLACEMENT", request.param)
    return request.param


def assert_placement_used(cap, placement: str) -> None:
    """The agent probed NSS's SSL methods (placed) or NSPR's functions (entry)."""
    if placement == "entry":
        assert "forced: TLSCAP_PROBE_PLACEMENT=entry" in cap.stderr
        assert "ssl_Recv at 0x" not in cap.stderr
    else:
        for name in ("ssl_Read", "ssl_Write", "ssl_Recv", "ssl_Send"):
            assert f"{name} at 0x" in cap.stderr and "(emulated-entry)" in cap.stderr, name
        assert "PR_Write at PR_Write (covered)" in cap.stderr


REQUEST = b"GET /nss HTTP/1.1\r\nHost: localhost\r\nX-Probe: tlscap\r\n\r\n"


def tstclnt(port: int, tmp_path: Path) -> subprocess.Popen:
    """tstclnt sending REQUEST and copying the answer to its stdout."""
    # stdin is a file: at the end of a pipe tstclnt spins on EOF and never exits.
    request = tmp_path / "request"
    request.write_bytes(REQUEST)
    with request.open("rb") as stdin:
        # -D: no certificate database; -o: accept the test's self-signed certificate;
        # -f: the client speaks first (it sends stdin as soon as it is connected).
        return subprocess.Popen(
            ["tstclnt", "-h", "127.0.0.1", "-p", str(port), "-D", "-o", "-f"],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip


def capture_tstclnt(agent, truth_server, tmp_path):
    """tstclnt's request and a 20 kB response, captured: (the capture, the server's
    truth, tstclnt's stdout, the server's port)."""
    a = agent("--log-level", "debug")
    server = truth_server(body_size=20_000)
    client = tstclnt(server.port, tmp_path)
    stdout, _ = client.communicate(timeout=30)
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    [truth] = server.result()
    return cap, truth, stdout, server.port


def test_tstclnt_exact_and_stdio_not_recorded(agent, truth_server, tmp_path, placement):
    cap, truth, stdout, port = capture_tstclnt(agent, truth_server, tmp_path)
    conn = assert_client_capture(cap, "tstclnt", "nss", truth, port)
    assert base64.b64decode(truth["received_b64"]) == REQUEST
    # tstclnt copied the response to its stdout with PR_Write, and read the request from
    # stdin with PR_Read: plain NSPR descriptors, left out. With NSPR's functions probed
    # (entry) they trap and are counted; with the SSL methods probed they trap nothing.
    assert stdout == base64.b64decode(truth["sent_b64"])
    assert {r["conn_id"] for r in cap.data(source="nss")} == {conn}
    if placement == "entry":
        assert cap.stats["kernel_nss_plain_calls"] >= 2
    else:
        assert cap.stats["kernel_nss_plain_calls"] == 0
    assert conn in {r["conn_id"] for r in cap.of_type("close")}
    assert cap.stats["lost"] == 0 and cap.stats["incomplete_calls"] == 0
    assert_placement_used(cap, placement)


def test_nspr_takes_over_when_the_methods_do_not_attach(agent, truth_server, tmp_path, monkeypatch):
    """The methods are proved but refused at attach (a wrapper makes bcc raise for them):
    NSPR's PR_* beside libssl3, which the plan had left covered, are probed instead and
    the connection is captured exactly, as with the entry placement."""
    from tests.ebpf import conftest

    monkeypatch.delenv("TLSCAP_PROBE_PLACEMENT", raising=False)
    wrapper = Path(__file__).parent / "programs" / "agent_refusing_nss_methods.py"
    monkeypatch.setattr(conftest, "TLSCAP", [sys.executable, str(wrapper)])
    cap, truth, stdout, port = capture_tstclnt(agent, truth_server, tmp_path)
    assert "not attached: probing NSPR's PR_Write, PR_Send, PR_Read, PR_Recv" in cap.stderr
    conn = assert_client_capture(cap, "tstclnt", "nss", truth, port)
    assert stdout == base64.b64decode(truth["sent_b64"])
    assert {r["conn_id"] for r in cap.data(source="nss")} == {conn}
    # NSPR's functions trap on stdin/stdout too, and leave them out.
    assert cap.stats["kernel_nss_plain_calls"] >= 2
    assert cap.stats["lost"] == 0 and cap.stats["incomplete_calls"] == 0


def test_plaintext_nspr_sockets_are_not_tls(agent, tmp_path, placement):
    """NSS's httpserv serves plain HTTP over NSPR sockets (PR_Recv/PR_Send, no SSL
    layer): nothing is recorded; NSPR's probes fire (entry) or nothing traps (placed)."""
    port = free_port()
    a = agent()
    serv = subprocess.Popen(
        ["httpserv", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port)
        out = subprocess.run(
            ["curl", "-s", "-m", "10", f"http://127.0.0.1:{port}/plain-text"],
            capture_output=True, timeout=30, check=True,
        )  # fmt: skip
        assert b"GET /plain-text HTTP/1.1" in out.stdout  # httpserv echoes the request
        cap = a.stop()
    finally:
        serv.kill()
        serv.wait()
    assert cap.data(source="nss") == []
    assert cap.data(comm="httpserv") == []
    if placement == "entry":
        assert cap.stats["kernel_nss_plain_calls"] >= 2
    else:
        assert cap.stats["kernel_nss_plain_calls"] == 0


def test_connection_imported_before_the_agent_started(agent, truth_server, tmp_path, placement):
    """SSL_ImportFD ran before the probes existed, so the SSL layer's identity was never
    learned: the layer NSS pushed on the socket is recognised all the same (entry; the
    SSL methods need no identity), and the socket (opened before the agent too) still
    maps to its connection."""
    server = truth_server(body_size=5000, hold=True)
    client = tstclnt(server.port, tmp_path)
    server.wait_received()  # the request went out before the agent existed
    a = agent()
    server.release()
    stdout, _ = client.communicate(timeout=30)
    cap = a.stop()
    [truth] = server.result()

    (conn,) = cap.conns(comm="tstclnt")
    assert {r["conn_id"] for r in cap.data(source="nss")} == {conn}
    assert cap.data(conn_id=conn, direction="egress") == []  # sent before we attached
    assert cap.stream(conn, "ingress") == base64.b64decode(truth["sent_b64"]) == stdout
    first = cap.data(conn_id=conn)[0]
    assert first["remote"] == {"ip": "127.0.0.1", "port": server.port}
    assert [first["local"]["ip"], first["local"]["port"]] == truth["peer"]


def test_tstclnt_bulk_same_records_both_placements(agent, truth_server, tmp_path, monkeypatch):
    """A 1 MB answer, one agent per placement: each capture equals what the server
    really sent and received, and both placements report the same calls - the same fd,
    direction, offset and length for every record - and the same tuple."""
    records = {}
    for mode in ("entry", "auto"):
        monkeypatch.setenv("TLSCAP_PROBE_PLACEMENT", mode)
        a = agent()
        server = truth_server(body_size=1_000_000)
        client = tstclnt(server.port, tmp_path)
        stdout, _ = client.communicate(timeout=60)
        cap = a.stop()
        assert cap.returncode == 0, cap.stderr
        [truth] = server.result()
        conn = assert_client_capture(cap, "tstclnt", "nss", truth, server.port)
        assert stdout == base64.b64decode(truth["sent_b64"])
        assert cap.stats["lost"] == 0 and cap.stats["incomplete_calls"] == 0
        rows = cap.data(conn_id=conn)
        assert all(r["remote"]["port"] == server.port for r in rows)
        records[mode] = [(r["fd"], r["direction"], r["offset"], r["len"], r["role"])
                         for r in rows]  # fmt: skip
        assert len(records[mode]) > 50
    assert records["auto"] == records["entry"]


@pytest.fixture
def nss_server_db(tls_cert, tmp_path) -> Path:
    """An NSS database holding the test certificate and key as "server", trusted."""
    cert, key = tls_cert
    db = tmp_path / "nssdb"
    db.mkdir()
    p12 = tmp_path / "server.p12"
    for cmd in (
        ["certutil", "-N", "-d", f"sql:{db}", "--empty-password"],
        ["openssl", "pkcs12", "-export", "-in", str(cert), "-inkey", str(key), "-out",
         str(p12), "-passout", "pass:", "-name", "server"],
        ["pk12util", "-i", str(p12), "-d", f"sql:{db}", "-W", ""],
        ["certutil", "-M", "-d", f"sql:{db}", "-n", "server", "-t", "CTP,C,C"],
    ):  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return db


def test_selfserv_and_vfyserv_every_ssl_method(agent, nss_server_db, placement):
    """NSS on both ends: vfyserv writes its request with PR_Write (ssl_Write) and reads
    with PR_Read (ssl_Read); selfserv reads with PR_Read and answers with PR_Writev,
    which NSS's ssl_WriteV turns into ssl_Send calls. Each side's capture must equal
    the other side's, byte for byte."""
    port = free_port()
    db = f"sql:{nss_server_db}"
    a = agent("--log-level", "debug")
    serv = subprocess.Popen(
        ["selfserv", "-d", db, "-n", "server", "-p", str(port), "-V", "tls1.2:"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port)
        out = subprocess.run(["vfyserv", "-p", str(port), "-d", db, "localhost"],
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        cap = a.stop()
    finally:
        serv.kill()
        serv.wait()
    assert cap.returncode == 0, cap.stderr
    said = re.search(r"Connection 1 read (\d+) bytes total", out.stdout + out.stderr)
    assert said, out.stdout + out.stderr
    read_total = int(said.group(1))
    (client,) = cap.conns(comm="vfyserv")
    (server,) = cap.conns(comm="selfserv")
    request = cap.stream(client, "egress")
    assert request.startswith(b"GET ") and cap.stream(server, "ingress") == request
    answer = cap.stream(client, "ingress")
    assert len(answer) == read_total > 0
    if placement == "entry":
        # PR_Writev has no NSPR probe: selfserv's answer was never seen at the entry.
        assert cap.data(conn_id=server, direction="egress") == []
    else:
        assert cap.stream(server, "egress") == answer
    assert cap.stats["lost"] == 0 and cap.stats["incomplete_calls"] == 0
    assert_placement_used(cap, placement)
