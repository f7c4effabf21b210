"""Inbound proxy mode: connections arriving at a local TLS service are redirected (nat
PREROUTING) to the proxy, which terminates them with the service's own certificate, so
clients see no difference, and re-encrypts to the service."""

from __future__ import annotations

import pytest

from tests.fallback.proxyharness import SERVER_NAME, connections, http_request, run_client


@pytest.mark.parametrize("family", [4, 6])
def test_inbound_with_the_services_certificate(lab, pki, start_echo, start_agent, family) -> None:
    service = start_echo(8443)
    agent = start_agent(
        "--intercept-ports", "none",
        "--inbound", f"8443:{pki.server_cert}:{pki.server_key}",
        ns=lab.server,
    )  # fmt: skip
    server_ip = lab.server_ip if family == 4 else lab.server_ip6
    target = f"{server_ip}:8443" if family == 4 else f"[{server_ip}]:8443"
    # The client trusts only the service's real CA: the proxy is invisible to it.
    report = run_client(
        lab, target, "--sni", SERVER_NAME, "--cafile", str(pki.ca), "--alpn", "http/1.1",
        "--send", http_request("/inbound", "to the service"),
    )  # fmt: skip
    assert report["ok"], f"{report['error']}\n{agent.stderr()}"
    assert report["alpn"] == "http/1.1"
    assert b"body=to the service" in report["received"]
    agent.stop()
    (conn,) = connections(agent.records()).values()
    opened = conn["open"]
    assert opened["role"] == "server"
    assert opened["local"] == {"ip": server_ip, "port": 8443}
    assert opened["remote"] == {"ip": report["local"][0], "port": report["local"][1]}
    assert opened["pid"] == service.pid
    # What the client sent is what the service read: ingress, from the service's view.
    assert conn["ingress"] == report["sent"]
    assert conn["egress"] == report["received"]
    rules = agent.stats()
    assert rules["proxy_intercepted"] == 1


def test_inbound_ports_without_a_certificate_are_left_alone(
    lab, pki, start_echo, start_agent
) -> None:
    start_echo(8443)
    start_echo(9443)
    agent = start_agent(
        "--intercept-ports", "none",
        "--inbound", f"8443:{pki.server_cert}:{pki.server_key}",
        ns=lab.server,
    )  # fmt: skip
    report = run_client(
        lab, f"{lab.server_ip}:9443", "--sni", SERVER_NAME, "--cafile", str(pki.ca),
        "--send", http_request("/not-inbound"),
    )  # fmt: skip
    assert report["ok"], report["error"]
    agent.stop()
    assert agent.stats()["proxy_accepted"] == 0


def test_inbound_refuses_to_start_with_an_unreadable_certificate(lab, tmp_path) -> None:
    import sys

    from tests.fallback.conftest import REPO, program_env

    out = lab.run(
        lab.server,
        [
            sys.executable, "-m", "agent", "run", "--mode", "proxy", "--ca-dir",
            str(tmp_path / "ca"), "--intercept-ports", "none", "--inbound",
            f"8443:{tmp_path}/missing.crt:{tmp_path}/missing.key", "--duration", "5",
        ],
        cwd=REPO, env=program_env(),
    )  # fmt: skip
    assert out.returncode != 0
    assert "inbound certificate" in out.stderr
    rules = lab.run(lab.server, ["iptables-save", "-t", "nat"]).stdout
    assert "TLSCAP" not in rules
