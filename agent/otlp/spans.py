"""Exchange record -> one OpenTelemetry span (pure: no I/O, no clock).

A span here is not instrumentation of this process: it is an HTTP or gRPC exchange
another process already made, seen on the wire.  So spans are built as the
exporter's input type (`ReadableSpan`) from the exchange's own timestamps, with
the captured process as their Resource, instead of going through a Tracer (which
stamps "now", samples, and binds one Resource per TracerProvider).

Attributes follow the HTTP and RPC semantic conventions; `http.route` is absent on
purpose (the route template is the application's knowledge, not the wire's).
Exchanges reach sinks already redacted (agent/l7), so `url.query` and the rest
carry what redaction left.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from agent.l7.exchange import Exchange, HttpMessage
from agent.records.record import Endpoint, Record

SCOPE = InstrumentationScope("tlscap", "0.1.0")
SERVICE_NAME_LABEL = "app.kubernetes.io/name"
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"}
)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


@dataclass(frozen=True, slots=True)
class Parent:
    """A remote parent taken from a W3C `traceparent` header."""

    trace_id: int
    span_id: int
    flags: int
    state: TraceState


def parse_traceparent(value: str, tracestate: str | None = None) -> Parent | None:
    """The W3C trace context in `value`, or None if it is not a valid traceparent.

    Version 00 must be exactly 55 characters; a later version may carry more
    fields after the fourth (read as 00, as the spec says); version ff is invalid.
    """
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    state = TraceState()
    if tracestate:
        try:
            state = TraceState.from_header([tracestate])
        except Exception:  # a bad tracestate is dropped, the parent still holds
            state = TraceState()
    return Parent(trace_id, span_id, int(flags_hex, 16), state)


def _host_port(authority: str) -> tuple[str, int | None]:
    """("example.com", 8443) from "example.com:8443"; IPv6 literals in brackets."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, _, port = authority.partition(":")
    else:
        host, port = authority, ""
    return host, int(port) if port.isdigit() else None


def split_target(target: str) -> tuple[str, str | None]:
    """(path, query or None) of a request-target; absolute-form targets lose their
    scheme and authority."""
    if "://" in target:
        after = target.split("://", 1)[1]
        slash = after.find("/")
        target = after[slash:] if slash >= 0 else "/"
    target = target.split("#", 1)[0]
    path, sep, query = target.partition("?")
    return path, (query if sep else None)


def endpoints(record: Record) -> tuple[Endpoint | None, Endpoint | None]:
    """(server end, client end) of the record's connection, from its role."""
    if record.role == "server":
        return record.local, record.remote
    if record.role == "client":
        return record.remote, record.local
    return None, None


def span_kind(record: Record) -> SpanKind:
    if record.role == "server":
        return SpanKind.SERVER
    if record.role == "client":
        return SpanKind.CLIENT
    return SpanKind.INTERNAL


def span_times(ex: Exchange, fallback_ns: int) -> tuple[int, int]:
    """(start, end) in ns: the request's first byte to the response's last; the
    side that was seen when the other was not."""
    req, resp = ex.request, ex.response
    start = (req.ts_ns if req else 0) or (resp.ts_ns if resp else 0) or fallback_ns
    end = 0
    if resp is not None:
        end = resp.end_ts_ns or resp.ts_ns
    if not end and req is not None:
        end = req.end_ts_ns or req.ts_ns
    return start, max(start, end or start)


def span_name(ex: Exchange) -> str:
    if ex.grpc is not None and ex.grpc.service:
        return f"{ex.grpc.service}/{ex.grpc.method}"
    method = ex.request.method if ex.request else ""
    return method if method in KNOWN_METHODS else "HTTP"


def span_attributes(record: Record) -> dict[str, Any]:
    """The semantic-convention attributes of an exchange record."""
    ex = record.exchange
    assert ex is not None
    req, resp = ex.request, ex.response
    attrs: dict[str, Any] = {"network.transport": "tcp"}
    server, client = endpoints(record)
    authority = req.authority if req is not None else ""
    host, authority_port = _host_port(authority) if authority else ("", None)
    if host and host != "[REDACTED]":
        attrs["server.address"] = host
    elif server is not None:
        attrs["server.address"] = server.ip
    if server is not None:
        attrs["server.port"] = server.port
    elif authority_port is not None:
        attrs["server.port"] = authority_port
    if client is not None:
        attrs["client.address"] = client.ip
        attrs["client.port"] = client.port
    if record.remote is not None:
        attrs["network.peer.address"] = record.remote.ip
        attrs["network.peer.port"] = record.remote.port
    version = (req.version if req else "") or (resp.version if resp else "")
    if version:
        attrs["network.protocol.name"] = "http"
        attrs["network.protocol.version"] = version
    if ex.grpc is not None:
        attrs["rpc.system"] = "grpc"
        if ex.grpc.service:
            attrs["rpc.service"] = ex.grpc.service
            attrs["rpc.method"] = ex.grpc.method
        if ex.grpc.status is not None:
            attrs["rpc.grpc.status_code"] = ex.grpc.status
    if req is not None:
        _request_attributes(attrs, req, record.role)
    if resp is not None and resp.status:
        attrs["http.response.status_code"] = resp.status
        if resp.body_len:
            attrs["http.response.body.size"] = resp.body_len
    attrs["tlscap.conn_id"] = record.conn_id
    attrs["tlscap.protocol"] = ex.protocol
    if record.source:
        attrs["tlscap.source"] = record.source
    if ex.notes:
        attrs["tlscap.notes"] = list(ex.notes)
    if ex.redactions:
        attrs["tlscap.redactions"] = list(ex.redactions)
    return attrs


def _request_attributes(attrs: dict[str, Any], req: HttpMessage, role: str) -> None:
    if req.method:
        if req.method in KNOWN_METHODS:
            attrs["http.request.method"] = req.method
        else:
            attrs["http.request.method"] = "_OTHER"
            attrs["http.request.method_original"] = req.method
    attrs["url.scheme"] = "https"  # captured from TLS libraries: always TLS on the wire
    if req.target and req.target != "[REDACTED]":
        path, query = split_target(req.target)
        attrs["url.path"] = path
        if query is not None:
            attrs["url.query"] = query
        if role == "client" and req.authority:
            # Required on client spans; redaction already masked sensitive query values.
            attrs["url.full"] = f"https://{req.authority}{path}" + (
                f"?{query}" if query is not None else ""
            )
    if req.body_len:
        attrs["http.request.body.size"] = req.body_len
    agent = req.header("user-agent")
    if agent:
        attrs["user_agent.original"] = agent


def span_status(record: Record) -> Status:
    """Error on a 5xx response or any non-zero gRPC status, on either side (the
    issue's rule: one rule for every span, so a dashboard's error count is the
    same whichever end was captured); otherwise unset."""
    ex = record.exchange
    assert ex is not None
    if ex.grpc is not None and ex.grpc.status:
        return Status(StatusCode.ERROR, f"grpc-status {ex.grpc.status}")
    status = ex.response.status if ex.response is not None else 0
    if status >= 500:
        return Status(StatusCode.ERROR)
    return Status(StatusCode.UNSET)


def error_type(record: Record, status: Status) -> str | None:
    """`error.type` for a failed span: the HTTP status code or gRPC status, as text."""
    if status.status_code is not StatusCode.ERROR:
        return None
    ex = record.exchange
    assert ex is not None
    if ex.grpc is not None and ex.grpc.status:
        return str(ex.grpc.status)
    return str(ex.response.status) if ex.response is not None else "_OTHER"


def resource_attributes(record: Record) -> dict[str, Any]:
    """Who made the exchange: the captured process, its container and pod."""
    attrs: dict[str, Any] = {
        "host.name": record.node,
        "process.pid": record.pid,
        "process.executable.name": record.comm,
        "telemetry.sdk.name": "tlscap",
        "telemetry.sdk.language": "python",
    }
    service = record.comm
    if record.container_id:
        attrs["container.id"] = record.container_id
    pod = record.pod
    if pod is not None:
        attrs["k8s.pod.name"] = pod.name
        attrs["k8s.namespace.name"] = pod.namespace
        if pod.uid:
            attrs["k8s.pod.uid"] = pod.uid
        if pod.container:
            attrs["k8s.container.name"] = pod.container
        service = pod.labels.get(SERVICE_NAME_LABEL) or service
    if record.node:
        attrs["k8s.node.name"] = record.node
    attrs["service.name"] = service or "unknown_service"
    return attrs


class ResourceCache:
    """One Resource per captured process (and pod), least recently used dropped
    beyond `size`: the exporter groups spans by Resource, so equal processes must
    share one object, and a node sees many processes over time."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._cache: OrderedDict[tuple, Resource] = OrderedDict()

    def get(self, record: Record) -> Resource:
        pod = record.pod
        key = (
            record.node, record.pid, record.comm, record.container_id,
            (pod.uid, pod.name, pod.namespace, pod.container,
             pod.labels.get(SERVICE_NAME_LABEL, "")) if pod else None,
        )  # fmt: skip
        resource = self._cache.get(key)
        if resource is not None:
            self._cache.move_to_end(key)
            return resource
        # Not Resource.create(): that merges in this agent's own SDK/env defaults,
        # which would describe the agent, not the captured process.
        resource = Resource(resource_attributes(record))
        self._cache[key] = resource
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return resource

    def __len__(self) -> int:
        return len(self._cache)


class SpanBuilder:
    """Exchange records -> ReadableSpans; counts traceparent headers it could not use."""

    def __init__(self, resources: ResourceCache | None = None, rng: random.Random | None = None):
        self.resources = resources if resources is not None else ResourceCache()
        self._rng = rng or random.Random()
        self.traceparent_invalid = 0
        self.traceparent_linked = 0
        self.last_invalid: str | None = None  # for one log line, by the caller

    def build(self, record: Record) -> ReadableSpan | None:
        """The span of an exchange record; None for any other record."""
        ex = record.exchange
        if record.type != "exchange" or ex is None:
            return None
        parent = self._parent(ex)
        bits = self._rng.getrandbits
        span_id = bits(64) or 1
        if parent is not None:
            trace_id, state = parent.trace_id, parent.state
            parent_ctx: SpanContext | None = SpanContext(
                parent.trace_id, parent.span_id, is_remote=True,
                trace_flags=TraceFlags(parent.flags), trace_state=parent.state,
            )  # fmt: skip
        else:
            trace_id, state, parent_ctx = bits(128) or 1, TraceState(), None
        context = SpanContext(
            trace_id, span_id, is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=state,
        )  # fmt: skip
        start, end = span_times(ex, record.ts_ns)
        attributes = span_attributes(record)
        status = span_status(record)
        error = error_type(record, status)
        if error is not None:
            attributes["error.type"] = error
        return ReadableSpan(
            name=span_name(ex),
            context=context,
            parent=parent_ctx,
            resource=self.resources.get(record),
            attributes=attributes,
            kind=span_kind(record),
            status=status,
            start_time=start,
            end_time=end,
            instrumentation_scope=SCOPE,
        )

    def _parent(self, ex: Exchange) -> Parent | None:
        if ex.request is None:
            return None
        header = ex.request.header("traceparent")
        if header is None:
            return None
        parent = parse_traceparent(header, ex.request.header("tracestate"))
        if parent is None:
            self.traceparent_invalid += 1
            self.last_invalid = header[:80]
        else:
            self.traceparent_linked += 1
        return parent
