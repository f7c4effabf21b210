"""The Collector gRPC service: Ingest from agents, Subscribe for consumers.

A thin shell over a backend (agent/collector/backend.py: the SQLite store and live
fan-out hub, or NATS JetStream): this module only speaks gRPC - it checks what
arrives, turns errors into gRPC status codes, and streams what goes out. A backend
that cannot store or serve now (NATS unreachable) makes the call UNAVAILABLE (the
agent spools and retries), counted in `ingest_unavailable`/`subscribe_unavailable`.

Roles (agent/collector/identity.py): a caller with a client certificate must carry a
tlscap identity. `tlscap://agent/<node>` may only Ingest, and only records of <node>;
`tlscap://agent/*` may Ingest records of any node;
`tlscap://consumer/<name>` may only Subscribe, within the policy
(agent/collector/policy.py). A caller without a certificate (no mutual TLS) may Ingest
as before, and Subscribe only if the collector allows anonymous subscribers. Every
refusal is PERMISSION_DENIED, counted in `refusals` and logged once per caller and
reason. Health and reflection are separate services and stay open.

With a TokenReviewer (`--token-review`, agent/collector/tokens.py) Ingest identifies
agents by their ServiceAccount token (`authorization: Bearer <token>` metadata):
- a valid agent token is `tlscap://agent/<its node>`. With a certificate as well, the
  certificate must be `tlscap://agent/*` (then the token decides the node) or name the
  same node; a consumer certificate never Ingests;
- no token: only a per-node certificate (`tlscap://agent/<node>`) may Ingest; the
  shared `tlscap://agent/*` and anonymous callers are refused (UNAUTHENTICATED);
- a token the API server does not accept: UNAUTHENTICATED; a valid token of another
  ServiceAccount or without a node name: PERMISSION_DENIED; the API server not
  answering: UNAVAILABLE (the agent retries). All counted in `refusals`;
- a stream lives no longer than the token it was opened with: past its expiry the
  next batch ends the stream with UNAUTHENTICATED and the agent reconnects with the
  kubelet's fresh token.
Subscribe never looks at tokens except to refuse a caller that sends one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from agent.certs.identity import ANY_NODE
from agent.collector.backend import Backend, BackendUnavailable, RecordRejected
from agent.collector.identity import Caller, RefusalCounters, caller_from_auth_context
from agent.collector.policy import ANY_CONSUMER, Policy, PolicyDenied
from agent.collector.tokens import TokenReviewer, TokenReviewUnavailable, bearer_token
from agent.records.filter import RecordFilter
from agent.records.record import Record
from agent.schema import pb, pb_grpc
from agent.schema.convert import SchemaError, filter_from_pb, from_pb

log = logging.getLogger(__name__)


class CollectorService(pb_grpc.CollectorServicer):
    def __init__(
        self,
        backend: Backend,
        *,
        policy: Policy | None = None,
        allow_anonymous_subscribe: bool = False,
        token_reviewer: TokenReviewer | None = None,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.allow_anonymous_subscribe = allow_anonymous_subscribe
        self.token_reviewer = token_reviewer
        self.refusals = RefusalCounters()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.counters = {
            "ingest_streams": 0,
            "ingest_batches": 0,
            "ingest_rejected": 0,
            "ingest_unavailable": 0,
            "subscribers": 0,
            "subscribe_unavailable": 0,
        }

    def _count(self, key: str, delta: int = 1) -> None:
        with self._lock:
            self.counters[key] += delta

    # -- Who is calling -------------------------------------------------------------------

    def _refuse(
        self,
        context: grpc.ServicerContext,
        caller: Caller,
        reason: str,
        detail: str,
        code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED,
    ) -> None:
        """Count, log (once per caller and reason), abort with `code`."""
        self.refusals.count(reason)
        who = caller.fingerprint or caller.describe()
        if self.refusals.first_time(f"{reason}|{who}|{detail}"):
            log.warning("refused %s from %s: %s", caller.describe(), context.peer(), detail)
        else:
            log.debug("refused %s from %s: %s", caller.describe(), context.peer(), detail)
        context.abort(code, detail)

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

    def _agent_caller(self, context: grpc.ServicerContext) -> Caller:
        """Who may Ingest here: the certificate's agent identity, or the token's."""
        caller = self._caller(context)
        if caller.identity is not None and caller.identity.role != "agent":
            self._refuse(
                context, caller, "refused_role", f"{caller.identity} may not Ingest (agents only)"
            )
        if self.token_reviewer is None:
            return caller
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        token = bearer_token(context.invocation_metadata())
        if token is None:
            if caller.identity is not None and caller.identity.name != ANY_NODE:
                return caller  # a per-node certificate names its node by itself
            self._refuse(
                context,
                caller,
                "refused_token",
                "this collector identifies agents by their ServiceAccount token: send the "
                "projected token (tlscap run --collector-token-file); "
                + (
                    f"{caller.identity} alone names no node"
                    if caller.identity is not None
                    else "anonymous callers may not Ingest"
                ),
                unauthenticated,
            )
        if not token:
            self._refuse(
                context,
                caller,
                "refused_token",
                "malformed authorization metadata: expected 'Bearer <token>'",
                unauthenticated,
            )
        try:
            verdict = self.token_reviewer.review(token)
        except TokenReviewUnavailable as exc:
            self.refusals.count("token_review_unavailable")
            message = str(exc)
            level = (
                logging.ERROR
                if self.refusals.first_time(f"unavailable|{message}")
                else logging.DEBUG
            )
            log.log(level, "cannot review the token of %s: %s", context.peer(), message)
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the collector cannot check agent tokens now ({message}); retry later",
            )
        if verdict.identity is None:
            if verdict.unauthenticated:
                self._refuse(context, caller, "refused_token", verdict.error, unauthenticated)
            self._refuse(context, caller, "refused_token_identity", verdict.error)
        if caller.identity is not None and caller.identity.name not in (
            ANY_NODE,
            verdict.identity.name,
        ):
            self._refuse(
                context,
                caller,
                "refused_token_identity",
                f"the certificate is {caller.identity} but the token is of node "
                f"{verdict.identity.name!r}: they must agree",
            )
        return Caller(
            verdict.identity,
            caller.certificate,
            caller.subject,
            caller.fingerprint,
            via_token=True,
            expires_at=verdict.expires_at,
        )

    # -- Ingest ---------------------------------------------------------------------------

    def Ingest(
        self, request_iterator: Iterator[pb.IngestBatch], context: grpc.ServicerContext
    ) -> Iterator[pb.IngestAck]:
        caller = self._agent_caller(context)
        peer = context.peer()
        self._count("ingest_streams")
        log.info("agent connected: %s (%s)", peer, caller.describe())
        try:
            for batch in request_iterator:
                if caller.expires_at is not None and time.time() >= caller.expires_at:
                    # The agent reconnects with the token the kubelet rotated in.
                    log.info(
                        "agent %s (%s): token expired, ending its stream", peer, caller.describe()
                    )
                    context.abort(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "the token this stream was opened with has expired; reconnect with "
                        "the current one",
                    )
                items = self._checked_items(batch, context, peer, caller)
                try:
                    result = self.backend.ingest(items)
                except BackendUnavailable as exc:
                    self._count("ingest_unavailable")
                    log.warning("cannot store a batch from %s: %s", peer, exc)
                    context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"the record store is unavailable: {exc}"
                    )
                except RecordRejected as exc:
                    self._count("ingest_rejected")
                    detail = f"batch {batch.batch_id}: {exc}"
                    log.warning("rejecting a batch from %s: %s", peer, detail)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)
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
        if self.token_reviewer is not None and bearer_token(context.invocation_metadata()):
            self._refuse(
                context,
                caller,
                "refused_role",
                "an agent token may only Ingest; Subscribe takes a consumer certificate "
                "(tlscap://consumer/<name>)",
            )
        try:
            flt = filter_from_pb(request.filter)
        except SchemaError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad filter: {exc}")
        flt = self._allowed_filter(flt, caller, context)
        peer = context.peer()
        try:
            events = self.backend.subscribe(flt, request, self._active(context))
        except BackendUnavailable as exc:
            self._count("subscribe_unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        self._count("subscribers")
        log.info(
            "subscriber connected: %s (%s, replay=%s, live=%s)",
            peer,
            caller.describe(),
            request.replay,
            request.live or not request.replay,
        )
        try:
            yield from events
        except BackendUnavailable as exc:
            self._count("subscribe_unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            events.close()
            self._count("subscribers", -1)
            log.info("subscriber disconnected: %s", peer)

    def _active(self, context: grpc.ServicerContext):
        stopping = self.stopping
        return lambda: context.is_active() and not stopping.is_set()

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
