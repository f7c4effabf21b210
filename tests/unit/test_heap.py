"""The collector settings the capture session applies once started (agent/capture/heap.py)."""

from __future__ import annotations

import gc
import resource

from agent.capture import heap


def test_settle_freezes_start_up_and_spaces_young_collections() -> None:
    before = gc.get_threshold()
    start_up_objects = [[i] for i in range(1000)]
    try:
        heap.settle_after_startup()
        assert gc.get_freeze_count() >= len(start_up_objects)
        assert gc.get_threshold() == (heap.AUTOMATIC_THRESHOLD, *before[1:])
        # Later garbage cycles are still collected, only less often.
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_young_collections_run_between_batches_once_enough_is_added() -> None:
    """collect_between_batches() collects only past YOUNG_THRESHOLD net new
    containers, and then an older generation as often as the thresholds say."""
    before = gc.get_threshold()
    gc.collect()
    try:
        gc.set_threshold(heap.AUTOMATIC_THRESHOLD, 2, 1000)
        kept = [[] for _ in range(heap.YOUNG_THRESHOLD // 2)]
        cycle: list = []
        cycle.append(cycle)
        del cycle
        heap.collect_between_batches()
        assert gc.get_count()[0] >= heap.YOUNG_THRESHOLD // 2  # not yet
        kept += [[] for _ in range(heap.YOUNG_THRESHOLD)]
        heap.collect_between_batches()
        assert gc.get_count()[:2] == (0, 1)  # a young collection
        assert gc.garbage == [] and gc.collect(0) == 0  # the cycle went with it
        kept += [[] for _ in range(heap.YOUNG_THRESHOLD)]
        heap.collect_between_batches()
        assert gc.get_count()[1] == 2
        kept += [[] for _ in range(heap.YOUNG_THRESHOLD)]
        heap.collect_between_batches()
        assert gc.get_count()[:2] == (0, 0)  # the second generation's turn
    finally:
        gc.set_threshold(*before)


def test_glibc_keeps_freed_memory_for_reuse() -> None:
    """The agent's machines run glibc: its mallopt() takes both thresholds."""
    assert heap.keep_freed_memory() is True


def test_a_batch_of_lines_freed_and_made_again_faults_nothing_in() -> None:
    """What the thresholds are for: a drain's worth of JSON lines (a thousand ~6 KB
    lines), freed and made again batch after batch, reuses the heap.  glibc's
    defaults trim the freed heap each time: ~14k faults here for 20 batches."""
    heap.keep_freed_memory()

    def batch() -> list[bytes]:
        return [bytes(6000) for _ in range(1000)]

    batch()  # the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        lines = batch()
        del lines
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 20 * 6000 * 1000 // 4096 // 10, faults  # < 10 % of the pages
