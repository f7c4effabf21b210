"""Which local process is on the other end of a proxied connection.

The eBPF path knows the pid of every call; the proxy only sees sockets.  For an
outbound connection the client is a local process whose socket's local end is the
peer address of the connection we accepted; for an inbound one the "process" is the
service listening on the port.  Both are found the way `ss -p` does it: the socket's
inode in /proc/net/tcp{,6}, then the process holding `socket:[inode]` among its fds.

Scanning every process's fds costs milliseconds on a busy host, so processes that
owned recent connections are searched first (a client making many connections is found
in one directory listing), and callers run lookups off the event loop.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from agent.flows.resolve import TcpState, normalize_ip, parse_proc_net_tcp
from agent.records.record import Endpoint

log = logging.getLogger(__name__)

HOT_PIDS = 16


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    comm: str


class SocketOwners:
    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = proc_root
        self._hot: OrderedDict[int, None] = OrderedDict()
        self.lookups = 0
        self.misses = 0

    def connection_owner(self, local: Endpoint, remote: Endpoint) -> ProcessRef | None:
        """The process whose socket has this (local, remote) pair, in our netns."""
        key = (normalize_ip(local.ip), local.port, normalize_ip(remote.ip), remote.port)
        for sock in self._sockets():
            if sock.inode and sock.state != TcpState.LISTEN:
                here = (normalize_ip(sock.local.ip), sock.local.port)
                there = (normalize_ip(sock.remote.ip), sock.remote.port)
                if (*here, *there) == key:
                    return self._holder(sock.inode)
        return self._missed()

    def listener_owner(self, port: int) -> ProcessRef | None:
        """The process listening on `port` (any address): an inbound service."""
        for sock in self._sockets():
            if sock.inode and sock.state == TcpState.LISTEN and sock.local.port == port:
                return self._holder(sock.inode)
        return self._missed()

    def _missed(self) -> None:
        self.lookups += 1
        self.misses += 1
        return None

    def _sockets(self):
        for name, ipv6 in (("tcp", False), ("tcp6", True)):
            try:
                with open(f"{self.proc_root}/self/net/{name}", encoding="ascii") as f:
                    yield from parse_proc_net_tcp(f.read(), ipv6)
            except FileNotFoundError:
                continue  # no IPv6 in this kernel

    def _holder(self, inode: int) -> ProcessRef | None:
        self.lookups += 1
        target = f"socket:[{inode}]"
        hot = list(reversed(self._hot))
        for pid in itertools.chain(hot, (p for p in self._all_pids() if p not in hot)):
            if self._holds(pid, target):
                self._hot[pid] = None
                self._hot.move_to_end(pid)
                while len(self._hot) > HOT_PIDS:
                    self._hot.popitem(last=False)
                return ProcessRef(pid, self._comm(pid))
        self.misses += 1
        return None

    def _all_pids(self) -> Iterator[int]:
        own = os.getpid()
        for entry in os.scandir(self.proc_root):
            if entry.name.isdigit() and int(entry.name) != own:
                yield int(entry.name)

    def _holds(self, pid: int, target: str) -> bool:
        fd_dir = f"{self.proc_root}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
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
