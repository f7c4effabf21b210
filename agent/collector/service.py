"""The Collector gRPC service: Ingest from agents, Subscribe for consumers.

A thin shell over the store (agent/collector/store.py) and the live fan-out
hub (agent/collector/fanout.py): this module only speaks gRPC - it checks what
arrives, turns errors into gRPC status codes, and streams what goes out.

Roles (agent/collector/identity.py): a caller with a client certificate must carry a
tlscap identity. `tlscap://agent/<node>` may only Ingest, and only records of <node>;
`tlscap://agent/*` may Ingest records of any node;
`tlscap://consumer/<name>` may only Subscribe, within the policy
(agent/collector/policy.py). A caller without a certificate (no mutual TLS) may Ingest
as before, and Subscribe only if the collector allows anonymous subscribers. Every
refusal is PERMISSION_DENIED, counted in `refusals` and logged once per caller and
reason. Health and reflection are separate services and stay open.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc

from agent.certs.identity import ANY_NODE
from agent.collector.fanout import Hub, Lagged, Subscription, SubscriptionClosed
from agent.collector.identity import Caller, RefusalCounters, caller_from_auth_context
from agent.collector.policy import ANY_CONSUMER, Policy, PolicyDenied
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
    def __init__(
        self,
        store: RecordStore,
        hub: Hub,
        subscriber_queue: int = 10_000,
        *,
        policy: Policy | None = None,
        allow_anonymous_subscribe: bool = False,
    ) -> None:
        self.store = store
        self.hub = hub
        self.subscriber_queue = subscriber_queue
        self.policy = policy
        self.allow_anonymous_subscribe = allow_anonymous_subscribe
        self.refusals = RefusalCounters()
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

    # -- Who is calling -------------------------------------------------------------------

    def _refuse(
        self, context: grpc.ServicerContext, caller: Caller, reason: str, detail: str
    ) -> None:
        """Count, log (once per caller and reason), abort with PERMISSION_DENIED."""
        self.refusals.count(reason)
        who = caller.fingerprint or caller.describe()
        if self.refusals.first_time(f"{reason}|{who}|{detail}"):
            log.warning("refused %s from %s: %s", caller.describe(), context.peer(), detail)
        else:
            log.debug("refused %s from %s: %s", caller.describe(), context.peer(), detail)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, detail)

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        caller = caller_from_auth_context(context.auth_context())
        if caller.certificate and caller.identity is None:
            self._refuse(
                context,
                caller,
                "refused_no_identity",
                f"client certificate {caller.subject!r}: {caller.error}; it needs one URI SAN "
                "tlscap://agent/<node> or tlscap://consumer/<name> (tlscap certs issues them)",
            )
        return caller

    # -- Ingest ---------------------------------------------------------------------------

    def Ingest(
        self, request_iterator: Iterator[pb.IngestBatch], context: grpc.ServicerContext
    ) -> Iterator[pb.IngestAck]:
        caller = self._caller(context)
        if caller.identity is not None and caller.identity.role != "agent":
            self._refuse(
                context, caller, "refused_role", f"{caller.identity} may not Ingest (agents only)"
            )
        peer = context.peer()
        self._count("ingest_streams")
        log.info("agent connected: %s (%s)", peer, caller.describe())
        try:
            for batch in request_iterator:
                items = self._checked_items(batch, context, peer, caller)
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
        self, batch: pb.IngestBatch, context: grpc.ServicerContext, peer: str, caller: Caller
    ) -> list[tuple[Record, bytes]]:
        node = caller.identity.name if caller.identity is not None else None
        if node == ANY_NODE:
            node = None  # tlscap://agent/*: an agent not bound to one node
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
            if node is not None and record.node != node:
                self._refuse(
                    context,
                    caller,
                    "refused_foreign_node",
                    f"batch {batch.batch_id}, record {i} (agent_id {record.agent_id!r}, "
                    f"seq {record.seq}): node {record.node!r} is not this agent's node {node!r}",
                )
            items.append((record, msg.SerializeToString()))
        return items

    # -- Subscribe ------------------------------------------------------------------------

    def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SubscribeResponse]:
        caller = self._caller(context)
        try:
            flt = filter_from_pb(request.filter)
        except SchemaError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad filter: {exc}")
        flt = self._allowed_filter(flt, caller, context)
        live = request.live or not request.replay  # asking for neither means "live"
        peer = context.peer()
        # Register for live records before replaying, so nothing stored during
        # the replay is missed; the rowid high-water mark drops the overlap.
        try:
            sub = self.hub.subscribe(flt, self.subscriber_queue) if live else None
        except SubscriptionClosed:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the collector is shutting down")
        self._count("subscribers")
        log.info(
            "subscriber connected: %s (%s, replay=%s, live=%s)",
            peer,
            caller.describe(),
            request.replay,
            live,
        )
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

    def _allowed_filter(
        self, flt: RecordFilter, caller: Caller, context: grpc.ServicerContext
    ) -> RecordFilter:
        """`flt` narrowed to what the caller may read, or the call refused."""
        if caller.identity is None:
            if not self.allow_anonymous_subscribe:
                self._refuse(
                    context,
                    caller,
                    "refused_anonymous",
                    "Subscribe needs a consumer certificate (tlscap://consumer/<name>, mutual "
                    "TLS); this collector does not allow anonymous subscribers",
                )
            name = ANY_CONSUMER  # allowed anonymous readers get the policy's "*" rule
        elif caller.identity.role != "consumer":
            self._refuse(
                context,
                caller,
                "refused_role",
                f"{caller.identity} may not Subscribe (consumers only)",
            )
            return flt  # not reached: abort raised
        else:
            name = caller.identity.name
        if self.policy is None:
            return flt
        try:
            return self.policy.restrict(name, flt)
        except PolicyDenied as exc:
            self._refuse(context, caller, "refused_policy", str(exc))
            return flt  # not reached

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
