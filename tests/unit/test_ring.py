"""take_records over ring bytes laid out as the kernel lays them out, and the batch
decoder over what it returns: wrap-around, discarded and busy records."""

from __future__ import annotations

import random

import pytest

from agent.events.decode import EventDecoder, SocketClosed, TlsCall
from agent.events.ring import (
    BUSY_BIT,
    DISCARD_BIT,
    HEADER_SIZE,
    RingBatch,
    record_span,
    take_records,
)
from tests.unit.eventbuild import close_record, conn_v4, data_record


class Ring:
    """A ring's data area written the way kernel/bpf/ringbuf.c writes it."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self.data = bytearray(size)
        self.producer = start
        self.consumer = start

    def put(self, body: bytes, flags: int = 0) -> int:
        pos = self.producer
        header = (len(body) | flags).to_bytes(4, "little") + bytes(4)
        for i, b in enumerate(header + body):
            self.data[(pos + i) % self.size] = b
        self.producer += record_span(len(body))
        return pos

    def doubled(self) -> bytes:
        """The kernel's mapping: the data area twice in a row."""
        return bytes(self.data) * 2

    def take(self, data: bytes | None = None, max_bytes: int = 1 << 30) -> list[bytes]:
        return self.take_batch(data, max_bytes).bodies()

    def take_batch(self, data: bytes | None = None, max_bytes: int = 1 << 30) -> RingBatch:
        pos, batch = take_records(
            self.doubled() if data is None else data, self.size, self.consumer, self.producer,
            max_bytes,
        )  # fmt: skip
        self.consumer = pos
        return batch


def test_records_come_back_in_order_and_exact() -> None:
    ring = Ring(4096)
    bodies = [b"a", b"bb" * 5, bytes(range(200)), b""]
    for body in bodies:
        ring.put(body)
    assert ring.take() == bodies
    assert ring.consumer == ring.producer


def test_span_is_header_plus_length_rounded_to_eight() -> None:
    assert record_span(0) == HEADER_SIZE
    assert record_span(1) == 16
    assert record_span(8) == 16
    assert record_span(9) == 24
    assert record_span(5 | DISCARD_BIT) == 16


def test_discarded_records_are_skipped_but_consumed() -> None:
    ring = Ring(4096)
    ring.put(b"keep-1")
    ring.put(b"dropped by the producer", flags=DISCARD_BIT)
    ring.put(b"keep-2")
    assert ring.take() == [b"keep-1", b"keep-2"]
    assert ring.consumer == ring.producer


def test_busy_record_stops_the_walk_until_committed() -> None:
    ring = Ring(4096)
    ring.put(b"first")
    busy_at = ring.put(b"being written", flags=BUSY_BIT)
    ring.put(b"after")
    assert ring.take() == [b"first"]
    assert ring.consumer == busy_at  # nothing past the busy record is taken
    assert ring.take() == []
    # The producer commits it: the length word loses its BUSY bit.
    ring.data[busy_at % ring.size : busy_at % ring.size + 4] = len(b"being written").to_bytes(
        4, "little"
    )
    assert ring.take() == [b"being written", b"after"]


def test_record_wrapping_the_end_reads_on_into_the_second_mapping() -> None:
    rng = random.Random(5)
    for start in range(4096 - 64, 4096, 8):  # every 8-aligned start near the end
        ring = Ring(4096, start=start + 4096 * 3)  # positions only grow: a later lap
        bodies = [rng.randbytes(rng.randrange(1, 300)) for _ in range(6)]
        for body in bodies:
            ring.put(body)
        assert ring.take(ring.doubled()) == bodies


def test_a_wrapped_record_in_a_single_mapping_is_refused_not_misread() -> None:
    ring = Ring(4096, start=4096 - 16)
    ring.put(b"x" * 100)
    with pytest.raises(ValueError, match="mapped twice"):
        ring.take(bytes(ring.data))


def test_the_data_area_may_start_inside_the_buffer() -> None:
    """The agent reads the data area in place, after the mapping's producer page."""
    ring = Ring(4096, start=4096 - 24)
    bodies = [b"first", b"wraps" * 20, b"third"]
    for body in bodies:
        ring.put(body)
    page = b"\xee" * 4096
    _, batch = take_records(page + ring.doubled(), ring.size, ring.consumer, ring.producer,
                            1 << 20, base=len(page))  # fmt: skip
    assert batch.bodies() == bodies


def test_max_bytes_bounds_a_batch_and_the_rest_follows() -> None:
    ring = Ring(1 << 16)
    bodies = [bytes([i]) * 100 for i in range(50)]
    for body in bodies:
        ring.put(body)
    first = ring.take(max_bytes=1000)
    assert 0 < len(first) < len(bodies)
    assert first + ring.take() == bodies


def test_batch_decoder_over_a_wrapped_ring_with_discards() -> None:
    """Real event layouts through a ring that wraps, with a record the producer
    discarded in the middle: every event decodes, byte-exact, in order."""
    ring = Ring(8192, start=8192 - 40)
    sock = conn_v4(("127.0.0.1", 443), ("127.0.0.1", 50000), gen=9)
    payloads = [random.Random(i).randbytes(n) for i, n in enumerate((700, 3000, 1, 2500))]
    ring.put(data_record(payloads[0], offset=0, socket=sock))
    ring.put(data_record(b"discarded", socket=sock), flags=DISCARD_BIT)
    offset = len(payloads[0])
    for p in payloads[1:]:
        ring.put(data_record(p, offset=offset, socket=sock))
        offset += len(p)
    ring.put(close_record(fd=7, gen=9))
    events = EventDecoder().decode_batch(ring.take_batch(ring.doubled()))
    calls = [e for e in events if isinstance(e, TlsCall)]
    assert [c.data for c in calls] == payloads
    assert [c.offset for c in calls] == [0, 700, 3700, 3701]
    assert all(c.socket.remote is not None and c.socket.remote.port == 443 for c in calls)
    assert calls[0].socket is calls[-1].socket  # decoded once, then looked up
    assert isinstance(events[-1], SocketClosed) and events[-1].gen == 9


def test_batch_decoder_keeps_going_past_a_bad_record() -> None:
    dec = EventDecoder()
    events = dec.decode_batch(
        RingBatch.of([b"\x01\x00", data_record(b"ok"), (99).to_bytes(4, "little")])
    )
    assert isinstance(events[0], ValueError)
    assert isinstance(events[1], TlsCall) and events[1].data == b"ok"
    assert isinstance(events[2], ValueError)


def _reference_walk(
    data: bytes, size: int, consumer: int, producer: int, max_bytes: int
) -> tuple[int, list[int]]:
    """kernel/bpf/ringbuf.c's consumer rules, written plainly (the model the C walk
    in agent/events/_decode.c must match)."""
    pos, spans = consumer, []
    while pos < min(producer, consumer + max_bytes):
        at = pos % size
        word = int.from_bytes(data[at : at + 4], "little")
        if word & BUSY_BIT:
            break
        if not word & DISCARD_BIT:
            spans += [at + HEADER_SIZE, word & ~(BUSY_BIT | DISCARD_BIT)]
        pos += record_span(word)
    return pos, spans


def test_the_walk_matches_the_kernels_rules_on_random_rings() -> None:
    rng = random.Random(0x4B1D)
    for _ in range(300):
        size = rng.choice([256, 1024, 4096])
        ring = Ring(size, start=rng.randrange(size * 3))
        while True:
            body = rng.randbytes(rng.choice([0, 1, 7, 8, rng.randrange(size // 4)]))
            if ring.producer + record_span(len(body)) - ring.consumer > size:
                break
            flags = rng.choice([0, 0, 0, DISCARD_BIT, BUSY_BIT])
            ring.put(body, flags=flags)
        max_bytes = rng.choice([1 << 30, rng.randrange(1, size)])
        doubled = ring.doubled()
        expected = _reference_walk(doubled, size, ring.consumer, ring.producer, max_bytes)
        pos, batch = take_records(doubled, size, ring.consumer, ring.producer, max_bytes)
        assert (pos, batch.spans) == expected


def test_a_header_past_the_mapping_or_a_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="past the"):
        take_records(bytes(16), 32, 14, 40, 1 << 20)
    with pytest.raises(ValueError, match="power of two"):
        take_records(bytes(96), 48, 0, 8, 1 << 20)
