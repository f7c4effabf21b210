"""Live fan-out: every newly stored record to every subscriber whose filter matches.

Ingest must never wait for a reader, so each subscriber has a bounded queue;
when it is full the new records are dropped *for that subscriber only* and
counted.  The bound is checked per publish() call: records arriving while the
queue holds fewer than max_pending are queued whole, so a subscriber that keeps
up is never cut off by an ingest batch larger than its bound, and a stalled one
holds at most max_pending plus one batch.  Where records were dropped, the
subscriber receives a Lagged notice saying how many it missed and the time span
they covered (so it can fetch them from the store with since_ns/until_ns),
followed by the records after the gap.

Replay then live, without losing or repeating a record:

    sub = hub.subscribe(flt)                     # 1. register first
    last = replay_from_store(flt)                # 2. replay; `last` = highest rowid sent
    sub.skip_through(last)                       # 3. before the first next_batch
    while True: sub.next_batch(...)              # 4. live

A record stored before the replay's final query is replayed and, if it also
reaches the hub, dropped by skip_through; one stored after has a higher rowid
than anything replayed and comes live.  Lagged counts stay exact across the
handover because one publish() call carries the records of one store
transaction, which the replay saw either entirely or not at all.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from agent.collector.store import StoredItem
from agent.records.filter import RecordFilter


@dataclass(frozen=True)
class Lagged:
    """`missed` records were dropped here; their ts_ns spanned [first_ts_ns, last_ts_ns]."""

    missed: int
    first_ts_ns: int  # the earliest ts_ns among them
    last_ts_ns: int  # the latest


class SubscriptionClosed(Exception):
    """The subscription (or the whole hub) was closed; nothing more will come."""


class _Gap:
    """Records dropped at one point of a subscriber's queue.

    Until the subscriber's replay handover is settled, each publish() call's
    drops are kept apart as a run (lowest rowid, highest rowid, count, ts span),
    so skip_through() can discount the ones the replay delivered.
    """

    __slots__ = ("first_ts_ns", "last_ts_ns", "missed", "runs")

    def __init__(self, settled: bool) -> None:
        self.missed = 0
        self.first_ts_ns = 0
        self.last_ts_ns = 0
        self.runs: list[tuple[int, int, int, int, int]] | None = None if settled else []

    def add(self, dropped: Sequence[StoredItem]) -> None:
        ts = [item.record.ts_ns for item in dropped]
        lo, hi = min(ts), max(ts)
        if self.runs is not None:
            rowids = [item.rowid for item in dropped]
            self.runs.append((min(rowids), max(rowids), len(dropped), lo, hi))
        self._count(len(dropped), lo, hi)

    def settle(self, skip_through: int) -> None:
        """Forget the runs the replay delivered (all their rowids <= skip_through)."""
        runs, self.runs = self.runs, None
        if runs is None:
            return
        self.missed = 0
        for _low_rowid, high_rowid, count, lo, hi in runs:
            # A run straddling skip_through cannot come from one transaction; if
            # one ever does, it is counted whole: a Lagged may over-report, never hide.
            if high_rowid > skip_through:
                self._count(count, lo, hi)

    def merge(self, other: _Gap) -> None:
        if other.missed:
            self._count(other.missed, other.first_ts_ns, other.last_ts_ns)

    def _count(self, n: int, lo: int, hi: int) -> None:
        if self.missed == 0:
            self.first_ts_ns, self.last_ts_ns = lo, hi
        else:
            self.first_ts_ns = min(self.first_ts_ns, lo)
            self.last_ts_ns = max(self.last_ts_ns, hi)
        self.missed += n

    def notice(self) -> Lagged:
        return Lagged(self.missed, self.first_ts_ns, self.last_ts_ns)


class Subscription:
    """One consumer's view of the live stream; made by Hub.subscribe.

    next_batch is meant for one consuming thread; publish() may run on any
    number of others.
    """

    def __init__(self, hub: Hub, flt: RecordFilter, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.filter = flt
        self.max_pending = max_pending
        self._hub = hub
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[StoredItem | _Gap] = deque()
        self._pending = 0  # records in _queue (gaps take no room)
        # None until the replay handover is settled (skip_through or the first
        # next_batch); then live records with rowid <= this are dropped silently.
        self._skip_through: int | None = None
        self._closed = False
        self.delivered = 0
        self.missed = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def skip_through(self, rowid: int) -> None:
        """Records up to `rowid` were replayed: drop their live copies, queued or to come.

        Call it before the first next_batch for exact Lagged counts.
        """
        with self._cond:
            skip = self._skip_through = max(rowid, self._skip_through or 0)
            kept: deque[StoredItem | _Gap] = deque()
            for entry in self._queue:
                if isinstance(entry, _Gap):
                    entry.settle(skip)
                    if not entry.missed:
                        continue
                    if kept and isinstance(kept[-1], _Gap):  # nothing left between two gaps
                        kept[-1].merge(entry)
                        continue
                    kept.append(entry)
                elif entry.rowid > skip:
                    kept.append(entry)
                else:
                    self._pending -= 1
            self._queue = kept

    def next_batch(
        self, timeout: float | None, max_items: int = 500
    ) -> Lagged | list[StoredItem] | None:
        """The next records (in publish order, at most max_items), or a Lagged notice
        where records were dropped, or None if nothing came within `timeout` seconds.

        Raises SubscriptionClosed once the subscription or the hub is closed, even
        if records were still queued: closing means "stop".
        """
        with self._cond:
            if self._skip_through is None:
                self._settle_without_replay()
            if not self._queue and not self._closed:
                self._cond.wait_for(lambda: self._queue or self._closed, timeout)
            if self._closed:
                raise SubscriptionClosed("subscription closed")
            if not self._queue:
                return None
            queue = self._queue
            head = queue[0]
            if isinstance(head, _Gap):
                queue.popleft()
                self.missed += head.missed
                return head.notice()
            batch: list[StoredItem] = []
            while queue and len(batch) < max_items:
                entry = queue[0]
                if isinstance(entry, _Gap):
                    break
                batch.append(entry)
                queue.popleft()
            self._pending -= len(batch)
            self.delivered += len(batch)
            return batch

    def close(self) -> None:
        """Unregister; a next_batch waiting in another thread raises SubscriptionClosed."""
        self._close()
        self._hub._remove(self)

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._pending = 0
            self._cond.notify_all()

    def _settle_without_replay(self) -> None:
        self._skip_through = 0
        for entry in self._queue:
            if isinstance(entry, _Gap):
                entry.settle(0)

    def _offer(self, matched: list[StoredItem], lowest_rowid: int) -> None:
        """Queue the records, or count them as missed if the queue is full."""
        with self._cond:
            if self._closed:
                return
            skip = self._skip_through
            if skip and lowest_rowid <= skip:
                matched = [item for item in matched if item.rowid > skip]
                if not matched:
                    return
            if self._pending < self.max_pending:
                # Taken whole even if it overshoots: a subscriber that keeps up is
                # never cut off by one ingest batch larger than its bound.
                self._queue.extend(matched)
                self._pending += len(matched)
            else:
                tail = self._queue[-1] if self._queue else None
                if not isinstance(tail, _Gap):
                    tail = _Gap(settled=skip is not None)
                    self._queue.append(tail)
                tail.add(matched)
            self._cond.notify_all()


class Hub:
    """Thread-safe: publish from any number of ingest threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Copy-on-write: publish() reads the current tuple without taking the lock.
        self._subs: tuple[Subscription, ...] = ()
        self._closed = False

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def subscribe(self, flt: RecordFilter, max_pending: int = 10_000) -> Subscription:
        sub = Subscription(self, flt, max_pending)
        with self._lock:
            if self._closed:
                raise SubscriptionClosed("the hub is closed")
            self._subs = (*self._subs, sub)
        return sub

    def publish(self, items: Sequence[StoredItem]) -> None:
        """Offer newly stored records to every subscriber; never blocks on a slow one.

        Pass the new_items of one RecordStore.insert per call (see the module notes).
        """
        subs = self._subs
        if not items or not subs:
            return
        lowest_rowid = min(item.rowid for item in items)
        # Subscribers often share a filter (the default one, above all): match once per filter.
        matched_by_filter: dict[RecordFilter, list[StoredItem]] = {}
        for sub in subs:
            matched = matched_by_filter.get(sub.filter)
            if matched is None:
                matches = sub.filter.matches
                matched = [item for item in items if matches(item.record)]
                matched_by_filter[sub.filter] = matched
            if matched:
                sub._offer(matched, lowest_rowid)

    def close(self) -> None:
        """Close every subscription (waking their readers); later subscribe() calls fail."""
        with self._lock:
            self._closed = True
            subs, self._subs = self._subs, ()
        for sub in subs:
            sub._close()

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)
