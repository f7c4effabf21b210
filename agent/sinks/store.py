"""Write records into a local SQLite store (`tlscap run --store PATH`).

The same store the collector keeps, so `tlscap tail --store PATH` reads it with
the same filters.  Records are inserted in batches, one transaction each (a
transaction per record could not keep up with capture); the batching policy is
the text sinks' PeriodicFlusher, with the pending rows as its "stream".
"""

from __future__ import annotations

from pathlib import Path

from agent.collector.store import RecordStore
from agent.records.record import Record
from agent.schema.convert import to_pb
from agent.sinks.base import PeriodicFlusher


class _PendingRows:
    """Rows waiting for their transaction: write() collects, flush() inserts."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.rows: list[tuple[Record, bytes]] = []
        self.stored = 0

    def write(self, row: tuple[Record, bytes]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if self.rows:
            batch, self.rows = self.rows, []
            self.stored += self.store.insert(batch).stored


class StoreSink:
    def __init__(self, path: Path, interval: float = 0.2) -> None:
        self._store = RecordStore(path)
        self._rows = _PendingRows(self._store)
        self._out = PeriodicFlusher(self._rows, interval)  # type: ignore[arg-type]

    def write(self, record: Record) -> None:
        self._out.write((record, to_pb(record).SerializeToString()))  # type: ignore[arg-type]

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        try:
            self._out.close()
        finally:
            self._store.close()

    def stats(self) -> dict[str, int]:
        return {"store_records": self._rows.stored}
