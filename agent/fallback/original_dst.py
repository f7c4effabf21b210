"""Where a redirected connection was really going (SO_ORIGINAL_DST).

iptables REDIRECT rewrites the destination to the proxy's port; conntrack remembers the
original one, and getsockopt(SO_ORIGINAL_DST) on the accepted socket returns it as a
sockaddr.  IPv6 uses IP6T_SO_ORIGINAL_DST at the SOL_IPV6 level, with the same number.
"""

from __future__ import annotations

import socket
import struct

from agent.records.record import Endpoint

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOCKADDR_IN_SIZE = 16
_SOCKADDR_IN6_SIZE = 28


def decode_sockaddr(raw: bytes) -> Endpoint:
    """A struct sockaddr_in / sockaddr_in6 as the kernel returns it."""
    if len(raw) < 4:
        raise ValueError(f"sockaddr of {len(raw)} bytes is too short")
    (family,) = struct.unpack_from("=H", raw)
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == socket.AF_INET and len(raw) >= 8:
        return Endpoint(socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    if family == socket.AF_INET6 and len(raw) >= 24:
        return Endpoint(socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    raise ValueError(f"unexpected sockaddr (family {family}, {len(raw)} bytes)")


def original_destination(sock: socket.socket) -> Endpoint:
    """Raises OSError (ENOENT) when the connection was not redirected by NAT."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_SIZE)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_SIZE)
    return decode_sockaddr(raw)
