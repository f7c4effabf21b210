"""Attach probes to new targets on a thread of its own.

An exec or an executable mmap can bring a TLS library (or a Go program) to
probe.  Finding it and attaching takes milliseconds to tens of milliseconds (ELF
and Go analysis, one perf_event_open per probe), and the drain loop must never
wait that long: the ring keeps filling meanwhile.  So the loop only names the
process here, and this thread does the work, one process at a time, each at
most once per request burst.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class TargetAttacher:
    def __init__(self, attach_pid: Callable[[int], None]) -> None:
        self._attach_pid = attach_pid
        self._wanted: dict[int, None] = {}  # insertion-ordered set of pids
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failures = 0  # attach work that raised (logged; the process is skipped)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tlscap-attach", daemon=True)
        self._thread.start()

    def request(self, pid: int) -> None:
        with self._cond:
            self._wanted[pid] = None
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def idle(self) -> bool:
        """Nothing waiting (for tests and the ready check)."""
        with self._cond:
            return not self._wanted

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                pid = next(iter(self._wanted))
                del self._wanted[pid]
            try:
                self._attach_pid(pid)
            except Exception:
                # A process that exits mid-attach, an unreadable binary: never
                # fatal to the agent.
                self.failures += 1
                log.warning("attaching to pid %d failed", pid, exc_info=True)
