"""CallAssembler: chunk events (decoded from raw records) -> one TlsCall per TLS call."""

from __future__ import annotations

import random

from agent.events import layout
from agent.events.calls import CallAssembler
from agent.events.decode import TlsCall
from tests.unit.eventbuild import call_chunks, conn_v4

CHUNK = layout.CHUNK_SIZE


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def feed_all(assembler: CallAssembler, chunks: list[TlsCall]) -> list[TlsCall]:
    out: list[TlsCall] = []
    for chunk in chunks:
        out += assembler.feed(chunk)
    return out


# --- complete calls ------------------------------------------------------------------------


def test_single_chunk_call_is_complete_at_once() -> None:
    a = CallAssembler()
    data = b"GET / HTTP/1.1\r\n\r\n"
    sock = conn_v4(("10.0.0.1", 443), ("10.0.0.2", 40000))
    [chunk] = call_chunks(data, tid=5, ts_ns=100, offset=7, socket=sock)
    [call] = a.feed(chunk)
    assert call.complete
    assert call.data == data
    assert call is chunk
    assert call.len == len(data)
    assert not call.truncated
    assert (a.incomplete_calls, a.out_of_order_chunks) == (0, 0)
    assert a.flush() == []


def test_multi_chunk_call_is_reassembled_exactly() -> None:
    a = CallAssembler()
    data = payload(40000)
    chunks = call_chunks(data, tid=5, ts_ns=100)
    assert [len(c.data) for c in chunks] == [CHUNK, CHUNK, 40000 - 2 * CHUNK]
    assert [c.chunk_off for c in chunks] == [0, CHUNK, 2 * CHUNK]
    assert a.feed(chunks[0]) == []
    assert a.feed(chunks[1]) == []
    [call] = a.feed(chunks[2])
    assert call.complete
    assert call.data == data
    assert call.chunk_off == 0
    assert call.captured_len == 40000
    assert call.len == 40000
    assert not call.truncated
    assert a.flush() == []
    assert (a.incomplete_calls, a.out_of_order_chunks) == (0, 0)


def test_call_of_exact_multiple_of_chunk_size() -> None:
    a = CallAssembler()
    data = payload(2 * CHUNK, seed=3)
    chunks = call_chunks(data, tid=1, ts_ns=1)
    assert len(chunks) == 2
    [call] = feed_all(a, chunks)
    assert call.complete and call.data == data
    assert a.flush() == []


def test_consecutive_calls_of_one_thread() -> None:
    a = CallAssembler()
    first, second = payload(20000, 1), payload(3, 2)
    calls = feed_all(
        a, call_chunks(first, tid=9, ts_ns=10) + call_chunks(second, tid=9, ts_ns=20, offset=20000)
    )
    assert [c.data for c in calls] == [first, second]
    assert all(c.complete for c in calls)
    assert a.incomplete_calls == 0


def test_interleaved_threads_are_reassembled_separately() -> None:
    a = CallAssembler()
    data_a, data_b = payload(40000, 1), payload(20000, 2)
    ca = call_chunks(data_a, tid=1, ts_ns=100, direction=layout.DIR_EGRESS)
    cb = call_chunks(data_b, tid=2, ts_ns=101, direction=layout.DIR_INGRESS)
    order = [ca[0], cb[0], ca[1], cb[1], ca[2]]
    out = [(i, call) for i, chunk in enumerate(order) for call in a.feed(chunk)]
    assert [i for i, _ in out] == [3, 4]
    (_, call_b), (_, call_a) = out
    assert call_a.complete and call_a.data == data_a and call_a.tid == 1
    assert call_a.direction == "egress"
    assert call_b.complete and call_b.data == data_b and call_b.tid == 2
    assert call_b.direction == "ingress"
    assert (a.incomplete_calls, a.out_of_order_chunks) == (0, 0)


def test_many_threads_random_interleaving() -> None:
    rng = random.Random(42)
    a = CallAssembler()
    expected: dict[int, bytes] = {}
    queues: list[list[TlsCall]] = []
    for tid in range(1, 9):
        data = payload(rng.randrange(1, 5 * CHUNK), seed=tid)
        expected[tid] = data
        queues.append(call_chunks(data, tid=tid, ts_ns=1000 + tid))
    got: dict[int, bytes] = {}
    while any(queues):
        q = rng.choice([q for q in queues if q])
        for call in a.feed(q.pop(0)):
            assert call.complete
            got[call.tid] = call.data
    assert got == expected


# --- lost chunks -------------------------------------------------------------------------


def test_lost_middle_chunk_released_by_next_call_of_same_thread() -> None:
    a = CallAssembler()
    data = payload(40000)
    chunks = call_chunks(data, tid=7, ts_ns=100)
    assert a.feed(chunks[0]) == []
    # chunks[1] was refused by the ring, so the kernel never sent chunks[2].
    nxt = b"next call"
    [nxt_chunk] = call_chunks(nxt, tid=7, ts_ns=200, offset=40000)
    incomplete, complete = a.feed(nxt_chunk)
    assert not incomplete.complete
    assert incomplete.data == data[:CHUNK]
    assert incomplete.captured_len == CHUNK
    assert incomplete.len == 40000
    assert incomplete.truncated
    assert incomplete.ts_mono_ns == 100
    assert complete.complete and complete.data == nxt
    assert a.incomplete_calls == 1
    assert a.out_of_order_chunks == 0


def test_lost_final_chunk_keeps_the_prefix() -> None:
    a = CallAssembler()
    data = payload(40000)
    chunks = call_chunks(data, tid=7, ts_ns=100)
    assert feed_all(a, chunks[:2]) == []
    released = a.feed(call_chunks(b"z", tid=7, ts_ns=300)[0])
    assert len(released) == 2
    incomplete = released[0]
    assert not incomplete.complete
    assert incomplete.data == data[: 2 * CHUNK]
    assert incomplete.captured_len == 2 * CHUNK
    assert a.incomplete_calls == 1


def test_other_threads_do_not_release_a_pending_call() -> None:
    a = CallAssembler()
    data = payload(40000)
    chunks = call_chunks(data, tid=7, ts_ns=100)
    a.feed(chunks[0])
    [other] = a.feed(call_chunks(b"other", tid=8, ts_ns=150)[0])
    assert other.complete and other.data == b"other"
    [call] = feed_all(a, chunks[1:])
    assert call.complete and call.data == data
    assert a.incomplete_calls == 0


def test_chunk_without_its_start_is_dropped_and_counted() -> None:
    a = CallAssembler()
    chunks = call_chunks(payload(40000), tid=3, ts_ns=100)
    assert a.feed(chunks[1]) == []
    assert a.feed(chunks[2]) == []
    assert a.out_of_order_chunks == 2
    assert a.incomplete_calls == 0
    assert a.flush() == []
    # The thread's next call is unaffected.
    [call] = a.feed(call_chunks(b"ok", tid=3, ts_ns=200)[0])
    assert call.complete and call.data == b"ok"


def test_orphan_chunk_releases_the_pending_call_of_its_thread() -> None:
    a = CallAssembler()
    first = payload(40000, 1)
    a.feed(call_chunks(first, tid=3, ts_ns=100)[0])
    # A later call of the same thread whose first chunk was lost.
    orphan = call_chunks(payload(40000, 2), tid=3, ts_ns=200)[1]
    [incomplete] = a.feed(orphan)
    assert not incomplete.complete
    assert incomplete.data == first[:CHUNK]
    assert a.incomplete_calls == 1
    assert a.out_of_order_chunks == 1


# --- flush -------------------------------------------------------------------------------


def test_flush_older_than_releases_only_older_calls() -> None:
    a = CallAssembler()
    d1, d2 = payload(20000, 1), payload(20000, 2)
    a.feed(call_chunks(d1, tid=1, ts_ns=1000)[0])
    a.feed(call_chunks(d2, tid=2, ts_ns=5000)[0])

    [old] = a.flush(older_than_mono_ns=3000)
    assert old.tid == 1
    assert not old.complete
    assert old.data == d1[:CHUNK]
    assert old.captured_len == CHUNK
    assert a.incomplete_calls == 1

    assert a.flush(older_than_mono_ns=5000) == []  # started at 5000: not before it
    [newer] = a.flush(older_than_mono_ns=5001)
    assert newer.tid == 2
    assert newer.data == d2[:CHUNK]
    assert a.incomplete_calls == 2
    assert a.flush() == []


def test_flush_all() -> None:
    a = CallAssembler()
    a.feed(call_chunks(payload(20000), tid=1, ts_ns=1000)[0])
    a.feed(call_chunks(payload(20000), tid=2, ts_ns=9_999_999)[0])
    released = a.flush()
    assert sorted(c.tid for c in released) == [1, 2]
    assert not any(c.complete for c in released)
    assert a.incomplete_calls == 2
    assert a.flush() == []


def test_flushed_call_does_not_swallow_its_late_chunks_into_a_new_call() -> None:
    a = CallAssembler()
    chunks = call_chunks(payload(40000), tid=1, ts_ns=1000)
    a.feed(chunks[0])
    a.flush()
    assert a.feed(chunks[1]) == []
    assert a.out_of_order_chunks == 1


# --- truncation --------------------------------------------------------------------------


def test_truncated_single_chunk_call() -> None:
    a = CallAssembler()
    captured = payload(CHUNK)
    [chunk] = call_chunks(captured, tid=1, ts_ns=1, len=100_000)
    [call] = a.feed(chunk)
    assert call.complete  # everything the cap allowed arrived
    assert call.truncated
    assert call.len == 100_000
    assert call.data == captured


def test_truncated_multi_chunk_call() -> None:
    a = CallAssembler()
    captured = payload(20000)
    chunks = call_chunks(captured, tid=1, ts_ns=1, len=1 << 21)
    [call] = feed_all(a, chunks)
    assert call.complete and call.truncated
    assert call.data == captured
    assert call.captured_len == 20000
    assert call.len == 1 << 21


def test_not_truncated_when_everything_captured() -> None:
    [chunk] = call_chunks(b"abc", tid=1, ts_ns=1)
    [call] = CallAssembler().feed(chunk)
    assert not call.truncated
