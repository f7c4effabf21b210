"""The flow table: which connection each TLS call belongs to.

Sans-I/O: it takes decoded kernel events and returns Records.  The two things
it needs from the outside world are handed in (a socket resolver for the local
address of a connection, a clock to turn kernel time into wall time), and the
one thing it asks of the kernel - "remember this socket that predates us, so its
close is reported" - is queued in `kernel_registrations` for the shell to carry
out.

Identity: a connection is (tgid, fd) plus the kernel's `gen` for the socket,
which tells apart two sockets that reused one fd.  Data with no fd (memory
BIOs) is its own connection per SSL object until the kernel binds the object
to its socket (bpf/calls.c, membio_bind): its records are held meanwhile, a
bounded while, so that they too go out with the socket's endpoints.  Offsets come from the kernel,
which counts them per SSL object; here they are only checked for gaps, the
visible trace of calls lost in the kernel.  Connections whose close or exit
event was lost are found by a periodic sweep of /proc (sweep.py).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import replace

from agent.events.decode import KernelSocket, SocketBound, SocketClosed, TlsCall
from agent.flows._known_calls import KnownCalls
from agent.flows.connection import (
    Connection,
    FlowStats,
    KernelRegistration,
    SocketFacts,
    SocketLookup,
    WallClock,
)
from agent.flows.sweep import Sweeper
from agent.records.record import Record

# gen values user space chooses for sockets it registers carry this bit, so
# they can never equal a kernel timestamp.
USER_GEN_BIT = 1 << 63

# Bounds on what the table keeps.  A connection whose close never reaches us
# (the kernel lost it, or the process was outside our view) would otherwise stay
# forever.  Live connections: the kernel's table of TLS sockets holds 256k
# (bpf/tlscap.h tls_sockets), so a table this size drops only what the kernel
# could not follow either; sockets found at start-up: every socket on the host.
MAX_CONNECTIONS = 1 << 18
MAX_ADOPTED = 1 << 18
# Records of TLS objects that have no socket yet (memory BIOs: the kernel binds
# them at their thread's next socket write or read) wait for it, at most this
# many per connection and in all; the shell releases them after a while
# (release_held).  Past any bound they go out without endpoints, counted.
MAX_HELD_PER_CONN = 256
MAX_HELD_RECORDS = 8192
MAX_HELD_BYTES = 32 << 20


class FlowTable:
    def __init__(
        self,
        resolver: SocketLookup,
        mono_to_wall: Callable[[int], int],
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_adopted: int = MAX_ADOPTED,
    ) -> None:
        if max_connections < 1 or max_adopted < 0:
            raise ValueError("max_connections must be >= 1 and max_adopted >= 0")
        self._max_connections = max_connections
        # Evict a sixteenth at a time: one sort per many new connections, not
        # one per connection, once the table is at its bound.
        self._evict_to = max_connections - max(1, max_connections // 16)
        self._max_adopted = max_adopted
        self._resolver = resolver
        self._wall = mono_to_wall
        self._by_fd: dict[tuple[int, int], Connection] = {}
        # A call on a connection already followed: its step (offsets, the record) in
        # C, for on_call and, a batch's run of such calls at a time, for the pipeline.
        self._known = KnownCalls(
            self._by_fd, mono_to_wall, Record.for_call, TlsCall, Connection, KernelSocket,
            mono_to_wall.offset if type(mono_to_wall) is WallClock else None,
        )  # fmt: skip
        self._by_ssl: dict[tuple[int, int], Connection] = {}
        self._user_gens = itertools.count(1)
        # Sockets adopted at start-up, by (tgid, fd): a call that was already in
        # the ring when we registered one still says gen 0 and must join it.
        self._adopted: dict[tuple[int, int], KernelRegistration] = {}
        self.kernel_registrations: list[KernelRegistration] = []
        self.stats = FlowStats()
        # Connections holding records, oldest hold first (keys of _by_ssl).
        self._holding: dict[tuple[int, int], Connection] = {}
        self._held_records = 0
        self._held_bytes = 0
        # The periodic /proc sweep (sweep_ended, sweep_closed), on these same maps:
        # _by_fd and _by_ssl are never rebound, so the two stay in step.
        self._sweep = Sweeper(
            self._by_fd, self._by_ssl, self.stats, tgids=self.tgids, close=self._close,
            end_process=self._end_process, new_conn=self._new_conn,
        )  # fmt: skip
        # The connections it closed, by (tgid, fd): its own dict, held here too so
        # that on_call looks there without a call into the sweeper.
        self._swept = self._sweep.swept

    def __len__(self) -> int:
        return len(self._by_fd) + len(self._by_ssl)

    # -- events -------------------------------------------------------------

    def on_call(self, call: TlsCall) -> list[Record]:
        # The hot path of the capture: every TLS call passes here, nearly all of them
        # on a connection already in _by_fd (locals and the checks inlined for that).
        out: list[Record] = []
        facts = None
        fd_key = (call.tgid, call.fd)
        fdless = call.fd < 0
        if not fdless and call.fd_weak and call.socket.gen == 0:
            # A guessed fd (a file read inside the call?): a connection on it
            # only if /proc says it is a socket; otherwise the object has no
            # socket yet, like a memory BIO's.
            if (call.tgid, call.ssl) in self._by_ssl and fd_key not in self._by_fd:
                fdless = True
            elif fd_key not in self._by_fd:
                facts = self._resolver.resolve(call.tgid, call.fd)
                fdless = facts is None
        if not fdless:
            conn = self._by_fd.get(fd_key)
            gen = call.socket.gen
            # A new socket on this fd? (_same_socket inline: gen 0 is not known yet.)
            if conn is not None and gen != 0 and gen != conn.gen:
                out.extend(self._close(conn, call.ts_mono_ns, call.tid))
                del self._by_fd[fd_key]
                self.stats.inferred_closes += 1
                conn = None
            if conn is None:
                swept = self._swept.pop(fd_key, None) if self._swept else None
                if swept is not None and swept.gen and swept.gen == gen:
                    conn = self._sweep.reopen(swept, call)
                else:
                    conn = self._open_socket_conn(
                        call.tgid, call.fd, call.socket, call.ts_mono_ns, call.comm,
                        call.source, call.cgroup_id, facts,
                    )  # fmt: skip
                self._by_fd[fd_key] = conn
                unbound = self._by_ssl.pop((call.tgid, call.ssl), None)
                if unbound is not None:
                    # The same TLS object carried data before its socket was
                    # known: calls served from what the handshake had already
                    # buffered make no syscall to learn it from, and a memory
                    # BIO's socket is found by what its thread does around the
                    # calls.  The kernel kept counting its offsets, so it
                    # stays one connection.
                    out.extend(self._join_socket(unbound, conn))
                    self.stats.fds_learned_late += 1
                else:
                    out.append(self._lifecycle_record("open", conn, call.ts_mono_ns, call.tid))
                self._keep_bound(out, conn, call.ts_mono_ns)
        else:
            key = (call.tgid, call.ssl)
            conn = self._by_ssl.get(key)
            if conn is not None and call.offset == 0 and conn.next_offset[call.direction] > 0:
                # The kernel started this object's offsets again: its socket
                # was closed and the SSL* now serves a new connection.
                self.stats.ssl_reused += 1
                out.extend(self._close(conn, call.ts_mono_ns, call.tid))
                del self._by_ssl[key]
                conn = None
            if conn is None:
                conn = self._new_conn(
                    call.tgid, -1, 0, call.socket, call.ts_mono_ns, call.comm, call.source,
                    call.cgroup_id, f"{call.tgid}-ssl{call.ssl:x}-{call.ts_mono_ns:x}",
                )  # fmt: skip
                conn.ssl = call.ssl
                conn.held = []
                conn.held_since = call.ts_mono_ns
                self._by_ssl[key] = conn
                self._holding[key] = conn
                self._emit(
                    out, conn, self._lifecycle_record("open", conn, call.ts_mono_ns, call.tid)
                )
                self._keep_bound(out, conn, call.ts_mono_ns)
        # Offsets, checked for gaps; take() moves them on, and makes the record.
        expected = conn.next_offset[call.direction]
        if call.offset != expected:
            self._offset_jump(call.offset, expected)
        record = self._known.take(conn, call, conn.fd if fdless else call.fd)
        if conn.held is None:
            if fdless:
                self.stats.unbound_records += 1
            out.append(record)
            return out
        conn.held.append(record)
        conn.held_bytes += len(call.data)
        self._held_records += 1
        self._held_bytes += len(call.data)
        self.stats.held_records += 1
        if len(conn.held) > MAX_HELD_PER_CONN:
            out.extend(self._release(conn))
        while self._holding and (
            self._held_records > MAX_HELD_RECORDS or self._held_bytes > MAX_HELD_BYTES
        ):
            out.extend(self._release(next(iter(self._holding.values()))))
        return out

    def on_known_calls(self, events: list, start: int, out: list[Record]) -> int:
        """The records of the run of `events` from `start` that are whole calls on
        connections followed under their socket, not holding and without an offset
        jump (nearly all of them), appended to `out`, exactly as on_call would make
        them; returns the index of the first event left for on_call and the rest.
        Only while the call assembler holds no call in pieces."""
        return self._known.records(events, start, out)

    def on_bind(self, ev: SocketBound) -> list[Record]:
        """The kernel found the socket of a TLS object that had none: its
        connection (and whatever it held) carries the socket from now on."""
        self._sweep.saw(ev.ts_mono_ns)
        unbound = self._by_ssl.pop((ev.tgid, ev.ssl), None)
        if unbound is None:
            return []  # no data yet (or already joined): its calls carry the fd
        out: list[Record] = []
        old = self._by_fd.pop((ev.tgid, ev.fd), None)
        if old is not None:
            # Only one object owns a socket: this one was replaced unseen.
            out.extend(self._close(old, ev.ts_mono_ns, ev.tid))
            self.stats.inferred_closes += 1
        conn = self._open_socket_conn(
            ev.tgid, ev.fd, ev.socket, ev.ts_mono_ns, unbound.comm, unbound.source,
            unbound.cgroup_id, None,
        )  # fmt: skip
        self._by_fd[(ev.tgid, ev.fd)] = conn
        out.extend(self._join_socket(unbound, conn))
        return out

    def release_held(self, older_than_mono_ns: int | None = None) -> list[Record]:
        """Give up waiting for the sockets of connections that have held their
        records since before `older_than_mono_ns` (None: all of them): their
        records go out without endpoints, counted."""
        out: list[Record] = []
        for conn in list(self._holding.values()):
            if older_than_mono_ns is not None and conn.held_since >= older_than_mono_ns:
                break  # oldest first: the rest are younger
            out.extend(self._release(conn))
        return out

    def on_close(self, ev: SocketClosed) -> list[Record]:
        self._sweep.saw(ev.ts_mono_ns)
        conn = self._by_fd.get((ev.tgid, ev.fd))
        if conn is None or not self._same_socket(conn, ev.gen):
            if conn is None and self._swept:
                self._swept.pop((ev.tgid, ev.fd), None)  # swept before its close came
            return []
        del self._by_fd[(ev.tgid, ev.fd)]
        return self._close(conn, ev.ts_mono_ns, ev.tid)

    def tgids(self) -> set[int]:
        """Processes with connections in the table."""
        return {k[0] for k in self._by_fd} | {k[0] for k in self._by_ssl}

    def sweep_ended(self, alive: Callable[[int], bool], ts_mono_ns: int) -> list[Record]:
        """Close the connections of processes that ended without an exit event we
        saw (it was dropped while the ring was full): counted, never silent.

        Two steps, like sweep_closed: a process found gone at one sweep has its
        connections closed at a later one, once its exit event cannot be still on
        its way (sweep.py says why).  `ts_mono_ns`: now, taken before `alive` is
        asked."""
        return self._sweep.ended(alive, ts_mono_ns)

    def sweep_closed(
        self, is_socket: Callable[[int, int], bool], idle_before_mono_ns: int, ts_mono_ns: int
    ) -> list[Record]:
        """Close the connections whose fd is no socket any more (their close event
        was dropped while the ring was full): counted, never silent.  Only those
        idle since `idle_before_mono_ns` are asked about, since a closed connection
        makes no more calls; a socket since reopened on the same fd shows up as a
        new socket on its first call (the kernel gives it another gen).

        Two steps (sweep.py says why): a connection found gone (`ts_mono_ns`: now,
        taken before `is_socket` is asked) is only closed by a later sweep, once
        the events sent before that look have been handled.  `is_socket` must
        answer False only when sure (resolve.fd_is_socket)."""
        return self._sweep.closed(is_socket, idle_before_mono_ns, ts_mono_ns)

    def on_exit(self, tgid: int, ts_mono_ns: int) -> list[Record]:
        """A process ended: every connection it still had is closed."""
        self._sweep.saw(ts_mono_ns)
        return self._end_process(tgid, ts_mono_ns)

    def adopt_existing_socket(self, tgid: int, fd: int, facts: SocketFacts) -> None:
        """A connection that predates the agent: have the kernel know it now,
        so the data that comes later carries its endpoints and its close is
        reported, however short-lived the process is from here on."""
        reg = KernelRegistration(
            tgid, fd, USER_GEN_BIT | next(self._user_gens),
            facts.remote, facts.local, facts.role, False,
        )  # fmt: skip
        self._adopted[(tgid, fd)] = reg
        if len(self._adopted) > self._max_adopted:
            # The oldest first: sockets are adopted once, at start-up.
            del self._adopted[next(iter(self._adopted))]
            self.stats.evicted_adoptions += 1
        self.kernel_registrations.append(reg)

    # -- helpers ------------------------------------------------------------

    def _end_process(
        self, tgid: int, ts_mono_ns: int, before_mono_ns: int | None = None
    ) -> list[Record]:
        """Close the connections of `tgid` (only those last used before
        `before_mono_ns`, if given)."""
        out = []
        for table in (self._by_fd, self._by_ssl):
            for key in [k for k in table if k[0] == tgid]:
                if before_mono_ns is not None and table[key].last_used >= before_mono_ns:
                    continue
                conn = table.pop(key)
                out.extend(self._close(conn, ts_mono_ns, tgid))
                if table is self._by_fd:
                    # Its fds were closed by the kernel, not by close(): the
                    # kernel's TLS socket table only lets go when told.
                    self.kernel_registrations.append(
                        KernelRegistration(tgid, conn.fd, conn.gen, None, None, "unknown",
                                           False, forget=True)
                    )  # fmt: skip
        return out

    def _keep_bound(self, out: list[Record], opened: Connection, ts_mono_ns: int) -> None:
        """Past the bound, close the least recently used connections (not `opened`)."""
        excess = len(self._by_fd) + len(self._by_ssl) - self._max_connections
        if excess <= 0:
            return
        excess += self._max_connections - self._evict_to
        candidates = (
            (conn.last_used, table, key)
            for table in (self._by_fd, self._by_ssl)
            for key, conn in table.items()
            if conn is not opened
        )
        for _used, table, key in heapq.nsmallest(excess, candidates, key=lambda c: c[0]):
            conn = table.pop(key)
            out.extend(self._close(conn, ts_mono_ns, conn.tgid))
            self.stats.evicted_connections += 1

    @staticmethod
    def _same_socket(conn: Connection, gen: int) -> bool:
        # gen 0: the event was sent before the kernel knew the socket (ours to
        # register, or in flight while we did).  A connection neither the
        # kernel nor /proc could identify keeps gen 0, so any socket the kernel
        # later sees created on its fd is a new one.
        return gen == 0 or gen == conn.gen

    def _open_socket_conn(
        self,
        tgid: int,
        fd: int,
        sock: KernelSocket,
        ts_mono_ns: int,
        comm: str,
        source: str,
        cgroup_id: int,
        facts: SocketFacts | None,
    ) -> Connection:
        gen = sock.gen
        conn_id = f"{tgid}-{fd}-{ts_mono_ns:x}"
        adopted = self._adopted.pop((tgid, fd), None)
        conn = self._new_conn(tgid, fd, gen, sock, ts_mono_ns, comm, source, cgroup_id, conn_id)
        if adopted is not None and gen in (0, adopted.gen):
            return self._open_adopted_conn(conn, sock, adopted)
        conn.local = sock.local
        if conn.local is not None and conn.remote is not None and conn.role != "unknown":
            return conn  # the kernel saw it all: no need to look at /proc
        if facts is None:
            facts = self._resolver.resolve(tgid, fd)
        if facts is not None:
            conn.local = conn.local or facts.local
            conn.remote = conn.remote or facts.remote
            if conn.role == "unknown":
                conn.role = facts.role
            if gen == 0:
                # The socket predates the agent (or the kernel's table lost it):
                # have the kernel track it so its close is reported.
                conn.gen = USER_GEN_BIT | next(self._user_gens)
                self.kernel_registrations.append(
                    KernelRegistration(tgid, fd, conn.gen, conn.remote, conn.local, conn.role, True)
                )
        return conn

    def _open_adopted_conn(
        self, conn: Connection, sock: KernelSocket, reg: KernelRegistration
    ) -> Connection:
        conn.gen = reg.gen
        conn.local = sock.local or reg.local
        conn.remote = sock.remote or reg.remote
        conn.role = reg.role if sock.role == "unknown" else sock.role
        if sock.gen == 0:
            # The kernel marks a socket TLS-carrying on its calls; this one's
            # first call beat the registration, so mark it ourselves.
            self.kernel_registrations.append(replace(reg, tls_seen=True))
        return conn

    def _new_conn(
        self,
        tgid: int,
        fd: int,
        gen: int,
        sock: KernelSocket,
        ts_mono_ns: int,
        comm: str,
        source: str,
        cgroup_id: int,
        conn_id: str,
    ) -> Connection:
        self.stats.connections += 1
        return Connection(
            conn_id=conn_id,
            tgid=tgid,
            fd=fd,
            gen=gen,
            comm=comm,
            cgroup_id=cgroup_id,
            source=source,
            local=None,
            remote=sock.remote,
            role=sock.role,
            last_used=ts_mono_ns,
        )

    def _join_socket(self, unbound: Connection, conn: Connection) -> list[Record]:
        """`conn` (just opened on a socket) continues `unbound`, the same TLS
        object's connection so far: same id and offsets; its held records go
        out now, with the socket."""
        conn.conn_id = unbound.conn_id
        conn.next_offset = unbound.next_offset
        conn.last_used = max(conn.last_used, unbound.last_used)
        self.stats.connections -= 1  # counted when it opened without a socket
        held = self._stop_holding(unbound)
        if held is None:
            return []
        self.stats.bound_connections += 1
        for record in held:
            record.fd = conn.fd
            record.local = conn.local
            record.remote = conn.remote
            record.role = conn.role
        return held

    def _stop_holding(self, conn: Connection) -> list[Record] | None:
        held = conn.held
        if held is None:
            return None
        self._holding.pop((conn.tgid, conn.ssl), None)
        self._held_records -= len(held)
        self._held_bytes -= conn.held_bytes
        conn.held = None
        conn.held_bytes = 0
        return held

    def _release(self, conn: Connection) -> list[Record]:
        """Stop waiting for `conn`'s socket: what it held goes out as it is."""
        held = self._stop_holding(conn)
        if held is None:
            return []
        self.stats.unbound_connections += 1
        self.stats.unbound_records += sum(1 for r in held if r.type == "data")
        return held

    def _emit(self, out: list[Record], conn: Connection, record: Record) -> None:
        if conn.held is None:
            out.append(record)
        else:
            conn.held.append(record)

    def _offset_jump(self, offset: int, expected: int) -> None:
        if offset > expected:
            self.stats.gaps += 1
            self.stats.gap_bytes += offset - expected
        else:
            self.stats.overlaps += 1

    def _lifecycle_record(self, kind: str, conn: Connection, ts_mono: int, tid: int) -> Record:
        return Record(
            type=kind,  # type: ignore[arg-type]
            ts_ns=self._wall(ts_mono),
            pid=conn.tgid,
            tid=tid,
            comm=conn.comm,
            cgroup_id=conn.cgroup_id,
            source=conn.source,
            conn_id=conn.conn_id,
            fd=conn.fd,
            local=conn.local,
            remote=conn.remote,
            role=conn.role,
        )

    def _close(self, conn: Connection, ts_mono: int, tid: int) -> list[Record]:
        """What `conn` still held, then its close."""
        self._sweep.saw(conn.last_used)
        out = self._release(conn)
        out.append(self._lifecycle_record("close", conn, ts_mono, tid))
        return out
