"""Real probes on real programs: what tlscap captures must be, byte for byte,
what the programs sent."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ebpf.conftest import PROGRAMS, run_program

CURL = ["curl", "-sk", "--http1.1", "--no-keepalive", "-A", "tlscap-test"]


def curl_request(host: str, port: int, path: str) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n"
        "User-Agent: tlscap-test\r\nAccept: */*\r\n\r\n"
    ).encode()


def run_curl(host: str, port: int, path: str, body_file: Path) -> None:
    url = f"https://[{host}]:{port}{path}" if ":" in host else f"https://{host}:{port}{path}"
    subprocess.run([*CURL, "-o", str(body_file), url], check=True, timeout=30)


def test_curl_and_s_server_both_sides_exact(agent, s_server, tmp_path):
    a = agent()  # started first: s_server and curl are processes it sees appear
    port = s_server("127.0.0.1")
    body_file = tmp_path / "body"
    run_curl("127.0.0.1", port, "/tlscap-probe", body_file)
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    # curl's side: exactly the request it wrote, exactly the response it read.
    (client_conn,) = cap.conns(comm="curl")
    sent = cap.stream(client_conn, "egress")
    received = cap.stream(client_conn, "ingress")
    assert sent == curl_request("127.0.0.1", port, "/tlscap-probe")
    assert (
        received == b"HTTP/1.0 200 ok\r\nContent-type: text/html\r\n\r\n" + body_file.read_bytes()
    )

    # s_server's side (SSL_read_ex/SSL_write_ex) saw the same bytes the other way.
    (server_conn,) = cap.conns(comm="openssl")
    assert cap.stream(server_conn, "ingress") == sent
    assert cap.stream(server_conn, "egress") == received

    client = cap.data(conn_id=client_conn)[0]
    server = cap.data(conn_id=server_conn)[0]
    assert client["role"] == "client" and server["role"] == "server"
    assert client["remote"] == {"ip": "127.0.0.1", "port": port}
    assert client["local"] == server["remote"]
    assert server["local"] == client["remote"]
    assert client["source"] == server["source"] == "openssl"

    # Lifecycle: each connection opened once and its close seen.
    for conn in (client_conn, server_conn):
        kinds = [r["type"] for r in cap.records if r.get("conn_id") == conn]
        assert kinds[0] == "open" and kinds.count("open") == 1
    assert client_conn in {r["conn_id"] for r in cap.of_type("close")}
    assert cap.stats["lost"] == 0


def test_ipv6_loopback_tuple(agent, s_server, tmp_path):
    a = agent()
    port = s_server("::1")
    run_curl("::1", port, "/v6", tmp_path / "body")
    cap = a.stop()
    (client_conn,) = cap.conns(comm="curl")
    (server_conn,) = cap.conns(comm="openssl")
    assert cap.stream(client_conn, "egress") == curl_request("::1", port, "/v6")
    client = cap.data(conn_id=client_conn)[0]
    server = cap.data(conn_id=server_conn)[0]
    assert client["remote"] == {"ip": "::1", "port": port}
    assert client["local"]["ip"] == "::1"
    assert client["local"] == server["remote"] and server["local"] == client["remote"]
    assert (client["role"], server["role"]) == ("client", "server")


def test_server_already_blocked_in_accept_when_the_agent_started(agent, s_server, tmp_path):
    """The accept() entry was never seen: bytes, role and the 4-tuple must still be
    exact on every record, though s_server closes the connection right after its
    answer (too soon for /proc to tell: the kernel pairs the socket with its TCP
    handshake, bpf/sockets.c)."""
    port = s_server("127.0.0.1")
    a = agent()
    for path in ("/late", "/later"):
        run_curl("127.0.0.1", port, path, tmp_path / "body")
    cap = a.stop()
    client_conns = cap.conns(comm="curl")
    server_conns = cap.conns(comm="openssl")
    assert len(client_conns) == len(server_conns) == 2
    for path, client_conn, server_conn in zip(
        ("/late", "/later"), client_conns, server_conns, strict=True
    ):
        assert cap.stream(server_conn, "ingress") == curl_request("127.0.0.1", port, path)
        assert cap.stream(server_conn, "egress") == cap.stream(client_conn, "ingress")
        client_port = cap.data(conn_id=client_conn)[0]["local"]["port"]
        for r in cap.data(conn_id=server_conn):
            assert r["role"] == "server", r
            assert r["local"] == {"ip": "127.0.0.1", "port": port}, r
            assert r["remote"] == {"ip": "127.0.0.1", "port": client_port}, r
        assert server_conn in {r["conn_id"] for r in cap.of_type("close")}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_python_ssl_1mib_each_way_reassembles_exactly(agent, tls_cert, workers):
    cert, key = tls_cert
    a = agent("--workers", workers)
    summary = run_program("ssl_pair.py", "bulk", "--cert", str(cert), "--key", str(key))
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    pid = summary["pid"]
    conns = {cap.data(conn_id=c)[0]["role"]: c for c in cap.conns(pid=pid)}
    assert set(conns) == {"client", "server"}

    def sha(conn: str, direction: str) -> str:
        data = cap.stream(conn, direction)  # fails on any gap, overlap or truncation
        assert len(data) == summary["size"]
        return hashlib.sha256(data).hexdigest()

    assert sha(conns["client"], "egress") == summary["client_sent_sha256"]
    assert sha(conns["server"], "ingress") == summary["client_sent_sha256"]
    assert sha(conns["server"], "egress") == summary["server_sent_sha256"]
    assert sha(conns["client"], "ingress") == summary["server_sent_sha256"]
    # One sendall of 1 MiB is one SSL_write_ex call: it must arrive as one record.
    assert any(r["len"] == 1 << 20 for r in cap.data(conn_id=conns["client"], direction="egress"))
    assert cap.stats["lost"] == 0 and cap.stats["incomplete_calls"] == 0


def test_payload_cap_marks_truncation_with_true_length(agent, tls_cert):
    cert, key = tls_cert
    a = agent("--max-capture", "256K")
    summary = run_program("ssl_pair.py", "bulk", "--cert", str(cert), "--key", str(key))
    cap = a.stop()
    big = [r for r in cap.data(pid=summary["pid"], direction="egress") if r["len"] == 1 << 20]
    assert big, "the 1 MiB writes were not captured"
    for r in big:
        assert r["truncated"] is True
        assert r["captured_len"] == 256 << 10
    assert cap.stats["kernel_truncated_calls"] >= 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_connection_made_before_the_agent_started(agent, tls_cert, workers):
    cert, key = tls_cert
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "ssl_pair.py"), "wait", "--size", "4096",
         "--cert", str(cert), "--key", str(key)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        hello = json.loads(proc.stdout.readline())  # connected, handshake done
        a = agent("--workers", workers)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        summary = json.loads(proc.stdout.read().strip().splitlines()[-1])
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    cap = a.stop()
    conns = {cap.data(conn_id=c)[0]["role"]: c for c in cap.conns(pid=summary["pid"])}
    assert set(conns) == {"client", "server"}
    client = cap.data(conn_id=conns["client"])[0]
    server = cap.data(conn_id=conns["server"])[0]
    assert client["local"] == {"ip": "127.0.0.1", "port": hello["client_port"]}
    assert client["remote"] == {"ip": "127.0.0.1", "port": hello["port"]}
    assert server["local"] == client["remote"] and server["remote"] == client["local"]
    sent = cap.stream(conns["client"], "egress")
    assert hashlib.sha256(sent).hexdigest() == summary["client_sent_sha256"]
    # The kernel was told about these sockets, so their closes were reported.
    closed = {r["conn_id"] for r in cap.of_type("close")}
    assert conns["client"] in closed and conns["server"] in closed


def test_private_libssl_copy_is_found_and_captured(agent, tls_cert, tmp_path):
    """A program that loads its own libssl from another path (another inode)."""
    private = tmp_path / "private-lib"
    private.mkdir()
    shutil.copy("/lib/x86_64-linux-gnu/libssl.so.3", private / "libssl.so.3")
    cert, key = tls_cert
    a = agent()
    env = {"LD_LIBRARY_PATH": str(private), "PATH": "/usr/bin:/bin"}
    summary = run_program(
        "ssl_pair.py", "repeat", "--count", "5", "--interval", "0.2", "--size", "2048",
        "--cert", str(cert), "--key", str(key), env=env,
    )  # fmt: skip
    cap = a.stop()
    assert summary["maps_libssl"] == [str(private / "libssl.so.3")]
    assert str(private / "libssl.so.3") in cap.stderr  # attached by path, logged
    client_conns = [
        c for c in cap.conns(pid=summary["pid"]) if cap.data(conn_id=c)[0]["role"] == "client"
    ]
    # Attaching races the program's first connection; every later one is whole.
    assert len(client_conns) >= 4, cap.stderr
    for conn in client_conns:
        assert (
            hashlib.sha256(cap.stream(conn, "egress")).hexdigest()
            == (summary["client_sent_sha256"])
        )


def test_pid_and_comm_filters_exclude_other_processes(agent, s_server, tls_cert, tmp_path):
    cert, key = tls_cert
    port = s_server("127.0.0.1")
    a = agent("--comm", "curl")
    run_curl("127.0.0.1", port, "/only-curl", tmp_path / "b1")
    summary = run_program("ssl_pair.py", "bulk", "--size", "1000", "--cert", str(cert),
                          "--key", str(key))  # fmt: skip
    cap = a.stop()
    assert {r["comm"] for r in cap.of_type("data")} == {"curl"}
    assert not cap.data(pid=summary["pid"])

    server_pid = int(
        subprocess.run(["pgrep", "-n", "-f", f"s_server -accept 127.0.0.1:{port}"],
                       capture_output=True, text=True, check=True).stdout
    )  # fmt: skip
    b = agent("--pid", str(server_pid))
    run_curl("127.0.0.1", port, "/only-server", tmp_path / "b2")
    cap = b.stop()
    assert {r["pid"] for r in cap.of_type("data")} == {server_pid}
    assert b"/only-server" in b"".join(
        base64.b64decode(r["data_b64"]) for r in cap.data(direction="ingress")
    )


def test_bad_arguments_fail_in_one_line(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent", "run", *args],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    r = run("--pid", "999999999")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "999999999" in r.stderr
    r = run("--output", "jsonl", "--output-file", str(tmp_path / "no/such/dir/out.jsonl"))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "no/such/dir" in r.stderr
    r = run("--shed-fraction", "1.5")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "--shed-fraction" in r.stderr


def test_clean_exit_leaves_no_probes(agent, tmp_path):
    a = agent()
    cap = a.stop()
    assert cap.returncode == 0
    assert cap.of_type("stats"), "no stats line at exit"
    progs = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    assert "probe_ssl" not in progs
    uprobe_events = Path("/sys/kernel/tracing/uprobe_events")
    if uprobe_events.exists():
        assert "libssl" not in uprobe_events.read_text()


def test_short_lived_curls_with_unseen_library_copies_are_held_and_captured(
    agent, s_server, tmp_path
):
    """Every fresh curl loads its own, never-seen libssl copy from a private mount
    namespace (as a new container image would) and is gone within milliseconds:
    with --hold-new-libraries each is stopped at its mapping of the library until
    the probes are on, so all five are captured from their first call."""
    port = s_server("127.0.0.1")
    a = agent("--comm", "curl", "--hold-new-libraries")
    runs = 5
    for i in range(runs):
        private = tmp_path / f"lib{i}"
        private.mkdir()
        shutil.copy("/lib/x86_64-linux-gnu/libssl.so.3", private / "libssl.so.3")
        url = f"https://127.0.0.1:{port}/run{i}"
        script = (
            f"mount --bind {private} {private} && "
            f"LD_LIBRARY_PATH={private} exec {' '.join(CURL)} -o /dev/null {url}"
        )
        subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=30)
    cap = a.stop()
    for i in range(runs):
        private = tmp_path / f"lib{i}" / "libssl.so.3"
        assert str(private) in cap.stderr, f"run {i}: its copy was never probed\n{cap.stderr}"
    conns = cap.conns(comm="curl")
    assert len(conns) == runs, cap.stderr
    for i, conn in enumerate(conns):
        assert cap.stream(conn, "egress") == curl_request("127.0.0.1", port, f"/run{i}")
        assert cap.stream(conn, "ingress").startswith(b"HTTP/1.0 200 ok")
    stats = cap.stats
    assert stats["held_processes"] >= runs and stats["hold_timeouts"] == 0, stats
