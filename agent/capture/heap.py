"""CPython's cyclic garbage collector, set for a process that moves events.

Every TLS call allocates a handful of container objects (its call, its Record, the
lists that carry them), so at CPython's default threshold (700 allocations) a
young-generation collection runs every ~100 events, and every tenth of those walks
the older generations too: everything the agent holds (bcc's tables, the flow
table, the caches, the imported modules).  Measured in bench/pipeline.py with a
heap of 300k ballast objects, the collector took 15-20 % of the HTTP/1 L7 path.

The hot path makes no reference cycles: its records and calls die by reference
counting the moment they are written.  The few cycles are per connection (an
HTTP/1 parser and its two streams), so collecting them rarely costs nothing but
some memory.  Hence, once start-up is over:

- what exists then is frozen: it lives as long as the agent, and the collector
  stops walking it (forked workers share those pages instead of dirtying them);
- the young generation is collected every YOUNG_THRESHOLD allocations, not 700.
"""

from __future__ import annotations

import gc

# ~10k events between young collections; the garbage in between is per-connection
# cycles only (a few KiB each), so memory stays bounded by connection churn.
YOUNG_THRESHOLD = 50_000


def settle_after_startup() -> None:
    """Freeze what start-up made and space out collections (see the module doc)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
