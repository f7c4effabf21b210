"""The periodic /proc sweep: connections whose close or exit event was lost.

Events are the fast path; this is the safety net (agent/capture/housekeeping.py
calls FlowTable.sweep_ended and sweep_closed every SWEEP_INTERVAL_S).  Processes
that ended without an exit event we saw, and idle connections whose fd is no
socket any more (their close event was dropped while the ring was full), are
closed: counted, never silent.

Why in two steps: /proc tells how things are now, the events how they were when
they were sent, and the agent may be seconds behind the kernel: a process that
exits while its last calls, closes and exit event wait in the ring has no fds
left in /proc.  So what one sweep finds gone (with when it looked, and how far
the events had come then: _events_seen_until) is only closed by a later sweep,
once the events sent before that look have been handled (_caught_up): by then
its close or its process's exit has closed it if it was coming, and a call made
after the look shows it alive.  Should the sweep still close a live connection,
its next call on the same socket reopens it as it was (Sweeper.reopen).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.events.decode import KernelSocket, TlsCall
    from agent.flows.connection import Connection, FlowStats
    from agent.records.record import Record

log = logging.getLogger(__name__)

# Connections the sweep closed, remembered by (tgid, fd) so that one which speaks
# again on the same socket (the sweep was wrong) comes back as what it was.
MAX_SWEPT = 1 << 16


class Sweeper:
    """A FlowTable's sweep: what one sweep saw gone, for the next one to close.

    It works on the table's own maps of connections (the same dicts, never
    copies) and opens and closes connections through the table, so its records
    and counts are the table's."""

    def __init__(
        self,
        by_fd: dict[tuple[int, int], Connection],
        by_ssl: dict[tuple[int, int], Connection],
        stats: FlowStats,
        *,
        tgids: Callable[[], set[int]],
        close: Callable[[Connection, int, int], list[Record]],
        end_process: Callable[[int, int, int], list[Record]],
        new_conn: Callable[[int, int, int, KernelSocket, int, str, str, int, str], Connection],
    ) -> None:
        self._by_fd = by_fd
        self._by_ssl = by_ssl
        self._stats = stats
        self._tgids = tgids
        self._close = close
        self._end_process = end_process
        self._new_conn = new_conn
        # Found gone by one sweep, with when it looked and how far the events had
        # come then: processes by tgid, connections by (tgid, fd).
        self._ended: dict[int, tuple[int, int]] = {}
        self._gone: dict[tuple[int, int], tuple[Connection, int, int]] = {}
        # Closed by the sweep, by (tgid, fd), oldest first (MAX_SWEPT).
        self.swept: dict[tuple[int, int], Connection] = {}
        # The newest kernel timestamp of the events handled that no connection
        # in the table shows in its last_used: closes, exits, binds, and the last
        # calls of connections closed since (_events_seen_until).
        self._newest_event_ns = 0

    def saw(self, ts_mono_ns: int) -> None:
        """The table handled an event of this kernel time that no connection in it
        shows any more."""
        if ts_mono_ns > self._newest_event_ns:
            self._newest_event_ns = ts_mono_ns

    def ended(self, alive: Callable[[int], bool], ts_mono_ns: int) -> list[Record]:
        """FlowTable.sweep_ended."""
        out: list[Record] = []
        seen_until = self._events_seen_until()
        for tgid, (looked_at, seen_then) in list(self._ended.items()):
            if not self._caught_up(looked_at, seen_then, seen_until):
                self._ended[tgid] = (looked_at, seen_until)
                continue
            del self._ended[tgid]
            # Only what it had when it was found gone: a process that has its
            # pid now is another one.
            closed = self._end_process(tgid, ts_mono_ns, looked_at)
            if closed:
                self._stats.exits_recovered += 1
                out.extend(closed)
        for tgid in self._tgids():
            if tgid not in self._ended and not alive(tgid):
                self._ended[tgid] = (ts_mono_ns, seen_until)
        return out

    def closed(
        self, is_socket: Callable[[int, int], bool], idle_before_mono_ns: int, ts_mono_ns: int
    ) -> list[Record]:
        """FlowTable.sweep_closed."""
        out: list[Record] = []
        seen_until = self._events_seen_until()
        asked: set[tuple[int, int]] = set()
        for key, (conn, looked_at, seen_then) in list(self._gone.items()):
            if self._by_fd.get(key) is not conn or conn.last_used >= looked_at:
                del self._gone[key]  # closed by its own event meanwhile, or it spoke
                continue
            if not self._caught_up(looked_at, seen_then, seen_until):
                self._gone[key] = (conn, looked_at, seen_until)
                continue
            del self._gone[key]
            asked.add(key)
            if is_socket(*key):
                continue  # a socket again: a new one is told apart by its gen
            del self._by_fd[key]
            self._stats.closes_recovered += 1
            self.swept[key] = conn
            if len(self.swept) > MAX_SWEPT:
                del self.swept[next(iter(self.swept))]
            out.extend(self._close(conn, ts_mono_ns, conn.tgid))
        for key, conn in self._by_fd.items():
            idle = conn.last_used < idle_before_mono_ns
            if idle and key not in self._gone and key not in asked and not is_socket(*key):
                self._gone[key] = (conn, ts_mono_ns, seen_until)
        return out

    def reopen(self, swept: Connection, call: TlsCall) -> Connection:
        """A connection the sweep closed speaks again on the same socket: the
        sweep was wrong.  It comes back (under a new id, as after an eviction)
        with what was known of it, its offsets going on where they were."""
        self._stats.sweep_reopened += 1
        log.warning(
            "connection %d/%d closed by the sweep spoke again on the same socket: reopened",
            call.tgid, call.fd,
        )  # fmt: skip
        sock = call.socket
        conn = self._new_conn(
            call.tgid, call.fd, swept.gen, sock, call.ts_mono_ns, call.comm, call.source,
            call.cgroup_id, f"{call.tgid}-{call.fd}-{call.ts_mono_ns:x}",
        )  # fmt: skip
        conn.local = sock.local or swept.local
        conn.remote = sock.remote or swept.remote
        if conn.role == "unknown":
            conn.role = swept.role
        conn.next_offset = dict(swept.next_offset)
        return conn

    def _events_seen_until(self) -> int:
        """The newest kernel timestamp among the events handled so far (of those
        the table sees): how far the agent has come in the kernel's story."""
        newest = self._newest_event_ns
        for table in (self._by_fd, self._by_ssl):
            for conn in table.values():
                if conn.last_used > newest:
                    newest = conn.last_used
        return newest

    @staticmethod
    def _caught_up(looked_at: int, seen_then: int, seen_now: int) -> bool:
        """Whether the events sent before a sweep looked at /proc (at `looked_at`)
        have all been handled: one sent after it has (the ring is first in, first
        out), or none at all came since the last sweep (`seen_then`: the drain
        loop empties the ring between two sweeps, so there were none left).
        Still behind while events come that are all older than the look.  (A
        worker of agent/capture/workers.py gets its events through a pipe that
        may lag as well; should a close come too early there, the connection's
        next call reopens it as it was: reopen.)"""
        return seen_now >= looked_at or seen_now == seen_then
