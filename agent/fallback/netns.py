"""Doing things inside another network namespace from one process (setns(2)).

A socket belongs to the network namespace of the thread that created it, for life; a
child process starts in the namespace of the thread that forked it.  setns(CLONE_NEWNET)
moves only the calling thread, and Python threads are OS threads, so two ways suffice:

- `Netns.call(fn)`: a fresh thread enters the namespace, runs `fn` and ends; nothing
  else in the process ever sees the switch.  For listeners, the sock_diag socket and
  the iptables tools (a subprocess started from that thread runs in the namespace, so
  `iptables-restore` needs no `nsenter`, and no pid is looked up at exec time).
- `Netns.entered(home)`: the calling thread steps in and back out, for the proxy's
  upstream sockets on the event loop's thread: two setns calls (a few µs) instead of a
  thread hop per connection.  Nothing between them may yield to the event loop.

A `Netns` holds an open fd of the namespace, opened once from a process's
`/proc/<pid>/ns/net`: that pins the namespace itself, so a pid that exits and is
reused later can never make us act in someone else's namespace.  Holding the fd (like
any socket in the namespace) keeps the namespace alive, so a pod's Netns is closed as
soon as the pod goes.  setns needs CAP_SYS_ADMIN (the privileged DaemonSet has it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace `fd` refers to (raises OSError)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetnsError(RuntimeError):
    """A namespace operation failed; str() is one line."""


class Netns:
    """An open handle on one network namespace, identified by (st_dev, st_ino)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)

    @classmethod
    def open(cls, path: str) -> Netns:
        """From a namespace file such as /proc/<pid>/ns/net (raises OSError)."""
        return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)

    @classmethod
    def current(cls) -> Netns:
        """The calling thread's own namespace (not necessarily the process's)."""
        return cls.open("/proc/thread-self/ns/net")

    @property
    def inode(self) -> int:
        return self.ident[1]

    def call(self, fn: Callable[..., T], *args: object, timeout: float = 60.0) -> T:
        """`fn(*args)` in a short-lived thread that lives in this namespace; re-raises
        what `fn` raised.  The thread ends with the call, so its namespace goes with it."""
        result: list[T] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                setns(self.fd)
                result.append(fn(*args))
            except BaseException as exc:  # handed to the caller's thread
                error.append(exc)

        thread = threading.Thread(target=body, name=f"netns-{self.inode}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise NetnsError(f"operation in network namespace {self.inode} timed out")
        if error:
            raise error[0]
        return result[0]

    @contextlib.contextmanager
    def entered(self, home: Netns) -> Iterator[None]:
        """Run the body in this namespace on the calling thread, then return to `home`.

        A failed return would leave the thread (possibly the event loop's) in the pod's
        namespace; that cannot happen while `home` is open, and if it ever did there is
        no safe way on, so the process stops rather than run in the wrong namespace."""
        setns(self.fd)
        try:
            yield
        finally:
            try:
                setns(home.fd)
            except OSError as exc:  # pragma: no cover - needs a kernel refusing our own ns
                os.write(2, f"tlscap: cannot return to the agent's namespace: {exc}\n".encode())
                os._exit(70)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Netns({self.path!r}, inode={self.inode})"


def netns_ident(pid: int, proc_root: str = "/proc") -> tuple[int, int] | None:
    """(st_dev, st_ino) of a process's network namespace; None when it is gone or hidden."""
    try:
        st = os.stat(f"{proc_root}/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
