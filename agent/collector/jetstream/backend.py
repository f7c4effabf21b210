"""The collector's NATS JetStream backend: a stateless gateway in front of a stream.

Ingest: every record of a checked batch is published (its protobuf Record bytes, on
its subject, with `Nats-Msg-Id: <agent_id>:<seq>`) concurrently, and the batch is
acknowledged to the agent only once JetStream has acknowledged every publish. Any
failure (NATS unreachable, no stream leader, a timeout) fails the whole batch: the
service answers UNAVAILABLE, the agent spools and re-sends it, and JetStream drops
the copies it already has within the stream's duplicate window.

Subscribe: one ordered consumer per subscriber (ephemeral, in memory, no acks) on the
subjects the filter can be narrowed to (subjects.py); the collector applies the whole
filter to what arrives. Cursors are stream sequences. nats-py re-creates an ordered
consumer from the last delivered sequence when it sees a gap or misses heartbeats
(its NATS server died), so a subscriber sees every record once, in stream order.

nats-py is asyncio: one event loop runs on a thread of its own and gRPC's worker
threads hand it coroutines (`_call`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.js import api

from agent.collector.backend import (
    LIVE_BATCH,
    POLL_SECONDS,
    Active,
    BackendUnavailable,
    IngestResult,
    Items,
    RecordRejected,
    batch_from_wire,
    lagged_response,
)
from agent.collector.fanout import Hub
from agent.collector.jetstream.config import NatsConfig
from agent.collector.jetstream.subjects import filter_subjects, msg_id, subject_for
from agent.collector.store import StoredItem
from agent.records.filter import RecordFilter
from agent.schema import pb
from agent.schema.convert import SchemaError, from_pb

log = logging.getLogger(__name__)

# How long stream setup waits out a JetStream cluster that is still forming.
STREAM_SETUP_SECONDS = 30.0
# JetStream's error codes for "the cluster cannot place this yet": no suitable peers
# (10005), JetStream temporarily unavailable (10008).
_FORMING_CODES = frozenset({10005, 10008})

T = TypeVar("T")

HEARTBEAT_SECONDS = 2.0  # ordered consumers re-create themselves after two missed ones
# Headers and protocol overhead a record's payload must leave room for.
HEADER_ROOM = 512
SUBSCRIBER_PENDING_BYTES = 64 << 20


class BackendError(Exception):
    """The backend cannot start (NATS unreachable, stream refused); one-line message."""


class JetStreamBackend:
    def __init__(self, config: NatsConfig, subscriber_queue: int = 10_000) -> None:
        self.config = config.check()
        self.subscriber_queue = subscriber_queue
        self.hub = Hub()
        self._lock = threading.Lock()
        self.counters = {
            "nats_published": 0,  # records JetStream stored (acked, not duplicates)
            "nats_duplicates": 0,  # publishes JetStream acked as duplicates
            "nats_publish_failures": 0,  # records whose publish failed (batch nacked)
            "nats_disconnects": 0,
            "nats_consumers": 0,  # live Subscribe consumers now
            "nats_consumers_total": 0,
            "nats_undecodable": 0,  # stream messages that are no tlscap Record
        }
        self._stream_state: dict[str, int] = {}
        self._last_report: dict[str, int] = {}
        self._closing = False
        self._nc: Any = None
        self._last_error = ""
        self._js: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats", daemon=True)
        self._thread.start()
        try:
            budget = config.connect_timeout * (len(config.servers) + 1) + 5
            self._call(self._connect(), budget)
            self._call(self._ensure_stream(), STREAM_SETUP_SECONDS + 10)
            self.maintain()  # the stream's state now: what it had dropped before we started
        except BackendUnavailable as exc:
            self.close()
            raise BackendError(f"NATS {','.join(config.servers)}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return self.config.describe()

    # -- plumbing -------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the NATS loop and wait for it (BackendUnavailable on timeout)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BackendUnavailable(f"no answer from NATS within {timeout:.0f}s") from None

    def _count(self, key: str, delta: int = 1) -> None:
        with self._lock:
            self.counters[key] += delta

    async def _connect(self) -> None:
        c = self.config
        options: dict[str, Any] = {}
        if c.creds_file is not None:
            options["user_credentials"] = str(c.creds_file)
        # nats-py retries forever once told to reconnect forever, the first connection
        # too: bound that one, so an unreachable NATS is a clear error at startup.
        budget = c.connect_timeout * (len(c.servers) + 1)
        try:
            connecting = nats.connect(
                servers=list(c.servers),
                name="tlscap-collector",
                tls=c.ssl_context(),
                connect_timeout=c.connect_timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,  # a collector outlives any NATS outage
                reconnect_time_wait=1,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                **options,
            )
            self._nc = await asyncio.wait_for(connecting, budget)
        except Exception as exc:
            why = _describe(exc)
            if isinstance(exc, asyncio.TimeoutError) and self._last_error:
                why = f"none answered within {budget:.0f}s (last error: {self._last_error})"
            raise BackendError(f"cannot connect to NATS at {','.join(c.servers)}: {why}") from None
        self._js = self._nc.jetstream(timeout=c.publish_timeout)

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = _describe(exc)
        if self._nc is None:
            log.debug("NATS: %s", self._last_error)  # still connecting: reported at the end
        elif isinstance(exc, nats.errors.SlowConsumerError):
            log.debug("NATS: %s", exc)  # an ordered consumer re-creates itself
        else:
            log.warning("NATS: %s", _describe(exc))

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self._count("nats_disconnects")
            log.warning("disconnected from NATS; reconnecting (Ingest is UNAVAILABLE meanwhile)")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", self._nc.connected_url.netloc)

    # -- the stream -----------------------------------------------------------------------

    def _wanted(self) -> dict[str, Any]:
        c = self.config
        return {
            "subjects": [f"{c.subject_prefix}.>"],
            "num_replicas": c.replicas,
            "max_age": c.max_age or 0.0,
            "max_bytes": c.max_bytes or -1,
            "max_msgs": c.max_msgs or -1,
            "duplicate_window": c.effective_dedup_window,
        }

    async def _ensure_stream(self) -> None:
        """Create the stream, or bring an existing one to the configured limits."""
        c = self.config
        jsm = self._js
        want = self._wanted()
        try:
            info = await jsm.stream_info(c.stream)
        except nats.js.errors.NotFoundError:
            info = None
        except Exception as exc:
            raise BackendError(
                f"cannot look up stream {c.stream} (is JetStream enabled on the servers?): "
                f"{_describe(exc)}"
            ) from None
        if info is None:
            config = api.StreamConfig(
                name=c.stream,
                description="tlscap records (docs/nats.md)",
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                discard=api.DiscardPolicy.OLD,
                **want,
            )
            await _while_cluster_forms(
                lambda: jsm.add_stream(config), f"cannot create stream {c.stream}"
            )
            log.info("created JetStream stream %s (%s)", c.stream, _limits(want))
            return
        have = info.config
        if have.storage not in (api.StorageType.FILE, "file"):
            raise BackendError(
                f"stream {c.stream} exists with {have.storage} storage; tlscap keeps records "
                "on file storage: delete it or choose another --stream"
            )
        if want["subjects"][0] not in (have.subjects or []):
            raise BackendError(
                f"stream {c.stream} exists with subjects {have.subjects}, not "
                f"{want['subjects'][0]}: it is not tlscap's; choose another --stream"
            )
        changed = {
            key: (getattr(have, key), value)
            for key, value in want.items()
            if key != "subjects" and not _same(getattr(have, key), value)
        }
        if not changed:
            log.info("using JetStream stream %s (%s)", c.stream, _limits(want))
            return
        log.warning(
            "stream %s differs from this collector's settings; updating it: %s",
            c.stream,
            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()),
        )
        try:
            await jsm.update_stream(replace(have, **{k: v for k, (_, v) in changed.items()}))
        except Exception as exc:
            raise BackendError(
                f"stream {c.stream} has other settings ({', '.join(changed)}) and cannot be "
                f"updated: {_describe(exc)}; fix the flags or the stream"
            ) from None

    # -- Ingest ---------------------------------------------------------------------------

    def ingest(self, items: Items) -> IngestResult:
        if not items:
            return IngestResult(0, 0)
        nc = self._nc
        if self._closing or nc is None or not nc.is_connected:
            self._count("nats_publish_failures", len(items))
            raise BackendUnavailable("not connected to NATS")
        limit = nc.max_payload - HEADER_ROOM
        prefix = self.config.subject_prefix
        messages = []
        for record, wire in items:
            if len(wire) > limit:
                raise RecordRejected(
                    f"record {record.agent_id}:{record.seq} is {len(wire)} bytes, more than "
                    f"NATS max_payload ({nc.max_payload}) allows; raise max_payload on the "
                    "NATS servers"
                )
            mid = msg_id(record.agent_id, record.seq)
            messages.append((subject_for(record, prefix), wire, mid))
        timeout = self.config.publish_timeout
        try:
            acks = self._call(self._publish(messages, timeout), timeout + 5)
        except BackendUnavailable:
            self._count("nats_publish_failures", len(items))
            raise
        failed = [a for a in acks if isinstance(a, BaseException)]
        stored = [
            StoredItem(ack.seq, record, wire)
            for ack, (record, wire) in zip(acks, items, strict=True)
            if not isinstance(ack, BaseException) and not ack.duplicate
        ]
        duplicates = len(items) - len(failed) - len(stored)
        with self._lock:
            self.counters["nats_published"] += len(stored)
            self.counters["nats_duplicates"] += duplicates
            self.counters["nats_publish_failures"] += len(failed)
        if failed:
            # Those that did land are duplicates when the agent re-sends the batch.
            raise BackendUnavailable(
                f"{len(failed)} of {len(items)} publishes failed: {_describe(failed[0])}"
            )
        stored.sort(key=lambda item: item.rowid)
        self.hub.publish(stored)
        return IngestResult(len(stored), duplicates)

    async def _publish(
        self, messages: list[tuple[str, bytes, str]], timeout: float
    ) -> list[api.PubAck | BaseException]:
        js, stream = self._js, self.config.stream
        return await asyncio.gather(
            *(
                js.publish(
                    subject, wire, timeout=timeout, stream=stream, headers={"Nats-Msg-Id": mid}
                )
                for subject, wire, mid in messages
            ),
            return_exceptions=True,
        )

    # -- Subscribe ------------------------------------------------------------------------

    def subscribe(
        self, flt: RecordFilter, request: pb.SubscribeRequest, active: Active
    ) -> Iterator[pb.SubscribeResponse]:
        if self._closing:
            raise BackendUnavailable("the collector is shutting down")
        replay = request.replay
        live = request.live or not replay
        start_seq = start_time = None
        if not replay:
            policy = api.DeliverPolicy.NEW
        elif request.after_cursor:
            policy, start_seq = api.DeliverPolicy.BY_START_SEQUENCE, request.after_cursor + 1
        elif flt.since_ns:
            policy = api.DeliverPolicy.BY_START_TIME
            start_time = datetime.datetime.fromtimestamp(
                max(0.0, flt.since_ns / 1e9 - self.config.replay_clock_skew), tz=datetime.UTC
            )
        else:
            policy = api.DeliverPolicy.ALL
        subjects = filter_subjects(flt, self.config.subject_prefix)
        try:
            sub, pending, lost = self._call(
                self._open(subjects, policy, start_seq, start_time), 15.0
            )
        except BackendUnavailable:
            raise
        except Exception as exc:
            raise BackendUnavailable(f"cannot create a consumer: {_describe(exc)}") from None
        self._count("nats_consumers")
        self._count("nats_consumers_total")
        return self._stream(sub, flt, replay, live, pending, lost, active)

    async def _open(
        self,
        subjects: list[str],
        policy: api.DeliverPolicy,
        start_seq: int | None,
        start_time: datetime.datetime | None,
    ) -> tuple[Any, int, int]:
        config = api.ConsumerConfig(
            deliver_policy=policy,
            opt_start_seq=start_seq,
            opt_start_time=start_time,
            filter_subjects=subjects if len(subjects) > 1 else None,
            description="tlscap collector Subscribe",
        )
        sub = await self._js.subscribe(
            subjects[0],
            stream=self.config.stream,
            ordered_consumer=True,
            config=config,
            idle_heartbeat=HEARTBEAT_SECONDS,
            pending_msgs_limit=max(1000, self.subscriber_queue),
            pending_bytes_limit=SUBSCRIBER_PENDING_BYTES,
        )
        try:
            info = await sub.consumer_info()
            # Messages may already be on their way (delivered counts them): then their
            # own num_pending says when the replay is over.
            pending = info.num_pending + (info.delivered.consumer_seq if info.delivered else 0)
            lost = 0
            if start_seq is not None:
                # Resuming from a cursor the stream's limits have already removed.
                state = (await self._js.stream_info(self.config.stream)).state
                first = min(state.first_seq, state.last_seq + 1)
                lost = max(0, first - start_seq)
        except BaseException:
            await _quietly(sub.unsubscribe())
            raise
        return sub, pending, lost

    def _stream(
        self,
        sub: Any,
        flt: RecordFilter,
        replay: bool,
        live: bool,
        pending: int,
        lost: int,
        active: Active,
    ) -> Iterator[pb.SubscribeResponse]:
        try:
            if lost:
                # Their times are unknown here (0): they are gone from the stream.
                yield lagged_response(lost, 0, 0)
            replayed = 0
            if replay and pending == 0:
                replay = False
                yield pb.SubscribeResponse(replay_done=pb.ReplayDone(replayed=0))
                if not live:
                    return
            last_seq = 0
            while active():
                try:
                    msgs = self._call(_next_messages(sub, LIVE_BATCH), POLL_SECONDS + 10)
                except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                    raise BackendUnavailable("the NATS connection closed") from None
                if not msgs:
                    continue
                wires = []
                for msg in msgs:
                    meta = msg.metadata
                    seq = meta.sequence.stream
                    if seq <= last_seq:
                        continue  # never twice, whatever a consumer reset re-delivers
                    last_seq, pending = seq, meta.num_pending
                    try:
                        record = from_pb(pb.Record.FromString(msg.data))
                    except (DecodeError, SchemaError):
                        self._count("nats_undecodable")
                        continue
                    if flt.matches(record):
                        wires.append(msg.data)
                if wires:
                    if replay:
                        replayed += len(wires)
                    yield pb.SubscribeResponse(records=batch_from_wire(wires, last_seq))
                if replay and pending == 0:
                    replay = False
                    yield pb.SubscribeResponse(replay_done=pb.ReplayDone(replayed=replayed))
                    if not live:
                        return
        finally:
            self._count("nats_consumers", -1)
            if not self._closing:
                # On a timeout the server drops the consumer itself: nobody listens.
                with contextlib.suppress(BackendUnavailable):
                    self._call(_quietly(sub.unsubscribe()), 5.0)

    # -- upkeep and stats -----------------------------------------------------------------

    def maintain(self) -> str | None:
        """Refresh the stream's state; a stats line when something changed."""
        try:
            info = self._call(self._js.stream_info(self.config.stream), 10.0)
        except Exception as exc:
            log.warning("cannot read stream %s: %s", self.config.stream, _describe(exc))
        else:
            state = info.state
            # Limits retention: what is gone from the head of the stream, the stream's
            # limits removed (a new stream has first_seq 0, an emptied one last_seq + 1).
            dropped = max(0, state.last_seq - state.messages - (state.num_deleted or 0))
            self._report_drops(dropped, state.messages, state.bytes)
            with self._lock:
                self._stream_state = {
                    "nats_stream_messages": state.messages,
                    "nats_stream_bytes": state.bytes,
                    "nats_stream_first_seq": state.first_seq,
                    "nats_stream_last_seq": state.last_seq,
                    "nats_stream_dropped": dropped,
                }
        now = self.stats()
        report = {k: v for k, v in now.items() if k != "nats_stream_first_seq"}
        if report == self._last_report:
            return None
        self._last_report = report
        return "jetstream: " + " ".join(f"{k.removeprefix('nats_')}={v}" for k, v in now.items())

    def _report_drops(self, dropped: int, messages: int, size: int) -> None:
        """Warn when a size or count limit made the stream drop records: it is full."""
        before = self._stream_state.get("nats_stream_dropped")
        if before is None or dropped <= before:
            return
        c = self.config
        full = (c.max_bytes and size >= 0.9 * c.max_bytes) or (
            c.max_msgs and messages >= 0.9 * c.max_msgs
        )
        if full:
            log.warning(
                "stream %s is full (%d records, %d bytes; --max-bytes %s, --max-records %s):"
                " its %d oldest records were dropped since the last check (%d in all)",
                c.stream,
                messages,
                size,
                c.max_bytes or "none",
                c.max_msgs or "none",
                dropped - before,
                dropped,
            )

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counters, **self._stream_state}

    def close(self) -> None:
        self._closing = True
        self.hub.close()
        if self._nc is not None and not self._nc.is_closed:
            try:
                self._call(self._nc.close(), 5.0)
            except Exception as exc:
                log.debug("closing the NATS connection: %s", exc)
        if self._loop.is_running():
            # Consumers' heartbeat and flow-control tasks outlive a closed connection.
            with contextlib.suppress(Exception):
                self._call(_cancel_tasks(), 5.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        if not self._loop.is_running():
            self._loop.close()


async def _next_messages(sub: Any, limit: int) -> list[Any]:
    """What the subscription holds, at most `limit`; waits up to POLL_SECONDS for one."""
    try:
        msgs = [await sub.next_msg(timeout=POLL_SECONDS)]
    except nats.errors.TimeoutError:
        return []
    while len(msgs) < limit and sub.pending_msgs:
        msgs.append(await sub.next_msg(timeout=None))
    return msgs


async def _cancel_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _quietly(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        await coro
    except Exception as exc:
        log.debug("ignored: %s", exc)


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(have, float):
        return abs(float(have or 0) - float(want or 0)) < 0.001
    return have == want


def _limits(want: dict[str, Any]) -> str:
    return (
        f"R{want['num_replicas']}, max_age {want['max_age'] or 'none'}s, max_bytes "
        f"{want['max_bytes']}, max_msgs {want['max_msgs']}, duplicate window "
        f"{want['duplicate_window']:.0f}s"
    )


async def _while_cluster_forms(attempt: Callable[[], Awaitable[Any]], failure: str) -> Any:
    """Run `attempt`, again while JetStream answers that its cluster is still forming.

    A collector often starts beside freshly started NATS servers (a Deployment next to
    a StatefulSet): each server is healthy before the meta group has heard from every
    peer, and replicated placement fails meanwhile ("no suitable peers", "temporarily
    unavailable"). Those answers are retried with a warning for STREAM_SETUP_SECONDS;
    anything else, or the same after that, is the BackendError the collector exits on.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STREAM_SETUP_SECONDS
    delay = 0.25
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not _cluster_forming(exc) or loop.time() + delay > deadline:
                raise BackendError(f"{failure}: {_describe(exc)}") from None
            log.warning("%s yet: %s; retrying in %.2fs", failure, _describe(exc), delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


def _cluster_forming(exc: BaseException) -> bool:
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in _FORMING_CODES


def _describe(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.APIError):
        return f"{exc.description or type(exc).__name__} (code {exc.code})"
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
