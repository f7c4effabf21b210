"""The pure halves of proxy mode for pods: what a pod's spec and annotations ask for,
and reading its certificates from its own mounts without escaping its root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.fallback.config import DestinationPattern, ProxyConfig, UpstreamRule
from agent.fallback.container_files import read_in_root
from agent.fallback.pods import PodProcesses, PodRejected, PodScanner, plan_pod, pod_config
from agent.k8s.metadata import PodInfo, ProxyAnnotations
from agent.k8s.podspec import SecretMount

SPEC = {
    "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
    "spec": {
        "volumes": [
            {"name": "tls", "secret": {"secretName": "web-tls"}},
            {"name": "proj", "projected": {"sources": [
                {"secret": {"name": "mesh", "items": [{"key": "tls.crt", "path": "c.pem"},
                                                      {"key": "tls.key", "path": "k.pem"}]}},
                {"configMap": {"name": "x"}},
            ]}},
            {"name": "data", "emptyDir": {}},
        ],
        "containers": [
            {"name": "app", "volumeMounts": [
                {"name": "tls", "mountPath": "/etc/tls"},
                {"name": "proj", "mountPath": "/etc/mesh/"},
                {"name": "tls", "mountPath": "/one", "subPath": "tls.crt"},
                {"name": "data", "mountPath": "/data"},
            ]},
        ],
    },
}  # fmt: skip


def test_pod_proxy_secret_mounts_from_the_spec() -> None:
    pod = PodInfo.from_api(SPEC)
    assert pod.secret_mounts == (
        SecretMount("web-tls", "app", "/etc/tls"),
        SecretMount("mesh", "app", "/etc/mesh/", (("tls.crt", "c.pem"), ("tls.key", "k.pem"))),
    )
    assert pod.secret_mounts[1].path_of("tls.key") == "/etc/mesh/k.pem"
    assert pod.secret_mounts[1].path_of("ca.crt") is None
    assert not pod.host_network
    assert PodInfo.from_api({**SPEC, "spec": {"hostNetwork": True}}).host_network


def _entry(annotations: dict[str, str]) -> PodProcesses:
    pod = PodInfo.from_api({**SPEC, "metadata": {**SPEC["metadata"], "annotations": annotations}})
    return PodProcesses(pod, {"app": [4242]}, (1, 2), 4242)


def _reader(files: dict[str, bytes]):
    def read(root: str, path: str) -> bytes:
        assert root == "/proc/4242/root"
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[path]

    return read


def test_pod_proxy_plan_reads_the_pods_own_certificates() -> None:
    entry = _entry({
        "tlscap.io/inbound-cert-secret": "web-tls", "tlscap.io/inbound-ports": "8443,9443",
        "tlscap.io/upstream-client-cert-secret": "mesh",
        "tlscap.io/upstream-insecure-destinations": "dev.shop.svc:8443, 198.18.7.0/24",
    })  # fmt: skip
    files = {"/etc/tls/tls.crt": b"CERT\n", "/etc/tls/tls.key": b"KEY",
             "/etc/mesh/c.pem": b"MC", "/etc/mesh/k.pem": b"MK"}  # fmt: skip
    plan = plan_pod(entry, ProxyConfig(), read=_reader(files))
    assert plan.inbound_pems == {8443: b"CERT\nKEY", 9443: b"CERT\nKEY"}
    assert plan.rules.inbound_ports == (8443, 9443) and plan.rules.outbound_port == 15443
    rules = plan.config.upstream_rules
    assert [r.pattern.text for r in rules] == [
        "dev.shop.svc:8443", "198.18.7.0/24", "0.0.0.0/0", "::/0"
    ]  # fmt: skip
    assert [r.insecure for r in rules] == [True, True, False, False]
    assert {r.client_pem for r in rules} == {b"MC\nMK"}


@pytest.mark.parametrize(
    ("annotations", "fragment", "permanent"),
    [
        ({"tlscap.io/inbound-ports": "https"}, "'https' is not a port", True),
        ({"tlscap.io/upstream-insecure-destinations": "a b"}, "not a name", True),
        ({"tlscap.io/upstream-client-cert-secret": "other"}, "is not mounted by any", True),
        (
            {"tlscap.io/inbound-cert-secret": "web-tls", "tlscap.io/inbound-ports": "8443"},
            "cannot read Secret 'web-tls'",
            False,  # not readable yet: retried
        ),
    ],
)
def test_pod_proxy_plan_rejects_the_whole_pod(annotations, fragment, permanent) -> None:
    with pytest.raises(PodRejected) as caught:
        plan_pod(_entry(annotations), ProxyConfig(), read=_reader({}))
    assert fragment in str(caught.value)
    assert caught.value.permanent is permanent


def test_pod_proxy_upstream_insecure_destinations_annotation() -> None:
    pod = PodInfo("p", "ns", "u", annotations={
        "tlscap.io/upstream-insecure-destinations": "a.example:8443,,*.dev.svc"})  # fmt: skip
    proxy, errors = ProxyAnnotations.from_pod(pod)
    assert errors == []
    assert proxy.upstream_insecure_destinations == ("a.example:8443", "*.dev.svc")
    _, errors = ProxyAnnotations.from_pod(
        PodInfo("p", "ns", "u", annotations={"tlscap.io/upstream-insecure-destinations": " "})
    )
    assert errors and "empty list" in errors[0]


def test_pod_proxy_node_rules_keep_their_own_client_certificate() -> None:
    node_rule = UpstreamRule(DestinationPattern.parse("api.corp"), Path("c"), Path("k"))
    config = pod_config(
        ProxyConfig(upstream_rules=(node_rule,)), ProxyAnnotations(upstream_insecure=True), b"P"
    )
    first = config.upstream_rules[0]
    assert first.client_cert == Path("c") and first.client_pem is None and first.insecure
    assert config.upstream_rules[-1].client_pem == b"P"


def test_pod_proxy_files_are_read_inside_the_containers_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/tls/..2026").mkdir(parents=True)
    (root / "etc/tls/..2026/tls.crt").write_bytes(b"pod cert")
    os.symlink("..2026", root / "etc/tls/..data")
    os.symlink("..data/tls.crt", root / "etc/tls/tls.crt")  # as the kubelet lays it out
    os.symlink("/etc/tls/tls.crt", root / "abs")  # absolute: the container's /etc
    (tmp_path / "node-secret").write_bytes(b"the node's")
    os.symlink(str(tmp_path / "node-secret"), root / "etc/tls/escape")
    os.symlink("../../../node-secret", root / "etc/tls/dotdot")

    assert read_in_root(str(root), "/etc/tls/tls.crt") == b"pod cert"
    assert read_in_root(str(root), "abs") == b"pod cert"
    with pytest.raises(FileNotFoundError):  # resolved inside the root, not on the node
        read_in_root(str(root), "/etc/tls/escape")
    with pytest.raises(FileNotFoundError):
        read_in_root(str(root), "/etc/tls/dotdot")
    with pytest.raises(OSError):
        read_in_root(str(root), "/etc/tls")
    (root / "big").write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="larger than"):
        read_in_root(str(root), "/big", limit=10)


def test_pod_proxy_scanner_reads_a_new_host_looking_pid_twice(tmp_path: Path) -> None:
    """A container's first process is forked outside its cgroup and moved in before it
    execs; caught in between, it must not be taken for a host process for good."""
    from agent.k8s.cgroup import ContainerCache, ContainerRef
    from agent.k8s.metadata import PodIndex, PodResolver

    cid = "ab" * 32
    index = PodIndex()
    index.replace_pods([{
        "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
        "status": {"containerStatuses": [{"name": "app", "containerID": f"containerd://{cid}"}]},
    }])  # fmt: skip
    moved = {"done": False}
    reads: list[int] = []

    def reader(pid: int, _root: str) -> ContainerRef | None:
        reads.append(pid)
        return ContainerRef("containerd", cid, "u1") if moved["done"] else None

    (tmp_path / "4242" / "ns").mkdir(parents=True)
    (tmp_path / "4242" / "ns" / "net").write_text("")
    scanner = PodScanner(
        PodResolver(index, ContainerCache(str(tmp_path), reader=reader)), str(tmp_path)
    )
    assert scanner.scan() == {}
    moved["done"] = True
    found = scanner.scan()
    assert list(found) == ["u1"] and found["u1"].pids == {"app": [4242]}
    assert found["u1"].netns is not None
    scanner.scan()
    assert reads == [4242, 4242]  # then trusted: no read per pass
