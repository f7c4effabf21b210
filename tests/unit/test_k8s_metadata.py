"""Pod metadata core: PodInfo from API objects, PodIndex, capture policy, proxy
annotations, and pid -> pod resolution over a fake /proc."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.k8s.cgroup import ContainerCache
from agent.k8s.metadata import (
    CAPTURE_ANNOTATION,
    CapturePolicy,
    NamespaceInfo,
    PodIndex,
    PodInfo,
    PodMeta,
    PodResolver,
    ProxyAnnotations,
    strip_runtime_prefix,
)

FIXTURES = Path(__file__).resolve().parents[1] / "k8s" / "fixtures"

# Container ids in the fixtures (sha256 of a name, see the fixture files).
WEB = "eaad67a374baafc7245151ce2c5fdff0c0873e66e0c9d10244f526a76fe13e8a"
WEB_RESTARTED = "b6e0209d6ededba6fe67e835bc93634606cb2a3e045a1b79539eede0f34c50a8"
LOG_SHIPPER = "6e5496453d2f5685d1bac965d3bef0c1b35b318e5d15dee2532a9fe372be9e2a"
MIGRATE = "d5a312b7b5832f62ebb4542c04f4cbc17362d745a8c7163b6cceb8afd5da9c03"
EXPORTER = "29b220d49cd6a1ed8396172f46fce4211ca0fa0d9926dee6710a289b6bd7a08e"
APISERVER = "8fa8c3a431ee4c139617ddd7a142a179a95edab4f317a427a31eceab4c9d5d01"
CACHE_REDIS = "d9730e223238744819b7b6149768e22288eb60450ad5464946124aa025f5aea8"
WEB_UID = "3f1c2a4e-8b7d-4e21-9a6f-5c0d1e2f3a4b"
EXPORTER_UID = "b7e9d1c3-2f4a-4b6c-8d0e-1f2a3b4c5d6e"
APISERVER_UID = "5d6e7f80-91a2-4b3c-8d4e-5f60718293a4"
STATIC_HASH = "0f4e8a1c2b3d5e6f7a8b9c0d1e2f3a4b"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def pods() -> list[dict[str, Any]]:
    return fixture("pods.json")["items"]


def pod_named(name: str) -> dict[str, Any]:
    return next(p for p in pods() if p["metadata"]["name"] == name)


def events() -> dict[str, dict[str, Any]]:
    return {e["type"]: e for e in fixture("watch_events.json")}


# ---------------------------------------------------------------------------------------
# PodInfo


def test_pod_info_from_a_deployment_pod() -> None:
    info = PodInfo.from_api(pod_named("web-7d4b9c8f6d-x2x9k"))
    assert info.name == "web-7d4b9c8f6d-x2x9k"
    assert info.namespace == "shop"
    assert info.uid == WEB_UID
    assert info.labels == {"app.kubernetes.io/name": "web", "pod-template-hash": "7d4b9c8f6d"}
    assert info.annotations[CAPTURE_ANNOTATION] == "true"
    # init, regular containers; prefixes stripped
    assert info.containers == {MIGRATE: "migrate", LOG_SHIPPER: "log-shipper", WEB: "web"}


def test_pod_info_pending_pod_has_no_containers_yet() -> None:
    info = PodInfo.from_api(pod_named("report-29384711-5xw8p"))
    assert info.containers == {}
    assert info.annotations == {}


def test_pod_info_from_a_watch_event_object() -> None:
    info = PodInfo.from_api(events()["ADDED"]["object"])
    assert (info.name, info.namespace) == ("cache-0", "shop")
    assert info.containers == {CACHE_REDIS: "redis"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"containerd://{WEB}", WEB),
        (f"cri-o://{WEB}", WEB),
        (f"docker://{WEB}", WEB),
        (WEB, WEB),
        ("containerd://", None),
        (f"containerd://{WEB.upper()}", None),
        (f"containerd://{WEB[:12]}", None),
        ("", None),
    ],
)
def test_strip_runtime_prefix(raw: str, expected: str | None) -> None:
    assert strip_runtime_prefix(raw) == expected


def test_pod_info_ephemeral_containers_and_other_runtimes() -> None:
    obj = copy.deepcopy(pod_named("web-7d4b9c8f6d-x2x9k"))
    obj["status"]["containerStatuses"] = [
        {"name": "web", "containerID": f"cri-o://{WEB}"},
        {"name": "no-id-yet"},
        "not a dict",
    ]
    obj["status"]["initContainerStatuses"] = []
    obj["status"]["ephemeralContainerStatuses"] = [
        {"name": "debugger-x7k2p", "containerID": f"docker://{EXPORTER}"}
    ]
    info = PodInfo.from_api(obj)
    assert info.containers == {WEB: "web", EXPORTER: "debugger-x7k2p"}


def test_pod_info_tolerates_missing_and_odd_fields() -> None:
    assert PodInfo.from_api({}) == PodInfo("", "", "")
    odd = {"metadata": {"name": "x", "labels": None, "annotations": ["nope"]}, "status": None}
    assert PodInfo.from_api(odd) == PodInfo("x", "", "")


# ---------------------------------------------------------------------------------------
# PodIndex


def test_index_full_list_indexes_by_uid_and_container() -> None:
    index = PodIndex()
    index.replace_pods(pods())
    assert len(index) == 5
    pod, name = index.by_container(WEB) or (None, "")
    assert pod is not None and pod.name == "web-7d4b9c8f6d-x2x9k" and name == "web"
    assert index.by_container(MIGRATE)[1] == "migrate"  # type: ignore[index]
    assert index.by_uid(EXPORTER_UID).name == "node-exporter-q7h2m"  # type: ignore[union-attr]
    assert index.by_container("0" * 64) is None
    assert index.by_uid("nope") is None


def test_index_static_pod_found_by_its_cgroup_uid() -> None:
    index = PodIndex()
    index.replace_pods(pods())
    mirror = index.by_uid(STATIC_HASH)
    assert mirror is not None and mirror.uid == APISERVER_UID
    assert mirror.name == "kube-apiserver-node-a"


def test_index_watch_events() -> None:
    index = PodIndex()
    index.replace_pods(pods())
    ev = events()

    index.apply_pod_event("ADDED", ev["ADDED"]["object"])
    assert index.by_container(CACHE_REDIS)[0].name == "cache-0"  # type: ignore[index]

    # MODIFIED: the web container restarted; the old id is gone, the new one found.
    index.apply_pod_event("MODIFIED", ev["MODIFIED"]["object"])
    assert index.by_container(WEB) is None
    assert index.by_container(WEB_RESTARTED)[1] == "web"  # type: ignore[index]
    assert index.by_container(LOG_SHIPPER)[0].uid == WEB_UID  # type: ignore[index]

    index.apply_pod_event("DELETED", ev["DELETED"]["object"])
    assert index.by_uid(EXPORTER_UID) is None
    assert index.by_container(EXPORTER) is None

    # Bookmarks and errors are the watcher's business; the index ignores them.
    index.apply_pod_event("BOOKMARK", ev["BOOKMARK"]["object"])
    index.apply_pod_event("ERROR", ev["ERROR"]["object"])
    assert len(index) == 5


def test_index_deleting_a_pod_keeps_a_container_id_another_pod_claims() -> None:
    index = PodIndex()
    a = {"metadata": {"uid": "a", "name": "a"}, "status": {"containerStatuses": []}}
    a["status"]["containerStatuses"].append({"name": "c", "containerID": f"containerd://{WEB}"})
    b = copy.deepcopy(a)
    b["metadata"] = {"uid": "b", "name": "b"}
    index.apply_pod_event("ADDED", a)
    index.apply_pod_event("ADDED", b)
    index.apply_pod_event("DELETED", a)
    assert index.by_container(WEB)[0].uid == "b"  # type: ignore[index]


def test_index_relist_drops_pods_whose_delete_was_missed() -> None:
    index = PodIndex()
    index.replace_pods(pods())
    index.replace_pods([pod_named("web-7d4b9c8f6d-x2x9k")])
    assert len(index) == 1
    assert index.by_container(EXPORTER) is None
    assert index.by_uid(STATIC_HASH) is None


def test_index_ignores_pods_without_uid() -> None:
    index = PodIndex()
    index.apply_pod_event("ADDED", {"metadata": {"name": "x"}})
    index.replace_pods([{"metadata": {"name": "y"}}])
    assert len(index) == 0


def test_index_namespaces() -> None:
    index = PodIndex()
    index.replace_namespaces(fixture("namespaces.json")["items"])
    assert index.namespace_count() == 6
    shop = index.namespace("shop")
    assert shop is not None
    assert shop.annotations == {CAPTURE_ANNOTATION: "true"}
    assert shop.labels["team"] == "storefront"
    index.apply_namespace_event("DELETED", {"metadata": {"name": "shop"}})
    assert index.namespace("shop") is None
    index.apply_namespace_event(
        "ADDED", {"metadata": {"name": "new", "annotations": {CAPTURE_ANNOTATION: "false"}}}
    )
    assert index.namespace("new") == NamespaceInfo("new", {}, {CAPTURE_ANNOTATION: "false"})


# ---------------------------------------------------------------------------------------
# CapturePolicy


def _pod(annotation: str | None) -> PodInfo:
    annotations = {} if annotation is None else {CAPTURE_ANNOTATION: annotation}
    return PodInfo("p", "ns", "uid", annotations=annotations)


def _ns(annotation: str | None) -> dict[str, str] | None:
    return None if annotation is None else {CAPTURE_ANNOTATION: annotation}


# (scope, pod annotation, namespace annotation, captured?)
TRUTH_TABLE = [
    ("node", None, None, True),
    ("node", "true", None, True),
    ("node", "false", None, False),
    ("node", None, "true", True),
    ("node", None, "false", False),
    ("node", "true", "false", True),  # the pod's own word wins
    ("node", "false", "true", False),
    ("node", "FALSE", None, False),
    ("node", "maybe", None, True),  # invalid: unset
    ("node", "maybe", "false", False),
    ("annotated", None, None, False),
    ("annotated", "true", None, True),
    ("annotated", "True", None, True),
    ("annotated", "false", None, False),
    ("annotated", None, "true", True),
    ("annotated", None, "false", False),
    ("annotated", "false", "true", False),
    ("annotated", "true", "false", True),
    ("annotated", "yes", None, False),  # invalid: unset
    ("annotated", "yes", "TRUE", True),
    ("annotated", " true ", None, True),
]


@pytest.mark.parametrize(("scope", "pod", "ns", "expected"), TRUTH_TABLE)
def test_capture_policy_truth_table(
    scope: str, pod: str | None, ns: str | None, expected: bool
) -> None:
    assert CapturePolicy(scope).wants(_pod(pod), _ns(ns)) is expected  # type: ignore[arg-type]


def test_capture_policy_host_processes() -> None:
    assert CapturePolicy("node").wants(None, None) is True
    assert CapturePolicy("annotated").wants(None, None) is False
    # A host process has no namespace; annotations passed anyway do not count.
    assert CapturePolicy("annotated").wants(None, _ns("true")) is False


def test_capture_policy_rejects_unknown_scope() -> None:
    with pytest.raises(ValueError):
        CapturePolicy("cluster")  # type: ignore[arg-type]


def test_capture_policy_logs_an_invalid_value_once(caplog: pytest.LogCaptureFixture) -> None:
    policy = CapturePolicy("node")
    with caplog.at_level(logging.WARNING, logger="agent.k8s.metadata"):
        for _ in range(5):
            policy.wants(_pod("yes please"), None)
        policy.wants(_pod("nope"), None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "yes please" in warnings[0].getMessage()


# ---------------------------------------------------------------------------------------
# ProxyAnnotations


def _annotated(**annotations: str) -> PodInfo:
    return PodInfo(
        "p", "ns", "uid", annotations={f"tlscap.io/{k}": v for k, v in annotations.items()}
    )


def test_proxy_annotations_from_the_fixture() -> None:
    proxy, errors = ProxyAnnotations.from_pod(PodInfo.from_api(pod_named("web-7d4b9c8f6d-x2x9k")))
    assert errors == []
    assert proxy == ProxyAnnotations(inbound_cert_secret="web-tls", inbound_ports=(8443,))


def test_proxy_annotations_none() -> None:
    assert ProxyAnnotations.from_pod(_annotated()) == (ProxyAnnotations(), [])


def test_proxy_annotations_everything() -> None:
    pod = PodInfo(
        "p",
        "ns",
        "uid",
        annotations={
            "tlscap.io/inbound-cert-secret": "api-tls",
            "tlscap.io/inbound-ports": " 8443, 9443,8443 ",
            "tlscap.io/upstream-client-cert-secret": "mesh.client-cert",
            "tlscap.io/upstream-insecure": "TRUE",
        },
    )
    proxy, errors = ProxyAnnotations.from_pod(pod)
    assert errors == []
    assert proxy == ProxyAnnotations("api-tls", (8443, 9443), "mesh.client-cert", True)


@pytest.mark.parametrize(
    ("annotations", "expected", "error_fragments"),
    [
        (
            {"inbound-cert-secret": "Web_TLS", "inbound-ports": "8443"},
            ProxyAnnotations(),
            ["not a valid Secret name"],
        ),
        (
            {"inbound-cert-secret": "web-tls"},
            ProxyAnnotations(),
            ["needs tlscap.io/inbound-ports"],
        ),
        (
            {"inbound-ports": "8443"},
            ProxyAnnotations(),
            ["needs tlscap.io/inbound-cert-secret"],
        ),
        (
            {"inbound-cert-secret": "web-tls", "inbound-ports": "8443,https,0,70000,-1"},
            ProxyAnnotations("web-tls", (8443,)),
            ["'https' is not a port", "'0' is not a port", "'70000'", "'-1'"],
        ),
        (
            {"inbound-cert-secret": "web-tls", "inbound-ports": "x"},
            ProxyAnnotations(),
            ["'x' is not a port", "needs tlscap.io/inbound-ports"],
        ),
        (
            {"upstream-client-cert-secret": "-bad-"},
            ProxyAnnotations(),
            ["upstream-client-cert-secret: '-bad-'"],
        ),
        (
            {"upstream-client-cert-secret": "a" * 254},
            ProxyAnnotations(),
            ["not a valid Secret name"],
        ),
        (
            {"upstream-insecure": "yes"},
            ProxyAnnotations(),
            ["upstream-insecure: 'yes' is neither true nor false"],
        ),
        (
            {"upstream-insecure": "false", "upstream-client-cert-secret": "c"},
            ProxyAnnotations(upstream_client_cert_secret="c"),
            [],
        ),
    ],
)
def test_proxy_annotations_errors(
    annotations: dict[str, str], expected: ProxyAnnotations, error_fragments: list[str]
) -> None:
    proxy, errors = ProxyAnnotations.from_pod(_annotated(**annotations))
    assert proxy == expected
    assert len(errors) == len(error_fragments), errors
    for fragment, error in zip(error_fragments, errors, strict=True):
        assert fragment in error


# ---------------------------------------------------------------------------------------
# PodResolver over a fake /proc


def _cgroup(proc: Path, pid: int, text: str) -> None:
    (proc / str(pid)).mkdir(exist_ok=True)
    (proc / str(pid) / "cgroup").write_text(text)


def _systemd_path(uid: str, cid: str) -> str:
    return (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n"
    )


@pytest.fixture
def resolver(tmp_path: Path) -> PodResolver:
    index = PodIndex()
    index.replace_pods(pods())
    _cgroup(tmp_path, 100, _systemd_path(WEB_UID, WEB))
    _cgroup(tmp_path, 101, _systemd_path(WEB_UID, LOG_SHIPPER))
    _cgroup(tmp_path, 200, "0::/system.slice/sshd.service\n")
    # a container just started: in the pod's cgroup, not yet in the pod's status
    _cgroup(tmp_path, 300, _systemd_path(WEB_UID, CACHE_REDIS))
    # a container of a pod the API has not told us about
    _cgroup(tmp_path, 400, _systemd_path("11111111-2222-4333-8444-555555555555", "ab" * 32))
    # a static pod: the cgroup carries the config hash, not the mirror pod's UID
    _cgroup(
        tmp_path,
        500,
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{STATIC_HASH}.slice/cri-containerd-{'cd' * 32}.scope\n",
    )
    return PodResolver(index, ContainerCache(str(tmp_path)))


def test_resolver_known_container(resolver: PodResolver) -> None:
    meta = resolver.resolve(100)
    assert meta == PodMeta(
        container_id=WEB,
        runtime="containerd",
        pod_name="web-7d4b9c8f6d-x2x9k",
        namespace="shop",
        pod_uid=WEB_UID,
        container_name="web",
        labels={"app.kubernetes.io/name": "web", "pod-template-hash": "7d4b9c8f6d"},
    )
    assert resolver.resolve(101).container_name == "log-shipper"  # type: ignore[union-attr]


def test_resolver_host_process_and_missing_pid(resolver: PodResolver) -> None:
    assert resolver.resolve(200) is None
    assert resolver.resolve(999) is None


def test_resolver_new_container_found_through_the_pod_uid(resolver: PodResolver) -> None:
    meta = resolver.resolve(300)
    assert meta is not None
    assert (meta.pod_name, meta.container_id, meta.container_name) == (
        "web-7d4b9c8f6d-x2x9k",
        CACHE_REDIS,
        "",
    )


def test_resolver_unknown_pod_keeps_what_the_cgroup_says(resolver: PodResolver) -> None:
    meta = resolver.resolve(400)
    assert meta == PodMeta(
        container_id="ab" * 32,
        runtime="containerd",
        pod_uid="11111111-2222-4333-8444-555555555555",
    )


def test_resolver_static_pod(resolver: PodResolver) -> None:
    meta = resolver.resolve(500)
    assert meta is not None
    assert (meta.pod_name, meta.namespace, meta.pod_uid) == (
        "kube-apiserver-node-a",
        "kube-system",
        APISERVER_UID,
    )


def test_resolver_sees_a_pod_that_arrives_later(tmp_path: Path) -> None:
    index = PodIndex()
    _cgroup(tmp_path, 100, _systemd_path(WEB_UID, WEB))
    resolver = PodResolver(index, ContainerCache(str(tmp_path)))
    assert resolver.resolve(100).pod_name == ""  # type: ignore[union-attr]  # API not there yet
    index.replace_pods(pods())
    assert resolver.resolve(100).pod_name == "web-7d4b9c8f6d-x2x9k"  # type: ignore[union-attr]


def test_resolver_forget_on_exit(resolver: PodResolver, tmp_path: Path) -> None:
    assert resolver.resolve(200) is None
    # pid 200 exits and is reused by a container process
    _cgroup(tmp_path, 200, _systemd_path(WEB_UID, WEB))
    assert resolver.resolve(200) is None  # cached
    resolver.forget(200)
    assert resolver.resolve(200).container_name == "web"  # type: ignore[union-attr]
