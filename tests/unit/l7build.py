"""Hand-made records of L7 connections, for the L7 stage's tests."""

from __future__ import annotations

from agent.l7.stage import L7Stage
from agent.records.record import Endpoint, Record


class Conn:
    """Makes the data records of one connection, offsets kept per direction."""

    def __init__(self, conn_id: str = "c1", role: str = "client") -> None:
        self.conn_id = conn_id
        self.role = role
        self.offsets = {"egress": 0, "ingress": 0}
        self.ts = 1_000_000_000

    def data(self, direction: str, payload: bytes, *, skip: int = 0, lost: int = 0) -> Record:
        """`skip` bytes before it were never captured; `lost` bytes after it neither."""
        self.offsets[direction] += skip
        self.ts += 1_000_000
        r = Record(
            type="data",
            ts_ns=self.ts,
            pid=10,
            comm="curl",
            source="openssl",
            conn_id=self.conn_id,
            fd=3,
            local=Endpoint("127.0.0.1", 50000),
            remote=Endpoint("127.0.0.1", 443),
            role=self.role,  # type: ignore[arg-type]
            direction=direction,  # type: ignore[arg-type]
            offset=self.offsets[direction],
            len=len(payload) + lost,
            captured_len=len(payload),
            truncated=lost > 0,
            data=payload,
        )
        self.offsets[direction] += len(payload) + lost
        return r

    def close(self) -> Record:
        self.ts += 1_000_000
        return Record(type="close", ts_ns=self.ts, conn_id=self.conn_id, role=self.role)  # type: ignore[arg-type]


def run(stage: L7Stage, records: list[Record]) -> list[Record]:
    out: list[Record] = []
    for r in records:
        out.extend(stage.process(r))
    out.extend(stage.flush())
    return out
