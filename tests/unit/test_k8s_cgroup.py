"""Container and pod from /proc/<pid>/cgroup: every runtime/driver layout, and garbage."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from agent.k8s.cgroup import (
    ContainerCache,
    ContainerRef,
    container_of_pid,
    parse_cgroup,
    parse_cgroup_path,
)

CID = "4c01db0b339c4b2b8ee44ec8d2a63b24a8a1a3fbd48d4f0ae5bd5dc0d9a0e4d1"
CID2 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
POD_UID = "3f1c2a4e-8b7d-4e21-9a6f-5c0d1e2f3a4b"
POD_UID_ = POD_UID.replace("-", "_")
STATIC_UID = "0f4e8a1c2b3d5e6f7a8b9c0d1e2f3a4b"

BURSTABLE = "/kubepods.slice/kubepods-burstable.slice"
BESTEFFORT = "/kubepods.slice/kubepods-besteffort.slice"


def v1(path: str, *, rdma: str = "/", misc: str = "/") -> str:
    """A cgroup v1 file as on a real node (Ubuntu 20.04): a dozen hierarchies, the
    unified one last; rdma/misc stay at the root in containers."""
    return (
        f"13:misc:{misc}\n"
        f"12:rdma:{rdma}\n"
        f"11:hugetlb:{path}\n"
        f"10:memory:{path}\n"
        f"9:cpu,cpuacct:{path}\n"
        f"8:freezer:{path}\n"
        f"7:pids:{path}\n"
        f"6:net_cls,net_prio:{path}\n"
        f"5:cpuset:{path}\n"
        f"4:blkio:{path}\n"
        f"3:devices:{path}\n"
        f"2:perf_event:{path}\n"
        f"1:name=systemd:{path}\n"
        f"0::/\n"
    )


def v2(path: str) -> str:
    return f"0::{path}\n"


CONTAINERS = [
    # (case, text, expected)
    (
        "systemd driver, containerd, burstable (v2)",
        v2(f"{BURSTABLE}/kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{CID}.scope"),
        ContainerRef("containerd", CID, POD_UID),
    ),
    (
        "systemd driver, containerd, burstable (v1)",
        v1(f"{BURSTABLE}/kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{CID}.scope"),
        ContainerRef("containerd", CID, POD_UID),
    ),
    (
        "systemd driver, CRI-O, besteffort",
        v2(f"{BESTEFFORT}/kubepods-besteffort-pod{POD_UID_}.slice/crio-{CID}.scope"),
        ContainerRef("cri-o", CID, POD_UID),
    ),
    (
        "systemd driver, dockershim",
        v1(f"{BURSTABLE}/kubepods-burstable-pod{POD_UID_}.slice/docker-{CID}.scope"),
        ContainerRef("docker", CID, POD_UID),
    ),
    (
        "systemd driver, guaranteed QoS: pod slice right under kubepods.slice",
        v2(f"/kubepods.slice/kubepods-pod{POD_UID_}.slice/cri-containerd-{CID}.scope"),
        ContainerRef("containerd", CID, POD_UID),
    ),
    (
        "static pod: the UID is the config hash",
        v2(f"{BURSTABLE}/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope"),
        ContainerRef("containerd", CID, STATIC_UID),
    ),
    (
        "cgroupfs driver, burstable",
        v1(f"/kubepods/burstable/pod{POD_UID}/{CID}"),
        ContainerRef("unknown", CID, POD_UID),
    ),
    (
        "cgroupfs driver, guaranteed",
        v1(f"/kubepods/pod{POD_UID}/{CID}"),
        ContainerRef("unknown", CID, POD_UID),
    ),
    (
        "cgroupfs driver, besteffort (v2)",
        v2(f"/kubepods/besteffort/pod{POD_UID}/{CID}"),
        ContainerRef("unknown", CID, POD_UID),
    ),
    (
        "cgroupfs driver, CRI-O names its leaf crio-<id>",
        v2(f"/kubepods/besteffort/pod{POD_UID}/crio-{CID}"),
        ContainerRef("cri-o", CID, POD_UID),
    ),
    (
        "plain Docker, cgroupfs (v1)",
        v1(f"/docker/{CID}"),
        ContainerRef("docker", CID, None),
    ),
    (
        "plain Docker, systemd (v2)",
        v2(f"/system.slice/docker-{CID}.scope"),
        ContainerRef("docker", CID, None),
    ),
    (
        "systemd inside a Docker container: a sub-cgroup of the scope",
        v2(f"/system.slice/docker-{CID}.scope/init.scope"),
        ContainerRef("docker", CID, None),
    ),
    (
        "podman, rootful",
        v2(f"/machine.slice/libpod-{CID}.scope"),
        ContainerRef("podman", CID, None),
    ),
    (
        "podman 4 puts the payload in a 'container' sub-cgroup",
        v2(f"/machine.slice/libpod-{CID}.scope/container"),
        ContainerRef("podman", CID, None),
    ),
    (
        "podman, rootless",
        v2(
            f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container"
        ),
        ContainerRef("podman", CID, None),
    ),
    (
        "podman, cgroupfs manager",
        v1(f"/libpod_parent/libpod-{CID}"),
        ContainerRef("podman", CID, None),
    ),
    (
        "kind: the node's kubelet.slice prefix",
        v2(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{POD_UID_}.slice/cri-containerd-{CID}.scope"
        ),
        ContainerRef("containerd", CID, POD_UID),
    ),
    (
        "kind on a cgroup v1 Docker host: the innermost container wins",
        v1(f"/docker/{CID2}/kubepods/besteffort/pod{POD_UID}/{CID}"),
        ContainerRef("unknown", CID, POD_UID),
    ),
    (
        "containerd's systemd-style cgroupsPath taken literally (colons)",
        v1(
            "/system.slice/containerd.service/"
            f"kubepods-besteffort-pod{POD_UID_}.slice:cri-containerd:{CID}"
        ),
        ContainerRef("containerd", CID, POD_UID),
    ),
    (
        "colon form, burstable, v2",
        v2(
            "/system.slice/containerd.service/"
            f"kubepods-burstable-pod{POD_UID_}.slice:cri-containerd:{CID}"
        ),
        ContainerRef("containerd", CID, POD_UID),
    ),
    (
        "a zombie's removed cgroup",
        v2(f"{BURSTABLE}/kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{CID}.scope").rstrip(
            "\n"
        )
        + " (deleted)\n",
        ContainerRef("containerd", CID, POD_UID),
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in CONTAINERS], ids=[c[0] for c in CONTAINERS]
)
def test_containers(text: str, expected: ContainerRef) -> None:
    assert parse_cgroup(text) == expected


HOST = [
    ("a systemd service", v2("/system.slice/nginx.service")),
    ("a login session", v2("/user.slice/user-1000.slice/session-3.scope")),
    ("the root cgroup", v2("/")),
    ("init", v2("/init.scope")),
    ("a v1 host process", v1("/system.slice/sshd.service")),
    ("the container runtime itself", v2("/system.slice/containerd.service")),
    ("the docker daemon", v2("/system.slice/docker.service")),
    ("podman's conmon is not the container", v2(f"/machine.slice/libpod-conmon-{CID}.scope")),
    (
        "CRI-O's conmon is not the container",
        v2(f"{BURSTABLE}/kubepods-burstable-pod{POD_UID_}.slice/crio-conmon-{CID}.scope"),
    ),
    ("a pod slice without a container", v2(f"{BURSTABLE}/kubepods-burstable-pod{POD_UID_}.slice")),
    ("kubepods itself (the kubelet's accounting)", v2("/kubepods.slice")),
    ("upper-case hex is not an id", v2(f"/docker/{CID.upper()}")),
    ("63 hex digits", v2(f"/docker/{CID[:-1]}")),
    ("65 hex digits", v2(f"/docker/{CID}0")),
    ("a .mount unit named after a container", v2(f"/system.slice/docker-{CID}.mount")),
    ("an unknown runtime prefix", v2(f"/system.slice/garden-{CID}.scope")),
    ("colon form with an unknown prefix", v2(f"/x/kubepods-pod{POD_UID_}.slice:other:{CID}")),
    ("empty file", ""),
]


@pytest.mark.parametrize("text", [h[1] for h in HOST], ids=[h[0] for h in HOST])
def test_host_processes(text: str) -> None:
    assert parse_cgroup(text) is None


def test_v1_first_hierarchy_naming_a_container_wins() -> None:
    # rdma/misc at "/" come first; the memory line is the first that names the container.
    text = v1(f"/docker/{CID}", rdma="/", misc="/")
    assert parse_cgroup(text) == ContainerRef("docker", CID, None)


def test_v1_a_later_line_with_the_pod_completes_the_first() -> None:
    text = f"12:name=runtime:/{CID}\n11:memory:/kubepods/burstable/pod{POD_UID}/{CID}\n"
    assert parse_cgroup(text) == ContainerRef("unknown", CID, POD_UID)


def test_v1_unified_line_alone_names_the_container_on_hybrid_hosts() -> None:
    text = "12:rdma:/\n1:name=systemd:/\n" + v2(f"/system.slice/docker-{CID}.scope")
    assert parse_cgroup(text) == ContainerRef("docker", CID, None)


def test_path_with_colons_is_not_split_as_fields() -> None:
    # Only the first two colons separate fields; the colon form lives in the path.
    text = f"4:memory:/a/kubepods-pod{POD_UID_}.slice:crio:{CID}\n"
    assert parse_cgroup(text) == ContainerRef("cri-o", CID, POD_UID)


def test_parse_cgroup_path_directly() -> None:
    assert parse_cgroup_path(f"/docker/{CID}") == ContainerRef("docker", CID, None)
    assert parse_cgroup_path("") is None
    assert parse_cgroup_path("////") is None


@pytest.mark.parametrize(
    "text",
    [
        "\x00\x00\x00",
        "garbage",
        ":::",
        "0:",
        "0::",
        "x::/docker/" + CID,  # hierarchy id not a number
        "0::docker/" + CID,  # relative path
        "\n\n\n",
        "0::/" + "a/" * 10000,
        "0::/" + "-pod" * 5000 + ".slice",
        "1:2:3:4:5:6\n" * 100,
        "\ufffd\ufffd::/\ufffd",
        f"0::/kubepods/pod{POD_UID}/{CID}\x00",
    ],
)
def test_garbage_is_none_not_an_exception(text: str) -> None:
    assert parse_cgroup(text) is None


def test_fuzz_never_raises_and_ids_are_always_64_hex() -> None:
    rng = random.Random(1234)
    seeds = [c[1] for c in CONTAINERS] + [h[1] for h in HOST]
    alphabet = "0123456789abcdefABCDEF:/-_.\n podkubeslicescope"
    for _ in range(3000):
        text = rng.choice(seeds)
        mutation = rng.randrange(4)
        if mutation == 0 and text:
            cut = rng.randrange(len(text))
            text = text[:cut]
        elif mutation == 1 and text:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(alphabet) + text[i + 1 :]
        elif mutation == 2:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(200)))
        else:
            i = rng.randrange(len(text) + 1)
            text = text[:i] + "".join(rng.choice(alphabet) for _ in range(5)) + text[i:]
        ref = parse_cgroup(text)
        if ref is not None:
            assert len(ref.container_id) == 64
            assert all(c in "0123456789abcdef" for c in ref.container_id)
            assert ref.runtime in ("containerd", "cri-o", "docker", "podman", "unknown")


# ---------------------------------------------------------------------------------------
# Reading /proc and caching


def _proc(tmp_path: Path, pid: int, text: str) -> None:
    (tmp_path / str(pid)).mkdir(exist_ok=True)
    (tmp_path / str(pid) / "cgroup").write_text(text)


def test_container_of_pid_reads_the_file(tmp_path: Path) -> None:
    _proc(tmp_path, 42, v2(f"/docker/{CID}"))
    assert container_of_pid(42, str(tmp_path)) == ContainerRef("docker", CID, None)


def test_container_of_pid_missing_process_is_none(tmp_path: Path) -> None:
    assert container_of_pid(4242, str(tmp_path)) is None


def test_container_of_pid_unreadable_is_none(tmp_path: Path) -> None:
    # A directory in place of the file: an OSError even for root (chmod 0 is not).
    (tmp_path / "7" / "cgroup").mkdir(parents=True)
    assert container_of_pid(7, str(tmp_path)) is None


def test_container_of_pid_on_this_machine_does_not_raise() -> None:
    ref = container_of_pid(os.getpid())
    assert ref is None or len(ref.container_id) == 64


def test_cache_reads_once_per_pid(tmp_path: Path) -> None:
    reads: list[int] = []

    def reader(pid: int, proc_root: str) -> ContainerRef | None:
        reads.append(pid)
        return container_of_pid(pid, proc_root)

    _proc(tmp_path, 1, v2(f"/docker/{CID}"))
    cache = ContainerCache(str(tmp_path), reader=reader)
    assert cache.get(1) == ContainerRef("docker", CID, None)
    assert cache.get(1) == ContainerRef("docker", CID, None)
    assert cache.get(2) is None  # a host/unknown pid is cached too
    assert cache.get(2) is None
    assert reads == [1, 2]
    assert (cache.hits, cache.misses) == (2, 2)


def test_cache_forget_rereads_a_reused_pid(tmp_path: Path) -> None:
    _proc(tmp_path, 5, v2(f"/docker/{CID}"))
    cache = ContainerCache(str(tmp_path))
    assert cache.get(5) == ContainerRef("docker", CID, None)
    # The process exits, the pid comes back as a process of another container.
    _proc(tmp_path, 5, v2(f"/system.slice/docker-{CID2}.scope"))
    assert cache.get(5) == ContainerRef("docker", CID, None)
    cache.forget(5)
    assert 5 not in cache
    assert cache.get(5) == ContainerRef("docker", CID2, None)
    cache.forget(12345)  # unknown pid: no error


def test_cache_is_bounded_lru(tmp_path: Path) -> None:
    cache = ContainerCache(str(tmp_path), maxsize=3)
    for pid in (1, 2, 3):
        cache.get(pid)
    cache.get(1)  # 1 is now the most recent; 2 the least
    cache.get(4)
    assert len(cache) == 3
    assert 2 not in cache
    assert all(p in cache for p in (1, 3, 4))
    cache.clear()
    assert len(cache) == 0


def test_cache_rejects_a_nonsense_size() -> None:
    with pytest.raises(ValueError):
        ContainerCache(maxsize=0)
