"""The collector settings the capture session applies once started (agent/capture/heap.py)."""

from __future__ import annotations

import gc

from agent.capture import heap


def test_settle_freezes_start_up_and_spaces_young_collections() -> None:
    before = gc.get_threshold()
    start_up_objects = [[i] for i in range(1000)]
    try:
        heap.settle_after_startup()
        assert gc.get_freeze_count() >= len(start_up_objects)
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *before[1:])
        # Later garbage cycles are still collected, only less often.
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
