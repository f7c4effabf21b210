"""Socket-level helpers the proxy needs and asyncio does not offer.

Peeking (MSG_PEEK) is how the proxy reads a ClientHello without consuming it: the bytes
stay in the kernel, so the same socket can then be handed to a TLS handshake, or
relayed untouched when the traffic turns out not to be TLS we can terminate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from agent.fallback.clienthello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    MalformedClientHello,
    NeedMore,
    NotTls,
    parse_client_hello,
)

SO_MARK = getattr(socket, "SO_MARK", 36)
# TLS alert record: level fatal (2), handshake_failure (40).  Sent to a client whose
# upstream handshake failed, so it sees an error at once instead of waiting on a timeout.
HANDSHAKE_FAILURE_ALERT = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
LINGER_RESET = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN
_TCP_CLOSE_WAIT = 8  # tcpi_state, include/net/tcp_states.h
_PEEK_LIMIT = MAX_CLIENT_HELLO + 64 * 5  # the largest hello we parse plus its record headers


@dataclass(frozen=True)
class Silent:
    """No byte arrived in time: a server-speaks-first protocol (SMTP, FTP) or an idle client."""


@dataclass(frozen=True)
class Closed:
    """The client closed before sending anything."""


@dataclass(frozen=True)
class Malformed:
    reason: str


Opening = ClientHello | NotTls | Malformed | Silent | Closed


async def _readable(sock: socket.socket, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(sock.fileno())


async def peek_opening(sock: socket.socket, first_byte_timeout: float, timeout: float) -> Opening:
    """Classify what the client sent first, without consuming any of it."""
    start = time.monotonic()
    needed = 1
    backoff = 0.001
    while True:
        try:
            data = sock.recv(min(max(needed, 4096), _PEEK_LIMIT), socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        except ConnectionError:
            return Closed()
        if data == b"":
            return Closed()
        if data is not None and len(data) >= needed:
            try:
                result = parse_client_hello(data)
            except MalformedClientHello as exc:
                return Malformed(str(exc))
            if not isinstance(result, NeedMore):
                return result
            needed = result.at_least
            continue
        elapsed = time.monotonic() - start
        if data is None:
            limit = first_byte_timeout if needed == 1 else timeout
            if elapsed >= limit or not await _readable(sock, limit - elapsed):
                return (
                    Silent() if needed == 1 else Malformed("ClientHello did not complete in time")
                )
        else:
            # Some bytes are there but not enough; the socket stays readable, so waiting
            # for readability would spin.  Poll with a short, growing sleep instead.
            if elapsed >= timeout:
                return Malformed("ClientHello did not complete in time")
            if _peer_closed(sock):
                return Malformed(f"client closed after {len(data)} bytes of a ClientHello")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.05)


def _peer_closed(sock: socket.socket) -> bool:
    """True once the client has sent FIN (CLOSE_WAIT), which a peek cannot show while
    unread bytes are queued."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return False
    return state == _TCP_CLOSE_WAIT


def discard(sock: socket.socket, count: int) -> None:
    """Read away up to `count` already-received bytes (the peeked hello)."""
    with contextlib.suppress(OSError):
        while count > 0:
            chunk = sock.recv(min(count, 65536))
            if not chunk:
                return
            count -= len(chunk)


def arm_reset(sock: socket.socket) -> None:
    """Make the coming close send RST instead of FIN (SO_LINGER with a zero timeout).
    Also takes the socket wrapper a transport hands out (`get_extra_info("socket")`)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)


def reset(sock: socket.socket) -> None:
    """Close with RST: tells the client at once that the destination is unreachable."""
    arm_reset(sock)
    sock.close()


def send_alert(sock: socket.socket, hello_bytes: int) -> None:
    """Answer a ClientHello with a fatal handshake_failure alert and close.

    The hello is read away first: closing with unread data makes the kernel send RST,
    which can overtake the alert.
    """
    discard(sock, hello_bytes)
    with contextlib.suppress(OSError):
        sock.send(HANDSHAKE_FAILURE_ALERT)
        sock.shutdown(socket.SHUT_WR)
    sock.close()


def marked_socket(family: int, mark: int | None) -> socket.socket:
    """A non-blocking TCP socket whose packets carry `mark`, which the rules let pass."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def accepted_stream(
    sock: socket.socket, context: ssl.SSLContext | None, handshake_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an accepted socket, server-side TLS with `context` when given."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    protocol = asyncio.StreamReaderProtocol(reader)
    kwargs = {"ssl": context, "ssl_handshake_timeout": handshake_timeout} if context else {}
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, **kwargs)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def ipv6_available() -> bool:
    """Whether ::1 can be bound in the calling thread's network namespace."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
