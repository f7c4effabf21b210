"""The one record type every capture path produces and every sink consumes.

A data Record is one TLS library call (one SSL_write / SSL_read ...) with the
plaintext it moved; open/close Records mark a connection's lifecycle; an exchange
Record is one HTTP request and its response parsed from a connection's data
records (agent/l7), and a stats Record closes a run.  The field names are the
JSON-lines contract (DESIGN.md §5).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal

from agent.records import _record
from agent.records._record import FIELDS

if TYPE_CHECKING:
    from agent.l7.exchange import Exchange

RecordType = Literal["data", "open", "close", "exchange", "stats"]
Direction = Literal["egress", "ingress"]
Role = Literal["client", "server", "unknown"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "port": self.port}

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class PodRef:
    """The Kubernetes pod (and container in it) a process runs in."""

    name: str
    namespace: str
    uid: str = ""
    container: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "container": self.container,
            "labels": dict(self.labels),
        }


class Record(_record.Record):
    """One record of the stream (see the module docstring); fields in this order,
    by position or keyword, every one but `type` and `ts_ns` with a default.

    Storage and construction are C (agent/records/_record.c): one is made per TLS
    call, and the dataclass this was cost ~1 µs to construct (~4 µs with
    keywords), a fifth of the whole capture path per call with no output.  The
    flow table makes a call's data record with `Record.for_call(call, ts_ns,
    conn_id, fd, local, remote, role)` (C too: it reads the TlsCall's slots).
    The annotations below document the fields; tests hold them to the C order.
    """

    __slots__ = ()

    type: RecordType
    ts_ns: int  # wall clock, ns since the Unix epoch
    # Identity in a multi-node stream: (agent_id, seq) is unique, and the
    # collector de-duplicates re-sent records on it.  Set by the capture session.
    agent_id: str  # ""
    node: str  # ""
    seq: int  # 0
    pid: int  # 0
    tid: int  # 0
    comm: str  # ""
    cgroup_id: int  # the caller's kernel cgroup id (0 = unknown)
    container_id: str  # ""
    pod: PodRef | None  # None
    source: str  # "openssl", "gotls", "proxy", ... ("")
    conn_id: str  # ""
    fd: int  # -1
    local: Endpoint | None  # None
    remote: Endpoint | None  # None
    role: Role  # "unknown"
    # data records only
    direction: Direction | None  # None
    offset: int  # byte offset of this payload within its direction of the connection (0)
    len: int  # bytes the call really moved (0)
    captured_len: int  # bytes of it we carry in `data` (0)
    truncated: bool  # False
    data: bytes  # b""
    # data and exchange records: the application protocol the connection was parsed
    # as ("http1", "http2", "grpc"; "" when not parsed or not recognised)
    protocol: str
    # data records: the redaction rules that masked bytes of `data` (same length
    # kept); a new list per record
    redactions: list[str]
    # exchange records only
    exchange: Exchange | None  # None
    # stats records only; a new dict per record
    stats: dict[str, int]

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _values(self) == _values(other)

    def __repr__(self) -> str:
        pairs = zip(FIELDS, _values(self), strict=True)
        return f"Record({', '.join(f'{name}={value!r}' for name, value in pairs)})"

    def replace(self, **changes: Any) -> Record:
        """A copy with `changes` (dataclasses.replace, which a C type cannot use)."""
        return Record(**{**dict(zip(FIELDS, _values(self), strict=True)), **changes})

    def to_json(self) -> dict[str, Any]:
        """The JSON-lines form (DESIGN.md §5)."""
        if self.type == "stats":
            return {"type": "stats", "ts_ns": self.ts_ns, **self.stats}
        out: dict[str, Any] = {
            "type": self.type,
            "ts_ns": self.ts_ns,
            "node": self.node,
            "agent_id": self.agent_id,
            "seq": self.seq,
            "pid": self.pid,
            "tid": self.tid,
            "comm": self.comm,
            "cgroup_id": self.cgroup_id,
            "container_id": self.container_id,
            "pod": self.pod.to_json() if self.pod else None,
            "source": self.source,
            "conn_id": self.conn_id,
            "fd": self.fd,
            "local": self.local.to_json() if self.local else None,
            "remote": self.remote.to_json() if self.remote else None,
            "role": self.role,
        }
        if self.type == "data":
            out.update(
                direction=self.direction,
                offset=self.offset,
                len=self.len,
                captured_len=self.captured_len,
                truncated=self.truncated,
                data_b64=base64.b64encode(self.data).decode("ascii"),
                protocol=self.protocol,
                redactions=list(self.redactions),
            )
        elif self.type == "exchange" and self.exchange is not None:
            out["protocol"] = self.protocol
            out["exchange"] = self.exchange.to_json()
        return out


_values = attrgetter(*FIELDS)
