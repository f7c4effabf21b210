"""The agent's heap, set for a process that moves events: CPython's cyclic garbage
collector, and the C allocator's habit of giving freed memory back at once.

Every TLS call allocates a handful of container objects (its call, its Record, the
lists that carry them), so at CPython's default threshold (700 allocations) a
young-generation collection runs every ~100 events, and every tenth of those walks
the older generations too: everything the agent holds (bcc's tables, the flow
table, the caches, the imported modules).  Measured in bench/pipeline.py with a
heap of 300k ballast objects, the collector took 15-20 % of the HTTP/1 L7 path.

The hot path makes no reference cycles: its records and calls die by reference
counting the moment they are written, so collecting rarely costs nothing but
some memory.  When it collects matters too: a young collection walks every
container alive at that moment, and in the middle of a batch that is the whole
batch (its records, their exchanges and header lists: tens of thousands of
objects, ~4k instructions per event in bench/pipeline.py's HTTP/1 run).  Between
two batches they are gone.  Hence, once start-up is over:

- what exists then is frozen: it lives as long as the agent, and the collector
  stops walking it (forked workers share those pages instead of dirtying them);
- the young generation is collected between batches (collect_between_batches,
  called by the pipeline after each), once YOUNG_THRESHOLD more containers
  are alive than at the last collection, not every 700 allocations;
- the collector's own trigger stays, far above that, as a safety net for code
  outside the drain loop (AUTOMATIC_THRESHOLD).

The C allocator (glibc) serves a batch's big buffers (its payload copies, its
JSON lines, a worker's frame: megabytes per drain) from fresh mmap()s, or trims
them off the heap when the batch is freed, so the next batch faults the same
memory in again and the kernel zeroes every page: measured 2.8 page faults and
7-10 us of system time per 4 KiB data record with JSON lines, about as much as
encoding it.  So freed memory is kept for reuse (mallopt: allocations below
MMAP_THRESHOLD come from the heap, and the heap keeps up to TRIM_THRESHOLD free
at its top).  The cost is memory: after a burst the agent holds up to that much
more than it needs.
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger(__name__)

# Net new containers between young collections; the garbage in between is rare
# cycles only, so memory stays bounded by connection churn.
YOUNG_THRESHOLD = 50_000
AUTOMATIC_THRESHOLD = 1_000_000


MMAP_THRESHOLD = 16 << 20  # a 1 MiB TLS call's line (~1.4 MB) stays on the heap
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def settle_after_startup() -> None:
    """Freeze what start-up made, space out collections and keep freed memory for
    reuse (see the module doc)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(AUTOMATIC_THRESHOLD, older, oldest)
    keep_freed_memory()


def collect_between_batches() -> None:
    """A young collection (or an older one, when as many young ones have run as
    the collector's own thresholds say) once YOUNG_THRESHOLD containers have
    been added since the last: called when a batch's objects are gone."""
    young, older, oldest = gc.get_count()
    if young < YOUNG_THRESHOLD:
        return
    _, older_every, oldest_every = gc.get_threshold()
    gc.collect(2 if oldest >= oldest_every else 1 if older >= older_every else 0)


def keep_freed_memory() -> bool:
    """Tell glibc's allocator to reuse freed memory rather than give it back (True),
    or say why not (another C library: its own defaults stay)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own libc
    if mallopt is None:
        log.debug("no mallopt() in this C library: allocator left as it is")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.debug("mallopt() refused the thresholds: allocator left as it is")
    return ok
