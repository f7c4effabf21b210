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
from typing import TYPE_CHECKING, Any, Literal

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


@dataclass(slots=True)  # one per TLS call on the hot path: slots make it ~3x cheaper
class Record:
    type: RecordType
    ts_ns: int  # wall clock, ns since the Unix epoch
    # Identity in a multi-node stream: (agent_id, seq) is unique, and the
    # collector de-duplicates re-sent records on it.  Set by the capture session.
    agent_id: str = ""
    node: str = ""
    seq: int = 0
    pid: int = 0
    tid: int = 0
    comm: str = ""
    cgroup_id: int = 0  # the caller's kernel cgroup id (0 = unknown)
    container_id: str = ""
    pod: PodRef | None = None
    source: str = ""  # "openssl", "gotls", "proxy", ...
    conn_id: str = ""
    fd: int = -1
    local: Endpoint | None = None
    remote: Endpoint | None = None
    role: Role = "unknown"
    # data records only
    direction: Direction | None = None
    offset: int = 0  # byte offset of this payload within its direction of the connection
    len: int = 0  # bytes the call really moved
    captured_len: int = 0  # bytes of it we carry in `data`
    truncated: bool = False
    data: bytes = b""
    # data and exchange records: the application protocol the connection was parsed
    # as ("http1", "http2", "grpc"; "" when not parsed or not recognised)
    protocol: str = ""
    # data records: the redaction rules that masked bytes of `data` (same length kept)
    redactions: list[str] = field(default_factory=list)
    # exchange records only
    exchange: Exchange | None = None
    # stats records only
    stats: dict[str, int] = field(default_factory=dict)

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
