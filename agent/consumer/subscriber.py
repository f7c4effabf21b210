"""Read a record stream: from a collector over gRPC, or from a local store file.

Both readers yield the same events (a Record, a Lagged notice, or the end of
the replayed history), so `tlscap tail` does not care where records come from.
The gRPC reader follows the collector's store cursor: if the connection drops
it resubscribes after the last record it delivered, so a consumer that keeps
running misses nothing and sees nothing twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from agent.export.backoff import Backoff
from agent.records.filter import RecordFilter
from agent.records.record import Record
from agent.schema import pb, pb_grpc
from agent.schema.convert import SchemaError, filter_to_pb, from_pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Missed:
    """The collector dropped records this subscriber was too slow to take."""

    count: int
    first_ts_ns: int
    last_ts_ns: int


@dataclass(frozen=True)
class ReplayFinished:
    replayed: int


Event = Record | Missed | ReplayFinished


class SubscriptionError(RuntimeError):
    """The collector refused the subscription (bad filter, not authorized, ...)."""


# Status codes after which retrying cannot help.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def subscribe(
    channel_factory: Callable[[], grpc.Channel],
    flt: RecordFilter,
    *,
    replay: bool,
    live: bool,
    stop: threading.Event,
    backoff: Backoff | None = None,
    after_cursor: int = 0,
    on_cursor: Callable[[int], None] | None = None,
) -> Iterator[Event]:
    """Events from a collector until `stop` is set (live) or the replay ends.

    Reconnects with backoff while `live`; a replay-only read fails fast.
    `after_cursor`: resume after this cursor (a cursor an earlier read reported
    through `on_cursor`, called after each batch's records were yielded).
    """
    backoff = backoff or Backoff()
    cursor = after_cursor
    replay = replay or cursor > 0
    replay_done = not replay
    while not stop.is_set():
        channel = channel_factory()
        request = pb.SubscribeRequest(
            filter=filter_to_pb(flt),
            # After a reconnect, replay what was stored since our cursor.
            replay=replay or cursor > 0,
            live=live,
            after_cursor=cursor,
        )
        call = pb_grpc.CollectorStub(channel).Subscribe(request)
        # grpc iterators block in C; cancelling the call is how a stop gets through.
        watcher = threading.Thread(target=_cancel_on, args=(stop, call), daemon=True)
        watcher.start()
        try:
            for response in call:
                kind = response.WhichOneof("event")
                if kind == "records":
                    backoff.reset()
                    for msg in response.records.records:
                        try:
                            yield from_pb(msg)
                        except SchemaError as exc:
                            log.warning("skipping a record the collector sent: %s", exc)
                    cursor = response.records.cursor or cursor
                    if on_cursor is not None:
                        on_cursor(cursor)
                elif kind == "lagged":
                    lag = response.lagged
                    yield Missed(lag.missed, lag.first_missed_ts_ns, lag.last_missed_ts_ns)
                elif kind == "replay_done" and not replay_done:
                    replay_done = True
                    yield ReplayFinished(response.replay_done.replayed)
            if not live:
                return
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if stop.is_set():  # our own cancel (see _cancel_on)
                return
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            if code in _FATAL or not live:
                raise SubscriptionError(f"{code.name if code else 'error'}: {detail}") from None
            delay = backoff.next_delay()
            log.warning("collector stream lost (%s: %s); retrying in %.1fs", code, detail, delay)
            stop.wait(delay)
        finally:
            call.cancel()
            channel.close()


def _cancel_on(stop: threading.Event, call: grpc.Future) -> None:
    while not stop.wait(0.2):
        if not call.running():
            return
    call.cancel()


def read_store(
    path: Path,
    flt: RecordFilter,
    *,
    replay: bool,
    live: bool,
    stop: threading.Event,
    poll_interval: float = 0.2,
) -> Iterator[Event]:
    """Events from a local store (`tlscap run --store PATH`), polling for new rows."""
    from agent.collector.store import RecordStore

    store = RecordStore(path)
    try:
        cursor = 0 if replay else store.last_rowid()
        replayed = 0
        while not stop.is_set():
            rows = store.query(flt, after_rowid=cursor, limit=1000)
            for rowid, wire in rows:
                cursor = rowid
                try:
                    yield from_pb(pb.Record.FromString(wire))
                except SchemaError as exc:
                    log.warning("skipping stored record %d: %s", rowid, exc)
                replayed += 1
            if not rows:
                if replay:
                    replay = False
                    yield ReplayFinished(replayed)
                if not live:
                    return
                stop.wait(poll_interval)
    finally:
        store.close()
