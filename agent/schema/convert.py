"""Record (the dataclass every sink takes) <-> tlscap.v1.Record (the wire form).

The two carry the same fields; this is the one place that knows how names and
enums map, so the exporter, the collector's store and `tlscap tail` agree.
"""

from __future__ import annotations

from agent.l7.exchange import Exchange, GrpcCall, GrpcMessage, HttpMessage
from agent.records.filter import DEFAULT_TYPES, RecordFilter
from agent.records.record import Direction, Endpoint, PodRef, Record, RecordType, Role
from agent.schema import pb

_TYPE_TO_PB: dict[str, int] = {
    "data": pb.RECORD_TYPE_DATA,
    "open": pb.RECORD_TYPE_OPEN,
    "close": pb.RECORD_TYPE_CLOSE,
    "stats": pb.RECORD_TYPE_STATS,
    "exchange": pb.RECORD_TYPE_EXCHANGE,
}
_TYPE_FROM_PB: dict[int, RecordType] = {v: k for k, v in _TYPE_TO_PB.items()}  # type: ignore[misc]

_DIRECTION_TO_PB: dict[str | None, int] = {
    None: pb.DIRECTION_UNSPECIFIED,
    "egress": pb.DIRECTION_EGRESS,
    "ingress": pb.DIRECTION_INGRESS,
}
_DIRECTION_FROM_PB: dict[int, Direction | None] = {v: k for k, v in _DIRECTION_TO_PB.items()}  # type: ignore[misc]

_ROLE_TO_PB: dict[str, int] = {
    "unknown": pb.ROLE_UNKNOWN,
    "client": pb.ROLE_CLIENT,
    "server": pb.ROLE_SERVER,
}
_ROLE_FROM_PB: dict[int, Role] = {v: k for k, v in _ROLE_TO_PB.items()}  # type: ignore[misc]


class SchemaError(ValueError):
    """A wire record that cannot be a tlscap Record (unknown type, bad port, ...)."""


def type_to_pb(name: str) -> int:
    return _TYPE_TO_PB[name]


def type_from_pb(value: int) -> RecordType:
    try:
        return _TYPE_FROM_PB[value]
    except KeyError:
        raise SchemaError(f"unknown record type {value}") from None


def direction_to_pb(name: str | None) -> int:
    return _DIRECTION_TO_PB[name]


def direction_from_pb(value: int) -> Direction | None:
    try:
        return _DIRECTION_FROM_PB[value]
    except KeyError:
        raise SchemaError(f"unknown direction {value}") from None


def to_pb(record: Record) -> pb.Record:
    msg = pb.Record(
        agent_id=record.agent_id,
        node=record.node,
        seq=record.seq,
        ts_ns=record.ts_ns,
        type=_TYPE_TO_PB[record.type],
        source=record.source,
    )
    if record.type == "stats":
        msg.stats.update(record.stats)
        return msg
    proc = msg.process
    proc.pid = record.pid
    proc.tid = record.tid
    proc.comm = record.comm
    proc.cgroup_id = record.cgroup_id
    proc.container_id = record.container_id
    if record.pod is not None:
        pod = proc.pod
        pod.name = record.pod.name
        pod.namespace = record.pod.namespace
        pod.uid = record.pod.uid
        pod.container = record.pod.container
        pod.labels.update(record.pod.labels)
    flow = msg.flow
    flow.conn_id = record.conn_id
    flow.fd = record.fd
    flow.role = _ROLE_TO_PB[record.role]
    if record.local is not None:
        flow.local.ip = record.local.ip
        flow.local.port = record.local.port
    if record.remote is not None:
        flow.remote.ip = record.remote.ip
        flow.remote.port = record.remote.port
    if record.type == "data":
        msg.direction = _DIRECTION_TO_PB[record.direction]
        msg.offset = record.offset
        msg.length = record.len
        msg.captured_len = record.captured_len
        msg.truncated = record.truncated
        msg.payload = record.data
        msg.protocol = record.protocol
        if record.redactions:
            msg.redactions.extend(record.redactions)
    elif record.type == "exchange" and record.exchange is not None:
        msg.protocol = record.protocol
        _exchange_to_pb(record.exchange, msg.exchange)
    return msg


def _http_to_pb(m: HttpMessage, out: pb.HttpMessage) -> None:
    out.ts_ns = m.ts_ns
    out.end_ts_ns = m.end_ts_ns
    out.method = m.method
    out.target = m.target
    out.authority = m.authority
    out.status = m.status
    out.reason = m.reason
    out.version = m.version
    out.headers.extend(pb.Header(name=k, value=v) for k, v in m.headers)
    out.trailers.extend(pb.Header(name=k, value=v) for k, v in m.trailers)
    out.body = m.body
    out.body_len = m.body_len
    out.body_truncated = m.body_truncated
    out.complete = m.complete


def _http_from_pb(m: pb.HttpMessage) -> HttpMessage:
    return HttpMessage(
        ts_ns=m.ts_ns,
        end_ts_ns=m.end_ts_ns,
        method=m.method,
        target=m.target,
        authority=m.authority,
        status=m.status,
        reason=m.reason,
        version=m.version,
        headers=[(h.name, h.value) for h in m.headers],
        trailers=[(h.name, h.value) for h in m.trailers],
        body=m.body,
        body_len=m.body_len,
        body_truncated=m.body_truncated,
        complete=m.complete,
    )


def _exchange_to_pb(ex: Exchange, out: pb.Exchange) -> None:
    out.protocol = ex.protocol
    out.stream_id = ex.stream_id
    if ex.request is not None:
        _http_to_pb(ex.request, out.request)
    if ex.response is not None:
        _http_to_pb(ex.response, out.response)
    if ex.grpc is not None:
        g = out.grpc
        g.service = ex.grpc.service
        g.method = ex.grpc.method
        if ex.grpc.status is not None:
            g.has_status = True
            g.status = ex.grpc.status
        g.message = ex.grpc.message
        for messages, target in (
            (ex.grpc.request_messages, g.request_messages),
            (ex.grpc.response_messages, g.response_messages),
        ):
            target.extend(
                pb.GrpcMessage(compressed=m.compressed, length=m.length, data=m.data)
                for m in messages
            )
    out.notes.extend(ex.notes)
    out.redactions.extend(ex.redactions)


def _exchange_from_pb(m: pb.Exchange) -> Exchange:
    if m.protocol not in ("http1", "http2", "grpc"):
        raise SchemaError(f"unknown exchange protocol {m.protocol!r}")
    grpc = None
    if m.HasField("grpc"):
        g = m.grpc
        grpc = GrpcCall(
            service=g.service,
            method=g.method,
            status=g.status if g.has_status else None,
            message=g.message,
            request_messages=[
                GrpcMessage(x.compressed, x.length, x.data) for x in g.request_messages
            ],
            response_messages=[
                GrpcMessage(x.compressed, x.length, x.data) for x in g.response_messages
            ],
        )
    return Exchange(
        protocol=m.protocol,  # type: ignore[arg-type]
        request=_http_from_pb(m.request) if m.HasField("request") else None,
        response=_http_from_pb(m.response) if m.HasField("response") else None,
        stream_id=m.stream_id,
        grpc=grpc,
        notes=list(m.notes),
        redactions=list(m.redactions),
    )


def _endpoint(flow: pb.Flow, name: str) -> Endpoint | None:
    if not flow.HasField(name):
        return None
    ep = getattr(flow, name)
    port = ep.port
    if port > 65535:
        raise SchemaError(f"{name} port out of range: {port}")
    return Endpoint(ep.ip, port)


def _pod(proc: pb.Process) -> PodRef | None:
    if not proc.HasField("pod"):
        return None
    pod = proc.pod
    return PodRef(pod.name, pod.namespace, pod.uid, pod.container, dict(pod.labels))


def from_pb(msg: pb.Record) -> Record:
    """The dataclass form; raises SchemaError for a record no agent would send.

    On the collector's ingest path for every record, hence the local variables:
    each attribute access on a protobuf message is a C call (and `payload`
    copies the bytes).
    """
    rtype = type_from_pb(msg.type)
    if rtype == "stats":
        return Record(
            type="stats",
            ts_ns=msg.ts_ns,
            agent_id=msg.agent_id,
            node=msg.node,
            seq=msg.seq,
            source=msg.source,
            stats=dict(msg.stats),
        )
    flow = msg.flow
    proc = msg.process
    role = _ROLE_FROM_PB.get(flow.role)
    if role is None:
        raise SchemaError(f"unknown role {flow.role}")
    direction = None
    payload = b""
    exchange = None
    if rtype == "exchange":
        if not msg.HasField("exchange"):
            raise SchemaError("exchange record without an exchange")
        exchange = _exchange_from_pb(msg.exchange)
    if rtype == "data":
        direction = direction_from_pb(msg.direction)
        if direction is None:
            raise SchemaError("data record without a direction")
        payload = msg.payload
        if len(payload) != msg.captured_len:
            raise SchemaError(
                f"payload is {len(payload)} bytes but captured_len says {msg.captured_len}"
            )
    return Record(
        type=rtype,
        ts_ns=msg.ts_ns,
        agent_id=msg.agent_id,
        node=msg.node,
        seq=msg.seq,
        pid=proc.pid,
        tid=proc.tid,
        comm=proc.comm,
        cgroup_id=proc.cgroup_id,
        container_id=proc.container_id,
        pod=_pod(proc),
        source=msg.source,
        conn_id=flow.conn_id,
        fd=flow.fd,
        local=_endpoint(flow, "local"),
        remote=_endpoint(flow, "remote"),
        role=role,
        direction=direction,
        offset=msg.offset,
        len=msg.length,
        captured_len=len(payload),
        truncated=msg.truncated,
        data=payload,
        protocol=msg.protocol,
        redactions=list(msg.redactions),
        exchange=exchange,
    )


def filter_to_pb(f: RecordFilter) -> pb.Filter:
    return pb.Filter(
        nodes=sorted(f.nodes),
        agent_ids=sorted(f.agent_ids),
        pids=sorted(f.pids),
        comms=sorted(f.comms),
        sources=sorted(f.sources),
        directions=sorted(_DIRECTION_TO_PB[d] for d in f.directions),
        remote_ips=sorted(f.remote_ips),
        remote_ports=sorted(f.remote_ports),
        local_ips=sorted(f.local_ips),
        local_ports=sorted(f.local_ports),
        conn_ids=sorted(f.conn_ids),
        types=sorted(_TYPE_TO_PB[t] for t in f.types),
        since_ns=f.since_ns,
        until_ns=f.until_ns,
        namespaces=sorted(f.namespaces),
        pods=sorted(f.pods),
        container_ids=sorted(f.container_ids),
        protocols=sorted(f.protocols),
        methods=sorted(f.methods),
        path_prefixes=sorted(f.path_prefixes),
        statuses=sorted(f.statuses),
        grpc_methods=sorted(f.grpc_methods),
    )


def filter_from_pb(msg: pb.Filter) -> RecordFilter:
    """Raises SchemaError for enum values this collector does not know."""
    directions = frozenset(direction_from_pb(d) for d in msg.directions)
    if None in directions:
        raise SchemaError("filter on an unspecified direction")
    return RecordFilter(
        nodes=frozenset(msg.nodes),
        agent_ids=frozenset(msg.agent_ids),
        pids=frozenset(msg.pids),
        comms=frozenset(msg.comms),
        sources=frozenset(msg.sources),
        directions=directions,  # type: ignore[arg-type]
        remote_ips=frozenset(msg.remote_ips),
        remote_ports=frozenset(msg.remote_ports),
        local_ips=frozenset(msg.local_ips),
        local_ports=frozenset(msg.local_ports),
        conn_ids=frozenset(msg.conn_ids),
        types=frozenset(type_from_pb(t) for t in msg.types) or DEFAULT_TYPES,
        since_ns=msg.since_ns,
        until_ns=msg.until_ns,
        namespaces=frozenset(msg.namespaces),
        pods=frozenset(msg.pods),
        container_ids=frozenset(msg.container_ids),
        protocols=frozenset(msg.protocols),
        methods=frozenset(msg.methods),
        path_prefixes=frozenset(msg.path_prefixes),
        statuses=frozenset(msg.statuses),
        grpc_methods=frozenset(msg.grpc_methods),
    )
