"""What is not a TLS client we can terminate must still get through, and must never take
the proxy down: plaintext on an intercepted port, a server that speaks first, garbage, a
truncated ClientHello, a huge one.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.fallback.proxyharness import SERVER_NAME, connections, http_request, run_client


def _proxy_still_works(lab, agent) -> None:
    report = run_client(
        lab, f"{lab.server_ip}:443", "--sni", SERVER_NAME, "--cafile", str(agent.ca_cert),
        "--send", http_request("/still-alive"),
    )  # fmt: skip
    assert report["ok"], f"{report['error']}\n{agent.stderr()}"
    assert b"path=/still-alive" in report["received"]


def test_plaintext_on_an_intercepted_port_is_relayed_and_recorded(
    lab, pki, start_echo, start_agent, programs
) -> None:
    programs(lab.server, "banner_server.py", "[::]:8080", "plain-upstream")
    agent = start_agent("--intercept-ports", "8080")
    request = b"GET / HTTP/1.0\r\n\r\n"
    report = run_client(lab, f"{lab.server_ip}:8080", "--plain", "--send-hex", request.hex())
    assert report["ok"], report["error"]
    assert report["received"] == b"plain-upstream\n"
    agent.stop()
    (conn,) = connections(agent.records()).values()
    assert conn["egress"] == request
    assert conn["ingress"] == report["received"]
    assert agent.stats()["proxy_plaintext"] == 1


def test_a_server_that_speaks_first_is_relayed(lab, start_agent, programs) -> None:
    """SMTP-like: the client waits for the banner.  The proxy waits a moment for a
    ClientHello, then relays; the banner arrives and is recorded."""
    programs(lab.server, "banner_server.py", "[::]:2525", "220 smtp.lab.test ESMTP")
    agent = start_agent("--intercept-ports", "2525")
    report = run_client(
        lab, f"{lab.server_ip}:2525", "--plain", "--read-first", "--send", "QUIT\r\n"
    )
    assert report["ok"], report["error"]
    assert report["received"].startswith(b"220 smtp.lab.test ESMTP")
    agent.stop()
    (conn,) = connections(agent.records()).values()
    assert conn["ingress"] == report["received"]


def _raw(lab, payload_file) -> subprocess.CompletedProcess:
    """Send a file's bytes to the server's port 443 from the client namespace
    (redirected to the proxy), half-close, and read whatever comes back."""
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{lab.server_ip}',443),timeout=15)\n"
        "d=b''\n"
        "try:\n"
        f"  s.sendall(open('{payload_file}','rb').read())\n"
        "  s.shutdown(socket.SHUT_WR)\n"
        "  while (c:=s.recv(65536)): d+=c\n"
        "except OSError as e: print('error', e)\n"
        "print(len(d))"
    )
    return lab.run(lab.client, [sys.executable, "-c", script], timeout=40)


def test_garbage_truncated_and_huge_client_hellos_do_not_hurt_the_proxy(
    lab, pki, start_echo, start_agent, tmp_path
) -> None:
    start_echo(443)
    agent = start_agent("--upstream-ca", str(pki.ca))
    garbage = os.urandom(4096)
    garbage = b"\x00" + garbage[1:]  # not 0x16: "not TLS", relayed to the server as is
    truncated = bytes.fromhex("160301020001000200") + b"\x03\x03" + os.urandom(20)
    huge = bytes.fromhex("16030140000100ffff") + os.urandom((1 << 20) - 9)
    for name, payload in (("garbage", garbage), ("truncated", truncated), ("huge", huge)):
        path = tmp_path / name
        path.write_bytes(payload)
        out = _raw(lab, path)
        assert out.returncode == 0, out.stderr
        _proxy_still_works(lab, agent)
    assert agent.proc.poll() is None, agent.stderr()
    agent.stop()
    stats = agent.stats()
    assert stats["proxy_plaintext"] == 1  # the garbage
    assert stats["proxy_malformed_hellos"] == 2  # truncated (client closed) and huge
    assert stats["proxy_internal_errors"] == 0
    assert "unparseable ClientHello" in agent.stderr()


def test_connections_that_were_not_redirected_are_refused(lab, start_agent) -> None:
    """Dialling the proxy port directly must not make the proxy connect to itself."""
    agent = start_agent()
    script = (
        "import socket\n"
        "try:\n"
        "  s=socket.create_connection(('127.0.0.1',15443),timeout=5)\n"
        "  s.sendall(b'x')\n"
        "  print(repr(s.recv(10)))\n"
        "except OSError as e: print('error', e)\n"
    )
    out = lab.run(lab.client, [sys.executable, "-c", script])
    assert out.returncode == 0, out.stderr
    assert "reset" in out.stdout or out.stdout.strip() == "b''", out.stdout
    agent.stop()
    assert agent.stats()["proxy_refused_not_redirected"] == 1


def test_the_agents_own_collector_traffic_is_never_redirected(lab, start_agent, tmp_path) -> None:
    """--collector on an intercepted port: its address is excluded from the rules."""
    agent = start_agent(
        "--collector", f"{lab.server_ip}:443", "--insecure", "--spool-dir", str(tmp_path / "spool")
    )
    rules = lab.run(lab.client, ["iptables-save", "-t", "nat"]).stdout
    assert f"-d {lab.server_ip}/32 -j RETURN" in rules
    agent.stop()
