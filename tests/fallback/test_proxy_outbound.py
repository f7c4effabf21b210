"""Outbound proxy mode end to end: a client namespace whose port-443 traffic iptables
redirects to `tlscap run --mode proxy`, and a real HTTPS server in the server namespace.

Every test checks what really crossed the wire (the client's own report of the bytes it
sent and received, and what the server saw) against the records.
"""

from __future__ import annotations

import pytest

from tests.fallback.proxyharness import SERVER_NAME, connections, http_request, run_client


def _bundle(tmp_path, *pems) -> str:
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"".join(p.read_bytes() for p in pems))
    return str(path)


@pytest.mark.parametrize("family", [4, 6])
def test_records_hold_the_exact_plaintext_and_real_tuples(
    lab, pki, start_echo, start_agent, family
) -> None:
    start_echo(443)
    agent = start_agent("--upstream-ca", str(pki.ca))
    server_ip = lab.server_ip if family == 4 else lab.server_ip6
    target = f"{server_ip}:443" if family == 4 else f"[{server_ip}]:443"
    request = http_request("/exact", "hello through the proxy")

    report = run_client(
        lab, target, "--sni", SERVER_NAME, "--cafile", str(agent.ca_cert), "--send", request
    )

    assert report["ok"], report["error"]
    client_ip = lab.client_ip if family == 4 else lab.client_ip6
    # The server saw the real client, not the proxy.
    assert (
        b"remote=" + (client_ip if family == 4 else f"[{client_ip}]").encode() in report["received"]
    )
    assert b"body=hello through the proxy" in report["received"]
    agent.stop()
    conns = list(connections(agent.records()).values())
    assert len(conns) == 1
    conn = conns[0]
    assert conn["egress"] == report["sent"]
    assert conn["ingress"] == report["received"]
    opened = conn["open"]
    assert opened["source"] == "proxy"
    assert opened["role"] == "client"
    assert opened["local"] == {"ip": report["local"][0], "port": report["local"][1]}
    assert opened["remote"] == {"ip": server_ip, "port": 443}
    assert opened["pid"] == report["pid"]
    assert opened["comm"].startswith("python")
    assert conn["close"]["conn_id"] == opened["conn_id"]
    stats = agent.stats()
    assert stats["proxy_intercepted"] == 1
    assert stats["proxy_leaves_issued"] == 1
    assert stats["bytes"] == len(report["sent"]) + len(report["received"])


@pytest.mark.parametrize("version,alpn", [("--http1.1", "http/1.1"), ("--http2", "h2")])
def test_curl_through_the_proxy_negotiates_the_same_alpn(
    lab, pki, start_echo, start_agent, tmp_path, version, alpn
) -> None:
    start_echo(443)
    agent = start_agent("--upstream-ca", str(pki.ca))
    out = lab.run(
        lab.client,
        [
            "curl", "-sS", version, "--cacert", str(agent.ca_cert), "-w", "\\n%{http_version}",
            "--resolve", f"{SERVER_NAME}:443:{lab.server_ip}",
            f"https://{SERVER_NAME}/via-curl", "--data-binary", "curl-body",
        ],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    body, http_version = out.stdout.rsplit("\n", 1)
    expected_proto = "HTTP/2.0" if alpn == "h2" else "HTTP/1.1"
    assert f"proto={expected_proto}" in body
    assert http_version == ("2" if alpn == "h2" else "1.1")
    agent.stop()
    (conn,) = connections(agent.records()).values()
    if alpn == "h2":
        assert conn["egress"].startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert b"curl-body" in conn["egress"]  # a DATA frame: plaintext, not compressed
    else:
        assert conn["egress"].startswith(b"POST /via-curl HTTP/1.1\r\n")
        assert conn["egress"].endswith(b"\r\n\r\ncurl-body")
    assert body.encode() in conn["ingress"]
    assert conn["open"]["comm"] == "curl"


def test_mtls_upstream_gets_the_configured_client_certificate(
    lab, pki, start_echo, start_agent
) -> None:
    start_echo(8443, "-client-ca", str(pki.ca))
    dest = f"{lab.server_ip}:8443"
    agent = start_agent(
        "--intercept-ports", "443,8443", "--upstream-ca", str(pki.ca),
        "--upstream-client-cert", f"{dest}={pki.client_cert}:{pki.client_key}",
    )  # fmt: skip
    report = run_client(
        lab, dest, "--sni", SERVER_NAME, "--cafile", str(agent.ca_cert),
        "--send", http_request("/mtls"),
    )  # fmt: skip
    assert report["ok"], report["error"]
    assert b"client=tlscap-client" in report["received"]
    agent.stop()
    (conn,) = connections(agent.records()).values()
    assert conn["ingress"] == report["received"]


def test_upstream_handshake_failure_answers_the_client_with_an_alert(
    lab, pki, start_echo, start_agent
) -> None:
    """An upstream whose certificate does not verify: the client must get a TLS alert at
    once, not a hang until some timeout."""
    start_echo(443, cert=pki.rogue_cert, key=pki.rogue_key)
    agent = start_agent("--upstream-ca", str(pki.ca))
    report = run_client(
        lab, f"{lab.server_ip}:443", "--sni", SERVER_NAME, "--cafile", str(agent.ca_cert),
        "--send", http_request("/untrusted-upstream"), timeout=20,
    )  # fmt: skip
    assert not report["ok"]
    assert "HANDSHAKE_FAILURE" in report["error"].upper(), report["error"]
    agent.stop()
    assert agent.stats()["proxy_upstream_tls_failures"] == 1
    assert "upstream TLS handshake failed" in agent.stderr()


def test_upstream_rejecting_after_the_handshake_resets_the_client(
    lab, pki, start_echo, start_agent
) -> None:
    """TLS 1.3 servers reject a missing client certificate after the handshake: the client
    must see an error, not a clean (empty) end of stream."""
    start_echo(8443, "-client-ca", str(pki.ca))
    agent = start_agent("--intercept-ports", "8443", "--upstream-ca", str(pki.ca))
    report = run_client(
        lab, f"{lab.server_ip}:8443", "--sni", SERVER_NAME, "--cafile", str(agent.ca_cert),
        "--send", http_request("/no-client-cert"), timeout=20,
    )  # fmt: skip
    assert not report["ok"]
    assert report["received"] == b""
    agent.stop()
    assert agent.stats()["proxy_relay_errors"] >= 1


def test_self_signed_upstream_needs_upstream_insecure(lab, pki, start_echo, start_agent) -> None:
    start_echo(443, cert=pki.rogue_cert, key=pki.rogue_key)
    agent = start_agent("--upstream-insecure", f"{SERVER_NAME}:443")
    report = run_client(
        lab, f"{lab.server_ip}:443", "--sni", SERVER_NAME, "--cafile", str(agent.ca_cert),
        "--send", http_request("/dev-service"),
    )  # fmt: skip
    assert report["ok"], report["error"]
    # Another name on the same server is not covered by the rule: verified, and refused.
    other = run_client(
        lab, f"{lab.server_ip}:443", "--sni", "other.lab.test", "--cafile",
        str(agent.ca_cert), "--send", http_request("/other"),
    )  # fmt: skip
    assert not other["ok"]
    agent.stop()
    stats = agent.stats()
    assert stats["proxy_intercepted"] == 1
    assert stats["proxy_upstream_tls_failures"] == 1


def test_pinned_client_fails_once_then_passes_through(
    lab, pki, start_echo, start_agent, tmp_path
) -> None:
    """A client that trusts only the real server's CA (as a pinning client would) rejects
    our leaf; the retry is relayed untouched and works, and the event is counted."""
    start_echo(443)
    agent = start_agent("--upstream-ca", str(pki.ca))
    args = (f"{lab.server_ip}:443", "--sni", SERVER_NAME, "--cafile", str(pki.ca))
    first = run_client(lab, *args, "--send", http_request("/pinned-1"))
    assert not first["ok"]
    assert "CERTIFICATE_VERIFY_FAILED" in first["error"]
    second = run_client(lab, *args, "--send", http_request("/pinned-2"))
    third = run_client(lab, *args, "--send", http_request("/pinned-3"))
    assert second["ok"], second["error"]
    assert third["ok"], third["error"]
    assert b"path=/pinned-2" in second["received"]
    agent.stop()
    stats = agent.stats()
    assert stats["proxy_pinned_clients"] == 1
    assert stats["proxy_passthrough_destinations"] == 1
    assert stats["proxy_passthrough"] == 2
    assert "client rejected our certificate" in agent.stderr()
    # Passed-through connections are visible (open/close) but carry no data records.
    conns = connections(agent.records())
    assert len(conns) == 2
    assert all(not c["data"] for c in conns.values())


def test_other_ports_and_excluded_networks_are_not_intercepted(
    lab, pki, start_echo, start_agent
) -> None:
    start_echo(443)
    start_echo(8443)
    agent = start_agent("--upstream-ca", str(pki.ca), "--exclude-cidr", f"{lab.server_ip}/32")
    for port in (443, 8443):
        # Trusting only the real CA works only when nobody is in the middle.
        report = run_client(
            lab, f"{lab.server_ip}:{port}", "--sni", SERVER_NAME, "--cafile", str(pki.ca),
            "--send", http_request("/direct"),
        )  # fmt: skip
        assert report["ok"], report["error"]
    intercepted = run_client(
        lab, f"[{lab.server_ip6}]:443", "--sni", SERVER_NAME, "--cafile", str(agent.ca_cert),
        "--send", http_request("/v6-still-intercepted"),
    )  # fmt: skip
    assert intercepted["ok"], intercepted["error"]
    agent.stop()
    assert agent.stats()["proxy_accepted"] == 1
