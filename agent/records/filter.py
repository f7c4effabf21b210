"""Which records a consumer wants: one predicate shared by every reader.

The collector's live fan-out, its store queries and `tlscap tail --store` all
select records with a RecordFilter, so "--port 443" means the same everywhere.
Every non-empty field must match (AND); inside a field any value may (OR).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.records.record import Record

# With no `types` given, a consumer sees the traffic, not agents' stats lines.
DEFAULT_TYPES = frozenset({"data", "open", "close", "exchange"})


@dataclass(frozen=True)
class RecordFilter:
    nodes: frozenset[str] = frozenset()
    agent_ids: frozenset[str] = frozenset()
    pids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()
    directions: frozenset[str] = frozenset()
    remote_ips: frozenset[str] = frozenset()
    remote_ports: frozenset[int] = frozenset()
    local_ips: frozenset[str] = frozenset()
    local_ports: frozenset[int] = frozenset()
    conn_ids: frozenset[str] = frozenset()
    types: frozenset[str] = field(default=DEFAULT_TYPES)
    since_ns: int = 0  # 0: no lower bound
    until_ns: int = 0  # 0: no upper bound
    namespaces: frozenset[str] = frozenset()  # of the process's Kubernetes pod
    pods: frozenset[str] = frozenset()
    container_ids: frozenset[str] = frozenset()
    # Parsed HTTP/gRPC (agent/l7).  `protocols` also selects the data records of
    # connections parsed as that protocol; the others select exchange records only.
    protocols: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    path_prefixes: frozenset[str] = frozenset()
    statuses: frozenset[int] = frozenset()
    grpc_methods: frozenset[str] = frozenset()  # "pkg.Service/Method" or "pkg.Service"

    @property
    def selects_exchanges_only(self) -> bool:
        return bool(self.methods or self.path_prefixes or self.statuses or self.grpc_methods)

    def matches(self, r: Record) -> bool:
        if r.type not in self.types:
            return False
        if self.since_ns and r.ts_ns < self.since_ns:
            return False
        if self.until_ns and r.ts_ns > self.until_ns:
            return False
        if self.nodes and r.node not in self.nodes:
            return False
        if self.agent_ids and r.agent_id not in self.agent_ids:
            return False
        if self.pids and r.pid not in self.pids:
            return False
        if self.comms and r.comm not in self.comms:
            return False
        if self.sources and r.source not in self.sources:
            return False
        if self.directions and r.direction not in self.directions:
            return False
        if self.conn_ids and r.conn_id not in self.conn_ids:
            return False
        if self.remote_ips and (r.remote is None or r.remote.ip not in self.remote_ips):
            return False
        if self.remote_ports and (r.remote is None or r.remote.port not in self.remote_ports):
            return False
        if self.local_ips and (r.local is None or r.local.ip not in self.local_ips):
            return False
        if self.local_ports and (r.local is None or r.local.port not in self.local_ports):
            return False
        if self.container_ids and r.container_id not in self.container_ids:
            return False
        if self.namespaces and (r.pod is None or r.pod.namespace not in self.namespaces):
            return False
        if self.pods and (r.pod is None or r.pod.name not in self.pods):
            return False
        if self.protocols and r.protocol not in self.protocols:
            return False
        return not self.selects_exchanges_only or self._matches_exchange(r)

    def _matches_exchange(self, r: Record) -> bool:
        ex = r.exchange
        if ex is None:
            return False
        req, resp = ex.request, ex.response
        if self.methods and (req is None or req.method not in self.methods):
            return False
        if self.path_prefixes and (
            req is None or not any(req.target.startswith(p) for p in self.path_prefixes)
        ):
            return False
        if self.statuses and (resp is None or resp.status not in self.statuses):
            return False
        if self.grpc_methods:
            call = ex.grpc
            if call is None or (
                call.full_method not in self.grpc_methods and call.service not in self.grpc_methods
            ):
                return False
        return True
