"""NSS/NSPR (PR_Write/PR_Send/PR_Read/PR_Recv on TLS layers only): NSS's own tstclnt
against a Python server that reports what it really received and sent, and NSPR
programs whose plaintext descriptors must never be recorded as TLS."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ebpf.conftest import assert_client_capture, free_port, wait_for_port

needs_nss_tools = pytest.mark.skipif(
    shutil.which("tstclnt") is None or shutil.which("httpserv") is None,
    reason="NSS's tstclnt/httpserv are not installed; `make setup` adds libnss3-tools",
)
pytestmark = needs_nss_tools

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


def test_tstclnt_exact_and_stdio_not_recorded(agent, truth_server, tmp_path):
    a = agent()
    server = truth_server(body_size=20_000)
    client = tstclnt(server.port, tmp_path)
    stdout, _ = client.communicate(timeout=30)
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    [truth] = server.result()

    conn = assert_client_capture(cap, "tstclnt", "nss", truth, server.port)
    assert base64.b64decode(truth["received_b64"]) == REQUEST
    # tstclnt copied the response to its stdout with PR_Write, and read the request from
    # stdin with PR_Read: plain NSPR descriptors, counted and left out.
    assert stdout == base64.b64decode(truth["sent_b64"])
    assert {r["conn_id"] for r in cap.data(source="nss")} == {conn}
    assert cap.stats["kernel_nss_plain_calls"] >= 2
    assert conn in {r["conn_id"] for r in cap.of_type("close")}
    assert cap.stats["lost"] == 0


def test_plaintext_nspr_sockets_are_not_tls(agent, tmp_path):
    """NSS's httpserv serves plain HTTP over NSPR sockets (PR_Recv/PR_Send, no SSL
    layer): the probes fire, and nothing is recorded."""
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
    assert cap.stats["kernel_nss_plain_calls"] >= 2


def test_connection_imported_before_the_agent_started(agent, truth_server, tmp_path):
    """SSL_ImportFD ran before the probes existed, so the SSL layer's identity was never
    learned: the layer NSS pushed on the socket is recognised all the same, and the
    socket (opened before the agent too) still maps to its connection."""
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
