"""Which container a process runs in, read from its cgroup path.

Every container runtime puts a container's processes in a cgroup whose name carries
the 64-hex container id, and under Kubernetes the enclosing cgroup carries the pod
UID; the kernel shows that path in /proc/<pid>/cgroup.  That is the one place that
works for every runtime without talking to it, and it is what the container id in
the pod's status (`containerd://<id>`) is matched against.

The layouts differ by cgroup driver and runtime (see the tests for real paths):

- systemd driver: ``kubepods-burstable-pod<uid, _ for ->.slice/cri-containerd-<id>.scope``
  (``crio-<id>.scope``, ``docker-<id>.scope``); podman ``libpod-<id>.scope``;
- cgroupfs driver: ``/kubepods/burstable/pod<uid>/<id>``, Docker's ``/docker/<id>``;
- containerd's systemd-style cgroupsPath taken literally by a cgroupfs runc:
  ``kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>``;
- nested (kind, docker-in-docker): any prefix before these; the innermost container
  is the one the process is in, so the last container-looking component wins.

The container id is searched from the end of the path because a container may make
sub-cgroups of its own (systemd inside a container: ``.../docker-<id>.scope/init.scope``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CONTAINER_CACHE_SIZE = 16384

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Prefixes of "<prefix>-<id>[.scope]" leaves: the systemd driver's scopes, and CRI-O and
# podman under cgroupfs, which name the leaf the same way without ".scope".  The monitor
# processes (crio-conmon-<id>.scope, libpod-conmon-<id>.scope) do not match: after the
# prefix comes "conmon-", not an id.
_RUNTIME_PREFIXES = {
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "docker": "docker",
    "libpod": "podman",
}
_SCOPE = re.compile(r"(cri-containerd|crio|docker|libpod)-([0-9a-f]{64})(?:\.scope)?")
# A pod's cgroup: "pod<uid>" (cgroupfs) or "...-pod<uid with _>.slice" (systemd, where
# "-" separates the slice hierarchy).  Static pods have a 32-hex UID (a config hash).
_POD = re.compile(
    r"(?:.*-)?pod([0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12}|[0-9a-f]{32})(?:\.slice)?"
)
# cgroup v2 shows the path of a removed cgroup (a zombie's) with this suffix.
_DELETED = " (deleted)"


@dataclass(frozen=True)
class ContainerRef:
    runtime: str  # "containerd" | "cri-o" | "docker" | "podman" | "unknown"
    container_id: str  # full 64-hex id
    pod_uid: str | None  # with dashes, as the API reports metadata.uid


def _pod_uid(component: str) -> str | None:
    m = _POD.fullmatch(component)
    return m.group(1).replace("_", "-") if m else None


def _container_in(component: str, parent: str) -> tuple[str, str, str | None] | None:
    """(runtime, container id, pod uid found in the same component) or None."""
    if ":" in component:
        parts = component.split(":")
        if len(parts) == 3 and parts[1] in _RUNTIME_PREFIXES and _HEX64.fullmatch(parts[2]):
            return _RUNTIME_PREFIXES[parts[1]], parts[2], _pod_uid(parts[0])
        return None
    m = _SCOPE.fullmatch(component)
    if m:
        return _RUNTIME_PREFIXES[m.group(1)], m.group(2), None
    if _HEX64.fullmatch(component):
        # A bare id: Docker's cgroupfs layout says so in the parent; under kubepods the
        # path does not tell containerd from CRI-O or dockershim.
        if parent == "docker":
            return "docker", component, None
        if parent.startswith("libpod_parent"):
            return "podman", component, None
        return "unknown", component, None
    return None


def parse_cgroup_path(path: str) -> ContainerRef | None:
    """The container named by one cgroup path, or None for a host process."""
    if path.endswith(_DELETED):
        path = path[: -len(_DELETED)]
    components = [c for c in path.split("/") if c]
    for i in range(len(components) - 1, -1, -1):
        found = _container_in(components[i], components[i - 1] if i else "")
        if found is None:
            continue
        runtime, container_id, pod_uid = found
        if pod_uid is None:
            for component in reversed(components[:i]):
                pod_uid = _pod_uid(component)
                if pod_uid:
                    break
        return ContainerRef(runtime=runtime, container_id=container_id, pod_uid=pod_uid)
    return None


def parse_cgroup(text: str) -> ContainerRef | None:
    """The container of a process, from the whole text of /proc/<pid>/cgroup.

    cgroup v2 has one line ``0::/path``; v1 has one ``N:controllers:/path`` line per
    hierarchy, which normally all name the same container.  The first line naming a
    container wins, unless a later line names the same container together with its pod
    (some hierarchies may sit outside the pod's, e.g. a runtime's own ``name=`` one).
    Malformed lines are skipped: this reads whatever the kernel (or a test) hands us.
    """
    best: ContainerRef | None = None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[0].isdigit() or not fields[2].startswith("/"):
            continue
        ref = parse_cgroup_path(fields[2])
        if ref is None:
            continue
        if best is None or (
            ref.container_id == best.container_id and best.pod_uid is None and ref.pod_uid
        ):
            best = ref
        if best.pod_uid:
            break
    return best


def container_of_pid(pid: int, proc_root: str = "/proc") -> ContainerRef | None:
    """The container process `pid` runs in; None for host processes and unreadable pids."""
    path = f"{proc_root}/{pid}/cgroup"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        # The process exited (ENOENT/ESRCH) or we may not look (EACCES): not an error for
        # the caller, who just gets no container for this record.
        log.debug("cannot read %s: %s", path, exc)
        return None
    return parse_cgroup(text)


class ContainerCache:
    """pid -> ContainerRef (or None) for the pids seen in records.

    Reading /proc for every record costs a few syscalls per TLS call; a process stays in
    its container for life, so one read per pid suffices.  Pids are reused, so the
    owner of the cache must `forget` a pid when its process exits; the LRU bound keeps
    a missed exit from growing the cache forever.
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        maxsize: int = CONTAINER_CACHE_SIZE,
        reader: Callable[[int, str], ContainerRef | None] = container_of_pid,
    ) -> None:
        if maxsize <= 0:
            raise ValueError(f"maxsize must be positive, got {maxsize}")
        self.proc_root = proc_root
        self.maxsize = maxsize
        self._reader = reader
        self._entries: OrderedDict[int, ContainerRef | None] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, pid: int) -> ContainerRef | None:
        with self._lock:
            if pid in self._entries:
                self._entries.move_to_end(pid)
                self.hits += 1
                return self._entries[pid]
        # Read outside the lock: another thread's lookups need not wait for our /proc.
        ref = self._reader(pid, self.proc_root)
        with self._lock:
            self.misses += 1
            self._entries[pid] = ref
            self._entries.move_to_end(pid)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return ref

    def forget(self, pid: int) -> None:
        """The process exited: its pid may come back as another process."""
        with self._lock:
            self._entries.pop(pid, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, pid: object) -> bool:
        return pid in self._entries
