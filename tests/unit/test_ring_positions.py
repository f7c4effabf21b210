"""The ring's producer and consumer positions are loaded and stored in one access.

The kernel reads the consumer position while the agent stores it.  A store made a
byte at a time (what `struct.Struct("<Q").pack_into` does) can be read half-written;
the kernel then took the ring for full and refused records with room to spare
(bench/README.md, "A torn consumer position").
"""

from __future__ import annotations

import mmap
import multiprocessing
import time

import pytest

from agent.events.ring import load_position, store_position

# Every byte differs between the two, so any mix of them is neither.
LOW = 0x00FF_FF00_FF00_FF00
HIGH = 0x0100_00FF_00FF_00FF


def test_a_stored_position_loads_back() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    store_position(page, 8, 2**64 - 8)
    assert load_position(page, 8) == 2**64 - 8
    assert load_position(page, 0) == 0
    assert page[8:16] == (2**64 - 8).to_bytes(8, "little")


@pytest.mark.parametrize("offset", [-8, 3, mmap.PAGESIZE - 4, mmap.PAGESIZE])
def test_only_an_aligned_word_inside_the_buffer_is_a_position(offset: int) -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    with pytest.raises(ValueError, match="aligned 8-byte word"):
        load_position(page, offset)
    with pytest.raises(ValueError, match="aligned 8-byte word"):
        store_position(page, offset, 1)


def test_a_read_only_mapping_is_refused_a_store() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ)
    with pytest.raises(BufferError, match="not writable"):
        store_position(page, 0, 1)
    with pytest.raises(OverflowError):
        store_position(mmap.mmap(-1, mmap.PAGESIZE), 0, -1)


def _store_alternately(page: mmap.mmap, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            store_position(page, 0, LOW)
            store_position(page, 0, HIGH)


def test_another_cpu_never_sees_a_half_stored_position() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and shared: the child writes into it
    store_position(page, 0, LOW)
    writer = multiprocessing.get_context("fork").Process(
        target=_store_alternately, args=(page, 1.0)
    )
    writer.start()
    seen: set[int] = set()
    loads = 0
    try:
        while writer.is_alive() or loads == 0:
            for _ in range(1000):
                seen.add(load_position(page, 0))
            loads += 1000
    finally:
        writer.join(10)
    assert writer.exitcode == 0
    assert seen == {LOW, HIGH}, f"{len(seen - {LOW, HIGH})} torn values in {loads} loads"
