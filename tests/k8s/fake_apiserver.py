"""A Kubernetes API server on loopback that speaks just the list/watch protocol.

Enough of the real server's behaviour for a reflector to be tested against it: a
global resourceVersion counter (etcd's revision), per-resource history so a watch
from version N replays what came after N, ``410 Gone`` for versions older than a
compaction point, BOOKMARK and ERROR events, chunked transfer encoding with events
split across chunks, bearer-token authentication and TLS.  Tests script failures
(`close_watches`, `send_bookmark`, `send_gone`, `fail_next`) and read back what the
client asked for (`requests`).

It also answers TokenReview (POST /apis/authentication.k8s.io/v1/tokenreviews) as a
1.30+ API server does for projected ServiceAccount tokens: `add_token` registers a
token (a JWT-shaped string with an `exp`, see `make_token`) for a ServiceAccount,
bound to a pod on a node; the review checks the caller's own bearer token
(`reviewer_token`, 403 if `deny_token_reviews`), the requested audiences against the
token's, and expiry, and puts the node name in user.extra unless the token was added
with `node=None` (as a pre-1.30 cluster, or a token not bound to a pod).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import queue
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from agent.certs.authority import CertificateAuthority

FIXTURES = Path(__file__).parent / "fixtures"

_KINDS = {"pods": "Pod", "namespaces": "Namespace"}
_PATHS = {"/api/v1/pods": "pods", "/api/v1/namespaces": "namespaces"}
_CLOSE = object()
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
DEFAULT_API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(subject: str, audiences: Iterable[str], exp: float, nonce: str = "") -> str:
    """A JWT-shaped token (unsigned: only the fake API server judges it)."""
    header = _b64url(json.dumps({"alg": "RS256", "kid": "fake"}).encode())
    claims = {"sub": subject, "aud": list(audiences), "exp": int(exp), "jti": nonce or subject}
    payload = _b64url(json.dumps(claims).encode())
    return f"{header}.{payload}.{_b64url(b'not-a-signature-' + nonce.encode())}"


@dataclass
class _Token:
    username: str
    audiences: tuple[str, ...]
    node: str | None
    pod: str
    expires_at: float


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def free_port() -> int:
    """A loopback port nobody listens on (for "API server down" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def gone_status(rv: str, current: int) -> dict[str, Any]:
    return status(410, "Expired", f"too old resource version: {rv} ({current})")


@dataclass
class Request:
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: Any = None  # decoded JSON of a POST

    @property
    def watch(self) -> bool:
        return self.params.get("watch") in ("1", "true")


@dataclass
class _Failure:
    status: int
    resource: str | None
    watch: bool | None  # None: lists and watches alike
    remaining: int


@dataclass
class _Resource:
    name: str
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    compacted: int = 0  # watches from a version below this get 410
    watchers: list[_Watcher] = field(default_factory=list)


@dataclass
class _Watcher:
    node: str | None
    events: queue.Queue = field(default_factory=queue.Queue)


def _key(resource: str, obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return meta["uid"] if resource == "pods" else meta["name"]


def _node_of(obj: dict[str, Any]) -> str | None:
    return (obj.get("spec") or {}).get("nodeName")


class FakeApiServer:
    def __init__(
        self,
        *,
        token: str | None = None,
        tls: bool = False,
        port: int = 0,
        split_events: bool = True,
        start_rv: int = 1000,
        require_client_cert: bool = False,
    ) -> None:
        self.token = token
        self.reviewer_token: str | None = None  # None: the same check as `token`
        self.deny_token_reviews = False  # the caller lacks system:auth-delegator
        self._tokens: dict[str, _Token] = {}
        self.split_events = split_events
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._rv = start_rv
        self._resources = {name: _Resource(name) for name in _KINDS}
        self._failures: list[_Failure] = []
        self._stopping = threading.Event()
        self.ca: CertificateAuthority | None = None
        self._ssl: ssl.SSLContext | None = None
        if tls:
            self.ca = CertificateAuthority.create("fake apiserver CA")
            leaf = self.ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"], dns_names=["localhost"])
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
                cert.write_bytes(leaf.cert_pem)
                key.write_bytes(leaf.key_pem)
                self._ssl.load_cert_chain(cert, key)
            if require_client_cert:
                # mTLS as kubeadm's API server does for client-certificate users.
                self._ssl.verify_mode = ssl.CERT_REQUIRED
                self._ssl.load_verify_locations(cadata=self.ca.cert_pem.decode())
        self._httpd = _Server(("127.0.0.1", port), _Handler, self)
        self._thread: threading.Thread | None = None

    # -- lifecycle

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        assert self.ca is not None, "not a TLS server"
        return self.ca.cert_pem

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.close_watches()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state

    @property
    def resource_version(self) -> int:
        return self._rv

    def load(self, resource: str, objs: Iterable[dict[str, Any]]) -> None:
        """Objects that exist before any client comes (no history, no events)."""
        with self._lock:
            res = self._resources[resource]
            for obj in objs:
                obj = copy.deepcopy(obj)
                self._rv += 1
                obj["metadata"]["resourceVersion"] = str(self._rv)
                res.objects[_key(resource, obj)] = obj
            res.compacted = self._rv

    def add(self, resource: str, obj: dict[str, Any]) -> int:
        return self._change(resource, "ADDED", obj)

    def modify(self, resource: str, obj: dict[str, Any]) -> int:
        return self._change(resource, "MODIFIED", obj)

    def delete(self, resource: str, obj: dict[str, Any]) -> int:
        return self._change(resource, "DELETED", obj)

    def _change(self, resource: str, kind: str, obj: dict[str, Any]) -> int:
        with self._lock:
            res = self._resources[resource]
            obj = copy.deepcopy(obj)
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            if kind == "DELETED":
                res.objects.pop(_key(resource, obj), None)
            else:
                res.objects[_key(resource, obj)] = obj
            res.history.append((self._rv, kind, obj))
            event = self._event(resource, kind, obj)
            for watcher in res.watchers:
                if watcher.node is None or watcher.node == _node_of(obj):
                    watcher.events.put(event)
            return self._rv

    def compact(self, resource: str) -> None:
        """Forget history: watches from any version seen so far get 410 Gone."""
        with self._lock:
            res = self._resources[resource]
            res.history.clear()
            # As etcd: some write moved the revision on, then history up to it went.
            self._rv += 1
            res.compacted = self._rv

    @staticmethod
    def _event(resource: str, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        return {"type": kind, "object": {"kind": _KINDS[resource], "apiVersion": "v1", **obj}}

    # -- TokenReview

    def add_token(
        self,
        namespace: str,
        service_account: str,
        *,
        node: str | None,
        audiences: Iterable[str] = ("tlscap-collector",),
        ttl: float = 3600.0,
        pod: str = "agent-pod",
    ) -> str:
        """A new projected token for the ServiceAccount, bound to `pod` on `node`."""
        username = f"system:serviceaccount:{namespace}:{service_account}"
        audiences = tuple(audiences)
        expires_at = time.time() + ttl
        with self._lock:
            nonce = f"{len(self._tokens)}-{pod}-{node}"
            token = make_token(username, audiences, expires_at, nonce)
            self._tokens[token] = _Token(username, audiences, node, pod, expires_at)
        return token

    def revoke_token(self, token: str) -> None:
        """As when the pod the token is bound to is deleted."""
        with self._lock:
            self._tokens.pop(token, None)

    def token_reviews(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == TOKEN_REVIEW_PATH]

    def _review(self, spec: dict[str, Any]) -> dict[str, Any]:
        token = str(spec.get("token") or "")
        wanted = list(spec.get("audiences") or [DEFAULT_API_AUDIENCE])
        with self._lock:
            known = self._tokens.get(token)
        status: dict[str, Any]
        if known is None:
            status = {
                "authenticated": False,
                "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
            }
        elif known.expires_at <= time.time():
            status = {"authenticated": False, "error": "[invalid bearer token, token has expired]"}
        elif not set(wanted) & set(known.audiences):
            status = {
                "authenticated": False,
                "error": f"[invalid bearer token, token audiences {list(known.audiences)} is "
                f"invalid for the target audiences {wanted}]",
            }
        else:
            namespace = known.username.split(":")[2]
            extra = {
                "authentication.kubernetes.io/pod-name": [known.pod],
                "authentication.kubernetes.io/pod-uid": [f"uid-{known.pod}"],
            }
            if known.node is not None:
                extra[NODE_NAME_EXTRA] = [known.node]
                extra["authentication.kubernetes.io/node-uid"] = [f"uid-{known.node}"]
            status = {
                "authenticated": True,
                "audiences": [a for a in wanted if a in known.audiences],
                "user": {
                    "username": known.username,
                    "uid": f"uid-{known.username}",
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{namespace}",
                        "system:authenticated",
                    ],
                    "extra": extra,
                },
            }
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    # -- scripting

    def close_watches(self, resource: str | None = None) -> None:
        """End open watch streams cleanly (as at timeoutSeconds, or an apiserver restart)."""
        self._broadcast(resource, _CLOSE)

    def send_bookmark(self, resource: str) -> int:
        """A BOOKMARK at a new resourceVersion (as if other resources had changed)."""
        with self._lock:
            self._rv += 1
            rv = self._rv
        kind = _KINDS[resource]
        self._broadcast(
            resource,
            {
                "type": "BOOKMARK",
                "object": {
                    "kind": kind,
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(rv)},
                },
            },
        )
        return rv

    def send_gone(self, resource: str) -> None:
        """An ERROR event with a 410 Status, then the end of the stream."""
        self._broadcast(resource, {"type": "ERROR", "object": gone_status("0", self._rv)})
        self._broadcast(resource, _CLOSE)

    def fail_next(
        self,
        status_code: int,
        count: int = 1,
        resource: str | None = None,
        watch: bool | None = None,
    ) -> None:
        """Answer the next `count` matching requests with an HTTP error status."""
        with self._lock:
            self._failures.append(_Failure(status_code, resource, watch, count))

    def watchers(self, resource: str) -> int:
        with self._lock:
            return len(self._resources[resource].watchers)

    def requests_for(self, resource: str, watch: bool | None = None) -> list[Request]:
        path = {v: k for k, v in _PATHS.items()}[resource]
        with self._lock:
            return [
                r for r in self.requests if r.path == path and (watch is None or r.watch == watch)
            ]

    def _broadcast(self, resource: str | None, item: object) -> None:
        with self._lock:
            for name, res in self._resources.items():
                if resource in (None, name):
                    for watcher in res.watchers:
                        watcher.events.put(item)

    # -- request handling (called from handler threads)

    def _take_failure(self, resource: str, watch: bool) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure.resource not in (None, resource):
                    continue
                if failure.watch is not None and failure.watch != watch:
                    continue
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                return failure.status
        return None

    def _list(self, resource: str, node: str | None) -> dict[str, Any]:
        with self._lock:
            res = self._resources[resource]
            items = [
                copy.deepcopy(o)
                for o in res.objects.values()
                if node is None or _node_of(o) == node
            ]
            return {
                "kind": f"{_KINDS[resource]}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    def _subscribe(
        self, resource: str, node: str | None, rv: str | None
    ) -> tuple[_Watcher, list[dict[str, Any]]]:
        """Register a watcher and return the backlog it must see first (atomically)."""
        with self._lock:
            res = self._resources[resource]
            watcher = _Watcher(node)
            if not rv or rv == "0":
                # "Any version": the current state as synthetic ADDED events.
                backlog = [self._event(resource, "ADDED", o) for o in res.objects.values()]
            elif not rv.isdigit() or int(rv) < res.compacted:
                backlog = [{"type": "ERROR", "object": gone_status(rv, self._rv)}]
                watcher.events.put(_CLOSE)
            else:
                backlog = [
                    self._event(resource, kind, o) for v, kind, o in res.history if v > int(rv)
                ]
            backlog = [e for e in backlog if node is None or _node_of(e["object"]) in (node, None)]
            res.watchers.append(watcher)
            return watcher, backlog

    def _unsubscribe(self, resource: str, watcher: _Watcher) -> None:
        with self._lock:
            self._resources[resource].watchers.remove(watcher)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, fake: FakeApiServer) -> None:
        self.fake = fake
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        ctx = self.server.fake._ssl
        if ctx is not None:
            # Handshake here, in the connection's thread, not in the accept loop.
            self.request.settimeout(5)
            self.request = ctx.wrap_socket(self.request, server_side=True)
            self.request.settimeout(None)
        super().setup()

    def handle(self) -> None:
        # Clients that fail verification or hang up are part of the tests.
        with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = Request(
            url.path, dict(parse_qsl(url.query)), {k.lower(): v for k, v in self.headers.items()},
            body,
        )  # fmt: skip
        with fake._lock:
            fake.requests.append(request)
        self.close_connection = True
        expected = fake.reviewer_token if fake.reviewer_token is not None else fake.token
        if expected is not None and request.headers.get("authorization") != f"Bearer {expected}":
            self._json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        if url.path != TOKEN_REVIEW_PATH:
            self._json(405, status(405, "MethodNotAllowed", f"POST is not supported on {url.path}"))
            return
        failure = fake._take_failure("tokenreviews", False)
        if failure is not None:
            self._json(failure, status(failure, "InternalError", "scripted failure"))
            return
        if fake.deny_token_reviews:
            self._json(
                403,
                status(
                    403,
                    "Forbidden",
                    'tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:'
                    'tlscap:tlscap-collector" cannot create resource "tokenreviews" in API group '
                    '"authentication.k8s.io" at the cluster scope',
                ),
            )
            return
        if (
            not isinstance(body, dict)
            or body.get("kind") != "TokenReview"
            or body.get("apiVersion") != "authentication.k8s.io/v1"
            or not isinstance(body.get("spec"), dict)
        ):
            self._json(
                400, status(400, "BadRequest", "not an authentication.k8s.io/v1 TokenReview")
            )
            return
        self._json(201, fake._review(body["spec"]))

    def do_GET(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query))
        request = Request(url.path, params, {k.lower(): v for k, v in self.headers.items()})
        with fake._lock:
            fake.requests.append(request)
        self.close_connection = True

        if (
            fake.token is not None
            and request.headers.get("authorization") != f"Bearer {fake.token}"
        ):
            self._json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        resource = _PATHS.get(url.path)
        if resource is None:
            self._json(404, status(404, "NotFound", f"the server could not find {url.path}"))
            return
        failure = fake._take_failure(resource, request.watch)
        if failure is not None:
            if failure == 410:
                self._json(410, gone_status(params.get("resourceVersion", ""), fake._rv))
            else:
                self._json(failure, status(failure, "InternalError", "scripted failure"))
            return
        node = None
        selector = params.get("fieldSelector", "")
        if selector:
            field_name, _, value = selector.partition("=")
            if field_name != "spec.nodeName" or resource != "pods":
                self._json(400, status(400, "BadRequest", f"unsupported selector {selector}"))
                return
            node = value
        if request.watch:
            self._watch(resource, node, params)
        else:
            self._json(200, fake._list(resource, node))

    def _json(self, code: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _write_events(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        lines = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        if self.server.fake.split_events:
            # Split mid-event, so the client must join partial lines across chunks.
            cut = max(1, len(lines) // 2 - 7)
            self._chunk(lines[:cut])
            self._chunk(lines[cut:])
        else:
            self._chunk(lines)

    def _watch(self, resource: str, node: str | None, params: dict[str, str]) -> None:
        fake = self.server.fake
        timeout = float(params.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        watcher, backlog = fake._subscribe(resource, node, params.get("resourceVersion"))
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            self._write_events(backlog)
            while time.monotonic() < deadline and not fake._stopping.is_set():
                try:
                    item = watcher.events.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is _CLOSE:
                    break
                batch = [item]
                # Whatever else is queued goes in the same chunk (several events a chunk).
                while not watcher.events.empty():
                    more = watcher.events.get_nowait()
                    if more is _CLOSE:
                        watcher.events.put(_CLOSE)
                        break
                    batch.append(more)
                self._write_events(batch)  # type: ignore[arg-type]
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ssl.SSLError):
            pass  # the client went away
        finally:
            fake._unsubscribe(resource, watcher)
