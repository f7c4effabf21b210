"""Readiness and liveness of a capture session, as /readyz and /healthz report them.

The session marks itself ready once every probe is attached (or the proxy listens) and
beats from its main loop; a loop that stops beating - wedged in a drain, a deadlock -
is what a liveness probe exists to catch.  Before it is ready the session counts as
alive: compiling the BPF program takes seconds, and that is the startup probe's to
time, not liveness'.
"""

from __future__ import annotations

import time

STALL_AFTER_S = 30.0


class Liveness:
    def __init__(self) -> None:
        self.ready = False
        self._beat = time.monotonic()

    def mark_ready(self) -> None:
        self.ready = True
        self.beat()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def alive(self, stall_after_s: float = STALL_AFTER_S) -> bool:
        return not self.ready or time.monotonic() - self._beat < stall_after_s
