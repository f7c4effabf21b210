"""Probes on emulated instructions (agent/probes/prologue.py) capture exactly what the
entry placement captures: every build probed twice, once as placed and once with
TLSCAP_PROBE_PLACEMENT=entry, both compared byte for byte with what the peers sent."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ebpf.conftest import run_program
from tests.ebpf.test_gotls_capture import (  # noqa: F401  (fixtures)
    agent_then_server,
    assert_fd_walk_works,
    assert_matches_recordings,
    go_https,
    go_programs,
)

PLACEMENTS = [pytest.param("auto", id="placed"), pytest.param("entry", id="forced-entry")]
LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"


@pytest.fixture(params=PLACEMENTS)
def placement(request, monkeypatch) -> str:
    """The agent started by the test inherits this placement switch."""
    monkeypatch.setenv("TLSCAP_PROBE_PLACEMENT", request.param)
    return request.param


def test_libssl3_placement_is_the_worker_unless_forced(placement):
    from agent.probes.elf_symbols import find_symbols
    from agent.probes.library_probes import PROBED_SYMBOLS, plan_library
    from agent.probes.targets import TlsLibrary

    lib = TlsLibrary(
        LIBSSL, LIBSSL, 0, 0, "libssl", frozenset(find_symbols(LIBSSL, PROBED_SYMBOLS))
    )
    kinds = {p.name: p.placement.kind for p in plan_library(lib)}
    if placement == "entry":
        assert set(kinds.values()) == {"entry"}
    else:
        assert kinds == {"SSL_write+SSL_write_ex": "worker", "SSL_read+SSL_read_ex": "worker"}


def test_python_ssl_bulk_same_records_both_placements(agent, tls_cert, placement):
    cert, key = tls_cert
    a = agent("--log-level", "debug")
    summary = run_program("ssl_pair.py", "bulk", "--cert", str(cert), "--key", str(key))
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    pid = summary["pid"]
    conns = {cap.data(conn_id=c)[0]["role"]: c for c in cap.conns(pid=pid)}
    assert set(conns) == {"client", "server"}
    for role, direction, key_ in (
        ("client", "egress", "client_sent_sha256"),
        ("server", "ingress", "client_sent_sha256"),
        ("server", "egress", "server_sent_sha256"),
        ("client", "ingress", "server_sent_sha256"),
    ):
        data = cap.stream(conns[role], direction)
        assert hashlib.sha256(data).hexdigest() == summary[key_], (role, direction)
    # One 1 MiB sendall is one call: one record of that length, at offset 0.
    sends = [r for r in cap.data(conn_id=conns["client"], direction="egress")]
    assert [(r["offset"], r["len"]) for r in sends] == [(0, 1 << 20)]
    client, server = (cap.data(conn_id=conns[r])[0] for r in ("client", "server"))
    assert client["local"] == server["remote"] and client["remote"] == server["local"]
    assert cap.stats["lost"] == 0 and cap.stats["incomplete_calls"] == 0
    fallback = cap.stats["probe_placements_entry_fallback"]
    if placement == "entry":
        assert "forced: TLSCAP_PROBE_PLACEMENT=entry" in cap.stderr
        assert fallback >= 4
    else:
        assert "SSL_write+SSL_write_ex at 0x" in cap.stderr and "(worker)" in cap.stderr
        assert cap.stats["probe_placements_emulated"] >= 2


NONBLOCKING = r"""
import hashlib, json, os, socket, ssl, sys
cert, key = sys.argv[1], sys.argv[2]
sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); sctx.load_cert_chain(cert, key)
cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); cctx.check_hostname = False
cctx.verify_mode = ssl.CERT_NONE
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
c = socket.create_connection(ls.getsockname()); s, _ = ls.accept()
for sock in (c, s):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
c = cctx.wrap_socket(c, do_handshake_on_connect=False)
s = sctx.wrap_socket(s, server_side=True, do_handshake_on_connect=False)
want = {"read": 0, "write": 0}
def step(fn, *a):
    try:
        return fn(*a)
    except ssl.SSLWantReadError:
        want["read"] += 1
    except ssl.SSLWantWriteError:
        want["write"] += 1
    return None
done = [False, False]
while not all(done):
    for i, side in enumerate((c, s)):
        if not done[i] and step(side.do_handshake) is None:
            try:
                side.do_handshake(); done[i] = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
want = {"read": 0, "write": 0}
def pump(src, dst, data):
    got = bytearray(); pos = 0
    while len(got) < len(data):
        if pos < len(data):
            n = step(src.send, data[pos:pos + 65536])
            pos += n or 0
        chunk = step(dst.recv, 65536)
        if chunk:
            got += chunk
    return bytes(got)
up = os.urandom(3 << 20); down = os.urandom(1 << 20)
assert pump(c, s, up) == up and pump(s, c, down) == down
print(json.dumps({"pid": os.getpid(), "up": hashlib.sha256(up).hexdigest(),
                  "down": hashlib.sha256(down).hexdigest(), "want": want}))
"""


def test_nonblocking_want_read_and_want_write_captured_once(agent, tls_cert, tmp_path, placement):
    cert, key = tls_cert
    program = tmp_path / "nonblocking.py"
    program.write_text(NONBLOCKING)
    a = agent()
    out = subprocess.run([sys.executable, str(program), str(cert), str(key)],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    assert summary["want"]["read"] > 0 and summary["want"]["write"] > 0, summary
    pid = summary["pid"]
    conns = {cap.data(conn_id=c)[0]["role"]: c for c in cap.conns(pid=pid)}
    sha = {k: v for k, v in summary.items() if k in ("up", "down")}
    # stream() fails on any gap or overlap: a retried call captured twice would overlap.
    for role, direction, which in (
        ("client", "egress", "up"),
        ("server", "ingress", "up"),
        ("server", "egress", "down"),
        ("client", "ingress", "down"),
    ):
        data = cap.stream(conns[role], direction)
        assert hashlib.sha256(data).hexdigest() == sha[which], (role, direction)  # fmt: skip
    assert cap.stats["lost"] == 0


def test_go_capture_exact_with_both_placements(agent, go_programs, go_https, placement):  # noqa: F811
    debug_agent = lambda: agent("--log-level", "debug")  # noqa: E731
    a, programs, server = agent_then_server(debug_agent, go_programs, go_https)
    client = programs.client(server, workers=2, requests=3, size=200_000)
    programs.stop()
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    assert cap.stats["lost"] == 0
    # Write closed at its completion points (go_write_completion.py) unless forced.
    used = "crypto/tls.(*Conn).Write completion points: writeRecordLocked(23)" in cap.stderr
    assert used == (placement != "entry"), cap.stderr[-3000:]
    assert_fd_walk_works(cap, [client["pid"], server.pid])  # config keyed by the probe's address
    assert_matches_recordings(cap, client["pid"], programs.recordings("client"), "client")
    assert_matches_recordings(cap, server.pid, programs.recordings("server"), "server")


def test_go_placement_reported_by_targets(go_https, placement):  # noqa: F811
    from agent.probes.placement_report import placements

    got = {p["function"].rsplit(".", 1)[1]: p for p in placements("go", str(go_https))}
    if placement == "entry":
        assert {p["placement"] for p in got.values()} == {"entry"}
        assert got["Write"]["returns"]["placement"] == "ret"
        assert "forced: TLSCAP_PROBE_PLACEMENT=entry" in got["Write"]["returns"]["reason"]
    else:
        # Write's hot return loses its probe to two emulated completion points.
        returns = got["Write"]["returns"]
        assert returns["placement"] == "completion", returns
        assert len(returns["points"]) == 2 and len(returns["unprobed_returns"]) == 2
        assert returns["reason"].startswith("writeRecordLocked(23) completion at")
        assert got["Read"]["returns"]["placement"] == "ret"
        assert (got["Write"]["placement"], got["Write"]["offset"]) == ("moved-entry", 9)
        assert (got["Read"]["placement"], got["Read"]["offset"]) == ("moved-entry", 4)
        assert got["Write"]["reason"].startswith("jbe")


def test_node_static_openssl_entries_are_already_emulated():
    node = Path("/usr/bin/node")
    if not node.exists():
        pytest.skip("no /usr/bin/node")
    from agent.probes.placement_report import placements

    got = {p["function"]: p for p in placements("openssl (static)", str(node))}
    for name in ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"):
        assert got[name]["placement"] == "emulated-entry", got[name]
