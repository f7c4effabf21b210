"""ShardRouter and frame_batch: a ring batch split between capture workers, by process."""

from __future__ import annotations

import pytest

from agent.capture.shards import ShardRouter, frame_batch, frame_of
from agent.events import layout
from agent.events.ring import RingBatch
from tests.unit.eventbuild import call_records, close_record, conn_v4, data_record, proc_record
from tests.unit.test_pipeline import make_pipeline

SOCK = conn_v4(("127.0.0.1", 443), ("127.0.0.1", 40000), gen=5)


def mixed_batch() -> list[bytes]:
    """Two processes' events interleaved, as the ring holds them."""
    return [
        proc_record(layout.EV_EXEC, tgid=100),
        data_record(b"GET / HTTP/1.1\r\n\r\n", socket=SOCK, tgid=100, ts_ns=10),
        data_record(b"odd" * 3, socket=SOCK, tgid=200, ts_ns=11),  # 9 bytes: padded
        *call_records(bytes(range(256)) * 100, socket=SOCK, tgid=100, ts_ns=20, offset=18),
        proc_record(layout.EV_HOLD, tgid=200),
        close_record(tgid=200, gen=5, ts_ns=30),
        proc_record(layout.EV_EXIT, tgid=200),
    ]


def test_each_process_goes_whole_and_in_order_to_one_worker() -> None:
    records = mixed_batch()
    router = ShardRouter(2)
    batch = RingBatch.of(records)
    runs, counts, own = router.split(batch)
    by_worker = [frame_batch(frame_of(batch.data, r)).bodies() for r in runs]
    of_100 = [records[i] for i in (0, 1, 3, 4)]
    of_200 = [records[i] for i in (2, 5, 6, 7)]
    assert by_worker == [of_100, of_200]  # round robin on first sight
    assert counts == [4, 4]
    # exec and hold are the agent's to act on (it attaches); they reach the workers too.
    assert RingBatch(batch.data, own).bodies() == [records[0], records[5]]


def test_a_process_keeps_its_worker_until_it_exits() -> None:
    router = ShardRouter(3)
    assert [router.worker_of(t) for t in (7, 8, 9, 10, 7, 8)] == [0, 1, 2, 0, 0, 1]
    runs, _, _ = router.split(RingBatch.of([proc_record(layout.EV_EXIT, tgid=8)]))
    assert [len(r) > 0 for r in runs] == [False, True, False]
    assert 8 not in router.processes(1)  # a new process with pid 8 starts afresh
    assert router.worker_of(8) == 1 and router.processes(0) == {7, 10}


def test_processes_known_at_start_are_spread_by_their_connections() -> None:
    router = ShardRouter(2)
    router.assign({1: 1, 2: 50, 3: 40, 4: 5})
    assert router.processes(0) == {2} and router.processes(1) == {3, 4, 1}


def test_a_record_too_short_to_name_its_process_goes_to_worker_0() -> None:
    batch = RingBatch.of([b"\x01\x00"])
    runs, counts, _ = ShardRouter(2).split(batch)
    assert frame_batch(frame_of(batch.data, runs[0])).bodies() == [b"\x01\x00"]
    assert counts == [1, 0]


def test_frame_that_ends_inside_a_record_is_refused() -> None:
    batch = RingBatch.of([data_record(b"abc")])
    runs, _, _ = ShardRouter(1).split(batch)
    with pytest.raises(ValueError, match="ends inside a record"):
        frame_batch(frame_of(batch.data, runs[0])[:-8])


def test_a_worker_pipeline_makes_what_one_pipeline_makes_of_its_process() -> None:
    records = mixed_batch()
    alone, alone_sink, _, _ = make_pipeline()
    alone.handle_batch(RingBatch.of([records[i] for i in (0, 1, 3, 4)]))  # process 100's
    batch = RingBatch.of(records)
    runs, _, _ = ShardRouter(2).split(batch)
    worker, worker_sink, execs, _ = make_pipeline()
    worker.handle_batch(frame_batch(frame_of(batch.data, runs[0])))
    fields = ("type", "pid", "direction", "offset", "data", "conn_id")
    assert [[getattr(r, f) for f in fields] for r in worker_sink.records] == [
        [getattr(r, f) for f in fields] for r in alone_sink.records
    ]
    assert [r.type for r in worker_sink.records] == ["open", "data", "data"]  # 2 chunks, 1 call
    assert execs == [100]


def test_neighbouring_records_of_one_worker_make_one_run() -> None:
    records = [data_record(b"a" * n, tgid=100, offset=n) for n in range(1, 9)]
    records.insert(4, data_record(b"other", tgid=200))
    batch = RingBatch.of(records)
    runs, counts, _ = ShardRouter(2).split(batch)
    assert len(runs[0]) == 4 and counts == [8, 1]  # two runs, around process 200's record
    assert runs[0][0] == 0 and runs[0][-1] == len(batch.data)  # whole records, padded


def test_no_workers_is_refused() -> None:
    with pytest.raises(ValueError):
        ShardRouter(0)
