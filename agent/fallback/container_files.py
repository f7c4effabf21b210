"""Read a file as a container sees it, through /proc/<pid>/root, without escaping it.

/proc/<pid>/root opens the container's root directory in its own mount namespace, so
the Secret volumes the kubelet mounted for it are there.  A plain open() of
"/proc/<pid>/root/etc/tls/tls.crt" would follow an absolute symlink inside the
container ("tls.crt -> /etc/shadow") to the *node's* file, since our root is the node's.
So the path is walked one component at a time with O_PATH|O_NOFOLLOW descriptors,
symlinks resolved by hand against the container's root, and ".." never climbs above
it (what openat2's RESOLVE_IN_ROOT does; Python has no binding for it).  Secret volumes
are full of symlinks (tls.crt -> ..data/tls.crt -> ..2026_12_01.../tls.crt): relative
ones, which resolve as they would inside the container.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

MAX_SYMLINKS = 40
MAX_FILE_BYTES = 1 << 20  # certificates and keys; anything larger is not one


def read_in_root(root: str, path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The contents of `path` resolved inside `root` (raises OSError)."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = [root_fd]  # open directories from the root down to where we are
    parts = deque(p for p in path.split("/") if p and p != ".")
    hops = 0
    try:
        while parts:
            name = parts.popleft()
            if name == "..":
                if len(dirs) > 1:
                    os.close(dirs.pop())
                continue
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirs[-1])
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, f"{path}: too many symlinks")
                target = os.readlink(name, dir_fd=dirs[-1])
                if target.startswith("/"):  # absolute: from the container's root
                    while len(dirs) > 1:
                        os.close(dirs.pop())
                parts.extendleft(reversed([p for p in target.split("/") if p and p != "."]))
            elif stat.S_ISDIR(mode):
                dirs.append(fd)
            elif stat.S_ISREG(mode) and not parts:
                return _read_path_fd(fd, path, limit)
            else:
                os.close(fd)
                raise OSError(errno.ENOTDIR if parts else errno.EINVAL, f"{path}: not a file")
        raise OSError(errno.EISDIR, f"{path}: is a directory")
    finally:
        for fd in dirs:
            os.close(fd)


def _read_path_fd(path_fd: int, path: str, limit: int) -> bytes:
    try:
        # An O_PATH descriptor cannot be read; reopening it through /proc/self/fd opens
        # the very inode we resolved, not whatever the path names by now.
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"{path}: larger than {limit} bytes")
    return data
