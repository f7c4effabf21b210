"""Attribution without a cluster: cgroup ids found by walking a cgroup2-shaped tree,
container ids and pods stamped on records, and the capture policy's drops counted."""

from __future__ import annotations

import os
from pathlib import Path

from agent.k8s.attribution import Attribution
from agent.k8s.cgroup import ContainerCache
from agent.k8s.cgroup_ids import CgroupPaths, cgroup2_mount
from agent.k8s.metadata import CapturePolicy, PodIndex, PodResolver
from agent.records.record import Record

CID = "ab" * 32
UID = "1234abcd-12ab-34cd-56ef-1234567890ab"
SCOPE = (
    f"kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
)


def tree(tmp_path: Path) -> tuple[Path, int]:
    root = tmp_path / "cgroup"
    (root / SCOPE).mkdir(parents=True)
    (root / "system.slice" / "nginx.service").mkdir(parents=True)
    return root, os.stat(root / SCOPE).st_ino


def pod(annotations: dict | None = None) -> dict:
    return {
        "metadata": {"name": "web-1", "namespace": "shop", "uid": UID,
                     "labels": {"app": "web"}, "annotations": annotations or {}},
        "spec": {"nodeName": "n1"},
        "status": {"containerStatuses": [{"name": "web", "containerID": f"containerd://{CID}"}]},
    }  # fmt: skip


def attribution(tmp_path: Path, scope: str = "node", pods=(), clock=None) -> Attribution:
    root, _ = tree(tmp_path)
    index = PodIndex()
    index.replace_pods(list(pods))
    resolver = PodResolver(index, ContainerCache(proc_root=str(tmp_path / "no-proc")))
    kwargs = {"clock": clock} if clock else {}
    return Attribution(resolver, CapturePolicy(scope), cgroups=CgroupPaths(str(root), **kwargs))


def record(cgroup_id: int, pid: int = 4242) -> Record:
    return Record(type="data", ts_ns=1, pid=pid, cgroup_id=cgroup_id, direction="egress")


def test_cgroup_id_names_the_container_after_the_process_is_gone(tmp_path: Path) -> None:
    att = attribution(tmp_path, pods=[pod()])
    ino = os.stat(tmp_path / "cgroup" / SCOPE).st_ino
    r = record(ino, pid=999_999)  # no such pid: /proc has nothing to say
    assert att.apply(r)
    assert r.container_id == CID
    assert r.pod is not None and (r.pod.name, r.pod.namespace, r.pod.container) == (
        "web-1", "shop", "web"
    )  # fmt: skip
    assert r.pod.labels == {"app": "web"}


def test_container_without_a_known_pod_keeps_its_id(tmp_path: Path) -> None:
    att = attribution(tmp_path)
    r = record(os.stat(tmp_path / "cgroup" / SCOPE).st_ino)
    assert att.apply(r) and r.container_id == CID and r.pod is None


def test_host_cgroup_is_no_container(tmp_path: Path) -> None:
    att = attribution(tmp_path)
    r = record(os.stat(tmp_path / "cgroup" / "system.slice" / "nginx.service").st_ino)
    assert att.apply(r) and r.container_id == "" and r.pod is None


def test_annotated_scope_counts_what_it_drops(tmp_path: Path) -> None:
    att = attribution(tmp_path, "annotated", pods=[pod()])
    ino = os.stat(tmp_path / "cgroup" / SCOPE).st_ino
    assert not att.apply(record(ino))  # the pod did not opt in
    assert not att.apply(record(0))  # host processes neither
    assert att.stats()["k8s_policy_dropped_records"] == 2

    opted = attribution(tmp_path / "b", "annotated", pods=[pod({"tlscap.io/capture": "true"})])
    ino = os.stat(tmp_path / "b" / "cgroup" / SCOPE).st_ino
    assert opted.apply(record(ino))


def test_unknown_ids_rewalk_at_most_once_a_second(tmp_path: Path) -> None:
    now = [100.0]
    att = attribution(tmp_path, clock=lambda: now[0])
    for _ in range(50):
        att.apply(record(123_456_789))  # an id no directory has
    assert att.cgroups.walks == 1
    now[0] += 1.5
    att.apply(record(123_456_789))
    assert att.cgroups.walks == 2


def test_cgroup2_mount_from_mounts_file(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert cgroup2_mount(str(mounts)) == "/sys/fs/cgroup/unified"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    assert cgroup2_mount(str(mounts)) is None
    assert cgroup2_mount(str(tmp_path / "missing")) is None
