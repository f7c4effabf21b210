"""One TCP socket's inode and uid by its 4-tuple, from the kernel (NETLINK_SOCK_DIAG).

Reading /proc/net/tcp walks the kernel's whole connection hash table and gives every
row to Python to parse (milliseconds, growing with TIME_WAIT sockets); an exact
sock_diag request is one hash lookup in the kernel, about as cheap as a syscall gets.
This is what `ss` uses; pyroute2's DiagSocket only offers dumps.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid:
# sport, dport (network order), src[16], dst[16], if, cookie[2]
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[0], cookie[1]
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue,
# wqueue, uid, inode
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_SOCKID_SIZE = _SOCKID.size + _SOCKID_TAIL.size


@dataclass(frozen=True)
class SocketId:
    inode: int
    uid: int
    state: int


def _packed(ip: str, family: int) -> bytes:
    addr = ipaddress.ip_address(ip)
    if family == socket.AF_INET6 and addr.version == 4:
        addr = ipaddress.IPv6Address(f"::ffff:{addr}")
    return addr.packed.ljust(16, b"\0")


def build_request(
    family: int, local: tuple[str, int], remote: tuple[str, int], seq: int = 1
) -> bytes:
    """The netlink message asking for the TCP socket local -> remote (pure)."""
    body = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, ALL_STATES)
        + _SOCKID.pack(local[1], remote[1], _packed(local[0], family), _packed(remote[0], family))
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
        + body
    )


def parse_reply(data: bytes) -> SocketId | None:
    """The socket from a reply, None for "no such socket"; raises OSError on other errors."""
    if len(data) < _NLMSGHDR.size:
        raise OSError(errno.EPROTO, "short sock_diag reply")
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    body = data[_NLMSGHDR.size : length]
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", body)
        if -code == errno.ENOENT:
            return None
        raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
    if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MSG_HEAD.size + _SOCKID_SIZE + _MSG_TAIL.size:
        raise OSError(errno.EPROTO, f"unexpected sock_diag reply (type {kind}, {len(body)} bytes)")
    _fam, state, _timer, _retrans = _MSG_HEAD.unpack_from(body)
    _expires, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(body, _MSG_HEAD.size + _SOCKID_SIZE)
    return SocketId(inode=inode, uid=uid, state=state)


class SockDiag:
    """A netlink socket for exact lookups; one per thread (it is not shared)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self._sock.settimeout(1.0)
        self._seq = 0

    def lookup(self, local: tuple[str, int], remote: tuple[str, int]) -> SocketId | None:
        """The TCP socket whose local end is `local` and peer is `remote`, in our netns.

        An IPv4 connection may belong to a dual-stack AF_INET6 socket (v4-mapped
        addresses), so IPv4 tuples are looked up in both families.
        """
        v6 = ":" in local[0] or ":" in remote[0]
        for family in (socket.AF_INET6,) if v6 else (socket.AF_INET, socket.AF_INET6):
            self._seq += 1
            self._sock.send(build_request(family, local, remote, self._seq))
            found = parse_reply(self._sock.recv(65536))
            if found is not None:
                return found
        return None

    def close(self) -> None:
        self._sock.close()
