"""Live fan-out: filters, bounded queues and Lagged notices, close, the replay handover."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest

from agent.collector.fanout import Hub, Lagged, SubscriptionClosed
from agent.collector.store import RecordStore, StoredItem
from agent.records.filter import RecordFilter
from agent.records.record import Endpoint, Record
from agent.schema.convert import to_pb

TS = 1_795_442_587_000_000_000
_rowids = itertools.count(1)


def _record(seq: int, **kw) -> Record:
    base = dict(
        type="data",
        ts_ns=TS + seq,
        agent_id="agent-a",
        seq=seq,
        pid=4211,
        comm="curl",
        source="openssl",
        conn_id="c1",
        remote=Endpoint("198.18.0.2", 443),
        direction="egress",
    )
    base.update(kw)
    return Record(**base)


def _items(*seqs: int, rowid_base: int = 0, **kw) -> list[StoredItem]:
    """Items as one store transaction would return them (rowid = seq + rowid_base)."""
    return [StoredItem(s + rowid_base, _record(s, **kw), b"wire%d" % s) for s in seqs]


def _seqs(batch) -> list[int]:
    assert isinstance(batch, list), batch
    return [item.record.seq for item in batch]


def test_subscriber_gets_only_matching_records() -> None:
    hub = Hub()
    curl = hub.subscribe(RecordFilter(comms=frozenset({"curl"})))
    everything = hub.subscribe(RecordFilter())
    hub.publish(_items(1, 2) + _items(3, comm="nginx") + _items(4))
    assert _seqs(curl.next_batch(timeout=0)) == [1, 2, 4]
    assert _seqs(everything.next_batch(timeout=0)) == [1, 2, 3, 4]
    assert curl.next_batch(timeout=0) is None
    # The default filter leaves stats records out.
    hub.publish([StoredItem(9, Record(type="stats", ts_ns=TS, seq=9), b"")])
    assert everything.next_batch(timeout=0) is None


def test_next_batch_respects_max_items_and_times_out() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter())
    hub.publish(_items(*range(1, 8)))
    assert _seqs(sub.next_batch(timeout=0, max_items=3)) == [1, 2, 3]
    assert _seqs(sub.next_batch(timeout=0, max_items=3)) == [4, 5, 6]
    assert _seqs(sub.next_batch(timeout=0, max_items=3)) == [7]
    start = time.monotonic()
    assert sub.next_batch(timeout=0.05) is None
    assert time.monotonic() - start >= 0.04


def test_next_batch_wakes_on_publish() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter())
    threading.Timer(0.05, hub.publish, args=(_items(1),)).start()
    start = time.monotonic()
    assert _seqs(sub.next_batch(timeout=10)) == [1]
    assert time.monotonic() - start < 5


def test_full_queue_drops_then_lagged_then_records_resume() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter(), max_pending=3)
    hub.publish(_items(1, 2))
    hub.publish(_items(3, 4, 5))  # below the bound when it came: taken whole
    hub.publish(_items(6, ts_ns=TS + 50))  # full: dropped
    hub.publish(_items(7, 8, ts_ns=TS + 100))  # dropped too
    assert _seqs(sub.next_batch(timeout=0)) == [1, 2, 3, 4, 5]
    assert sub.next_batch(timeout=0) == Lagged(missed=3, first_ts_ns=TS + 50, last_ts_ns=TS + 100)
    hub.publish(_items(9, 10))
    assert _seqs(sub.next_batch(timeout=0)) == [9, 10]
    assert sub.next_batch(timeout=0) is None
    assert (sub.delivered, sub.missed) == (7, 3)


def test_lagged_comes_at_the_point_of_the_gap() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter(), max_pending=2)
    hub.publish(_items(1, 2))
    hub.publish(_items(3))  # queue: 1 2 [gap 3]
    assert _seqs(sub.next_batch(timeout=0, max_items=1)) == [1]
    hub.publish(_items(4))  # room for one: 2 [gap 3] 4
    hub.publish(_items(5))  # full again: 2 [gap 3] 4 [gap 5]
    assert _seqs(sub.next_batch(timeout=0)) == [2]
    assert sub.next_batch(timeout=0) == Lagged(1, TS + 3, TS + 3)
    assert _seqs(sub.next_batch(timeout=0)) == [4]
    assert sub.next_batch(timeout=0) == Lagged(1, TS + 5, TS + 5)
    assert sub.next_batch(timeout=0) is None


def test_a_batch_larger_than_the_bound_reaches_a_subscriber_that_keeps_up() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter(), max_pending=10)
    for start in (1, 101):
        hub.publish(_items(*range(start, start + 100)))
        assert _seqs(sub.next_batch(timeout=0, max_items=1000)) == list(range(start, start + 100))


def test_a_stalled_subscriber_does_not_hold_back_another() -> None:
    hub = Hub()
    stalled = hub.subscribe(RecordFilter(), max_pending=10)
    reader = hub.subscribe(RecordFilter(), max_pending=10)
    got: list[int] = []
    for start in range(1, 1001, 5):
        hub.publish(_items(*range(start, start + 5)))
        while (batch := reader.next_batch(timeout=0)) is not None:
            got.extend(_seqs(batch))
    assert got == list(range(1, 1001))
    assert _seqs(stalled.next_batch(timeout=0)) == list(range(1, 11))
    assert stalled.next_batch(timeout=0) == Lagged(990, TS + 11, TS + 1000)


def test_close_wakes_a_waiting_reader() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter())
    other = hub.subscribe(RecordFilter())
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(sub.next_batch(timeout=30))
        except SubscriptionClosed as exc:
            outcome.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.05)
    sub.close()
    t.join(timeout=5)
    assert not t.is_alive()
    assert isinstance(outcome[0], SubscriptionClosed)
    assert hub.subscriber_count == 1
    hub.publish(_items(1))  # the closed one is gone; the other still gets it
    assert _seqs(other.next_batch(timeout=0)) == [1]
    with pytest.raises(SubscriptionClosed):
        sub.next_batch(timeout=0)


def test_hub_close_wakes_everyone_and_refuses_new_subscribers() -> None:
    hub = Hub()
    subs = [hub.subscribe(RecordFilter()) for _ in range(3)]
    hub.publish(_items(1))  # queued records are not delivered after close
    closed = []

    def wait(sub) -> None:
        try:
            sub.next_batch(timeout=0.01)  # takes the queued record
            sub.next_batch(timeout=30)
        except SubscriptionClosed:
            closed.append(sub)

    threads = [threading.Thread(target=wait, args=(s,)) for s in subs]
    for t in threads:
        t.start()
    time.sleep(0.05)
    hub.close()
    for t in threads:
        t.join(timeout=5)
    assert len(closed) == 3
    assert hub.subscriber_count == 0
    with pytest.raises(SubscriptionClosed):
        hub.subscribe(RecordFilter())
    hub.publish(_items(2))  # a no-op now
    subs[0].close()  # closing again is harmless


# -- replay then live --------------------------------------------------------------------------


def test_skip_through_drops_what_the_replay_delivered() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter())
    hub.publish(_items(1, 2, 3))  # stored before the replay's query: replayed
    hub.publish(_items(4, 5))  # stored after: live only
    sub.skip_through(3)
    hub.publish(_items(2))  # a late publish of a replayed record
    hub.publish(_items(6))
    assert _seqs(sub.next_batch(timeout=0)) == [4, 5, 6]
    assert sub.next_batch(timeout=0) is None


def test_lagged_during_replay_counts_only_records_the_replay_did_not_send() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter(), max_pending=2)
    hub.publish(_items(1, 2))  # stored before the replay's last query: replayed
    hub.publish(_items(3))  # replayed too, and dropped here: not missed
    hub.publish(_items(4, 5))  # stored after the replay's last query: both dropped
    hub.publish(_items(6, 7))  # dropped
    sub.skip_through(3)
    assert sub.next_batch(timeout=0) == Lagged(4, TS + 4, TS + 7)
    hub.publish(_items(8))
    assert _seqs(sub.next_batch(timeout=0)) == [8]


def test_lagged_without_skip_through_counts_every_drop() -> None:
    hub = Hub()
    sub = hub.subscribe(RecordFilter(), max_pending=2)
    hub.publish(_items(1, 2))
    hub.publish(_items(3))
    hub.publish(_items(4))
    assert _seqs(sub.next_batch(timeout=0)) == [1, 2]
    assert sub.next_batch(timeout=0) == Lagged(2, TS + 3, TS + 4)


def test_replay_then_live_with_a_real_store_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Two agents ingest while a subscriber replays, hands over, and follows live."""
    per_agent, batch = 3000, 50
    with RecordStore(tmp_path / "s.db") as store:
        hub = Hub()
        flt = RecordFilter(remote_ports=frozenset({443}))
        started = threading.Event()

        def ingest(agent: str) -> None:
            for first in range(1, per_agent + 1, batch):
                records = [
                    _record(s, agent_id=agent, remote=Endpoint("198.18.0.2", 443 if s % 3 else 80))
                    for s in range(first, first + batch)
                ]
                result = store.insert([(r, to_pb(r).SerializeToString()) for r in records])
                hub.publish(result.new_items)
                if first > per_agent // 4:
                    started.set()

        agents = [threading.Thread(target=ingest, args=(f"agent-{n}",)) for n in (1, 2)]
        for t in agents:
            t.start()
        started.wait(timeout=30)  # some history exists, and ingest is still running
        sub = hub.subscribe(flt, max_pending=1_000_000)
        seen: list[int] = []
        after = 0
        while rows := store.query(flt, after_rowid=after, limit=100):
            seen.extend(rowid for rowid, _ in rows)
            after = rows[-1][0]
        replayed = len(seen)
        sub.skip_through(after)
        expected = 2 * sum(1 for s in range(1, per_agent + 1) if s % 3)
        deadline = time.monotonic() + 60
        while len(seen) < expected and time.monotonic() < deadline:
            got = sub.next_batch(timeout=1)
            assert not isinstance(got, Lagged)
            if got:
                assert all(item.record.remote.port == 443 for item in got)  # type: ignore[union-attr]
                seen.extend(item.rowid for item in got)
        for t in agents:
            t.join()
        assert 0 < replayed < expected  # the handover really happened mid-ingest
        assert len(seen) == len(set(seen)) == expected
        assert sorted(seen) == [rowid for rowid, _ in store.query(flt, limit=10**6)]
        assert sub.next_batch(timeout=0.1) is None


def test_handover_counts_exactly_when_the_queue_overflows_during_replay(tmp_path: Path) -> None:
    with RecordStore(tmp_path / "s.db") as store:
        hub = Hub()
        seqs = itertools.count(1)

        def ingest(n: int) -> None:
            records = [_record(next(seqs)) for _ in range(n)]
            hub.publish(
                store.insert([(r, to_pb(r).SerializeToString()) for r in records]).new_items
            )

        ingest(100)  # history
        sub = hub.subscribe(RecordFilter(), max_pending=10)
        replayed, after, pages = 0, 0, 0
        while rows := store.query(sub.filter, after_rowid=after, limit=30):
            replayed += len(rows)
            after = rows[-1][0]
            pages += 1
            if pages <= 5:
                ingest(20)  # agents keep sending while the replay runs: the queue overflows
        assert replayed == 200  # the replay caught up with everything stored meanwhile
        ingest(7)  # stored after the replay's last query,
        ingest(8)  # before the handover
        sub.skip_through(after)
        assert sub.next_batch(timeout=0) == Lagged(15, TS + 201, TS + 215)
        ingest(3)
        assert _seqs(sub.next_batch(timeout=0)) == [216, 217, 218]


def test_replay_then_live_lagged_counts_add_up_under_threads(tmp_path: Path) -> None:
    """A slow subscriber: replayed + delivered live + reported missed == all stored."""
    with RecordStore(tmp_path / "s.db") as store:
        hub = Hub()
        history, total, batch = 1000, 5000, 20
        go, stop = threading.Event(), threading.Event()

        def insert(records: list[Record]) -> None:
            hub.publish(
                store.insert([(r, to_pb(r).SerializeToString()) for r in records]).new_items
            )

        def ingest() -> None:
            go.wait()
            for first in range(history + 1, total + 1, batch):
                insert([_record(s) for s in range(first, first + batch)])
                time.sleep(0.0005)
            stop.set()

        insert([_record(s) for s in range(1, history + 1)])
        t = threading.Thread(target=ingest)
        t.start()
        sub = hub.subscribe(RecordFilter(), max_pending=25)
        go.set()
        replayed, after = 0, 0
        while rows := store.query(sub.filter, after_rowid=after, limit=50):
            replayed += len(rows)
            after = rows[-1][0]
            time.sleep(0.001)  # a slow replay: the live queue overflows meanwhile
        sub.skip_through(after)
        delivered = missed = 0
        while True:
            got = sub.next_batch(timeout=0.05)
            if got is None:
                if stop.is_set():  # set after the last publish: the queue is drained
                    break
            elif isinstance(got, Lagged):
                missed += got.missed
            else:
                assert all(item.rowid > after for item in got)
                delivered += len(got)
                time.sleep(0.002)  # and a slow consumer
        t.join()
        assert replayed + delivered + missed == total
        assert (sub.delivered, sub.missed) == (delivered, missed)


# -- threads -----------------------------------------------------------------------------------


def test_publish_from_many_threads_smoke() -> None:
    hub = Hub()
    fast = hub.subscribe(RecordFilter(), max_pending=100_000)
    slow = hub.subscribe(RecordFilter(), max_pending=50)
    egress = hub.subscribe(RecordFilter(directions=frozenset({"egress"})))
    publishers, batches, per_batch = 4, 200, 10
    errors: list[BaseException] = []
    received: dict[int, list[int]] = {id(fast): [], id(slow): [], id(egress): []}
    missed: dict[int, int] = {id(fast): 0, id(slow): 0, id(egress): 0}
    publishing_done = threading.Event()

    def publish(p: int) -> None:
        try:
            for b in range(batches):
                base = (p * batches + b) * per_batch
                hub.publish(
                    [
                        StoredItem(
                            base + i + 1,
                            _record(base + i + 1, direction="egress" if i % 2 else "ingress"),
                            b"",
                        )
                        for i in range(per_batch)
                    ]
                )
        except BaseException as exc:
            errors.append(exc)

    def consume(sub, pause: float) -> None:
        try:
            while True:
                got = sub.next_batch(timeout=0.05)
                if got is None:
                    if publishing_done.is_set():
                        return
                elif isinstance(got, Lagged):
                    missed[id(sub)] += got.missed
                else:
                    received[id(sub)].extend(item.rowid for item in got)
                    time.sleep(pause)
        except BaseException as exc:
            errors.append(exc)

    consumers = [
        threading.Thread(target=consume, args=(fast, 0)),
        threading.Thread(target=consume, args=(slow, 0.002)),
        threading.Thread(target=consume, args=(egress, 0)),
    ]
    pubs = [threading.Thread(target=publish, args=(p,)) for p in range(publishers)]
    for t in consumers + pubs:
        t.start()
    for t in pubs:
        t.join()
    publishing_done.set()
    for t in consumers:
        t.join(timeout=30)
    assert not errors
    total = publishers * batches * per_batch
    assert sorted(received[id(fast)]) == list(range(1, total + 1))
    assert missed[id(fast)] == 0
    assert len(received[id(slow)]) + missed[id(slow)] == total
    assert len(set(received[id(slow)])) == len(received[id(slow)])
    assert sorted(received[id(egress)]) == list(range(2, total + 1, 2))
    # Each publisher's records arrive in the order it published them.
    for p in range(publishers):
        lo, hi = p * batches * per_batch, (p + 1) * batches * per_batch
        mine = [r for r in received[id(fast)] if lo < r <= hi]
        assert mine == sorted(mine)
    for sub in (fast, slow, egress):
        sub.close()
    assert hub.subscriber_count == 0
