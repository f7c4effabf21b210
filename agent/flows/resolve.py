"""Resolve a process's socket fd to its TCP connection by reading /proc.

The eBPF side knows (pid, fd) for every TLS call and usually the remote address
(from connect/accept), but never the local address, and nothing at all about
connections opened before the agent started.  The kernel already publishes the
full 4-tuple per socket inode in /proc/<pid>/net/tcp{,6}; /proc/<pid>/fd/<fd>
links the fd to that inode.

We read /proc/<pid>/net rather than /proc/net because the former is the table of
*that process's* network namespace (a container's sockets are invisible in the
host's /proc/net).  pyroute2's sock_diag is not used: a netlink socket only sees
the netns it was opened in (the agent's), so /proc/<pid>/net would still be
needed for every other namespace, and parsing it is fast enough (see
SocketResolver for how often it happens).

Address normalisation: an IPv4 peer of a dual-stack IPv6 socket shows up in
tcp6 as an IPv4-mapped address (``::ffff:127.0.0.1``).  We report it as the
plain IPv4 string, because the same connection seen from its other end (an
AF_INET socket) has plain IPv4 addresses, users filter on ``127.0.0.1`` not on
the mapped spelling, and the role logic must match such a socket against IPv4
listeners.  ``normalize_ip`` applies the same rule to addresses from elsewhere
(e.g. sockaddr_in6 captured at connect/accept) so both paths agree.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

from agent.records.record import Endpoint, Role

log = logging.getLogger(__name__)


class TcpState(IntEnum):
    """Kernel TCP states as printed (hex) in the `st` column (include/net/tcp_states.h)."""

    ESTABLISHED = 0x01
    SYN_SENT = 0x02
    SYN_RECV = 0x03
    FIN_WAIT1 = 0x04
    FIN_WAIT2 = 0x05
    TIME_WAIT = 0x06
    CLOSE = 0x07
    CLOSE_WAIT = 0x08
    LAST_ACK = 0x09
    LISTEN = 0x0A
    CLOSING = 0x0B
    NEW_SYN_RECV = 0x0C


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One row of /proc/<pid>/net/tcp or tcp6."""

    local: Endpoint
    remote: Endpoint
    state: int  # a TcpState value; kept as int so an unknown future state still parses
    inode: int  # 0 for sockets with no file (TIME_WAIT, request socks)
    uid: int
    ipv6: bool  # which table it came from (an AF_INET6 socket may carry IPv4-mapped addresses)


@dataclass(frozen=True, slots=True)
class SocketInfo:
    """What the resolver knows about one (pid, fd)."""

    local: Endpoint
    remote: Endpoint
    state: int
    inode: int
    role: Role

    @property
    def state_name(self) -> str:
        try:
            return TcpState(self.state).name
        except ValueError:
            return f"0x{self.state:02X}"


_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_WILDCARDS_V4 = ("0.0.0.0", "::")  # a dual-stack [::] listener also accepts IPv4
_WILDCARDS_V6 = ("::",)


def _ip_from_packed(packed: bytes) -> str:
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    if packed[:12] == _V4_MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def decode_proc_address(hex_addr: str, byteorder: str = sys.byteorder) -> str:
    """Decode the address half of a ``local_address``/``rem_address`` column.

    The kernel prints the raw network-order address as native-endian 32-bit words
    (``%08X`` of each ``__be32``), so on little-endian hosts every 4-byte word is
    byte-reversed: 127.0.0.1 is ``0100007F``, ::1 is ``00000000...01000000``.
    """
    raw = bytes.fromhex(hex_addr)
    if len(raw) not in (4, 16):
        raise ValueError(f"bad address length in {hex_addr!r}")
    if byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _ip_from_packed(raw)


def normalize_ip(ip: str) -> str:
    """Canonical text form of an address; IPv4-mapped IPv6 becomes plain IPv4."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _endpoint(column: str) -> Endpoint:
    hex_addr, _, hex_port = column.partition(":")
    return Endpoint(decode_proc_address(hex_addr), int(hex_port, 16))


def _row_to_socket(fields: list[str], ipv6: bool) -> TcpSocket:
    local, remote = fields[1], fields[2]
    addr_len = 32 if ipv6 else 8
    if local.find(":") != addr_len or remote.find(":") != addr_len:
        raise ValueError("address width does not match the table family")
    return TcpSocket(
        local=_endpoint(local),
        remote=_endpoint(remote),
        state=int(fields[3], 16),
        uid=int(fields[7]),
        inode=int(fields[9]),
        ipv6=ipv6,
    )


def _rows(text: str) -> Iterable[tuple[int, list[str]]]:
    for lineno, line in enumerate(text.splitlines(), 1):
        # Only the first 10 columns are ours; the rest vary by kernel version.
        fields = line.split(None, 10)
        if fields and fields[0] != "sl":
            yield lineno, fields


def parse_proc_net_tcp(text: str, ipv6: bool) -> list[TcpSocket]:
    """Parse the contents of /proc/<pid>/net/tcp (ipv6=False) or tcp6 (ipv6=True).

    Raises ValueError on a malformed row: the format is a kernel ABI, so a row we
    cannot read means a bug here, not something to skip quietly.
    """
    out: list[TcpSocket] = []
    for lineno, fields in _rows(text):
        try:
            out.append(_row_to_socket(fields, ipv6))
        except (IndexError, ValueError) as e:
            raise ValueError(f"line {lineno}: cannot parse {' '.join(fields)!r}: {e}") from None
    return out


def classify_role(local: Endpoint, state: int, listeners: frozenset[tuple[str, int]]) -> Role:
    """`server` if the local side is a listening (ip, port) of the netns, else `client`.

    An accepted socket shares its listener's local port, and a listener bound to a
    wildcard address covers every local address.  Ephemeral (client) ports are never
    handed out from a bound port, so a port match does not misfire on clients.  A
    listening socket itself is neither side of a connection.
    """
    if state == TcpState.LISTEN:
        return "unknown"
    if (local.ip, local.port) in listeners:
        return "server"
    wildcards = _WILDCARDS_V6 if ":" in local.ip else _WILDCARDS_V4
    if any((w, local.port) in listeners for w in wildcards):
        return "server"
    return "client"


def socket_inode(pid: int, fd: int, proc_root: str = "/proc") -> int | None:
    """Inode of the socket behind /proc/<pid>/fd/<fd>; None if gone or not a socket."""
    try:
        target = os.readlink(f"{proc_root}/{pid}/fd/{fd}")
    except OSError:
        return None
    if not (target.startswith("socket:[") and target.endswith("]")):
        return None
    try:
        return int(target[8:-1])
    except ValueError:
        return None


def fd_is_socket(pid: int, fd: int, proc_root: str = "/proc") -> bool:
    """Whether fd `fd` of process `pid` may still be a socket: False only when
    /proc is sure it is not (closed, or something else now), since the sweep
    closes connections on a False (FlowTable.sweep_closed).

    A process whose first thread has exited (pthread_exit in main) keeps
    running, but /proc/<pid>/fd is then empty: its open files are looked up
    through another thread, /proc/<pid>/task/<tid>/fd.  An error other than
    "no such file" (EACCES, ENOMEM, ...) tells nothing: True."""
    try:
        return _is_socket_link(os.readlink(f"{proc_root}/{pid}/fd/{fd}"))
    except FileNotFoundError:
        pass
    except OSError:
        return True
    try:
        tids = os.listdir(f"{proc_root}/{pid}/task")
    except FileNotFoundError:
        return False  # the process is gone
    except OSError:
        return True
    for tid in tids:
        if tid == str(pid):
            continue  # the first thread: asked above
        try:
            return _is_socket_link(os.readlink(f"{proc_root}/{pid}/task/{tid}/fd/{fd}"))
        except FileNotFoundError:
            continue  # closed, or that thread is exiting too: ask the next one
        except OSError:
            return True
    return False


def _is_socket_link(target: str) -> bool:
    return target.startswith("socket:[") and target.endswith("]")


def netns_id(pid: int, proc_root: str = "/proc") -> int | None:
    """Inode of the process's network namespace (unique per netns while it lives)."""
    try:
        return os.stat(f"{proc_root}/{pid}/ns/net").st_ino
    except OSError:
        return None


class _NetnsTable:
    """One netns's TCP sockets, indexed by inode.

    Rows are split but decoded only when looked up (listeners excepted): a busy
    node has 10k+ sockets and we need a handful, and decoding every row costs ~5x
    more than splitting it (≈45 ms vs ≈8 ms for 10k rows).
    """

    __slots__ = ("absent", "burst", "listeners", "loaded_at", "rows")

    def __init__(self, texts: Iterable[tuple[str, bool]], loaded_at: float, burst: int) -> None:
        self.rows: dict[str, tuple[list[str], bool]] = {}
        listeners: set[tuple[str, int]] = set()
        for text, ipv6 in texts:
            for _, fields in _rows(text):
                if len(fields) < 10:
                    continue
                if fields[9] != "0":  # TIME_WAIT and request socks have no inode
                    self.rows[fields[9]] = (fields, ipv6)
                if fields[3] == "0A":
                    local = _endpoint(fields[1])
                    listeners.add((local.ip, local.port))
        self.listeners = frozenset(listeners)
        self.loaded_at = loaded_at
        self.burst = burst  # the resolve_many() call that read it
        # Inodes confirmed absent by a read made after their fd was seen (UDP/unix
        # sockets, sockets not yet connected); stops them from forcing a re-read on
        # every call while this snapshot lives.
        self.absent: set[int] = set()

    def get(self, inode: int) -> TcpSocket | None:
        row = self.rows.get(str(inode))
        return _row_to_socket(*row) if row else None


def read_tcp_tables(pid: int, proc_root: str = "/proc") -> list[tuple[str, bool]]:
    """Raw text of both TCP tables of `pid`'s netns, as (text, ipv6) pairs."""
    out: list[tuple[str, bool]] = []
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"{proc_root}/{pid}/net/{name}", encoding="ascii") as f:
                out.append((f.read(), ipv6))
        except FileNotFoundError:
            if ipv6 and os.path.isdir(f"{proc_root}/{pid}"):
                continue  # kernel without IPv6: no tcp6 file
            raise
    return out


class SocketResolver:
    """(pid, fd) -> SocketInfo, with the TCP tables cached per network namespace.

    Cache policy, per netns:
    - a table younger than `max_age` seconds is reused as is;
    - a lookup that misses forces one re-read, because a brand-new connection is
      usually the reason for the miss;
    - within one `resolve_many()` call (a burst, e.g. one ring-buffer drain) each
      netns is read at most once: all fds are looked up first, so a table read
      after that has every socket that was open at the time.  A flood of new
      connections therefore costs one read per burst, not one per connection.
    Tables of namespaces not used for `evict_after` seconds are dropped.  Not
    thread-safe: meant to be called from the single event-loop thread.
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        max_age: float = 0.05,
        evict_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = proc_root
        self.max_age = max_age
        self.evict_after = evict_after
        self._clock = clock
        self._tables: dict[int, _NetnsTable] = {}
        self._burst = 0
        self.reads = 0  # table reads so far; for tests and stats

    def refresh(self, pid: int | None = None) -> None:
        """Forget the cached table of `pid`'s netns (or all) so the next lookup re-reads."""
        if pid is None:
            self._tables.clear()
            return
        ns = netns_id(pid, self.proc_root)
        if ns is not None:
            self._tables.pop(ns, None)

    def open_sockets(self, pid: int) -> dict[int, SocketInfo]:
        """Every connected TCP socket `pid` holds, by fd (listeners left out).

        Used once at start-up for connections that predate the agent: the
        kernel never saw them being made, and asking later races their close.
        """
        try:
            fds = [int(name) for name in os.listdir(f"{self.proc_root}/{pid}/fd")]
        except (OSError, ValueError):
            return {}
        found = self.resolve_many((pid, fd) for fd in fds)
        return {
            fd: info
            for (_, fd), info in found.items()
            if info is not None and info.state != TcpState.LISTEN
        }

    def resolve(self, pid: int, fd: int) -> SocketInfo | None:
        """The TCP connection behind (pid, fd), or None if gone / not a TCP socket."""
        return self.resolve_many([(pid, fd)])[(pid, fd)]

    def resolve_many(
        self, items: Iterable[tuple[int, int]]
    ) -> dict[tuple[int, int], SocketInfo | None]:
        """Resolve a burst of (pid, fd) pairs, reading each netns table at most once."""
        self._burst += 1
        results: dict[tuple[int, int], SocketInfo | None] = {}
        # Phase 1: every fd -> (inode, netns) before any table is read (see class doc).
        pending: list[tuple[tuple[int, int], int, int]] = []
        for key in items:
            pid, fd = key
            results[key] = None
            inode = socket_inode(pid, fd, self.proc_root)
            ns = netns_id(pid, self.proc_root) if inode is not None else None
            if inode is not None and ns is not None:
                pending.append((key, inode, ns))
        # Phase 2: look up, re-reading a table on a miss unless this burst already did.
        for key, inode, ns in pending:
            try:
                results[key] = self._lookup(key[0], inode, ns)
            except (IndexError, ValueError) as e:
                log.warning("unreadable TCP table row for pid %d inode %d: %s", key[0], inode, e)
        return results

    def _lookup(self, pid: int, inode: int, ns: int) -> SocketInfo | None:
        table = self._tables.get(ns)
        if table is None or self._clock() - table.loaded_at >= self.max_age:
            table = self._load(ns, pid) or table
        if table is None:
            return None
        sock = table.get(inode)
        if sock is None and table.burst != self._burst and inode not in table.absent:
            table = self._load(ns, pid) or table
            sock = table.get(inode)
        if sock is None:
            if table.burst == self._burst:
                table.absent.add(inode)
            return None
        role = classify_role(sock.local, sock.state, table.listeners)
        return SocketInfo(sock.local, sock.remote, sock.state, sock.inode, role)

    def _load(self, ns: int, pid: int) -> _NetnsTable | None:
        now = self._clock()
        try:
            table = _NetnsTable(read_tcp_tables(pid, self.proc_root), now, self._burst)
        except OSError:
            return None  # the process exited between phase 1 and now
        except ValueError as e:
            log.warning("unreadable TCP table for pid %d: %s", pid, e)
            return None
        self.reads += 1
        self._tables[ns] = table
        self._evict(now)
        return table

    def _evict(self, now: float) -> None:
        # Namespaces come and go with containers; without this the cache only grows.
        stale = [ns for ns, t in self._tables.items() if now - t.loaded_at > self.evict_after]
        for ns in stale:
            del self._tables[ns]
