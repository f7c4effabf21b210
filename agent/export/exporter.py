"""The gRPC exporter: a sink that streams records to a tlscap collector, at least once.

Threads and who owns what:
- write() runs on the capture loop: it serializes the record and appends it to a
  bounded in-memory queue.  It never touches the network or the disk.
- One sender thread owns everything else: the Ingest stream, the window of
  unacknowledged batches, the spool, reconnecting.
- Per stream, a reader thread turns acks and the stream's end into events for the
  sender; gRPC's own thread pulls requests from a queue the sender fills.

Delivery: a batch is forgotten only when the collector acks it.  When the stream
fails (or an ack is late), unacked batches go to the disk spool and the sender
reconnects with backoff; while disconnected, queued records go to the spool too.
After reconnecting the spool is replayed oldest first, and new records go through
the spool until it is empty, so the collector sees records roughly in order.
Re-sent batches make duplicates, which the collector drops on (agent_id, seq).
What is dropped -- queue full, spool full, disk error -- is counted in stats().

Identity: with a `token_file` every Ingest call carries `authorization: Bearer <token>`
(the pod's projected ServiceAccount token, read again for each new stream; the caller
must only use it over TLS). A collector that refuses this agent (UNAUTHENTICATED,
PERMISSION_DENIED: a bad token, a record of another node...) is not an outage but a
configuration problem: its message is logged once per change, counted
(export_refused), records keep going to the spool, and retries wait at least
`refused_retry` seconds. An UNAUTHENTICATED after the token file changed is the
collector ending a stream whose token expired: reconnect at once with the new token.

Failover: given several collectors (a CollectorTargets: several addresses, or a name
with several), the exporter stays on one until its stream fails as an outage
(connection refused or reset, UNAVAILABLE, a keepalive or ack timeout), then tries
the next one at once; only after a whole round of failures does it wait out the
backoff.  Nothing else changes: unacked batches go to the spool and are re-sent to
the new collector, whose stream (JetStream: Nats-Msg-Id agent_id:seq) drops what
the old one already stored.  Switching collectors and getting an ack is a failover
(export_failovers, logged).  Refusals and rejected batches do not move on: every
collector shares the configuration that caused them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from agent.export.backoff import Backoff
from agent.export.spool import Spool, SpoolCheckout, SpoolWriteError
from agent.export.targets import CollectorTargets, Endpoint
from agent.export.token import TokenFile
from agent.records.record import Record
from agent.schema import pb
from agent.schema.convert import to_pb
from agent.schema.wire import encode_ingest_batch, take_batch

log = logging.getLogger(__name__)

INGEST_METHOD = "/tlscap.v1.Collector/Ingest"
_CLOSE_RETRY = 0.5  # seconds between reconnect attempts while closing
# The collector refused this agent: not something a quick retry fixes.
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

# channel_factory() for one target; channel_factory(endpoint) for a CollectorTargets.
ChannelFactory = Callable[[], grpc.Channel] | Callable[[Endpoint], grpc.Channel]

# Channel options the exporter's channel factory should apply (they are not
# required: the exporter works with a default channel too).
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Detect a collector that vanished without a FIN while the stream is idle.
    # Servers reject pings more often than every 5 min by default (GOAWAY
    # too_many_pings), so stay above that; under load the ack timeout is faster.
    ("grpc.keepalive_time_ms", 310_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_send_message_length", -1),
)


# -- the sink ------------------------------------------------------------------------


@dataclass
class _InFlight:
    count: int
    sent_at: float
    records: list[bytes]
    checkout: SpoolCheckout | None  # None: from the queue, only held here


@dataclass
class _CheckedOut:
    checkout: SpoolCheckout
    outstanding: int = 0  # batches sent, not yet acked
    pending: int = 0  # batches not yet sent


class _Stream:
    """One Ingest call: the request queue gRPC pulls from, and the call itself."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.token: str | None = None  # the token this call was opened with
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.call: Any = None
        self.acked = False
        self.finished = threading.Event()  # the reader saw the call end

    def request_iterator(self) -> Iterator[bytes]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def end(self, grace: float = 0.0) -> None:
        # Ending the iterator frees gRPC's consumer thread and half-closes the
        # stream; given a grace period the collector can finish it cleanly
        # instead of seeing a cancellation.
        self.requests.put(None)
        if grace > 0:
            self.finished.wait(grace)
        if self.call is not None:
            self.call.cancel()


class _RateLimitedWarning:
    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = -interval
        self._suppressed = 0

    def __call__(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} similar warnings suppressed)"
        self._last, self._suppressed = now, 0
        log.warning(message, *args)


class GrpcExporter:
    """Sink: streams records to a collector's Ingest RPC; see the module docstring.

    `channel_factory()` builds a channel to `target` (TLS or not is the caller's
    choice; CHANNEL_OPTIONS are recommended).  It is called again for every
    reconnect attempt: a fresh channel connects at once, where a failed one
    waits out gRPC's own reconnect backoff (up to 2 minutes by default).
    A str `target` is only used in messages; a CollectorTargets is the rotation
    to fail over along, and then `channel_factory(endpoint)` dials its current
    endpoint (apply `endpoint.channel_options()` on TLS channels).
    `spool_dir` holds records across outages and agent restarts, bounded by
    `spool_max_bytes`.
    """

    def __init__(
        self,
        target: str | CollectorTargets,
        *,
        channel_factory: ChannelFactory,
        spool_dir: str | os.PathLike[str],
        spool_max_bytes: int = 1 << 30,
        spool_segment_bytes: int = 4 << 20,
        queue_max_records: int = 100_000,
        queue_max_bytes: int = 64 << 20,
        batch_max_records: int = 512,
        batch_max_bytes: int = 1 << 20,
        linger: float = 0.02,
        max_in_flight: int = 8,
        ack_timeout: float = 30.0,
        close_timeout: float = 5.0,
        backoff: Backoff | None = None,
        token_file: TokenFile | None = None,
        refused_retry: float = 5.0,
        autostart: bool = True,
    ) -> None:
        if min(queue_max_records, queue_max_bytes, batch_max_records, batch_max_bytes) < 1:
            raise ValueError("queue and batch bounds must be positive")
        if max_in_flight < 1 or ack_timeout <= 0 or linger < 0:
            raise ValueError("need max_in_flight >= 1, ack_timeout > 0, linger >= 0")
        self._targets = target if isinstance(target, CollectorTargets) else None
        self.target = target if isinstance(target, str) else target.describe()
        self.batch_max_records = batch_max_records
        self.batch_max_bytes = batch_max_bytes
        self.queue_max_records = queue_max_records
        self.queue_max_bytes = queue_max_bytes
        self.linger = linger
        self.max_in_flight = max_in_flight
        self.ack_timeout = ack_timeout
        self.close_timeout = close_timeout
        self._backoff = backoff or Backoff()
        self._token_file = token_file
        self.refused_retry = refused_retry
        self._last_refusal: str | None = None
        self._channel_factory = channel_factory
        self._channel: grpc.Channel | None = None
        self._ingest: Any = None

        # Shared with write(): guarded by _lock.
        self._lock = threading.Lock()
        self._queue: deque[bytes] = deque()
        self._queue_bytes = 0
        self._queue_since = 0.0  # when the oldest queued record arrived
        self._queue_dropped = 0
        self._closed = False
        self._spill_records = max(1, queue_max_records // 2)
        self._spill_bytes = max(1, queue_max_bytes // 2)
        self._warn_queue_full = _RateLimitedWarning()
        self._warn_spool_failed = _RateLimitedWarning()

        # Sender-thread state.
        self._wake = threading.Event()
        self._events: deque[tuple[int, str, Any]] = deque()
        self._stream: _Stream | None = None
        self._generation = 0
        self._next_batch_id = 1
        self._in_flight: OrderedDict[int, _InFlight] = OrderedDict()
        self._checked_out: dict[int, _CheckedOut] = {}
        self._replay: deque[tuple[_CheckedOut, list[bytes]]] = deque()
        self._reconnect_at = 0.0
        self._outage = False
        self._round_failures = 0  # failed attempts since the last ack, for the rotation
        self._last_acked: Endpoint | None = None  # where the last stream got its first ack
        self._closing = False
        self._close_deadline = 0.0

        # Counters (written by the sender thread, read by anyone).
        self.sent_records = 0
        self.acked_records = 0
        self.spool_failed_records = 0
        self.rejected_records = 0
        self.reconnects = 0
        self.failovers = 0  # acks from another collector than the previous one
        self.refused = 0  # streams the collector refused (UNAUTHENTICATED, PERMISSION_DENIED)

        # Raises SpoolError (an OSError with a one-line message) before anything starts.
        self.spool = Spool(spool_dir, spool_max_bytes, spool_segment_bytes)
        try:
            self._new_channel()  # a factory that cannot work fails here, not later
        except BaseException:
            self.spool.close()
            raise
        self._thread = threading.Thread(target=self._run, name="tlscap-export", daemon=True)
        if autostart:
            self.start()

    # -- the Sink side (capture thread) ---------------------------------------

    def start(self) -> None:
        self._thread.start()

    def write(self, record: Record) -> None:
        wire = to_pb(record).SerializeToString()
        with self._lock:
            if self._closed:
                raise ValueError("write to a closed exporter")
            queued = len(self._queue)
            # A lone record above the byte bound is still taken: it would never fit.
            if queued >= self.queue_max_records or (
                queued and self._queue_bytes + len(wire) > self.queue_max_bytes
            ):
                self._queue_dropped += 1
                dropped = self._queue_dropped
            else:
                dropped = 0
                self._queue.append(wire)
                self._queue_bytes += len(wire)
                queued += 1
                if queued == 1:
                    self._queue_since = time.monotonic()
        if dropped:
            self._warn_queue_full(
                "export queue full (%d records, %d bytes): dropping records; %d dropped so far"
                " (the collector or the spool disk cannot keep up)",
                self.queue_max_records,
                self.queue_max_bytes,
                dropped,
            )
            return
        # Wake the sender only when there is something for it to decide.
        if (
            queued == 1
            or queued % self.batch_max_records == 0
            or queued == self._spill_records
            or self._queue_bytes >= self.batch_max_bytes
        ):
            self._wake.set()

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued and wait (bounded) for acks; the rest is spooled."""
        timeout = self.close_timeout if timeout is None else timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close_deadline = time.monotonic() + timeout
        self._closing = True
        self._wake.set()
        pending = len(self._queue) + self.spool.records
        if pending and not self._connected():
            log.info(
                "exporter: collector %s unavailable; trying for up to %.1f s to deliver"
                " %d records before exit (the rest stays in the spool)",
                self.target,
                timeout,
                pending,
            )
        if self._thread.is_alive():
            self._thread.join(timeout + 2.0)
        stuck = self._thread.is_alive()
        if stuck:
            # Never hang the agent's exit: the daemon thread dies with the process.
            log.error(
                "exporter: sender did not finish within %.1f s; %d queued records and"
                " %d unacked batches may be lost",
                timeout,
                len(self._queue),
                len(self._in_flight),
            )
        else:
            if not self._thread.ident:  # never started: nothing ran, keep the queue
                self._spool_queue()
            self.spool.close()
        self._drop_channel()
        log.info(
            "exporter closed: %d records sent, %d acked, %d left in the spool %s for the next run,"
            " %d lost",
            self.sent_records,
            self.acked_records,
            self.spool.records,
            self.spool.directory,
            self._lost(),
        )

    def stats(self) -> dict[str, int]:
        return {
            "export_sent_records": self.sent_records,
            "export_acked_records": self.acked_records,
            "export_queued_records": len(self._queue),
            "export_queue_dropped": self._queue_dropped,
            "export_spooled_records": self.spool.records,
            "export_spool_bytes": self.spool.bytes,
            "export_spool_dropped_records": self.spool.dropped_records,
            "export_spool_dropped_bytes": self.spool.dropped_bytes,
            "export_spool_failed_records": self.spool_failed_records,
            "export_spool_corrupt_bytes": self.spool.corrupt_bytes,
            "export_rejected_records": self.rejected_records,
            "export_lost_records": self._lost(),
            "export_reconnects": self.reconnects,
            "export_refused": self.refused,
            "export_failovers": self.failovers,
            "export_connected": int(self._connected()),
        }

    def _lost(self) -> int:
        return (
            self._queue_dropped
            + self.spool.dropped_records
            + self.spool_failed_records
            + self.rejected_records
        )

    def _connected(self) -> bool:
        # After a failure only an ack proves the collector is back: an open
        # stream may still be waiting for a TCP connect that never comes.
        return self._stream is not None and not self._outage

    # -- the channel -----------------------------------------------------------

    # No channel.subscribe() here: closing a subscribed channel races gRPC's
    # polling thread (grpc/grpc#18995, #20026), and channels are closed often.

    @property
    def _where(self) -> str:
        """The collector now in use, for messages."""
        return self.target if self._targets is None else str(self._targets.current)

    def _new_channel(self) -> None:
        if self._targets is None:
            channel = self._channel_factory()  # type: ignore[call-arg]
        else:
            channel = self._channel_factory(self._targets.current)  # type: ignore[call-arg]
        self._channel = channel
        self._ingest = channel.stream_stream(
            INGEST_METHOD,
            request_serializer=None,  # requests are pre-encoded bytes
            response_deserializer=pb.IngestAck.FromString,
        )

    def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is None:
            return
        try:
            channel.close()
        except Exception as exc:  # closing must not stop the exporter
            log.debug("exporter: closing the channel: %s", exc)

    # -- the sender thread ----------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                now = time.monotonic()
                self._handle_events()
                self._check_stream(now)
                if self._stream is None and now >= self._reconnect_at:
                    self._open_stream()
                self._pump(now)
                if self._closing and (self._drained() or time.monotonic() >= self._close_deadline):
                    break
                self._wake.wait(self._wait_time(time.monotonic()))
        except Exception:
            log.exception("exporter: sender thread failed; records will be spooled")
        finally:
            self._shutdown()

    def _wait_time(self, now: float) -> float:
        deadlines = [now + 1.0]
        if self._queue and (self._closing or self._spilling() or self._window_open()):
            deadlines.append(self._queue_since + self.linger)
        if self._stream is None:
            deadlines.append(self._reconnect_at)
        if self._in_flight:
            deadlines.append(next(iter(self._in_flight.values())).sent_at + self.ack_timeout)
        if self._closing:
            deadlines.append(self._close_deadline)
        # The floor only guards against a spin should a deadline above be stale.
        return max(0.001, min(deadlines) - now)

    def _drained(self) -> bool:
        """All delivered, the spool included: closing need not wait for its deadline."""
        return not (self._queue or self._in_flight or self._replay or self.spool.records)

    # -- stream lifecycle -----------------------------------------------------

    def _open_stream(self) -> None:
        self._generation += 1
        stream = _Stream(self._generation)
        self._stream = stream
        try:
            if self._channel is None:
                self._new_channel()
            metadata = None
            if self._token_file is not None:
                stream.token = self._token_file.read()
                metadata = self._token_file.metadata(stream.token)
            stream.call = self._ingest(
                stream.request_iterator(), wait_for_ready=False, metadata=metadata
            )
        except Exception as exc:  # e.g. a closed channel; treat like any failed attempt
            self._fail_stream(f"{type(exc).__name__}: {exc}")
            return
        reader = threading.Thread(
            target=self._read_acks, args=(stream,), name="tlscap-export-acks", daemon=True
        )
        reader.start()

    def _read_acks(self, stream: _Stream) -> None:
        gen = stream.generation
        try:
            for ack in stream.call:
                self._events.append((gen, "ack", ack.batch_id))
                self._wake.set()
            self._events.append((gen, "error", (None, "the collector ended the stream")))
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            name = code.name if code is not None else "error"
            self._events.append((gen, "error", (code, f"{name}: {details}")))
        except Exception as exc:  # a bug, or a response we cannot parse
            self._events.append((gen, "error", (None, f"{type(exc).__name__}: {exc}")))
        stream.finished.set()
        self._wake.set()

    def _handle_events(self) -> None:
        while self._events:
            gen, kind, value = self._events.popleft()
            if self._stream is None or gen != self._stream.generation:
                continue  # from a stream already given up
            if kind == "ack":
                self._on_ack(value)
            elif value[0] in _REFUSALS:
                self._on_refused(*value)
            else:
                code, reason = value
                rejected = _is_rejection(code, reason)
                if rejected:
                    self._drop_rejected_batch(reason)
                self._fail_stream(reason, outage=not rejected)

    def _on_ack(self, batch_id: int) -> None:
        assert self._stream is not None
        if not self._stream.acked:
            self._stream.acked = True
            self._backoff.reset()
            self._round_failures = 0
            self._note_failover()
            self._end_outage()
            if self._last_refusal is not None:
                self._last_refusal = None
                log.warning("exporter: collector %s accepts this agent again", self._where)
        flight = self._in_flight.pop(batch_id, None)
        if flight is None:
            log.debug("exporter: ack for unknown batch %d", batch_id)
            return
        self.acked_records += flight.count
        if flight.checkout is not None:
            out = self._checked_out.get(flight.checkout.segment)
            if out is not None:
                out.outstanding -= 1
                if out.outstanding == 0 and out.pending == 0:
                    del self._checked_out[flight.checkout.segment]
                    self.spool.ack(out.checkout)

    def _check_stream(self, now: float) -> None:
        if self._stream is not None and self._in_flight:
            oldest = next(iter(self._in_flight.values()))
            if now - oldest.sent_at > self.ack_timeout:
                self._fail_stream(f"no ack within {self.ack_timeout:g} s")

    def _drop_rejected_batch(self, reason: str) -> None:
        """The collector handles batches in order: the one it refused is the oldest unacked."""
        if not self._in_flight:
            return
        batch_id, flight = self._in_flight.popitem(last=False)
        self.rejected_records += flight.count
        log.error(
            "exporter: collector %s rejected batch %d (%d records): %s; dropped it"
            " (%d rejected so far; do agent and collector versions match?)",
            self._where,
            batch_id,
            flight.count,
            reason,
            self.rejected_records,
        )
        if flight.checkout is None:
            return
        # Spooled: delete its segment, but give the segment's other records another go.
        out = self._checked_out.pop(flight.checkout.segment, None)
        if out is not None:
            rejected = {id(r) for r in flight.records}
            self._spool_append([r for r in out.checkout.records if id(r) not in rejected])
            self.spool.ack(out.checkout)

    def _on_refused(self, code: grpc.StatusCode, reason: str) -> None:
        stream = self._stream
        assert stream is not None
        if (
            code == grpc.StatusCode.UNAUTHENTICATED
            and self._token_file is not None
            and stream.token is not None
            and self._token_file.read() != stream.token
        ):
            # The kubelet rotated the token (the collector ends streams whose token
            # expired): nothing is wrong, reconnect with the new one now.
            self._fail_stream(f"{reason}; the token was rotated", outage=False, retry_now=True)
            return
        self.refused += 1
        if reason != self._last_refusal:
            self._last_refusal = reason
            log.error(
                "exporter: collector %s refused this agent (%s); records stay in the spool %s"
                " and sending is retried (check the agent's token, certificate and --node)",
                self._where,
                reason,
                self.spool.directory,
            )
        else:
            log.debug("exporter: refused again (%s)", reason)
        self._fail_stream(reason, refused=True)

    def _note_failover(self) -> None:
        if self._targets is None:
            return
        now = self._targets.current
        before, self._last_acked = self._last_acked, now
        if before is not None and before != now:
            self.failovers += 1
            log.warning(
                "exporter: failed over from collector %s to %s (%d failovers so far)",
                before,
                now,
                self.failovers,
            )

    def _end_outage(self) -> None:
        if self._outage:
            self._outage = False
            self.reconnects += 1
            log.warning(
                "exporter: reconnected to collector %s; replaying %d spooled records",
                self._where,
                self.spool.records,
            )

    def _fail_stream(
        self, reason: str, *, outage: bool = True, refused: bool = False, retry_now: bool = False
    ) -> None:
        """Give up the stream: unacked batches to the spool, reconnect later.

        outage=False: the collector is fine but ended the stream on purpose (it
        refused a batch), so this is no state change worth a warning.
        refused: the collector refused this agent (already logged); wait at least
        refused_retry, and send to the spool meanwhile, as in an outage.
        retry_now: reconnect without waiting (a rotated token)."""
        stream = self._stream
        assert stream is not None
        self._stream = None
        stream.end()
        self._drop_channel()
        self._abandon_in_flight()
        failed_at = self._where
        if outage and not (refused or retry_now) and self._targets is not None:
            delay = self._rotate()
        else:
            delay = self._backoff.next_delay()
        if refused:
            delay = max(delay, self.refused_retry)
        if retry_now:
            delay = 0.0
        if self._closing:
            # A collector restarting as we exit (a rolling update) is back within
            # the close deadline: retry often enough to catch it.
            delay = min(delay, _CLOSE_RETRY)
        self._reconnect_at = time.monotonic() + delay
        if refused:
            self._outage = True  # spool, and probe with one batch until an ack
        elif not outage:
            log.debug("exporter: reconnecting after %s", reason)
        elif not self._outage:
            self._outage = True
            log.warning(
                "exporter: collector %s unreachable (%s); spooling to %s%s",
                failed_at,
                reason,
                self.spool.directory,
                f"; trying {self._where}" if failed_at != self._where else "",
            )
        else:
            log.debug("exporter: still unreachable (%s); next try in %.1f s", reason, delay)

    def _rotate(self) -> float:
        """Move to the next collector: at once, unless a whole round has failed."""
        assert self._targets is not None
        self._round_failures += 1
        self._targets.advance()
        if self._round_failures < len(self._targets):
            return 0.0
        self._round_failures = 0
        return self._backoff.next_delay()

    def _abandon_in_flight(self) -> None:
        # Spooled segments first: they are older than anything sent from the queue.
        for out in self._checked_out.values():
            self.spool.release(out.checkout)
        self._checked_out.clear()
        self._replay.clear()
        for flight in self._in_flight.values():
            if flight.checkout is None:
                self._spool_append(flight.records)
        self._in_flight.clear()

    def _shutdown(self) -> None:
        unacked = sum(f.count for f in self._in_flight.values())
        if self._stream is not None:
            stream, self._stream = self._stream, None
            # Everything acked: let the collector see a clean end of stream.
            left = self._close_deadline - time.monotonic()
            clean = self._closing and not self._in_flight
            stream.end(grace=max(0.0, min(0.5, left)) if clean else 0.0)
        self._abandon_in_flight()
        queued = self._spool_queue()
        if unacked or queued:
            log.warning(
                "exporter: %d unacked and %d unsent records saved to the spool %s for the next run",
                unacked,
                queued,
                self.spool.directory,
            )

    # -- moving records -------------------------------------------------------

    def _probing(self) -> bool:
        """A new stream during an outage: most attempts fail before they connect, so
        risk one batch until the collector acks (no re-reading the spool per retry)."""
        return self._outage and self._stream is not None and not self._stream.acked

    def _window_open(self) -> bool:
        if self._stream is None:
            return False
        return len(self._in_flight) < (1 if self._probing() else self.max_in_flight)

    def _spilling(self) -> bool:
        """Should queued records go to the spool rather than to the stream?"""
        if self._stream is None or self._probing() or self.spool.backlog_records:
            return True  # disconnected, or keeping order behind older spooled records
        # Connected but the window is full: the collector is slower than capture.
        # Let the queue absorb bursts; past half its bound, the disk takes over.
        return len(self._in_flight) >= self.max_in_flight and (
            len(self._queue) >= self._spill_records or self._queue_bytes >= self._spill_bytes
        )

    def _pump(self, now: float) -> None:
        while self._spilling():
            batch = self._take_ready(now)
            if batch is None:
                break
            self._spool_append(batch)
        while self._window_open():
            if self._replay:
                out, records = self._replay.popleft()
                out.pending -= 1
                out.outstanding += 1
                self._send(records, out.checkout)
            elif self.spool.backlog_records:
                self._checkout_next()
            else:
                batch = self._take_ready(now)
                if batch is None:
                    break
                self._send(batch, None)

    def _checkout_next(self) -> None:
        checkout = self.spool.checkout()
        if checkout is None:
            return
        out = _CheckedOut(checkout)
        records: deque[bytes] = deque(checkout.records)
        while records:
            self._replay.append(
                (out, take_batch(records, self.batch_max_records, self.batch_max_bytes))
            )
            out.pending += 1
        self._checked_out[checkout.segment] = out

    def _take_ready(self, now: float) -> list[bytes] | None:
        """The next batch off the queue, if one is due (full, or lingered long enough)."""
        with self._lock:
            if not self._queue:
                return None
            due = (
                self._closing
                or len(self._queue) >= self.batch_max_records
                or self._queue_bytes >= self.batch_max_bytes
                or now - self._queue_since >= self.linger
            )
            if not due:
                return None
            batch = take_batch(self._queue, self.batch_max_records, self.batch_max_bytes)
            self._queue_bytes -= sum(len(r) for r in batch)
            if self._queue:
                self._queue_since = now
            return batch

    def _send(self, records: list[bytes], checkout: SpoolCheckout | None) -> None:
        assert self._stream is not None
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        self._in_flight[batch_id] = _InFlight(len(records), time.monotonic(), records, checkout)
        self._stream.requests.put(encode_ingest_batch(batch_id, records))
        self.sent_records += len(records)

    def _spool_append(self, records: list[bytes]) -> None:
        try:
            self.spool.append(records)
        except SpoolWriteError as exc:
            self.spool_failed_records += exc.records_lost
            self._warn_spool_failed(
                "exporter: cannot write to the spool %s (%s); %d records lost so far",
                self.spool.directory,
                exc,
                self.spool_failed_records,
            )

    def _spool_queue(self) -> int:
        """Everything still queued goes to the spool; returns how many records."""
        moved = 0
        while True:
            with self._lock:  # not held across the disk write: write() may be waiting
                if not self._queue:
                    return moved
                batch = take_batch(self._queue, self.batch_max_records, self.batch_max_bytes)
                self._queue_bytes -= sum(len(r) for r in batch)
            self._spool_append(batch)
            moved += len(batch)


def _is_rejection(code: grpc.StatusCode | None, details: str) -> bool:
    """Did the collector refuse a batch for what it holds (so a re-send cannot help)?

    Sending it again would fail the same way, forever, and block everything
    behind it.  Every other error is treated as an outage and retried.
    """
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return True
    # gRPC's own size check: a record above the collector's message limit.
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
