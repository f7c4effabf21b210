"""What a drain loop does between batches, in the agent and in each worker.

Every turn: release partial calls whose missing chunks will not come.  Every
SWEEP_INTERVAL_S: look for what lost events hid - processes that ended and
connections closed without an event we saw (EventPipeline.sweep_ended).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.capture.pipeline import EventPipeline
from agent.flows.resolve import fd_is_socket
from agent.probes.targets import pid_alive

# A partial call whose remaining chunks have not come after this long never
# will (the kernel stopped sending it when the ring was full).
STALE_CALL_NS = 500_000_000
# How often the session looks for what lost events hid: processes that ended
# (their exit event dropped) and TLS libraries that appeared (their exec or mmap
# event dropped).  Events are the fast path; this is the safety net.
SWEEP_INTERVAL_S = 10.0


class Housekeeping:
    def __init__(
        self,
        pipeline: EventPipeline | None,
        *,
        on_sweep: Callable[[], None] | None = None,
        interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        """`pipeline`: None where there is none to keep (the agent, with workers);
        `on_sweep`: more to do at each sweep (the agent's rescan for TLS code)."""
        self._pipeline = pipeline
        self._on_sweep = on_sweep
        self._interval_s = interval_s
        self._next_sweep = time.monotonic() + interval_s

    def tick(self) -> None:
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.flush_calls(older_than_mono_ns=time.monotonic_ns() - STALE_CALL_NS)
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._interval_s
        if pipeline is not None:
            pipeline.sweep_ended(
                pid_alive, time.monotonic_ns(), is_socket=fd_is_socket,
                idle_ns=int(self._interval_s * 1e9),
            )  # fmt: skip
        if self._on_sweep is not None:
            self._on_sweep()
