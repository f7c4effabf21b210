"""Attach probes to new targets on a thread of its own.

An exec or an executable mmap can bring a TLS library (or a Go program) to
probe.  Finding it and attaching takes milliseconds to tens of milliseconds (ELF
and Go analysis, one perf_event_open per probe), and the drain loop must never
wait that long: the ring keeps filling meanwhile.  So the loop only names the
process here, and this thread does the work, one process at a time, each at
most once per request burst.

Held processes (--hold-new-libraries, bpf/process.c) come first: the kernel
stopped them as they mapped a TLS library, and each is resumed (SIGCONT) as
soon as its libraries are probed, or when its hold has lasted `hold_max`
seconds, or when the agent stops - whichever comes first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

RESCAN = -1  # not a pid: the work item "look at every process"


class TargetAttacher:
    def __init__(
        self,
        attach_pid: Callable[[int], None],
        hold_max: float = 2.0,
        rescan_all: Callable[[], None] | None = None,
    ) -> None:
        self._attach_pid = attach_pid
        self._rescan_all = rescan_all
        self._rescan_wanted = False
        self._wanted: dict[int, None] = {}  # insertion-ordered set of pids
        self._held: dict[int, float] = {}  # pid -> when its hold must end (monotonic)
        self._working: set[int] = set()  # pids being attached right now
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self.hold_max = hold_max
        self.failures = 0  # attach work that raised (logged; the process is skipped)
        self.holds = 0  # processes the kernel stopped for us
        self.hold_timeouts = 0  # resumed because the hold ran out, not because we were done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tlscap-attach", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(
            target=self._watch_holds, name="tlscap-hold-watchdog", daemon=True
        )
        self._watchdog.start()

    def request(self, pid: int) -> None:
        with self._cond:
            self._wanted[pid] = None
            self._cond.notify_all()

    def rescan(self) -> None:
        """Look at every process once more (the periodic safety net), when idle."""
        with self._cond:
            self._rescan_wanted = True
            self._cond.notify_all()

    def hold(self, pid: int) -> None:
        """The kernel stopped `pid`: probe it first, then resume it."""
        with self._cond:
            self.holds += 1
            self._held.setdefault(pid, time.monotonic() + self.hold_max)
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in (self._thread, self._watchdog):
            if thread is not None:
                thread.join(timeout)
        self._thread = self._watchdog = None
        with self._cond:
            for pid in list(self._held):
                self._resume_locked(pid)

    def _next(self) -> tuple[int, bool] | None:
        """(pid, held), or (RESCAN, False) for a rescan of every process."""
        with self._cond:
            while (
                not self._wanted
                and not self._pending_holds()
                and not self._rescan_wanted
                and not self._stopping
            ):
                self._cond.wait()
            if self._stopping:
                return None
            holds = self._pending_holds()
            if holds:
                return holds[0], True
            if self._wanted:
                pid = next(iter(self._wanted))
                del self._wanted[pid]
                return pid, False
            self._rescan_wanted = False
            return RESCAN, False

    def _pending_holds(self) -> list[int]:
        return [pid for pid in self._held if pid not in self._working]

    def _run(self) -> None:
        while (item := self._next()) is not None:
            pid, held = item
            with self._cond:
                self._working.add(pid)
            try:
                if pid == RESCAN:
                    if self._rescan_all is not None:
                        self._rescan_all()
                else:
                    self._attach_pid(pid)
            except Exception:
                # A process that exits mid-attach, an unreadable binary: never
                # fatal to the agent.
                self.failures += 1
                log.warning("attaching to pid %d failed", pid, exc_info=True)
            finally:
                with self._cond:
                    self._working.discard(pid)
                    if held:
                        self._wanted.pop(pid, None)  # done already
                        self._resume_locked(pid)

    def _watch_holds(self) -> None:
        """Resume every hold that outlived hold_max, busy attacher or not."""
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                for pid, deadline in list(self._held.items()):
                    if deadline <= now:
                        self.hold_timeouts += 1
                        log.warning("pid %d: resumed after a %.1f s hold", pid, self.hold_max)
                        self._resume_locked(pid)
                wait = min((d for d in self._held.values()), default=now + 1.0) - now
                self._cond.wait(max(0.01, min(wait, 1.0)))

    def _resume_locked(self, pid: int) -> None:
        deadline = self._held.pop(pid, None)
        if deadline is None:
            return
        with contextlib.suppress(ProcessLookupError):  # killed while held
            os.kill(pid, signal.SIGCONT)
        held_ms = (time.monotonic() - deadline + self.hold_max) * 1000
        log.info("pid %d: resumed after a %.1f ms hold", pid, held_ms)
        self._cond.notify_all()
