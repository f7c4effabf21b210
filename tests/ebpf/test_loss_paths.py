"""Silent-loss paths of the kernel side, for real: probes attached while a
program is mid-loop, and files written inside TLS calls during a handshake.

Runs real programs under the real agent (see conftest.py).  The agent is
limited to the program under test with --pid, so the kernel counters checked
here are that program's alone, whatever else this machine is running.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from tests.ebpf.conftest import PROGRAMS

LINE = 11  # b"%010d\n"


def start_program(name: str, *args: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAMS / name), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    return proc, json.loads(proc.stdout.readline())


def finish_program(proc: subprocess.Popen) -> dict:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    return json.loads(out.strip().splitlines()[-1])


def test_calls_on_one_ssl_looping_across_the_attach_are_all_captured(agent, tls_cert):
    """A thread loops on SSL_write with one SSL* while the probes are attached.

    With the entry probe placed before the return probe, a call starting in
    between opened an entry nothing closed, and every later call on that SSL*
    and thread was taken for a nested one and dropped.  Every call made after
    the agent is ready must be captured, once, in order, without offset gaps.
    """
    cert, key = tls_cert
    proc, hello = start_program("ssl_write_loop.py", "--cert", str(cert), "--key", str(key))
    try:
        a = agent("--pid", str(hello["pid"]))
        summary = finish_program(proc)
    finally:
        proc.kill()
    assert summary["received"] == summary["sent"]
    cap = a.stop(settle=1.0)

    [client] = [
        c
        for c in cap.conns(pid=summary["pid"], direction="egress")
        if cap.data(conn_id=c)[0]["local"] == {"ip": "127.0.0.1", "port": summary["client_port"]}
    ]
    # Offsets start where the capture did and run without a gap or an overlap.
    stream = cap.stream(client, "egress")
    assert len(stream) % LINE == 0
    seqs = [int(line) for line in stream.split(b"\n")[:-1]]
    first = seqs[0]
    assert seqs == list(range(first, summary["stop"])), "calls missing or repeated"
    assert first <= summary["mark"], "calls made after the agent was ready are missing"
    stats = cap.stats
    assert stats["kernel_nested_calls"] == 0
    assert stats["kernel_stale_calls"] == 0  # the return probe is there before any entry
    assert stats["kernel_map_full"] == 0
    assert stats["lost"] == 0


@pytest.mark.parametrize("msg_log", [False, True], ids=["keylog", "keylog+msglog"])
def test_files_written_inside_a_handshake_do_not_take_the_socket_fd(
    agent, tls_cert, tmp_path, msg_log
):
    """Handshakes run inside the first SSL_write / SSL_read and write key logs
    (and, with the message log, a file line *before* the ClientHello goes out).
    Every record must still carry the socket's fd and 4-tuple, with offsets
    from 0 and the exact bytes."""
    cert, key = tls_cert
    args = ["--cert", str(cert), "--key", str(key), "--keylog-dir", str(tmp_path)]
    proc, hello = start_program("ssl_keylog.py", *args, *(["--msg-log"] if msg_log else []))
    try:
        a = agent("--pid", str(hello["pid"]))
        summary = finish_program(proc)
    finally:
        proc.kill()
    assert summary["keylog_bytes"] > 0
    assert summary["server_got_sha256"] == summary["request_sha256"]
    cap = a.stop()

    client_end = {"ip": "127.0.0.1", "port": summary["client_port"]}
    server_end = {"ip": "127.0.0.1", "port": summary["port"]}
    records = cap.data(pid=summary["pid"])
    assert records
    for r in records:
        if r["role"] == "client":
            assert (r["fd"], r["local"], r["remote"]) == (
                summary["client_fd"],
                client_end,
                server_end,
            )
        else:
            assert r["role"] == "server", r
            assert (r["fd"], r["local"], r["remote"]) == (
                summary["server_fd"],
                server_end,
                client_end,
            )
    conns = {cap.data(conn_id=c)[0]["role"]: c for c in cap.conns(pid=summary["pid"])}
    assert set(conns) == {"client", "server"}, "one connection per side, nothing else"
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    assert sha(cap.stream(conns["client"], "egress")) == summary["request_sha256"]
    assert sha(cap.stream(conns["server"], "ingress")) == summary["request_sha256"]
    assert sha(cap.stream(conns["server"], "egress")) == summary["response_sha256"]
    assert sha(cap.stream(conns["client"], "ingress")) == summary["response_sha256"]
    closed = {r["conn_id"] for r in cap.of_type("close")}
    assert set(conns.values()) <= closed
    if msg_log:
        # The message log's write came first inside the client's SSL_write:
        # seen, and not taken for the socket.
        assert cap.stats["kernel_unknown_fds"] > 0
