"""The agent's HTTP side door: /healthz, /readyz and Prometheus /metrics.

A thin shell: what to answer comes from three callables the session hands in
(`alive`, `ready`, `snapshot`) and from `SummaryCollector`; this module only binds,
routes and writes responses. It serves from a daemon thread, one short-lived
thread per request, so a slow scraper never holds up capture, and every metric is
read from the session's counters at scrape time (nothing on the capture path).

Each server has its own CollectorRegistry, never prometheus_client's global one:
several agents (and tests) may run servers in one process, and the global
registry's process/platform collectors describe the Python runtime, not capture.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from agent.health.metrics import Snapshot, SummaryCollector

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
LISTEN_EXAMPLES = "0.0.0.0:9090, :9090, [::1]:9090 or localhost:9090"

Response = tuple[int, str, bytes]  # status, content type, body


class ListenError(OSError):
    """The health server could not bind its address (the message names it)."""


def parse_listen(value: str) -> tuple[str, int]:
    """Split "HOST:PORT" for the CLI; host "" means all interfaces.

    Accepts "0.0.0.0:9090", ":9090" (or "*:9090"), "[::1]:9090", "localhost:9090";
    port 0 asks for an ephemeral port. Raises ValueError with a message that can be
    shown to the user as is.
    """
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"listen address {value!r}: expected [IPV6]:PORT, e.g. [::1]:9090")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"listen address {value!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"listen address {value!r}: expected HOST:PORT ({LISTEN_EXAMPLES})")
        if ":" in host:
            raise ValueError(
                f"listen address {value!r}: put an IPv6 address in brackets, e.g. [::1]:9090"
            )
        if host == "*":
            host = ""
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"listen address {value!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


class HealthServer:
    """Serves /healthz (alive), /readyz (ready) and /metrics (snapshot) on `listen`.

    The callables are called from the server's request threads, once per request.
    """

    def __init__(
        self,
        listen: str,
        snapshot: Snapshot,
        ready: Callable[[], bool],
        alive: Callable[[], bool],
    ) -> None:
        self.listen = listen
        self._host, self._port = parse_listen(listen)
        self._ready = ready
        self._alive = alive
        self.registry = CollectorRegistry()
        self.registry.register(SummaryCollector(snapshot))
        self._routes: dict[str, Callable[[str], Response]] = {
            "/healthz": lambda _accept: self._healthz(),
            "/readyz": lambda _accept: self._readyz(),
            "/metrics": self._metrics,
        }
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Bind (raising ListenError naming the address) and serve from a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("health server already started")
        family, sockaddr, dualstack = _resolve(self.listen, self._host, self._port)
        try:
            httpd = _HttpServer(family, sockaddr, dualstack, self._routes)
        except OSError as exc:
            err = ListenError(
                f"cannot listen on {self.listen} for /healthz and /metrics: {exc.strerror or exc}"
            )
            err.errno = exc.errno
            raise err from exc
        self._httpd = httpd
        self._thread = threading.Thread(target=self._serve, name="tlscap-health", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("health: serving /healthz, /readyz, /metrics on %s", _url_host(host, port))

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when asked for port 0."""
        if self._httpd is None:
            raise RuntimeError("health server not started")
        host, port = self._httpd.socket.getsockname()[:2]
        return host, port

    def stop(self) -> None:
        """Stop serving and close the listening socket; returns promptly. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or self._stopping.is_set():
            return
        self._stopping.set()
        # On Linux, shutting down a listening socket wakes a select() on it at once
        # (accept then fails with EINVAL), so the serve loop sees _stopping without
        # a poll interval to wait out.
        with contextlib.suppress(OSError):  # already gone: nothing left to wake
            httpd.socket.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5.0)
        httpd.server_close()

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._httpd is not None
        while not self._stopping.is_set():
            try:
                self._httpd.handle_request()
            except Exception:
                log.exception("health: serve loop error")

    # -- endpoints -------------------------------------------------------------

    def _healthz(self) -> Response:
        ok, reason = _check(self._alive, "liveness", "not alive")
        return (200, TEXT, b"ok\n") if ok else (503, TEXT, f"{reason}\n".encode())

    def _readyz(self) -> Response:
        ok, reason = _check(self._ready, "readiness", "not ready")
        return (200, TEXT, b"ready\n") if ok else (503, TEXT, f"{reason}\n".encode())

    def _metrics(self, accept: str) -> Response:
        # OpenMetrics when the scraper asks for it (Prometheus does), else 0.0.4 text.
        encoder, content_type = choose_encoder(accept)
        return 200, content_type, encoder(self.registry)


def _check(probe: Callable[[], bool], what: str, failed: str) -> tuple[bool, str]:
    try:
        return (True, "") if probe() else (False, failed)
    except Exception as exc:
        reason = f"{failed}: {what} check raised {type(exc).__name__}: {exc}"
        reason = " ".join(reason.split())  # one line, whatever the exception says
        log.warning("health: %s", reason)
        return False, reason


def _resolve(listen: str, host: str, port: int) -> tuple[socket.AddressFamily, tuple, bool]:
    """(family, sockaddr, dual-stack) to bind; host "" is every interface, v6 and v4."""
    if not host:
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, ("::", port), True
        return socket.AF_INET, ("0.0.0.0", port), False
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {listen}: cannot resolve {host!r}: {exc}") from exc
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr, False


def _url_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not hold up stop() or the agent's exit

    def __init__(
        self,
        family: socket.AddressFamily,
        sockaddr: tuple,
        dualstack: bool,
        routes: dict[str, Callable[[str], Response]],
    ) -> None:
        self.address_family = family
        self.dualstack = dualstack
        self.routes = routes
        super().__init__(sockaddr, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.dualstack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: it calls socket.getfqdn(), a reverse DNS
        # lookup that can stall start-up on a node with slow or no DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: object, client_address: object) -> None:
        # Default prints a traceback to stderr; a client hanging up mid-response
        # is routine for probes and not worth more than a debug line.
        log.debug("health: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    server_version = "tlscap"
    timeout = 10.0  # a client that connects and says nothing gives its thread back

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _respond(self, body: bool) -> None:
        path = urlsplit(self.path).path
        route = self.server.routes.get(path)
        if route is None:
            status, content_type, payload = 404, TEXT, b"not found\n"
        else:
            try:
                status, content_type, payload = route(self.headers.get("Accept", ""))
            except Exception as exc:
                log.warning("health: %s failed: %s: %s", path, type(exc).__name__, exc)
                status, content_type, payload = 500, TEXT, b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        # Kubelet probes and scrapes arrive every few seconds: debug only.
        log.debug("health: %s %s", self.address_string(), format % args)
