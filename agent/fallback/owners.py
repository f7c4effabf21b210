"""Which local process is on the other end of a proxied connection.

The eBPF path knows the pid of every call; the proxy only sees sockets.  For an
outbound connection the client is a local process whose socket's local end is the
peer address of the connection we accepted; for an inbound one it is the service
listening on the original destination.  Both are found the way `ss -p` does it: the
socket's inode from the kernel (an exact sock_diag lookup, /proc/net/tcp where netlink
is not allowed), then the process holding `socket:[inode]` among its fds.

Scanning processes' fds is the expensive half, so processes that owned recent
connections are searched first (a client making many connections is found in one
directory listing), then the newest processes (a fresh `curl` is usually among them);
callers run lookups off the event loop.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from agent.fallback.sock_diag import SockDiag
from agent.flows.resolve import TcpState, normalize_ip, parse_proc_net_tcp
from agent.records.record import Endpoint

log = logging.getLogger(__name__)

HOT_PIDS = 16


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    comm: str


class SocketOwners:
    """Owner lookups in the agent's own namespace or, for a pod's proxy, in the pod's:
    there `diag_factory` makes the sock_diag socket inside that namespace (one, shared
    under a lock, so a hundred pods do not cost a hundred sockets per worker thread),
    `net_dir` is a pod process's /proc/<pid>/net, and the pod's own processes are
    searched first (`candidates`)."""

    def __init__(
        self,
        proc_root: str = "/proc",
        use_netlink: bool = True,
        *,
        diag_factory: Callable[[], SockDiag] | None = None,
        net_dir: Callable[[], str] | None = None,
        candidates: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self.proc_root = proc_root
        self.use_netlink = use_netlink
        self._hot: OrderedDict[int, None] = OrderedDict()
        self._hot_lock = threading.Lock()
        self._diag = threading.local()  # a netlink socket per worker thread
        self._diag_factory = diag_factory
        self._shared_diag: SockDiag | None = None
        self._shared_lock = threading.Lock()
        self._net_dir = net_dir or (lambda: f"{self.proc_root}/self/net")
        self._candidates = candidates
        self.lookups = 0
        self.misses = 0

    def connection_owner(self, local: Endpoint, remote: Endpoint) -> ProcessRef | None:
        """The process whose socket has this (local, remote) pair, in our netns."""
        return self._owner(local, remote, listening=False)

    def listener_owner(self, local: Endpoint, peer: Endpoint) -> ProcessRef | None:
        """The process listening where `peer` was going (`local`): an inbound service.

        Asked with the peer's tuple, the kernel answers as it would for a packet of that
        connection: no established socket exists (the proxy took it), so the listener.
        """
        return self._owner(local, peer, listening=True)

    def _owner(self, local: Endpoint, remote: Endpoint, listening: bool) -> ProcessRef | None:
        self.lookups += 1
        inode = self._inode(local, remote, listening)
        found = self._holder(inode) if inode else None
        if found is None:
            self.misses += 1
        return found

    def _inode(self, local: Endpoint, remote: Endpoint, listening: bool) -> int | None:
        if self._diag_factory is not None and self.use_netlink:
            with self._shared_lock:
                return self._shared_inode(local, remote, listening)
        diag = self._netlink()
        if diag is not None:
            try:
                sock = diag.lookup((local.ip, local.port), (remote.ip, remote.port))
            except OSError as exc:
                log.debug("sock_diag lookup failed (%s); reading /proc/net/tcp", exc)
            else:
                if sock is None or (sock.state == TcpState.LISTEN) != listening:
                    return None
                return sock.inode
        return self._inode_from_proc(local, remote, listening)

    def _shared_inode(self, local: Endpoint, remote: Endpoint, listening: bool) -> int | None:
        try:
            if self._shared_diag is None:
                assert self._diag_factory is not None
                self._shared_diag = self._diag_factory()
            sock = self._shared_diag.lookup((local.ip, local.port), (remote.ip, remote.port))
        except OSError as exc:
            log.debug("sock_diag lookup failed (%s); reading /proc/<pid>/net/tcp", exc)
            return self._inode_from_proc(local, remote, listening)
        if sock is None or (sock.state == TcpState.LISTEN) != listening:
            return None
        return sock.inode

    def close(self) -> None:
        with self._shared_lock:
            if self._shared_diag is not None:
                self._shared_diag.close()
                self._shared_diag = None

    def _netlink(self) -> SockDiag | None:
        if not self.use_netlink:
            return None
        diag = getattr(self._diag, "socket", None)
        if diag is None:
            try:
                diag = self._diag.socket = SockDiag()
            except OSError as exc:
                log.warning("no NETLINK_SOCK_DIAG (%s): owner lookups read /proc/net/tcp", exc)
                self.use_netlink = False
                return None
        return diag

    def _inode_from_proc(self, local: Endpoint, remote: Endpoint, listening: bool) -> int | None:
        here = (normalize_ip(local.ip), local.port)
        there = (normalize_ip(remote.ip), remote.port)
        for sock in self._sockets():
            if not sock.inode or (sock.state == TcpState.LISTEN) != listening:
                continue
            if listening:
                if sock.local.port == local.port:
                    return sock.inode
            elif (normalize_ip(sock.local.ip), sock.local.port) == here and (
                normalize_ip(sock.remote.ip),
                sock.remote.port,
            ) == there:
                return sock.inode
        return None

    def _sockets(self):
        for name, ipv6 in (("tcp", False), ("tcp6", True)):
            try:
                with open(f"{self._net_dir()}/{name}", encoding="ascii") as f:
                    yield from parse_proc_net_tcp(f.read(), ipv6)
            except FileNotFoundError:
                continue  # no IPv6 in this kernel

    def _holder(self, inode: int) -> ProcessRef | None:
        target = f"socket:[{inode}]"
        with self._hot_lock:
            hot = list(reversed(self._hot))
        if self._candidates is not None:
            hot += [p for p in self._candidates() if p not in hot]
        for pid in itertools.chain(hot, (p for p in self._all_pids() if p not in hot)):
            if self._holds(pid, target):
                with self._hot_lock:
                    self._hot[pid] = None
                    self._hot.move_to_end(pid)
                    while len(self._hot) > HOT_PIDS:
                        self._hot.popitem(last=False)
                return ProcessRef(pid, self._comm(pid))
        return None

    def _all_pids(self) -> Iterator[int]:
        """Newest first: pids grow until they wrap, and new clients are the usual case."""
        own = os.getpid()
        pids = [int(name) for name in os.listdir(self.proc_root) if name.isdigit()]
        return (pid for pid in sorted(pids, reverse=True) if pid != own)

    def _holds(self, pid: int, target: str) -> bool:
        fd_dir = f"{self.proc_root}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            with self._hot_lock:
                self._hot.pop(pid, None)  # exited, or not ours to read
            return False
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return True
            except OSError:
                continue
        return False

    def _comm(self, pid: int) -> str:
        try:
            with open(f"{self.proc_root}/{pid}/comm", encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except OSError:
            return ""
