"""agent.fallback.original_dst: decoding SO_ORIGINAL_DST, and what a non-NATed socket gives."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from agent.fallback.original_dst import decode_sockaddr, original_destination
from agent.flows.resolve import normalize_ip
from agent.records.record import Endpoint


def sockaddr_in(ip: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_pton(socket.AF_INET, ip)
        + bytes(8)
    )


def sockaddr_in6(ip: str, port: int, flowinfo: int = 0, scope_id: int = 0) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!H", port)
        + struct.pack("!I", flowinfo)
        + socket.inet_pton(socket.AF_INET6, ip)
        + struct.pack("=I", scope_id)
    )


def test_sockaddr_sizes() -> None:
    assert len(sockaddr_in("1.2.3.4", 1)) == 16
    assert len(sockaddr_in6("::1", 1)) == 28


@pytest.mark.parametrize(
    ("ip", "port"),
    [("198.18.0.2", 443), ("127.0.0.1", 1), ("255.255.255.255", 65535), ("0.0.0.0", 8443)],
)
def test_decode_sockaddr_in(ip: str, port: int) -> None:
    assert decode_sockaddr(sockaddr_in(ip, port)) == Endpoint(ip, port)


@pytest.mark.parametrize(
    ("ip", "port"),
    [("2001:2::2", 443), ("::1", 8443), ("fe80::1", 65535), ("::ffff:198.18.0.2", 443)],
)
def test_decode_sockaddr_in6(ip: str, port: int) -> None:
    raw = sockaddr_in6(ip, port, flowinfo=0x12345, scope_id=3)
    assert decode_sockaddr(raw) == Endpoint(ip, port)


def test_port_is_big_endian() -> None:
    assert decode_sockaddr(sockaddr_in("10.0.0.1", 0x01BB)).port == 443
    assert decode_sockaddr(sockaddr_in("10.0.0.1", 0xBB01)).port == 0xBB01


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x02",
        b"\x02\x00\x01",
        sockaddr_in("10.0.0.1", 443)[:7],  # family and port, half an address
        sockaddr_in6("::1", 443)[:23],
    ],
)
def test_too_short(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_sockaddr(raw)


def test_unknown_family() -> None:
    raw = struct.pack("=H", socket.AF_UNIX) + bytes(14)
    with pytest.raises(ValueError, match=f"family {int(socket.AF_UNIX)}"):
        decode_sockaddr(raw)


# --- a connection that iptables did not redirect ---------------------------------------------


@pytest.fixture
def accepted_pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    family, host = request.param
    try:
        listener = socket.create_server((host, 0), family=family)
    except OSError as exc:  # no IPv6 here
        pytest.skip(f"cannot listen on {host}: {exc}")
    with listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        with client, server:
            yield client, server


def proxy_would_refuse(sock: socket.socket) -> bool:
    """The TlsProxy._handle check: no original destination, or it is our own address."""
    try:
        dst = original_destination(sock)
    except OSError:
        dst = None
    here = (normalize_ip(sock.getsockname()[0]), sock.getsockname()[1])
    return dst is None or (normalize_ip(dst.ip), dst.port) == here


@pytest.mark.parametrize(
    "accepted_pair",
    [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
    indirect=True,
    ids=["ipv4", "ipv6"],
)
def test_plain_connection_has_no_usable_original_destination(
    accepted_pair: tuple[socket.socket, socket.socket],
) -> None:
    _client, server = accepted_pair
    try:
        dst = original_destination(server)
    except OSError:
        pass  # ENOENT (conntrack has no NAT for it) or ENOPROTOOPT (no conntrack at all)
    else:
        # Some kernels report a tracked but un-NATed connection's own destination.
        here = server.getsockname()
        assert (normalize_ip(dst.ip), dst.port) == (normalize_ip(here[0]), here[1])
    assert proxy_would_refuse(server)
