"""TLS over memory BIOs - Node.js (OpenSSL inside the node binary, libuv moving the
ciphertext) and Python asyncio (SSLObject) - captured on real programs: every record
carries its connection (4-tuple, role) and the bytes are exactly what was sent.

The library never touches the socket here; the kernel binds each TLS object to the
socket its thread writes right after an SSL_write or read right before an SSL_read
(bpf/calls.c, membio_bind), and the flow table holds the first records until then.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from tests.ebpf.conftest import PROGRAMS, Capture, run_program, wait_for
from tests.ebpf.test_openssl_capture import curl_request, run_curl

NODE = shutil.which("node") or shutil.which("nodejs")


@pytest.fixture
def node() -> str:
    if NODE is None:
        reason = "Node.js is not installed (`make setup` installs Debian's nodejs)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return NODE


def endpoint(ip: str, port: int) -> dict:
    return {"ip": ip, "port": port}


def assert_every_record(cap: Capture, conn: str, *, role: str, local: dict, remote: dict) -> None:
    """Every record of the connection - open, data, close - names its socket."""
    records = [r for r in cap.records if r.get("conn_id") == conn]
    assert [r["type"] for r in records].count("open") == 1, records
    assert any(r["type"] == "close" for r in records), "its close was not reported"
    for r in records:
        assert r["role"] == role, r
        assert r["local"] == local, r
        assert r["remote"] == remote, r
        assert r["fd"] >= 0, r


def assert_nothing_unbound(cap: Capture) -> None:
    stats = cap.stats
    assert stats["flow_unbound_records"] == 0, stats
    assert stats["flow_unbound_connections"] == 0, stats
    assert stats["lost"] == 0, stats
    assert stats["kernel_membio_binds"] > 0, stats


def wait_until_node_probed(agent) -> None:
    """The agent follows exec: node's OpenSSL is in its executable, probed once the
    agent has seen it start (a process that starts and talks at once could beat it;
    --hold-new-libraries covers libraries, not executables)."""
    wait_for(lambda: "/node (static" in agent.stderr_text(), 60, "the agent to probe node")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_node_https_client(agent, node, truth_server):
    count = 3
    a = agent()  # started first: node is a process it sees appear
    server = truth_server(count=count, body_size=20_000)
    proc = subprocess.Popen(
        [node, str(PROGRAMS / "node_https.js"), "client", str(server.port), "/membio", str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "started\n"
        wait_until_node_probed(a)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        answers = json.loads(proc.stdout.read().strip().splitlines()[-1])
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    truth = {tuple(t["peer"]): t for t in server.result()}
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    conns = cap.conns(comm="node")
    assert len(conns) == count, cap.stderr
    for conn, answer in zip(conns, answers, strict=True):
        local = endpoint("127.0.0.1", answer["local_port"])
        t = truth[(local["ip"], local["port"])]
        assert cap.stream(conn, "egress") == base64.b64decode(t["received_b64"])
        ingress = cap.stream(conn, "ingress")
        assert ingress == base64.b64decode(t["sent_b64"])
        assert ingress.endswith(base64.b64decode(answer["body_b64"]))
        assert_every_record(
            cap, conn, role="client", local=local, remote=endpoint("127.0.0.1", server.port)
        )
        assert cap.data(conn_id=conn)[0]["source"] == "openssl"
    assert_nothing_unbound(cap)


def test_node_https_server_and_curl(agent, node, tls_cert, tmp_path):
    cert, key = tls_cert
    a = agent()
    proc = subprocess.Popen(
        [node, str(PROGRAMS / "node_https.js"), "server", str(cert), str(key), "30000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), line
        port = int(line.split()[1])
        wait_until_node_probed(a)
        paths = ("/node-one", "/node-two")
        for path in paths:
            run_curl("127.0.0.1", port, path, tmp_path / "body")
        proc.stdin.write("done\n")
        proc.stdin.flush()
        served = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    server_conns = cap.conns(comm="node")
    client_conns = cap.conns(comm="curl")
    assert len(server_conns) == len(client_conns) == len(paths), cap.stderr
    for path, server_conn, client_conn, answer in zip(
        paths, server_conns, client_conns, served, strict=True
    ):
        request = cap.stream(server_conn, "ingress")
        assert request == curl_request("127.0.0.1", port, path)
        assert request == cap.stream(client_conn, "egress")
        response = cap.stream(server_conn, "egress")
        assert response == cap.stream(client_conn, "ingress")
        assert response.endswith(base64.b64decode(answer["body_b64"]))
        client = cap.data(conn_id=client_conn)[0]
        assert client["local"]["port"] == answer["remote_port"]
        assert_every_record(
            cap, server_conn, role="server", local=endpoint("127.0.0.1", port),
            remote=client["local"],
        )  # fmt: skip
    assert_nothing_unbound(cap)


def check_asyncio_pair(cap: Capture, summary: dict) -> None:
    port, client_port = summary["port"], summary["client_port"]
    conns = {cap.data(conn_id=c)[0]["role"]: c for c in cap.conns(pid=summary["pid"])}
    assert set(conns) == {"client", "server"}, cap.conns(pid=summary["pid"])
    client_end = endpoint("127.0.0.1", client_port)
    server_end = endpoint("127.0.0.1", port)
    assert_every_record(cap, conns["client"], role="client", local=client_end, remote=server_end)
    assert_every_record(cap, conns["server"], role="server", local=server_end, remote=client_end)

    def stream(role: str, direction: str, expected_len: int) -> str:
        data = cap.stream(conns[role], direction)  # fails on any gap, overlap or truncation
        assert len(data) == expected_len
        return sha(data)

    assert stream("client", "egress", summary["client_sent_len"]) == summary["client_sent_sha256"]
    assert stream("server", "ingress", summary["client_sent_len"]) == summary["client_sent_sha256"]
    assert stream("server", "egress", summary["server_sent_len"]) == summary["server_sent_sha256"]
    assert stream("client", "ingress", summary["server_sent_len"]) == summary["server_sent_sha256"]
    assert_nothing_unbound(cap)


def test_asyncio_client_and_server(agent, tls_cert):
    cert, key = tls_cert
    a = agent()
    summary = run_program("asyncio_tls.py", "pair", str(cert), str(key))
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    check_asyncio_pair(cap, summary)


def test_asyncio_connection_opened_before_the_agent(agent, tls_cert):
    """Both ends connected and talked before the agent started: their sockets are
    found at start-up, and the first calls after it bind the TLS objects to them."""
    cert, key = tls_cert
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "asyncio_tls.py"), "wait", str(cert), str(key)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        hello = json.loads(proc.stdout.readline())
        a = agent()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        summary = json.loads(proc.stdout.read().strip().splitlines()[-1])
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    assert (summary["port"], summary["client_port"]) == (hello["port"], hello["client_port"])
    check_asyncio_pair(cap, summary)
