"""Write records into a local SQLite store (`tlscap run --store PATH`).

The same store the collector keeps, so `tlscap tail --store PATH` reads it with
the same filters.  Records are inserted in batches, one transaction each (a
transaction per record could not keep up with capture); the batching policy is
the text sinks' PeriodicFlusher, with the pending rows as its "stream".

Capture workers (`--workers N`) each open a StoreSink on the same file, and the
agent process one more for its stats record.  What makes several writer
processes safe is RecordStore's: write-ahead logging (readers never block a
writer), a batch that takes the write lock before it reads anything (BEGIN
IMMEDIATE: a read upgraded to a write would fail at once when another process
wrote meanwhile) and a busy timeout far longer than one batch's transaction.
Records of one run never collide there: each writer numbers in its own seq slot
(RecordWriter).
"""

from __future__ import annotations

from pathlib import Path

from agent.collector.store import RecordStore, StoreError
from agent.records.record import Record
from agent.schema.convert import to_pb
from agent.sinks.base import OutputError, PeriodicFlusher


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
        """Raises OutputError (an OSError) with a one-line message if the file cannot
        be a store (created 0600: it holds captured plaintext)."""
        try:
            self._store = RecordStore(path)
        except StoreError as exc:
            raise OutputError(str(exc)) from None
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
