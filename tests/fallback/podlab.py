"""Pods without a cluster, for the pod-proxy tests (test_pod_proxy_*).

A "pod" here is what the agent sees of one on a node: processes in a cgroup v2
directory named as the kubelet's systemd driver names a containerd container (so
/proc/<pid>/cgroup names the container and the pod UID), running in a network
namespace of their own, and an entry in the local fake API server (pod list/watch with
annotations, container statuses and Secret volume mounts).  The agent runs in a "node"
namespace of its own, so even its node-level rules stay inside the lab; the fake API
server listens on that namespace's loopback (its socket made there through
agent.fallback.netns, the very mechanism under test).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agent.fallback.netns import Netns
from agent.fallback.rules import installed_rules
from agent.k8s.cgroup_ids import cgroup2_mount
from tests.k8s.fake_apiserver import FakeApiServer, load_fixture
from tests.netns import NetnsLab

NODE = "tlscap-pod-lab-node"
TOKEN = "pod-lab-token"
_extra = itertools.count()


def extra_netns_name() -> str:
    # Named like tests/netns.py's (…-<n>-[cs]) so a dead run's are swept there too;
    # indices from 900 never meet a lab's (1..250).
    return f"tlscap-t{os.getpid()}-{900 + next(_extra)}-s"


@dataclass
class FakePod:
    name: str
    netns: str
    annotations: dict[str, str]
    cgroup_root: Path
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    container_id: str = field(default_factory=lambda: os.urandom(32).hex())
    secret_mounts: dict[str, str] = field(default_factory=dict)  # secret -> mount path
    dirs: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        qos = "kubepods-besteffort"
        pod_slice = f"{qos}-pod{self.uid.replace('-', '_')}.slice"
        base = self.cgroup_root / "kubepods.slice"
        self.dirs = [base, base / f"{qos}.slice", base / f"{qos}.slice" / pod_slice]
        self.dirs.append(self.dirs[-1] / f"cri-containerd-{self.container_id}.scope")
        for d in self.dirs:
            d.mkdir(exist_ok=True)

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` run in this pod: the shell joins the container's cgroup (from the
        host's mount namespace, where /sys/fs/cgroup is) and then enters the netns."""
        procs = str(self.dirs[-1] / "cgroup.procs")
        script = 'echo $$ > "$1" && shift && exec ip netns exec "$@"'
        return ["sh", "-c", script, "sh", procs, self.netns, *argv]

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def api_object(self) -> dict:
        pod = copy.deepcopy(load_fixture("pods.json")["items"][0])
        pod["metadata"].update(
            name=self.name, namespace="shop", uid=self.uid, annotations=self.annotations,
            labels={"app": self.name, "team": "payments"},
        )  # fmt: skip
        pod["spec"]["nodeName"] = NODE
        volumes = [{"name": f"v-{s}", "secret": {"secretName": s}} for s in self.secret_mounts]
        mounts = [
            {"name": f"v-{s}", "mountPath": path, "readOnly": True}
            for s, path in self.secret_mounts.items()
        ]
        pod["spec"]["volumes"] = volumes
        pod["spec"]["containers"] = [
            {"name": "app", "image": "example/app:1", "volumeMounts": mounts}
        ]
        pod["spec"].pop("initContainers", None)
        pod["status"]["containerStatuses"] = [
            {"name": "app", "containerID": f"containerd://{self.container_id}", "ready": True,
             "restartCount": 0, "image": "example/app:1", "imageID": "", "started": True,
             "state": {"running": {"startedAt": "2026-12-01T08:00:00Z"}}}
        ]  # fmt: skip
        pod["status"]["initContainerStatuses"] = []
        return pod

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
        self.procs.clear()
        for d in reversed(self.dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # a parent slice may still hold another pod's


class PodLab:
    """The node namespace, the fake API server in it, pods, and their namespaces."""

    def __init__(self, lab: NetnsLab, workdir: Path) -> None:
        from pyroute2 import netns

        mount = cgroup2_mount()
        if mount is None:
            raise RuntimeError("no cgroup v2 hierarchy mounted")
        self.lab = lab
        self.cgroup_root = Path(mount)
        self.workdir = workdir
        self.namespaces: list[str] = []
        self.node = self.new_netns()
        self.pods: list[FakePod] = []
        ns = Netns.open(f"/run/netns/{self.node}")
        try:
            self.api = ns.call(lambda: FakeApiServer(token=TOKEN)).start()
        finally:
            ns.close()
        self.api.load("namespaces", [{"metadata": {"name": "shop", "uid": str(uuid.uuid4())}}])
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": self.api.url}}],
            "users": [{"name": "lab", "user": {"token": TOKEN}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
        }))  # fmt: skip
        self._netns_module = netns

    def new_netns(self) -> str:
        from pyroute2 import netns

        name = extra_netns_name()
        if name in netns.listnetns():
            netns.remove(name)
        netns.create(name)
        self.namespaces.append(name)
        self.lab.run(name, ["ip", "link", "set", "lo", "up"], check=True)
        return name

    def pod(self, name: str, netns: str, annotations: dict[str, str], **kw) -> FakePod:
        """A pod with a long-running process (its "sandbox") in `netns`; not yet in
        the API (see `publish`)."""
        pod = FakePod(name, netns, annotations, self.cgroup_root, **kw)
        self.pods.append(pod)
        pod.start(["sleep", "3600"])
        return pod

    def publish(self, *pods: FakePod, before_agent: bool = True) -> None:
        if before_agent:
            self.api.load("pods", [p.api_object() for p in pods])
        else:
            for p in pods:
                self.api.add("pods", p.api_object())

    def agent_args(self, *extra: str) -> list[str]:
        return ["--node", NODE, "--kubeconfig", str(self.kubeconfig), "--k8s-metadata", "on",
                "--proxy-pods", "on", *extra]  # fmt: skip

    def rules(self, ns: str) -> list[str]:
        """Our rules in `ns`, both families, as iptables-save prints them."""
        out = []
        for tool in ("iptables-save", "ip6tables-save"):
            out += installed_rules(self.lab.run(ns, [tool, "-t", "nat"]).stdout)
        return out

    def listeners(self, ns: str, port: int = 15443) -> list[str]:
        out = self.lab.run(ns, ["ss", "-Hltn", f"sport = :{port}"]).stdout
        return [line for line in out.splitlines() if line.strip()]

    def close(self) -> None:
        for pod in self.pods:
            pod.stop()
        self.api.stop()
        for name in self.namespaces:
            with contextlib.suppress(OSError):
                self._netns_module.remove(name)


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds it took for `condition` to hold; AssertionError after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start
