"""The TLS-terminating proxy that iptables REDIRECT sends connections to.

Per connection: recover the original destination, peek at what the client sends first,
then choose one of four ways to carry it (counted in ProxyStats):

- intercept: a ClientHello for a destination we may terminate.  Connect to the real
  destination first, offering the client's ALPN list, so the protocol the server picks
  (h2 or http/1.1) is the one we then offer the client, with a leaf for its SNI.
- plaintext: not TLS (or a server that speaks first).  Relayed and recorded as is.
- passthrough: a destination whose client refused our certificate before (pinning), a
  ClientHello we cannot parse, or an inbound port without a certificate.  Relayed as
  opaque bytes; open/close records only.
- refused: a connection that was not redirected to us (someone dialled the proxy port).

The upstream is dialled first so that its failures map onto what the client would have
seen without us: a refused TCP connect becomes a reset, a failed upstream handshake a
TLS alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass

from agent.fallback.clienthello import ClientHello, NotTls
from agent.fallback.config import ProxyConfig
from agent.fallback.contexts import LeafCache, ServiceContexts, UpstreamContexts
from agent.fallback.flow_records import FlowIdentity, ProxiedFlow, Side
from agent.fallback.original_dst import original_destination
from agent.fallback.owners import ProcessRef, SocketOwners
from agent.fallback.passthrough import PassthroughMemory
from agent.fallback.sockets import (
    Closed,
    Silent,
    accepted_stream,
    arm_reset,
    marked_socket,
    peek_opening,
    reset,
    send_alert,
)
from agent.flows.resolve import normalize_ip
from agent.records.record import Endpoint, PodRef, Record

log = logging.getLogger(__name__)

RELAY_CHUNK = 256 * 1024
# Alerts a client sends when it does not accept the certificate we presented.
_CERT_REJECTIONS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")


@dataclass
class ProxyStats:
    accepted: int = 0
    intercepted: int = 0
    plaintext: int = 0
    passthrough: int = 0
    passthrough_destinations: int = 0  # destinations switched to passthrough this run
    pinned_clients: int = 0  # a client refused our certificate
    client_handshake_failures: int = 0  # other client-side TLS failures (timeouts, resets)
    malformed_hellos: int = 0
    upstream_connect_failures: int = 0
    upstream_tls_failures: int = 0
    refused_not_redirected: int = 0
    empty_connections: int = 0  # closed before sending a byte
    relay_errors: int = 0  # a side reset the connection mid-stream
    truncated_bytes: int = 0  # payload beyond --max-capture, not carried in records
    owner_unknown: int = 0
    internal_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f"proxy_{k}": v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Timeouts:
    first_byte: float = 3.0
    hello: float = 10.0
    connect: float = 10.0
    handshake: float = 10.0


class TlsProxy:
    def __init__(
        self,
        config: ProxyConfig,
        leaves: LeafCache,
        services: ServiceContexts,
        upstreams: UpstreamContexts,
        emit: Callable[[Record], None],
        *,
        max_capture: int = 1 << 20,
        owners: SocketOwners | None = None,
        timeouts: Timeouts = Timeouts(),
        socket_factory: Callable[[int, int | None], socket.socket] = marked_socket,
        pod: PodRef | None = None,
    ) -> None:
        self.config = config
        self.leaves = leaves
        self.services = services
        self.upstreams = upstreams
        self.emit = emit
        self.max_capture = max_capture
        self.owners = owners
        self.timeouts = timeouts
        # Upstream sockets: a pod's proxy makes them in the pod's network namespace.
        self.socket_factory = socket_factory
        self.pod = pod  # the pod whose namespace this proxy serves (None: the node's)
        self.passthrough = PassthroughMemory()
        self.stats = ProxyStats()
        self._tasks: set[asyncio.Task] = set()
        self._own_addresses: set[tuple[str, int]] = set()

    # -- accepting ------------------------------------------------------------

    async def serve(self, listeners: list[tuple[socket.socket, Side]], stop: asyncio.Event) -> None:
        """Accept on every listener until `stop` is set, then end open connections."""
        for sock, _ in listeners:
            host, port = sock.getsockname()[:2]
            self._own_addresses.add((normalize_ip(host), port))
        accept_loops = [asyncio.create_task(self._accept(s, side)) for s, side in listeners]
        try:
            await stop.wait()
        finally:
            for task in accept_loops:
                task.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*accept_loops, *self._tasks, return_exceptions=True)

    async def _accept(self, listener: socket.socket, side: Side) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.error("accept on the %s proxy port failed: %s", side, exc)
                await asyncio.sleep(0.1)
                continue
            self.stats.accepted += 1
            task = asyncio.create_task(self._handle_safely(conn, peer, side))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle_safely(self, conn: socket.socket, peer: tuple, side: Side) -> None:
        try:
            await self._handle(conn, peer, side)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception:  # one connection's bug must not take the proxy down
            self.stats.internal_errors += 1
            log.exception("proxied connection from %s failed", peer[:2])
            conn.close()

    # -- one connection -----------------------------------------------------

    async def _handle(self, conn: socket.socket, peer: tuple, side: Side) -> None:
        conn.setblocking(False)
        # Stock asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP,
        # which accepted ones are not; without it, small TLS records wait out delayed
        # ACKs (40 ms per request measured).  uvloop sets it anyway.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            dst = original_destination(conn)
        except OSError:
            dst = None
        here = (normalize_ip(conn.getsockname()[0]), conn.getsockname()[1])
        if dst is None or (normalize_ip(dst.ip), dst.port) in {here, *self._own_addresses}:
            self.stats.refused_not_redirected += 1
            log.debug("refusing %s: not redirected to us by iptables", peer[:2])
            reset(conn)
            return
        client = Endpoint(normalize_ip(peer[0]), peer[1])
        server = Endpoint(normalize_ip(dst.ip), dst.port)
        loop = asyncio.get_running_loop()
        owner = loop.run_in_executor(None, self._owner, side, client, server)
        opening = await peek_opening(conn, self.timeouts.first_byte, self.timeouts.hello)
        if isinstance(opening, Closed):
            self.stats.empty_connections += 1
            conn.close()
            return
        identity_parts = (side, client, server)
        if isinstance(opening, ClientHello):
            await self._tls(conn, opening, identity_parts, owner)
        elif isinstance(opening, NotTls | Silent):
            self.stats.plaintext += 1
            await self._relay_plain(conn, identity_parts, owner, record=True)
        else:
            self.stats.malformed_hellos += 1
            self.stats.passthrough += 1
            log.warning(
                "%s -> %s: unparseable ClientHello (%s); relaying it untouched",
                client,
                server,
                opening.reason,
            )
            await self._relay_plain(conn, identity_parts, owner, record=False)

    def _owner(self, side: Side, client: Endpoint, server: Endpoint) -> ProcessRef | None:
        """Runs in a worker thread."""
        if self.owners is None:
            return None
        try:
            if side == "outbound":
                found = self.owners.connection_owner(client, server)
            else:
                found = self.owners.listener_owner(server, client)
        except (OSError, ValueError) as exc:
            log.debug("owner lookup failed: %s", exc)
            found = None
        return found

    async def _flow(
        self, parts: tuple[Side, Endpoint, Endpoint], owner: asyncio.Future
    ) -> ProxiedFlow:
        side, client, server = parts
        process = await owner
        if process is None and self.owners is not None:
            self.stats.owner_unknown += 1  # counted here, on the loop's thread
        identity = FlowIdentity(
            side,
            client,
            server,
            pid=process.pid if process else 0,
            comm=process.comm if process else "",
            pod=self.pod,
        )
        return ProxiedFlow(identity, self.max_capture)

    async def _tls(
        self,
        conn: socket.socket,
        hello: ClientHello,
        parts: tuple[Side, Endpoint, Endpoint],
        owner: asyncio.Future,
    ) -> None:
        side, client, server = parts
        key = (server.ip, server.port, hello.sni)
        no_certificate = side == "inbound" and not self.services.serves(server.port)
        if no_certificate or self.passthrough.reason(key) is not None:
            self.stats.passthrough += 1
            await self._relay_plain(conn, parts, owner, record=False)
            return

        if side == "outbound":
            rule = self.config.upstream_rule_for(server.ip, server.port, hello.sni)
            up_context = self.upstreams.context(rule, hello.alpn)
        else:
            up_context = self.upstreams.insecure(hello.alpn)
        up_sock = await self._connect(server, conn)
        if up_sock is None:
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                sock=up_sock,
                ssl=up_context,
                server_hostname=hello.sni or (server.ip if up_context.check_hostname else ""),
                ssl_handshake_timeout=self.timeouts.handshake,
                limit=1 << 20,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            up_sock.close()
            self.stats.upstream_tls_failures += 1
            log.warning(
                "%s -> %s (%s): upstream TLS handshake failed: %s; the client gets an alert "
                "(for a self-signed or private upstream see --upstream-ca / --upstream-insecure)",
                client,
                server,
                hello.sni or "no SNI",
                exc,
            )
            send_alert(conn, hello.record_bytes)
            return

        ssl_object = up_writer.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object else None
        alpn = (chosen,) if chosen else ()
        try:
            client_context = await self._client_context(side, hello.sni or server.ip, server, alpn)
            reader, writer = await accepted_stream(conn, client_context, self.timeouts.handshake)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            up_writer.close()
            self._client_refused(key, client, server, exc)
            conn.close()
            return
        self.stats.intercepted += 1
        flow = await self._flow(parts, owner)
        await self._relay(flow, reader, writer, up_reader, up_writer)

    async def _client_context(
        self, side: Side, name: str, server: Endpoint, alpn: tuple[str, ...]
    ) -> ssl.SSLContext:
        if side == "inbound":
            return self.services.context(server.port, alpn)
        context = self.leaves.cached_context(name, alpn)
        if context is None:  # minting a key and certificate: keep it off the event loop
            loop = asyncio.get_running_loop()
            context = await loop.run_in_executor(None, self.leaves.context, name, alpn)
        return context

    def _client_refused(
        self, key: tuple[str, int, str | None], client: Endpoint, server: Endpoint, exc: Exception
    ) -> None:
        if isinstance(exc, TimeoutError):
            self.stats.client_handshake_failures += 1
            log.info("%s -> %s: client did not finish the TLS handshake in time", client, server)
            return
        reason = getattr(exc, "reason", None) or type(exc).__name__
        if any(r in str(reason) for r in _CERT_REJECTIONS):
            self.stats.pinned_clients += 1
        else:
            self.stats.client_handshake_failures += 1
        if self.passthrough.remember(key, str(reason)):
            self.stats.passthrough_destinations += 1
            log.warning(
                "%s -> %s (%s): client rejected our certificate (%s), probably pinning or "
                "not trusting the tlscap CA; this destination is passed through untouched "
                "from now on",
                client,
                server,
                key[2] or "no SNI",
                reason,
            )

    async def _connect(self, server: Endpoint, client: socket.socket) -> socket.socket | None:
        """A marked TCP connection to `server`; None (and the client reset, as the
        unreachable server would have) when it cannot be made."""
        family = socket.AF_INET6 if ":" in server.ip else socket.AF_INET
        sock = self.socket_factory(family, self.config.mark)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (server.ip, server.port)),
                self.timeouts.connect,
            )
        except (OSError, TimeoutError) as exc:
            sock.close()
            log.info("upstream %s unreachable: %s", server, exc or "timed out")
            self.stats.upstream_connect_failures += 1
            reset(client)
            return None
        return sock

    async def _relay_plain(
        self,
        conn: socket.socket,
        parts: tuple[Side, Endpoint, Endpoint],
        owner: asyncio.Future,
        *,
        record: bool,
    ) -> None:
        up_sock = await self._connect(parts[2], conn)
        if up_sock is None:
            return
        up_reader, up_writer = await asyncio.open_connection(sock=up_sock, limit=1 << 20)
        reader, writer = await accepted_stream(conn, None, self.timeouts.handshake)
        flow = await self._flow(parts, owner)
        await self._relay(flow, reader, writer, up_reader, up_writer, record=record)

    # -- relaying -----------------------------------------------------------

    async def _relay(
        self,
        flow: ProxiedFlow,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        *,
        record: bool = True,
    ) -> None:
        self.emit(flow.opened())
        try:
            await asyncio.gather(
                self._pump(flow if record else None, True, reader, up_writer, writer),
                self._pump(flow if record else None, False, up_reader, writer, up_writer),
            )
        finally:
            for w in (writer, up_writer):
                w.close()
            self.stats.truncated_bytes += flow.truncated_bytes
            self.emit(flow.closed())

    async def _pump(
        self,
        flow: ProxiedFlow | None,
        from_client: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reader_side: asyncio.StreamWriter,
    ) -> None:
        try:
            while data := await reader.read(RELAY_CHUNK):
                if flow is not None:
                    self.emit(flow.data(from_client, data))
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError) as exc:
            # A reset or a TLS alert on one side (TLS 1.3 servers, for one, reject a missing
            # client certificate only after the handshake): reset both sides, so each peer
            # sees an error as it would without us, not a clean end of stream.
            self.stats.relay_errors += 1
            log.debug("relay ended by an error: %s", exc)
            for side in (writer, reader_side):
                _abort_with_reset(side)
            return
        # Plain TCP half-closes, so a client that shuts down its sending side still gets
        # its answer.  TLS streams cannot half-close: ending one direction ends the
        # connection, as close_notify does for most TLS peers.
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        arm_reset(sock)
    writer.transport.abort()
