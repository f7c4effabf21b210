"""Write records into a local SQLite store (`tlscap run --store PATH`).

The same store the collector keeps, so `tlscap tail --store PATH` reads it with
the same filters.  Records are inserted in batches (one transaction per batch
keeps up with capture); a batch is written when it is full or `interval` old.
"""

from __future__ import annotations

import threading
from pathlib import Path

from agent.collector.store import RecordStore
from agent.records.record import Record
from agent.schema.convert import to_pb

BATCH_RECORDS = 512


class StoreSink:
    def __init__(self, path: Path, interval: float = 0.2) -> None:
        self._store = RecordStore(path)
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: list[tuple[Record, bytes]] = []
        self._timer: threading.Timer | None = None
        self._error: BaseException | None = None
        self.stored = 0

    def write(self, record: Record) -> None:
        with self._lock:
            self._raise_deferred()
            self._pending.append((record, to_pb(record).SerializeToString()))
            if len(self._pending) >= BATCH_RECORDS:
                self._flush_locked()
            elif self._timer is None:
                # The last records of a burst reach the store within `interval`.
                self._timer = threading.Timer(self.interval, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            self._raise_deferred()
            self._flush_locked()

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            try:
                self._raise_deferred()
                self._flush_locked()
            finally:
                self._store.close()

    def stats(self) -> dict[str, int]:
        return {"store_records": self.stored}

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if self._error is None:
                try:
                    self._flush_locked()
                except Exception as exc:  # re-raised to the writer on its next call
                    self._error = exc

    def _raise_deferred(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _flush_locked(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self.stored += self._store.insert(batch).stored
