"""Where the collector keeps records: the interface the gRPC service talks to.

Two backends implement it:
- LocalBackend: the embedded SQLite store (agent/collector/store.py) and the live
  fan-out hub (agent/collector/fanout.py) -- the default, one box;
- JetStreamBackend (agent/collector/jetstream/backend.py): a NATS JetStream stream;
  collectors are then stateless gateways in front of it.

The service checks callers, records and filters; a backend stores a checked batch and
streams what a (policy-narrowed) filter selects, as SubscribeResponse messages.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

from agent.collector.fanout import Hub, Lagged, Subscription, SubscriptionClosed
from agent.collector.store import RecordStore
from agent.records.filter import RecordFilter
from agent.records.record import Record
from agent.schema import pb
from agent.schema.wire import encode_record_batch

REPLAY_PAGE = 1000  # stored records per replay query / per RecordBatch
LIVE_BATCH = 500  # live records per RecordBatch at most
POLL_SECONDS = 0.5  # how often a waiting live stream checks that its client is still there

Items = Sequence[tuple[Record, bytes]]
Active = Callable[[], bool]  # False once the client left or the collector is stopping


class BackendUnavailable(Exception):
    """The backend cannot take or serve records now (UNAVAILABLE: the agent retries)."""


class RecordRejected(Exception):
    """A record the backend can never store (INVALID_ARGUMENT: the agent drops it)."""


class IngestResult(NamedTuple):
    stored: int  # records new to the backend
    duplicates: int  # records it already had


class Backend(Protocol):
    hub: Hub  # records ingested through this collector, live (the OTLP feed reads it)

    def ingest(self, items: Items) -> IngestResult:
        """Store a checked batch; return only once it is durable. Raises
        BackendUnavailable or RecordRejected."""

    def subscribe(
        self, flt: RecordFilter, request: pb.SubscribeRequest, active: Active
    ) -> Iterator[pb.SubscribeResponse]:
        """Register the subscription now (BackendUnavailable if it cannot be), and
        return the iterator of what it sends: replay, ReplayDone, live, Lagged."""

    def maintain(self) -> str | None:
        """Periodic upkeep (retention); a line worth logging, or None."""

    def stats(self) -> dict[str, int]: ...

    def describe(self) -> str: ...

    def close(self) -> None:
        """Stop: wake live subscribers, release the store or connection."""


class LocalBackend:
    """SQLite store + in-process hub: exactly the collector's single-box behaviour."""

    def __init__(self, store: RecordStore, hub: Hub, subscriber_queue: int = 10_000) -> None:
        self.store = store
        self.hub = hub
        self.subscriber_queue = subscriber_queue
        # Insert and publish happen together so live subscribers see records in
        # store (cursor) order; the store serializes writers anyway.
        self._ingest_lock = threading.Lock()

    def describe(self) -> str:
        return f"store {self.store.path}"

    def ingest(self, items: Items) -> IngestResult:
        with self._ingest_lock:
            result = self.store.insert(items)
            self.hub.publish(result.new_items)
        return IngestResult(result.stored, result.duplicates)

    def subscribe(
        self, flt: RecordFilter, request: pb.SubscribeRequest, active: Active
    ) -> Iterator[pb.SubscribeResponse]:
        live = request.live or not request.replay  # asking for neither means "live"
        # Register for live records before replaying, so nothing stored during
        # the replay is missed; the rowid high-water mark drops the overlap.
        try:
            sub = self.hub.subscribe(flt, self.subscriber_queue) if live else None
        except SubscriptionClosed:
            raise BackendUnavailable("the collector is shutting down") from None
        return self._stream(flt, request, sub, active)

    def _stream(
        self,
        flt: RecordFilter,
        request: pb.SubscribeRequest,
        sub: Subscription | None,
        active: Active,
    ) -> Iterator[pb.SubscribeResponse]:
        try:
            last_rowid = request.after_cursor
            if request.replay:
                replayed = 0
                for batch in self._replay(flt, last_rowid, active):
                    last_rowid = batch.cursor
                    replayed += len(batch.records)
                    yield pb.SubscribeResponse(records=batch)
                yield pb.SubscribeResponse(replay_done=pb.ReplayDone(replayed=replayed))
            if sub is not None:
                sub.skip_through(last_rowid)  # their live copies are not sent again
                yield from self._live(sub, active)
        finally:
            if sub is not None:
                sub.close()

    def _replay(self, flt: RecordFilter, after: int, active: Active) -> Iterator[pb.RecordBatch]:
        while active():
            rows = self.store.query(flt, after_rowid=after, limit=REPLAY_PAGE)
            if not rows:
                return
            after = rows[-1][0]
            yield batch_from_wire([wire for _, wire in rows], after)

    def _live(self, sub: Subscription, active: Active) -> Iterator[pb.SubscribeResponse]:
        while active():
            try:
                got = sub.next_batch(timeout=POLL_SECONDS, max_items=LIVE_BATCH)
            except SubscriptionClosed:
                return  # the collector is shutting down
            if got is None:
                continue
            if isinstance(got, Lagged):
                yield lagged_response(got.missed, got.first_ts_ns, got.last_ts_ns)
                continue
            yield pb.SubscribeResponse(
                records=batch_from_wire([item.wire for item in got], got[-1].rowid)
            )

    def maintain(self) -> str | None:
        pruned = self.store.prune()
        return f"retention: removed {pruned} old records" if pruned else None

    def stats(self) -> dict[str, int]:
        return self.store.stats()

    def close(self) -> None:
        self.hub.close()
        self.store.close()


def lagged_response(missed: int, first_ts_ns: int, last_ts_ns: int) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(
        lagged=pb.Lagged(
            missed=missed, first_missed_ts_ns=first_ts_ns, last_missed_ts_ns=last_ts_ns
        )
    )


def batch_from_wire(wires: list[bytes], cursor: int = 0) -> pb.RecordBatch:
    """A RecordBatch from serialized Records, parsed in one call."""
    batch = pb.RecordBatch.FromString(encode_record_batch(wires))
    batch.cursor = cursor
    return batch
