"""Kernel cgroup id -> cgroup path, for processes that are gone by the time their
records are read.

Every event carries the caller's cgroup v2 id (bpf_get_current_cgroup_id): the inode
number of its directory in the cgroup2 file system.  A short-lived process (a `curl`
in a container) has usually exited before user space reads /proc/<pid>/cgroup, but its
container's cgroup directory is still there, so walking the cgroup2 tree for that
inode finds the path - and the path names the container.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

RESCAN_INTERVAL_S = 1.0  # an unknown id re-walks the tree at most this often
MAX_PATHS = 65536


def cgroup2_mount(mounts_file: str = "/proc/mounts") -> str | None:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or .../unified on hybrid
    hosts; None on cgroup v1-only hosts."""
    try:
        with open(mounts_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError as exc:
        log.debug("cannot read %s: %s", mounts_file, exc)
    return None


class CgroupPaths:
    """Caches id -> path ("/kubepods.slice/..."), learning new ids by walking the tree.

    Thread-safe; a walk happens at most once per RESCAN_INTERVAL_S, so a flood of ids
    that are no directory (a cgroup already removed) costs one walk a second.
    """

    def __init__(self, root: str | None = None, clock=time.monotonic) -> None:
        self.root = root if root is not None else cgroup2_mount()
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._last_walk = float("-inf")
        self.walks = 0

    def path_of(self, cgroup_id: int) -> str | None:
        if not cgroup_id or self.root is None:
            return None
        with self._lock:
            path = self._paths.get(cgroup_id)
            if path is not None or self._clock() - self._last_walk < RESCAN_INTERVAL_S:
                return path
            self._last_walk = self._clock()
            self._walk()
            return self._paths.get(cgroup_id)

    def _walk(self) -> None:
        assert self.root is not None
        self.walks += 1
        found: dict[int, str] = {}
        for directory, _subdirs, _files in os.walk(self.root):
            try:
                ino = os.stat(directory).st_ino
            except OSError:
                continue  # removed while we walked
            relative = os.path.relpath(directory, self.root)
            found[ino] = "/" if relative == "." else "/" + relative
            if len(found) >= MAX_PATHS:
                log.warning("more than %d cgroups under %s: not all indexed", MAX_PATHS, self.root)
                break
        self._paths = found
