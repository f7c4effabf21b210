"""Proxy mode for pods, from the node: one `tlscap run --mode proxy` (in a "node"
namespace of the lab) intercepts inside each selected pod's own network namespace, with
no sidecar, as the API server (a local fake) and the pods' cgroups describe them."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agent.fallback.rules import InterceptRules, expected_rules
from tests.fallback.conftest import PROGRAMS, REPO, program_env
from tests.fallback.podlab import PodLab, wait_until
from tests.fallback.proxyharness import SERVER_NAME, connections, http_request

CAPTURE = {"tlscap.io/capture": "true"}
# Outbound only, both families: what a pod without inbound annotations gets.
ONE_SET = len(expected_rules(InterceptRules(outbound_port=15443), 4)) + len(
    expected_rules(InterceptRules(outbound_port=15443), 6)
)


@pytest.fixture
def pods(lab, tmp_path) -> Iterator[PodLab]:
    try:
        built = PodLab(lab, tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        yield built
    finally:
        built.close()


def _client_in(pods: PodLab, pod, *args: str) -> dict:
    out = subprocess.run(
        pod.argv([sys.executable, str(PROGRAMS / "tls_client.py"), *args]),
        cwd=REPO, env=program_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["sent"] = base64.b64decode(report.pop("sent_b64"))
    report["received"] = base64.b64decode(report.pop("received_b64"))
    return report


def _assert_clean(pods: PodLab, *namespaces: str) -> None:
    for ns in namespaces:
        assert pods.rules(ns) == [], f"tlscap rules left in {ns}"
        assert pods.listeners(ns) == [], f"a listener left in {ns}"


def test_pod_proxy_outbound_exact_bytes_with_the_pods_metadata(
    lab, pki, pods, start_echo, start_agent
) -> None:
    start_echo(443)
    checkout = pods.pod("checkout", lab.client, CAPTURE)
    pods.publish(checkout)
    agent = start_agent(*pods.agent_args("--capture-scope", "annotated",
                                         "--upstream-ca", str(pki.ca)), ns=pods.node)  # fmt: skip
    took = wait_until(lambda: len(pods.rules(lab.client)) == ONE_SET, 5, "the pod's rules")
    assert pods.listeners(lab.client), "no listener inside the pod's namespace"
    request = http_request("/from-a-pod", "hello from checkout")

    report = _client_in(
        pods, checkout, f"{lab.server_ip}:443", "--sni", SERVER_NAME,
        "--cafile", str(agent.ca_cert), "--send", request,
    )  # fmt: skip

    assert report["ok"], f"{report['error']}\n{agent.stderr()}"
    # The upstream connection left from the pod's namespace: the server saw the pod.
    assert f"remote={lab.client_ip}:".encode() in report["received"]
    assert b"body=hello from checkout" in report["received"]
    agent.stop()
    _assert_clean(pods, lab.client)
    (conn,) = connections(agent.records()).values()
    assert conn["egress"] == report["sent"]
    assert conn["ingress"] == report["received"]
    opened = conn["open"]
    assert opened["source"] == "proxy" and opened["role"] == "client"
    assert opened["local"] == {"ip": report["local"][0], "port": report["local"][1]}
    assert opened["remote"] == {"ip": lab.server_ip, "port": 443}
    assert opened["pid"] == report["pid"]  # found with sock_diag in the pod's namespace
    assert opened["container_id"] == checkout.container_id
    assert opened["pod"] == {
        "name": "checkout", "namespace": "shop", "uid": checkout.uid, "container": "app",
        "labels": {"app": "checkout", "team": "payments"},
    }  # fmt: skip
    stats = agent.stats()
    assert stats["proxy_intercepted"] == 1 and stats["proxy_pods_installed"] == 1
    print(f"pod rules and listeners in place {took:.2f}s after the agent was ready")


def test_pod_proxy_inbound_with_the_pods_own_certificate(
    lab, pki, pods, echo_binary, start_agent, tmp_path
) -> None:
    secret_dir = tmp_path / "var-run-secrets" / "payments-tls"
    secret_dir.mkdir(parents=True)
    (secret_dir / "tls.crt").write_bytes(pki.server_cert.read_bytes())
    (secret_dir / "tls.key").write_bytes(pki.server_key.read_bytes())
    payments = pods.pod(
        "payments", lab.server,
        {**CAPTURE, "tlscap.io/inbound-cert-secret": "payments-tls",
         "tlscap.io/inbound-ports": "8443"},
        secret_mounts={"payments-tls": str(secret_dir)},
    )  # fmt: skip
    service = payments.start(
        [str(echo_binary), "-listen", ":8443", "-cert", str(pki.server_cert),
         "-key", str(pki.server_key)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert service.stdout.readline().strip() == "ready"
    pods.publish(payments)
    agent = start_agent(*pods.agent_args("--capture-scope", "annotated"), ns=pods.node)
    wait_until(lambda: any("TLSCAP_IN" in r for r in pods.rules(lab.server)), 5, "inbound rules")
    assert pods.listeners(lab.server, 15444)

    from tests.fallback.proxyharness import run_client

    # The client trusts only the service's real CA: the proxy presents the pod's own
    # certificate, read from the pod's Secret mount, and re-encrypts to the service.
    report = run_client(
        lab, f"{lab.server_ip}:8443", "--sni", SERVER_NAME, "--cafile", str(pki.ca),
        "--alpn", "http/1.1", "--send", http_request("/inbound", "to payments"),
    )  # fmt: skip
    assert report["ok"], f"{report['error']}\n{agent.stderr()}"
    assert b"body=to payments" in report["received"]
    agent.stop()
    _assert_clean(pods, lab.server)
    (conn,) = connections(agent.records()).values()
    opened = conn["open"]
    assert opened["role"] == "server"
    assert opened["local"] == {"ip": lab.server_ip, "port": 8443}
    assert opened["remote"] == {"ip": report["local"][0], "port": report["local"][1]}
    assert opened["pod"]["name"] == "payments" and opened["pod"]["container"] == "app"
    # sock_diag in the pod's namespace found the service's listening socket: the echo
    # server itself (the sh wrapper exec'd into it, keeping the pid).
    assert opened["pid"] == service.pid
    assert conn["ingress"] == report["sent"]
    assert conn["egress"] == report["received"]


def test_pod_proxy_pod_deleted_takes_its_rules_and_listener(lab, pods, start_agent) -> None:
    checkout = pods.pod("checkout", lab.client, CAPTURE)
    agent = start_agent(*pods.agent_args("--capture-scope", "annotated"), ns=pods.node)
    # The pod appears after the agent: a watch event, as a pod starting on the node.
    pods.publish(checkout, before_agent=False)
    took = wait_until(lambda: len(pods.rules(lab.client)) == ONE_SET, 5, "the pod's rules")
    assert took < 2.5, f"rules took {took:.2f}s to appear"
    assert pods.listeners(lab.client)

    pods.api.delete("pods", checkout.api_object())
    gone = wait_until(lambda: not pods.rules(lab.client), 5, "the pod's rules to go")
    wait_until(lambda: not pods.listeners(lab.client), 2, "the pod's listener to close")
    assert gone < 2.5, f"rules took {gone:.2f}s to go"
    agent.stop()
    stats = agent.stats()
    assert stats["proxy_pods_installed"] == 1 and stats["proxy_pods_removed"] == 1


def test_pod_proxy_kill_and_restart_leaves_one_set_of_rules(lab, pods, start_agent) -> None:
    a = pods.pod("checkout", lab.client, CAPTURE)
    b = pods.pod("ledger", lab.server, CAPTURE)
    c = pods.pod("audit", pods.new_netns(), CAPTURE)
    pods.publish(a, b, c)
    args = pods.agent_args("--capture-scope", "annotated")
    first = start_agent(*args, ns=pods.node)
    for ns in (a.netns, b.netns, c.netns):
        wait_until(lambda ns=ns: len(pods.rules(ns)) == ONE_SET, 5, f"rules in {ns}")
    first.stop(signal.SIGKILL)
    assert len(pods.rules(a.netns)) == ONE_SET  # a killed agent cleans nothing
    # While the agent is down, "audit" opts out: the next agent must clean its
    # namespace of the dead run's rules (and do nothing else there).
    c.annotations = {"tlscap.io/capture": "false"}
    pods.api.modify("pods", c.api_object())

    second = start_agent(*args, ns=pods.node)
    for ns in (a.netns, b.netns):
        wait_until(lambda ns=ns: pods.listeners(ns), 5, f"the new listener in {ns}")
        wait_until(lambda ns=ns: len(pods.rules(ns)) == ONE_SET, 5, f"rules in {ns}")
    wait_until(lambda: pods.rules(c.netns) == [], 5, "the opted-out pod's stale rules to go")
    assert sorted(pods.rules(a.netns)) == sorted(pods.rules(b.netns))
    assert pods.listeners(c.netns) == []
    second.stop()
    _assert_clean(pods, a.netns, b.netns, c.netns)
    stats = second.stats()
    assert stats["proxy_pods_installed"] == 2 and stats["proxy_pods_stale_swept"] == 1


def test_pod_proxy_unselected_pod_is_never_touched(lab, pods, start_agent) -> None:
    selected = pods.pod("checkout", lab.client, CAPTURE)
    other = pods.pod("ledger", lab.server, {})  # no annotation, annotated scope
    opted_out = pods.pod("audit", pods.new_netns(), {"tlscap.io/capture": "false"})
    pods.publish(selected, other, opted_out)
    agent = start_agent(*pods.agent_args("--capture-scope", "annotated"), ns=pods.node)
    wait_until(lambda: len(pods.rules(lab.client)) == ONE_SET, 5, "the selected pod's rules")
    for _ in range(3):  # across a few reconcile passes
        assert pods.rules(lab.server) == [] and pods.rules(opted_out.netns) == []
        assert pods.listeners(lab.server) == [] and pods.listeners(opted_out.netns) == []
        time.sleep(0.5)
    agent.stop()
    assert agent.stats()["proxy_pods_installed"] == 1


def test_pod_proxy_garbage_annotations_leave_the_pod_alone(lab, pods, start_agent) -> None:
    good = pods.pod("checkout", lab.client, CAPTURE)
    bad = pods.pod(
        "broken", lab.server,
        {**CAPTURE, "tlscap.io/inbound-cert-secret": "Not_A_Secret!",
         "tlscap.io/inbound-ports": "https"},
    )  # fmt: skip
    pods.publish(good, bad)
    agent = start_agent(*pods.agent_args("--capture-scope", "annotated"), ns=pods.node)
    wait_until(lambda: len(pods.rules(lab.client)) == ONE_SET, 5, "the good pod's rules")
    wait_until(lambda: "shop/broken" in agent.stderr(), 5, "a log line about the bad pod")
    assert pods.rules(lab.server) == [] and pods.listeners(lab.server) == []
    agent.stop()
    line = next(x for x in agent.stderr().splitlines() if "shop/broken" in x)
    assert "not intercepted" in line and "annotations are invalid" in line
    assert "'Not_A_Secret!' is not a valid Secret name" in line
    assert "'https' is not a port number" in line
    assert "left untouched" in line
    assert agent.stats()["proxy_pods_bad_annotations"] == 1
