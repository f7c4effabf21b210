"""A small Kubernetes API client: LIST and WATCH over http.client (and `create`, a POST,
for the collector's TokenReview), nothing else.

The agent needs two read-only calls (list and watch pods and namespaces), so the
`kubernetes` package (and its dozens of dependencies in a privileged image) is not
worth it.  What this file does own is the part such clients get right and naive ones
do not: in-cluster credentials whose token rotates, kubeconfig files with inline
(base64) certificates, separate connect and read timeouts, a watch stream decoded
from chunks that split events anywhere, and a way for another thread to abort a
blocked watch (`close`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import yaml

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
USER_AGENT = "tlscap-agent"
# A watch event is one object; a Pod with huge annotations is still far below this.
# The limit only stops a broken peer from growing our buffer without end.
MAX_EVENT_BYTES = 16 * 1024 * 1024
_MAX_ERROR_BODY = 4096


class ConfigError(ValueError):
    """No usable API server configuration (bad kubeconfig, missing in-cluster files)."""


class ApiError(Exception):
    """The API server answered with a non-2xx status."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        super().__init__(f"HTTP {status} {reason}: {_status_message(body)}")


class ApiConnectionError(ConnectionError):
    """The API server could not be reached or broke the conversation (TLS, timeout, garbage)."""


def _status_message(body: str) -> str:
    # Errors come as a Status object; its message is what a person wants to read.
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:200]
    if isinstance(obj, dict) and obj.get("message"):
        return str(obj["message"])
    return body[:200]


# ---------------------------------------------------------------------------------------
# Configuration


@dataclass
class ApiConfig:
    server: str  # https://host:port (http:// for `kubectl proxy`), optionally with a path
    token: str | None = field(default=None, repr=False)
    # Read on every connection when set: bound service-account tokens rotate hourly.
    token_file: str | None = None
    ca_file: str | None = None
    ca_data: bytes | None = None  # PEM
    client_cert_file: str | None = None
    client_key_file: str | None = None
    client_cert_data: bytes | None = field(default=None, repr=False)  # PEM
    client_key_data: bytes | None = field(default=None, repr=False)  # PEM
    insecure_skip_verify: bool = False
    tls_server_name: str | None = None

    def current_token(self) -> str | None:
        """The bearer token to send now (the token file's content when there is one)."""
        if self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                # Mid-rotation the kubelet swaps a symlink; keep the last good token.
                log.warning(
                    "cannot read token file %s (%s); using the last token", self.token_file, exc
                )
            else:
                if token:
                    self.token = token
        return self.token

    @classmethod
    def in_cluster(
        cls,
        env: Mapping[str, str] = os.environ,
        sa_dir: str = SERVICE_ACCOUNT_DIR,
    ) -> ApiConfig:
        """The pod's service account, as client-go's rest.InClusterConfig finds it."""
        host = env.get("KUBERNETES_SERVICE_HOST", "")
        port = env.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise ConfigError(
                "not in a cluster: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are unset"
            )
        if ":" in host:  # an IPv6 service address
            host = f"[{host}]"
        token_file = os.path.join(sa_dir, "token")
        ca_file = os.path.join(sa_dir, "ca.crt")
        for path, what in ((token_file, "service account token"), (ca_file, "cluster CA")):
            if not os.access(path, os.R_OK):
                raise ConfigError(f"in-cluster {what} {path} is missing or unreadable")
        config = cls(server=f"https://{host}:{port}", token_file=token_file, ca_file=ca_file)
        config.current_token()
        return config

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str], context: str | None = None) -> ApiConfig:
        """The cluster and user of `context` (default: current-context) in a kubeconfig."""
        path = Path(path).expanduser()
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read kubeconfig {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"kubeconfig {path} is not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"kubeconfig {path} is not a kubeconfig (no mapping at the top)")
        context = context or doc.get("current-context")
        if not context:
            raise ConfigError(f"kubeconfig {path} has no current-context; name a context")
        ctx = _named(doc, "contexts", "context", context, path)
        cluster = _named(doc, "clusters", "cluster", str(ctx.get("cluster") or ""), path)
        user = (
            _named(doc, "users", "user", str(ctx.get("user") or ""), path)
            if ctx.get("user")
            else {}
        )
        server = cluster.get("server")
        if not server:
            raise ConfigError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")

        # Relative file names in a kubeconfig are relative to the file (as kubectl does).
        def file_field(section: Mapping[str, Any], key: str) -> str | None:
            value = section.get(key)
            return str(path.parent / str(value)) if value else None

        def data_field(section: Mapping[str, Any], key: str) -> bytes | None:
            value = section.get(key)
            if not value:
                return None
            try:
                # Hand-edited files sometimes wrap the base64 over lines.
                return base64.b64decode("".join(str(value).split()), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"kubeconfig {path}: {key} is not valid base64") from None

        config = cls(
            server=str(server),
            token=str(user["token"]) if user.get("token") else None,
            token_file=file_field(user, "tokenFile"),
            ca_file=file_field(cluster, "certificate-authority"),
            ca_data=data_field(cluster, "certificate-authority-data"),
            client_cert_file=file_field(user, "client-certificate"),
            client_key_file=file_field(user, "client-key"),
            client_cert_data=data_field(user, "client-certificate-data"),
            client_key_data=data_field(user, "client-key-data"),
            insecure_skip_verify=bool(cluster.get("insecure-skip-tls-verify")),
            tls_server_name=cluster.get("tls-server-name") or None,
        )
        has_cert = config.client_cert_file or config.client_cert_data
        has_key = config.client_key_file or config.client_key_data
        if bool(has_cert) != bool(has_key):
            raise ConfigError(f"kubeconfig {path}: user has a client certificate or key, not both")
        if not (config.token or config.token_file or has_cert) and (
            user.get("exec") or user.get("auth-provider")
        ):
            raise ConfigError(
                f"kubeconfig {path}: user {ctx.get('user')!r} authenticates with an exec or "
                "auth-provider plugin, which tlscap does not run; use a token or client "
                "certificate"
            )
        return config

    @classmethod
    def discover(
        cls,
        kubeconfig: str | None,
        env: Mapping[str, str] = os.environ,
        sa_dir: str = SERVICE_ACCOUNT_DIR,
    ) -> ApiConfig | None:
        """An explicit kubeconfig, else in-cluster, else $KUBECONFIG or ~/.kube/config.

        None when there is nothing to find (not in a cluster, no kubeconfig): the agent
        then runs without pod metadata.  A configuration that exists but is broken
        raises ConfigError rather than being skipped silently.
        """
        if kubeconfig:
            return cls.from_kubeconfig(kubeconfig)
        if env.get("KUBERNETES_SERVICE_HOST") and env.get("KUBERNETES_SERVICE_PORT"):
            return cls.in_cluster(env, sa_dir)
        # $KUBECONFIG may list several files that kubectl merges; we take the first that
        # exists rather than re-implementing the merge.
        candidates = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
        home = env.get("HOME") or os.path.expanduser("~")
        candidates.append(os.path.join(home, ".kube", "config"))
        for candidate in candidates:
            if os.path.isfile(candidate):
                return cls.from_kubeconfig(candidate)
        return None

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context: cluster CA (or system trust), client certificate."""
        ctx = ssl.create_default_context(
            cafile=self.ca_file,
            cadata=self.ca_data.decode("ascii", "replace") if self.ca_data else None,
        )
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        cert_file, key_file = self.client_cert_file, self.client_key_file
        if self.client_cert_data or self.client_key_data:
            # ssl loads a client key from files only: write the inline data to private
            # files in a private directory just long enough to load them.
            with tempfile.TemporaryDirectory(prefix="tlscap-kube-") as tmp:
                if self.client_cert_data:
                    cert_file = _write_private(tmp, "client.crt", self.client_cert_data)
                if self.client_key_data:
                    key_file = _write_private(tmp, "client.key", self.client_key_data)
                ctx.load_cert_chain(str(cert_file), key_file)
        elif cert_file:
            ctx.load_cert_chain(cert_file, key_file)
        return ctx


def _named(doc: Mapping[str, Any], section: str, inner: str, name: str, path: Path) -> dict:
    for entry in doc.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(inner)
            return value if isinstance(value, dict) else {}
    raise ConfigError(f"kubeconfig {path}: no {inner} named {name!r}")


def _write_private(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------------------------------
# The watch stream (pure)


class WatchDecoder:
    """Newline-delimited JSON watch events from byte chunks split anywhere."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        events = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                events.append(_decode_event(line))
        if len(self._buffer) > self._max:
            raise ApiConnectionError(f"watch event longer than {self._max} bytes")
        return events

    def finish(self) -> list[dict[str, Any]]:
        """At the end of the stream: the last event if it lacked only its newline."""
        tail, self._buffer = bytes(self._buffer).strip(), bytearray()
        if not tail:
            return []
        try:
            return [_decode_event(tail)]
        except ApiConnectionError:
            # Cut off mid-event: it was not applied, and re-watching from the last
            # resourceVersion sends it again.
            log.debug("watch stream ended inside an event (%d bytes dropped)", len(tail))
            return []


def _decode_event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        raise ApiConnectionError(f"malformed watch event: {line[:80]!r}") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ApiConnectionError(f"malformed watch event: {line[:80]!r}")
    return event


# ---------------------------------------------------------------------------------------
# The client


class WatchStream(Iterator[dict[str, Any]]):
    """An open watch: an iterator of events that ends when the server ends the stream."""

    def __init__(self, api: KubeApi, conn: http.client.HTTPConnection, response: Any) -> None:
        self._api = api
        self._conn = conn
        self._response = response
        self._events = self._read()

    def __next__(self) -> dict[str, Any]:
        return next(self._events)

    def _read(self) -> Iterator[dict[str, Any]]:
        decoder = WatchDecoder()
        try:
            while True:
                try:
                    data = self._response.read1(65536)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    # ValueError: the socket was closed under us by KubeApi.close().
                    raise ApiConnectionError(f"watch stream broken: {exc!r}") from exc
                if not data:
                    break
                yield from decoder.feed(data)
            yield from decoder.finish()
        finally:
            self.close()

    def close(self) -> None:
        self._api._release(self._conn, self._response)

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KubeApi:
    """GET access to one API server (and `create`, a POST, for the collector's
    TokenReview); thread-safe, one connection per request.

    A connection per request keeps this simple and costs little: lists happen once
    per (re)start and watches last minutes.  `close` shuts down every open connection,
    so a thread blocked reading a watch returns at once.
    """

    def __init__(
        self, config: ApiConfig, connect_timeout: float = 5.0, read_timeout: float = 30.0
    ) -> None:
        url = urlsplit(config.server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"API server must be an http(s) URL, got {config.server!r}")
        self.config = config
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        # Each open request's socket, kept apart from the connection: http.client drops
        # conn.sock once a "Connection: close" response owns it, and close() needs it.
        self._open: dict[http.client.HTTPConnection, socket.socket | None] = {}
        self._closed = False

    def list(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET a collection (or any object) and return the decoded JSON."""
        return self._json_call("GET", path, params)

    def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST `obj` as JSON to a collection (e.g. a TokenReview) and return the reply."""
        return self._json_call("POST", path, None, json.dumps(obj).encode())

    def _json_call(
        self, method: str, path: str, params: Mapping[str, str] | None, body: bytes | None = None
    ) -> dict[str, Any]:
        """One request whose reply must be a JSON object."""
        conn, response = self._request(path, params, self.read_timeout, method, body)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiConnectionError(f"{method} {path}: {exc!r}") from exc
        finally:
            self._release(conn, response)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ApiConnectionError(f"{method} {path}: response is not JSON") from None
        if not isinstance(reply, dict):
            raise ApiConnectionError(f"{method} {path}: response is not a JSON object")
        return reply

    def watch(
        self, path: str, params: Mapping[str, str] | None = None, timeout_s: int = 300
    ) -> WatchStream:
        """Start a watch; raises ApiError at once if the server refuses it.

        The server ends the stream after `timeout_s`; the read timeout is set past that,
        so a silent stream (no events, no bookmarks) is not mistaken for a dead one.
        """
        query = {**(params or {}), "watch": "true", "timeoutSeconds": str(timeout_s)}
        conn, response = self._request(path, query, timeout_s + self.read_timeout)
        return WatchStream(self, conn, response)

    def close(self) -> None:
        """Abort every request in flight and refuse new ones."""
        with self._lock:
            self._closed = True
            socks = list(self._open.values())
        for sock in socks:
            _shutdown(sock)

    # -- internals

    def _connection(self) -> http.client.HTTPConnection:
        if not self._https:
            return http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        if self._ssl is None:
            try:
                self._ssl = self.config.ssl_context()
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"cannot set up TLS for {self.config.server}: {exc}") from exc
        conn = http.client.HTTPSConnection(
            self._host, self._port, timeout=self.connect_timeout, context=self._ssl
        )
        if self.config.tls_server_name:
            # http.client verifies against the host it dials; tls-server-name overrides
            # the name checked (and sent as SNI), as kubectl does.
            ctx, name = self._ssl, self.config.tls_server_name

            def connect() -> None:
                http.client.HTTPConnection.connect(conn)
                conn.sock = ctx.wrap_socket(conn.sock, server_hostname=name)

            conn.connect = connect  # type: ignore[method-assign]
        return conn

    def _request(
        self,
        path: str,
        params: Mapping[str, str] | None,
        read_timeout: float,
        method: str = "GET",
        body: bytes | None = None,
    ) -> tuple[http.client.HTTPConnection, Any]:
        url = self._prefix + path
        if params:
            url += "?" + urlencode(params)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        token = self.config.current_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = self._connection()
        with self._lock:
            if self._closed:
                raise ApiConnectionError("API client is closed")
            self._open[conn] = None
        try:
            conn.connect()
            conn.sock.settimeout(read_timeout)
            with self._lock:
                closed = self._closed
                self._open[conn] = conn.sock
            if closed:  # close() ran while we connected and could not see this socket
                _shutdown(conn.sock)
            conn.request(method, url, body=body, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._release(conn)
            raise ApiConnectionError(f"{method} {url} on {self.config.server}: {exc}") from exc
        if not 200 <= response.status < 300:
            try:
                body = response.read(_MAX_ERROR_BODY).decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                body = ""
            finally:
                self._release(conn, response)
            raise ApiError(response.status, response.reason, body)
        return conn, response

    def _release(self, conn: http.client.HTTPConnection, response: Any = None) -> None:
        with self._lock:
            sock = self._open.pop(conn, None)
        if response is not None:
            response.close()
        conn.close()
        if sock is not None:
            sock.close()


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    # socket.shutdown, not SSLSocket's: that one drops the TLS object under the reading
    # thread; the plain shutdown just makes its recv return.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
