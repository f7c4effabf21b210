"""GnuTLS (gnutls_record_send2/recv*): real wget and gnutls-serv, captured byte for byte,
with the receive probes on GnuTLS's internal worker (agent/probes/gnutls_worker.py) and
with TLSCAP_PROBE_PLACEMENT=entry."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

import pytest

from tests.ebpf.conftest import REPO, assert_client_capture, free_port, wait_for_port
from tests.ebpf.test_probe_placement import placement  # noqa: F401  (fixture)

TLS_CLIENT = REPO / "tests" / "fallback" / "programs" / "tls_client.py"

needs_wget = pytest.mark.skipif(
    shutil.which("wget") is None, reason="wget (GnuTLS) is not installed; `make setup` adds it"
)
needs_gnutls_serv = pytest.mark.skipif(
    shutil.which("gnutls-serv") is None,
    reason="gnutls-serv is not installed; `make setup` adds gnutls-bin",
)


def wget(port: int, path: str, out: str, *extra: str) -> None:
    subprocess.run(
        ["wget", "-q", "--no-check-certificate", "--tries=1", "-O", out, *extra,
         f"https://127.0.0.1:{port}{path}"],
        check=True, timeout=30,
    )  # fmt: skip


@needs_wget
def test_wget_request_and_response_exact(agent, truth_server, tmp_path, placement):  # noqa: F811
    a = agent()
    server = truth_server(body_size=40_000)  # several TLS records, several recv calls
    body = tmp_path / "body"
    wget(server.port, "/gnutls", str(body))
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    [truth] = server.result()

    conn = assert_client_capture(cap, "wget", "gnutls", truth, server.port)
    assert base64.b64decode(truth["received_b64"]).startswith(b"GET /gnutls HTTP/1.1\r\n")
    assert base64.b64decode(truth["sent_b64"]).endswith(body.read_bytes())
    assert len(cap.data(conn_id=conn, direction="ingress")) > 1
    assert conn in {r["conn_id"] for r in cap.of_type("close")}
    assert cap.stats["lost"] == 0
    assert "gnutls_record_send2" in cap.stderr  # the PLT-jumping gnutls_record_send is not


@needs_wget
def test_consecutive_wget_connections_stay_apart(agent, truth_server, tmp_path, placement):  # noqa: F811
    """Two wget runs (their GnuTLS sessions may well reuse one address for the session
    object): two connections, each exact from offset 0, never one merged stream."""
    a = agent()
    server = truth_server(count=1, body_size=500)
    second = truth_server(count=1, body_size=700)
    wget(server.port, "/one", str(tmp_path / "one"))
    wget(second.port, "/two", str(tmp_path / "two"))
    cap = a.stop()
    [t1], [t2] = server.result(), second.result()
    conns = cap.conns(comm="wget")
    assert len(conns) == 2
    by_port = {cap.data(conn_id=c)[0]["remote"]["port"]: c for c in conns}
    for port, truth in ((server.port, t1), (second.port, t2)):
        conn = by_port[port]
        assert cap.stream(conn, "egress") == base64.b64decode(truth["received_b64"])
        assert cap.stream(conn, "ingress") == base64.b64decode(truth["sent_b64"])


@needs_gnutls_serv
def test_gnutls_serv_server_side_exact(agent, tls_cert, tmp_path, placement):  # noqa: F811
    """The server side of GnuTLS: gnutls-serv --http answering a Python ssl client."""
    cert, key = tls_cert
    a = agent()
    port = free_port()
    serv = subprocess.Popen(
        ["gnutls-serv", "--http", "--port", str(port), "--x509certfile", str(cert),
         "--x509keyfile", str(key)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port)
        request = "GET /from-python HTTP/1.0\r\nHost: localhost\r\n\r\n"
        out = subprocess.run(
            [sys.executable, str(TLS_CLIENT), f"127.0.0.1:{port}", "--sni", "localhost",
             "--cafile", str(cert), "--send", request],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        client = json.loads(out.stdout.strip().splitlines()[-1])
        assert client["ok"], client
        cap = a.stop()
    finally:
        serv.kill()
        serv.wait()

    received = base64.b64decode(client["received_b64"])
    assert received.startswith(b"HTTP/1.0 200 OK")
    (server_conn,) = cap.conns(comm="gnutls-serv")
    # Everything the client sent, everything it got; wait_for_port's connection (no TLS
    # data) left no record.
    assert cap.stream(server_conn, "ingress") == request.encode()
    assert cap.stream(server_conn, "egress") == received
    first = cap.data(conn_id=server_conn)[0]
    assert first["source"] == "gnutls" and first["role"] == "server"
    assert first["local"] == {"ip": "127.0.0.1", "port": port}
    assert first["remote"] == {"ip": client["local"][0], "port": client["local"][1]}
