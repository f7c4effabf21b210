"""Processes placed in fresh cgroups named like a kubelet's are attributed, on real
captured records, to the container id the cgroup path names and to the pod the API
server (a local fake speaking the list/watch API) says owns that container; with
--capture-scope annotated only the annotated pod's traffic is kept."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.k8s.cgroup_ids import cgroup2_mount
from tests.ebpf.conftest import REPO, TLSCAP, wait_for
from tests.k8s.fake_apiserver import FakeApiServer, load_fixture

NODE = "tlscap-lab-node"


class FakeContainer:
    """A cgroup v2 directory named as the kubelet's systemd driver names a containerd
    container; processes started with run() live in it."""

    def __init__(self, root: Path, pod_uid: str) -> None:
        self.id = os.urandom(32).hex()
        qos = "kubepods-besteffort"
        pod_slice = f"{qos}-pod{pod_uid.replace('-', '_')}.slice"
        self.dirs = [
            root / "kubepods.slice",
            root / "kubepods.slice" / f"{qos}.slice",
            root / "kubepods.slice" / f"{qos}.slice" / pod_slice,
        ]
        self.dirs.append(self.dirs[-1] / f"cri-containerd-{self.id}.scope")
        for d in self.dirs:
            d.mkdir(exist_ok=True)

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        # The shell moves itself into the cgroup, then becomes the program.
        script = 'echo $$ > "$1" && shift && exec "$@"'
        procs = str(self.dirs[-1] / "cgroup.procs")
        return subprocess.run(["sh", "-c", script, "sh", procs, *argv],
                              capture_output=True, timeout=30, check=True)  # fmt: skip

    def remove(self) -> None:
        for d in reversed(self.dirs):
            # A parent slice may still hold the other fake container: left for it.
            with contextlib.suppress(OSError):
                d.rmdir()


def pod_object(name: str, uid: str, container_id: str, annotations: dict) -> dict:
    pod = copy.deepcopy(load_fixture("pods.json")["items"][0])
    pod["metadata"].update(name=name, namespace="shop", uid=uid, annotations=annotations,
                           labels={"app": name, "team": "payments"})  # fmt: skip
    pod["spec"]["nodeName"] = NODE
    pod["status"]["containerStatuses"] = [
        {"name": "app", "containerID": f"containerd://{container_id}", "ready": True,
         "restartCount": 0, "image": "example/app:1", "imageID": "", "started": True,
         "state": {"running": {"startedAt": "2026-11-23T08:00:00Z"}}}
    ]  # fmt: skip
    pod["status"]["initContainerStatuses"] = []
    return pod


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict]:
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy mounted on this host")
    root = Path(mount)
    server = FakeApiServer(token="lab-token").start()
    made: list[FakeContainer] = []
    try:
        uids = {name: str(uuid.uuid4()) for name in ("checkout", "ledger")}
        containers = {name: FakeContainer(root, uid) for name, uid in uids.items()}
        made += containers.values()
        server.load("pods", [
            pod_object("checkout", uids["checkout"], containers["checkout"].id,
                       {"tlscap.io/capture": "true"}),
            pod_object("ledger", uids["ledger"], containers["ledger"].id, {}),
        ])  # fmt: skip
        server.load("namespaces", [{"metadata": {"name": "shop", "uid": str(uuid.uuid4())}}])
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": server.url}}],
            "users": [{"name": "lab", "user": {"token": "lab-token"}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
        }))  # fmt: skip
        yield {"server": server, "kubeconfig": str(kubeconfig), "containers": containers,
               "uids": uids}  # fmt: skip
    finally:
        server.stop()
        for c in made:
            c.remove()


def curl(port: int) -> list[str]:
    return ["curl", "-sk", "--http1.1", "-o", "/dev/null", f"https://127.0.0.1:{port}/pod"]


def start_agent(agent, cluster: dict, *extra: str):
    a = agent("--node", NODE, "--kubeconfig", cluster["kubeconfig"], "--k8s-metadata", "on",
              *extra)  # fmt: skip
    # The pods are listed in the background: wait until the agent has asked for them.
    server = cluster["server"]
    wait_for(lambda: server.requests_for("pods", watch=True), 10, "the agent to watch pods")
    return a


def test_records_carry_container_id_and_pod(agent, s_server, cluster):
    port = s_server("127.0.0.1")
    a = start_agent(agent, cluster)
    checkout = cluster["containers"]["checkout"]
    checkout.run(curl(port))
    subprocess.run(curl(port), check=True, timeout=30)  # a host process: no pod
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    in_pod = [r for r in cap.data(comm="curl") if r["container_id"]]
    on_host = [r for r in cap.data(comm="curl") if not r["container_id"]]
    assert in_pod and on_host
    assert {r["container_id"] for r in in_pod} == {checkout.id}
    assert {json.dumps(r["pod"], sort_keys=True) for r in in_pod} == {json.dumps({
        "name": "checkout", "namespace": "shop", "uid": cluster["uids"]["checkout"],
        "container": "app", "labels": {"app": "checkout", "team": "payments"},
    }, sort_keys=True)}  # fmt: skip
    assert all(r["pod"] is None for r in on_host)
    # Open/close records are attributed too.
    conn = in_pod[0]["conn_id"]
    assert [r["pod"]["name"] for r in cap.records if r.get("conn_id") == conn] == [
        "checkout"
    ] * len([r for r in cap.records if r.get("conn_id") == conn])
    assert cap.stats["k8s_connected"] == 1 and cap.stats["k8s_policy_dropped_records"] == 0
    # The server was asked for this node's pods only.
    [listed] = cluster["server"].requests_for("pods", watch=False)[:1]
    assert f"spec.nodeName={NODE}" in str(listed)


def test_annotated_scope_keeps_only_opted_in_pods(agent, s_server, cluster):
    port = s_server("127.0.0.1")
    a = start_agent(agent, cluster, "--capture-scope", "annotated")
    cluster["containers"]["checkout"].run(curl(port))  # tlscap.io/capture: "true"
    cluster["containers"]["ledger"].run(curl(port))  # no annotation
    subprocess.run(curl(port), check=True, timeout=30)  # host process
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    kept = cap.data(comm="curl")
    assert kept and {r["pod"]["name"] for r in kept} == {"checkout"}
    assert cap.data(comm="openssl") == []  # s_server runs on the host: not opted in
    assert cap.stats["k8s_policy_dropped_records"] > 0


def test_metadata_on_without_an_api_server_fails_at_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(HOME=str(tmp_path), KUBECONFIG="")
    out = subprocess.run(
        [*TLSCAP, "run", "--k8s-metadata", "on", "--duration", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "no Kubernetes API configuration" in out.stderr
