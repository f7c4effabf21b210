"""Records for one proxied connection, in the same shape the eBPF path produces (pure).

The proxy sits between a client and a server, but a record describes one process's
view of its connection, as if the proxy were not there:

- outbound (a local client to a remote server): the process is the client, `local` is
  its own address, `remote` the original destination; what the client sent is egress.
- inbound (a remote client to a local service): the process is the service, `local`
  is the original destination (its listening address), `remote` the peer; what the
  client sent is ingress.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from agent.records.record import Direction, Endpoint, PodRef, Record, Role

SOURCE = "proxy"

Side = Literal["outbound", "inbound"]

_conn_numbers = itertools.count(1)


def new_conn_id(clock_ns: Callable[[], int] = time.time_ns) -> str:
    """`proxy-<n>-<start time, hex>`: unique within a run and across restarts."""
    return f"proxy-{next(_conn_numbers)}-{clock_ns():x}"


@dataclass(frozen=True)
class FlowIdentity:
    side: Side
    client: Endpoint  # the peer that connected to us
    server: Endpoint  # where it was going (SO_ORIGINAL_DST)
    pid: int = 0
    comm: str = ""
    # Set for a pod's proxy: the pod is known from its namespace even when the
    # client's process is not (attribution then refines it from the process).
    pod: PodRef | None = None


class ProxiedFlow:
    def __init__(
        self,
        identity: FlowIdentity,
        max_capture: int,
        conn_id: str | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.identity = identity
        self.max_capture = max_capture
        self.conn_id = conn_id or new_conn_id(clock_ns)
        self._clock = clock_ns
        self._offsets: dict[Direction, int] = {"egress": 0, "ingress": 0}
        self.truncated_bytes = 0
        if identity.side == "outbound":
            self.local, self.remote, self.role = identity.client, identity.server, "client"
        else:
            self.local, self.remote, self.role = identity.server, identity.client, "server"
        self.role: Role

    def _record(self, type_: Literal["open", "close", "data"]) -> Record:
        return Record(
            type=type_,
            ts_ns=self._clock(),
            pid=self.identity.pid,
            tid=self.identity.pid,
            comm=self.identity.comm,
            pod=self.identity.pod,
            source=SOURCE,
            conn_id=self.conn_id,
            local=self.local,
            remote=self.remote,
            role=self.role,
        )

    def opened(self) -> Record:
        return self._record("open")

    def closed(self) -> Record:
        return self._record("close")

    def direction(self, from_client: bool) -> Direction:
        return "egress" if from_client == (self.role == "client") else "ingress"

    def data(self, from_client: bool, payload: bytes) -> Record:
        direction = self.direction(from_client)
        record = self._record("data")
        record.direction = direction
        record.offset = self._offsets[direction]
        record.len = len(payload)
        record.data = payload[: self.max_capture]
        record.captured_len = len(record.data)
        record.truncated = record.captured_len < record.len
        self.truncated_bytes += record.len - record.captured_len
        self._offsets[direction] += len(payload)
        return record

    def bytes_moved(self, from_client: bool) -> int:
        return self._offsets[self.direction(from_client)]
