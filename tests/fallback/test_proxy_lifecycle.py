"""Start, stop, crash and restart: the rules are ours to clean up, and `--mode auto`
chooses proxy mode only where eBPF really cannot run."""

from __future__ import annotations

import signal

import pytest

from tests.fallback.proxyharness import SERVER_NAME, http_request, run_client


def _jumps(lab, tool: str) -> int:
    saved = lab.run(lab.client, [tool, "-t", "nat"]).stdout
    return sum(1 for line in saved.splitlines() if line.endswith("-j TLSCAP_OUT"))


def test_kill_9_then_restart_replaces_the_stale_rules(lab, pki, start_echo, start_agent) -> None:
    start_echo(443)
    crashed = start_agent("--upstream-ca", str(pki.ca))
    crashed.proc.send_signal(signal.SIGKILL)
    crashed.proc.wait(timeout=10)
    # A crash cannot clean up: the rules stay, redirecting into a closed port ...
    assert _jumps(lab, "iptables-save") == 1
    # ... until the next start replaces them (the CA on disk is reused).
    restarted = start_agent("--upstream-ca", str(pki.ca), "--ca-dir", str(crashed.ca_dir))
    assert _jumps(lab, "iptables-save") == 1
    assert _jumps(lab, "ip6tables-save") == 1
    report = run_client(
        lab, f"{lab.server_ip}:443", "--sni", SERVER_NAME, "--cafile", str(crashed.ca_cert),
        "--send", http_request("/after-restart"),
    )  # fmt: skip
    assert report["ok"], report["error"]
    assert restarted.stop() == 0
    assert _jumps(lab, "iptables-save") == 0
    assert _jumps(lab, "ip6tables-save") == 0


def test_sigint_exits_cleanly(lab, start_agent) -> None:
    agent = start_agent()
    assert agent.stop(signal.SIGINT) == 0
    assert _jumps(lab, "iptables-save") == 0
    assert agent.stats()["records"] == 0


def test_auto_mode_falls_back_to_the_proxy_where_ebpf_cannot_load(
    lab, pki, start_echo, start_agent
) -> None:
    start_echo(443)
    agent = start_agent(
        "--mode", "auto", "--upstream-ca", str(pki.ca),
        env={"BCC_KERNEL_SOURCE": "/nonexistent"},
    )  # fmt: skip
    assert "using proxy mode instead" in agent.stderr()
    assert "BCC_KERNEL_SOURCE=/nonexistent" in agent.stderr()
    report = run_client(
        lab, f"{lab.server_ip}:443", "--sni", SERVER_NAME, "--cafile", str(agent.ca_cert),
        "--send", http_request("/auto"),
    )  # fmt: skip
    assert report["ok"], report["error"]
    agent.stop()
    assert agent.stats()["proxy_intercepted"] == 1


def test_auto_mode_keeps_ebpf_where_it_works(lab, start_agent) -> None:
    pytest.importorskip("bcc", reason="bcc is not importable; `make setup` installs python3-bpfcc")
    agent = start_agent("--mode", "auto")
    assert "proxy mode" not in agent.stderr()
    assert _jumps(lab, "iptables-save") == 0
    agent.stop()
    assert "proxy_accepted" not in agent.stats()
