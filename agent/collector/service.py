"""The Collector gRPC service: Ingest from agents, Subscribe for consumers.

A thin shell over the store (agent/collector/store.py) and the live fan-out
hub (agent/collector/fanout.py): this module only speaks gRPC - it checks what
arrives, turns errors into gRPC status codes, and streams what goes out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc

from agent.collector.fanout import Hub, Lagged, Subscription, SubscriptionClosed
from agent.collector.store import RecordStore
from agent.records.filter import RecordFilter
from agent.records.record import Record
from agent.schema import pb, pb_grpc
from agent.schema.convert import SchemaError, filter_from_pb, from_pb
from agent.schema.wire import encode_record_batch

log = logging.getLogger(__name__)

REPLAY_PAGE = 1000  # stored records per replay query / per RecordBatch
LIVE_BATCH = 500  # live records per RecordBatch at most
POLL_SECONDS = 0.5  # how often a waiting live stream checks that its client is still there


class CollectorService(pb_grpc.CollectorServicer):
    def __init__(self, store: RecordStore, hub: Hub, subscriber_queue: int = 10_000) -> None:
        self.store = store
        self.hub = hub
        self.subscriber_queue = subscriber_queue
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        # Insert and publish happen together so live subscribers see records in
        # store (cursor) order; the store serializes writers anyway.
        self._ingest_lock = threading.Lock()
        self.counters = {
            "ingest_streams": 0,
            "ingest_batches": 0,
            "ingest_rejected": 0,
            "subscribers": 0,
        }

    def _count(self, key: str, delta: int = 1) -> None:
        with self._lock:
            self.counters[key] += delta

    # -- Ingest ---------------------------------------------------------------------------

    def Ingest(
        self, request_iterator: Iterator[pb.IngestBatch], context: grpc.ServicerContext
    ) -> Iterator[pb.IngestAck]:
        peer = context.peer()
        self._count("ingest_streams")
        log.info("agent connected: %s", peer)
        try:
            for batch in request_iterator:
                items = self._checked_items(batch, context, peer)
                with self._ingest_lock:
                    result = self.store.insert(items)
                    self.hub.publish(result.new_items)
                self._count("ingest_batches")
                yield pb.IngestAck(
                    batch_id=batch.batch_id, stored=result.stored, duplicates=result.duplicates
                )
        finally:
            self._count("ingest_streams", -1)
            log.info("agent disconnected: %s", peer)

    def _checked_items(
        self, batch: pb.IngestBatch, context: grpc.ServicerContext, peer: str
    ) -> list[tuple[Record, bytes]]:
        items = []
        for i, msg in enumerate(batch.records):
            try:
                record = from_pb(msg)
                if not record.agent_id or record.seq == 0:
                    raise SchemaError("record without agent_id/seq (its identity)")
            except SchemaError as exc:
                self._count("ingest_rejected")
                detail = f"batch {batch.batch_id}, record {i}: {exc}"
                log.warning("rejecting a batch from %s: %s", peer, detail)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)
            items.append((record, msg.SerializeToString()))
        return items

    # -- Subscribe ------------------------------------------------------------------------

    def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SubscribeResponse]:
        try:
            flt = filter_from_pb(request.filter)
        except SchemaError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad filter: {exc}")
        live = request.live or not request.replay  # asking for neither means "live"
        peer = context.peer()
        # Register for live records before replaying, so nothing stored during
        # the replay is missed; the rowid high-water mark drops the overlap.
        try:
            sub = self.hub.subscribe(flt, self.subscriber_queue) if live else None
        except SubscriptionClosed:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the collector is shutting down")
        self._count("subscribers")
        log.info("subscriber connected: %s (replay=%s, live=%s)", peer, request.replay, live)
        try:
            last_rowid = request.after_cursor
            if request.replay:
                replayed = 0
                for batch in self._replay(flt, last_rowid, context):
                    last_rowid = batch.cursor
                    replayed += len(batch.records)
                    yield pb.SubscribeResponse(records=batch)
                yield pb.SubscribeResponse(replay_done=pb.ReplayDone(replayed=replayed))
            if sub is not None:
                sub.skip_through(last_rowid)  # their live copies are not sent again
                yield from self._live(sub, context)
        finally:
            if sub is not None:
                sub.close()
            self._count("subscribers", -1)
            log.info("subscriber disconnected: %s", peer)

    def _replay(
        self, flt: RecordFilter, after: int, context: grpc.ServicerContext
    ) -> Iterator[pb.RecordBatch]:
        while context.is_active() and not self.stopping.is_set():
            rows = self.store.query(flt, after_rowid=after, limit=REPLAY_PAGE)
            if not rows:
                return
            after = rows[-1][0]
            yield batch_from_wire([wire for _, wire in rows], after)

    def _live(
        self, sub: Subscription, context: grpc.ServicerContext
    ) -> Iterator[pb.SubscribeResponse]:
        while context.is_active() and not self.stopping.is_set():
            try:
                got = sub.next_batch(timeout=POLL_SECONDS, max_items=LIVE_BATCH)
            except SubscriptionClosed:
                return  # the collector is shutting down
            if got is None:
                continue
            if isinstance(got, Lagged):
                yield pb.SubscribeResponse(
                    lagged=pb.Lagged(
                        missed=got.missed,
                        first_missed_ts_ns=got.first_ts_ns,
                        last_missed_ts_ns=got.last_ts_ns,
                    )
                )
                continue
            yield pb.SubscribeResponse(
                records=batch_from_wire([item.wire for item in got], got[-1].rowid)
            )


def batch_from_wire(wires: list[bytes], cursor: int = 0) -> pb.RecordBatch:
    """A RecordBatch from serialized Records, parsed in one call."""
    batch = pb.RecordBatch.FromString(encode_record_batch(wires))
    batch.cursor = cursor
    return batch
