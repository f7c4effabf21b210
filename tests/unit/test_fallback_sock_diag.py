"""agent.fallback.sock_diag: exact TCP socket lookups over NETLINK_SOCK_DIAG."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest

from agent.fallback.sock_diag import (
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    SockDiag,
    SocketId,
    build_request,
    parse_reply,
)


def _header(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body


def test_request_layout() -> None:
    msg = build_request(socket.AF_INET, ("198.18.0.1", 40000), ("198.18.0.2", 443), seq=7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq) == (len(msg), SOCK_DIAG_BY_FAMILY, 1, 7)
    family, proto = msg[16], msg[17]
    assert (family, proto) == (socket.AF_INET, socket.IPPROTO_TCP)
    sport, dport = struct.unpack_from(">HH", msg, 24)
    assert (sport, dport) == (40000, 443)
    assert msg[28:32] == socket.inet_aton("198.18.0.1")
    assert msg[44:48] == socket.inet_aton("198.18.0.2")
    # An IPv4 tuple asked of the AF_INET6 table is v4-mapped.
    mapped = build_request(socket.AF_INET6, ("198.18.0.1", 1), ("198.18.0.2", 2))
    assert mapped[28:44] == socket.inet_pton(socket.AF_INET6, "::ffff:198.18.0.1")


def test_reply_parsing() -> None:
    body = struct.pack("=BBBB", socket.AF_INET, 1, 0, 0) + bytes(48)
    body += struct.pack("=IIIII", 0, 0, 0, 1000, 424242)
    assert parse_reply(_header(SOCK_DIAG_BY_FAMILY, body)) == SocketId(424242, 1000, 1)
    assert parse_reply(_header(NLMSG_ERROR, struct.pack("=i", -errno.ENOENT))) is None
    with pytest.raises(OSError, match="sock_diag"):
        parse_reply(_header(NLMSG_ERROR, struct.pack("=i", -errno.EPERM)))
    with pytest.raises(OSError, match="short"):
        parse_reply(b"\x00" * 4)
    with pytest.raises(OSError, match="unexpected"):
        parse_reply(_header(SOCK_DIAG_BY_FAMILY, b"\x00" * 8))


@pytest.mark.parametrize("server_family", [socket.AF_INET, socket.AF_INET6])
def test_real_lookup_finds_the_socket_and_its_listener(server_family: int) -> None:
    host = "::" if server_family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(server_family) as listener:
        if server_family == socket.AF_INET6:  # dual-stack: IPv4 peers appear v4-mapped
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            with accepted:
                diag = SockDiag()
                try:
                    here = client.getsockname()
                    found = diag.lookup(here, ("127.0.0.1", port))
                    assert found is not None
                    assert found.inode == os.fstat(client.fileno()).st_ino
                    served = diag.lookup(("127.0.0.1", port), here)
                    assert served is not None
                    assert served.inode == os.fstat(accepted.fileno()).st_ino
                    # A peer with no connection: the kernel answers with the listener.
                    listening = diag.lookup(("127.0.0.1", port), ("127.0.0.1", 1))
                    assert listening is not None
                    assert listening.inode == os.fstat(listener.fileno()).st_ino
                    assert listening.state == 10  # TCP_LISTEN
                    assert diag.lookup(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
                finally:
                    diag.close()
