"""The flow table: which connection each TLS call belongs to.

Sans-I/O: it takes decoded kernel events and returns Records.  The two things
it needs from the outside world are handed in (a socket resolver for the local
address of a connection, a clock to turn kernel time into wall time), and the
one thing it asks of the kernel - "remember this socket that predates us, so its
close is reported" - is queued in `kernel_registrations` for the shell to carry
out.

Identity: a connection is (tgid, fd) plus the kernel's `gen` for the socket,
which tells apart two sockets that reused one fd.  Data with no fd (memory
BIOs) is its own connection per SSL object.  Offsets come from the kernel,
which counts them per SSL object; here they are only checked for gaps, the
visible trace of calls lost in the kernel.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from agent.events.decode import SocketClosed, TlsCall
from agent.records.record import Direction, Endpoint, Record, Role

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


class SocketFacts(Protocol):
    local: Endpoint | None
    remote: Endpoint | None
    role: Role


class SocketLookup(Protocol):
    def resolve(self, pid: int, fd: int) -> SocketFacts | None: ...


@dataclass(frozen=True)
class KernelRegistration:
    """Ask the kernel to track a socket it did not see being created."""

    tgid: int
    fd: int
    gen: int
    remote: Endpoint | None
    local: Endpoint | None
    role: Role
    tls_seen: bool  # report its close (else only once TLS data is seen on it)
    # The kernel may drop this socket: its process exited without closing it
    # (the kernel's table of TLS sockets is only cleaned by close()).
    forget: bool = False


@dataclass
class Connection:
    conn_id: str
    tgid: int
    fd: int
    gen: int
    comm: str
    source: str
    local: Endpoint | None
    remote: Endpoint | None
    role: Role
    cgroup_id: int = 0
    next_offset: dict[Direction, int] = field(default_factory=lambda: {"egress": 0, "ingress": 0})
    last_used: int = 0  # ts of its latest call: the least recently used go first


@dataclass
class FlowStats:
    connections: int = 0
    inferred_closes: int = 0  # a socket was replaced on its fd without a close we saw
    gaps: int = 0  # offset jumps: data lost before it reached us
    gap_bytes: int = 0
    overlaps: int = 0  # offset went backwards: should never happen
    fds_learned_late: int = 0  # connections whose first calls came without an fd
    # Past the table's bound: the least recently used connection is closed (a
    # close record is written; later data on it opens it again, under a new id).
    evicted_connections: int = 0
    evicted_adoptions: int = 0  # sockets found at start-up forgotten before any TLS
    # Processes found ended by the periodic sweep: their exit event was lost.
    exits_recovered: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


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
        self._by_ssl: dict[tuple[int, int], Connection] = {}
        self._user_gens = itertools.count(1)
        # Sockets adopted at start-up, by (tgid, fd): a call that was already in
        # the ring when we registered one still says gen 0 and must join it.
        self._adopted: dict[tuple[int, int], KernelRegistration] = {}
        self.kernel_registrations: list[KernelRegistration] = []
        self.stats = FlowStats()

    def __len__(self) -> int:
        return len(self._by_fd) + len(self._by_ssl)

    # -- events -------------------------------------------------------------

    def on_call(self, call: TlsCall) -> list[Record]:
        out: list[Record] = []
        if call.fd >= 0:
            conn = self._by_fd.get((call.tgid, call.fd))
            if conn is not None and not self._same_socket(conn, call.socket.gen):
                out.append(self._close_record(conn, call.ts_mono_ns, call.tid))
                del self._by_fd[(call.tgid, call.fd)]
                self.stats.inferred_closes += 1
                conn = None
            if conn is None:
                conn = self._open_socket_conn(call)
                self._by_fd[(call.tgid, call.fd)] = conn
                fdless = self._by_ssl.pop((call.tgid, call.ssl), None)
                if fdless is not None:
                    # The same TLS object carried data before its socket was
                    # known: calls served from what the handshake had already
                    # buffered make no syscall to learn it from.  The kernel
                    # kept counting its offsets, so it stays one connection.
                    conn.conn_id = fdless.conn_id
                    conn.next_offset = fdless.next_offset
                    self.stats.fds_learned_late += 1
                    self.stats.connections -= 1  # counted when it opened fd-less
                else:
                    out.append(self._lifecycle_record("open", conn, call.ts_mono_ns, call.tid))
                self._keep_bound(out, conn, call.ts_mono_ns)
        else:
            conn = self._by_ssl.get((call.tgid, call.ssl))
            if conn is None:
                conn = self._new_conn(call, f"{call.tgid}-ssl{call.ssl:x}-{call.ts_mono_ns:x}", 0)
                self._by_ssl[(call.tgid, call.ssl)] = conn
                out.append(self._lifecycle_record("open", conn, call.ts_mono_ns, call.tid))
                self._keep_bound(out, conn, call.ts_mono_ns)
        conn.last_used = call.ts_mono_ns
        conn.comm = call.comm or conn.comm
        conn.cgroup_id = call.cgroup_id or conn.cgroup_id
        self._check_offset(conn, call)
        out.append(
            Record(
                type="data",
                ts_ns=self._wall(call.ts_mono_ns),
                pid=call.tgid,
                tid=call.tid,
                comm=call.comm,
                cgroup_id=call.cgroup_id,
                source=call.source,
                conn_id=conn.conn_id,
                fd=call.fd,
                local=conn.local,
                remote=conn.remote,
                role=conn.role,
                direction=call.direction,
                offset=call.offset,
                len=call.len,
                captured_len=len(call.data),
                truncated=call.truncated,
                data=call.data,
            )
        )
        return out

    def on_close(self, ev: SocketClosed) -> list[Record]:
        conn = self._by_fd.get((ev.tgid, ev.fd))
        if conn is None or not self._same_socket(conn, ev.gen):
            return []
        del self._by_fd[(ev.tgid, ev.fd)]
        return [self._close_record(conn, ev.ts_mono_ns, ev.tid)]

    def tgids(self) -> set[int]:
        """Processes with connections in the table."""
        return {k[0] for k in self._by_fd} | {k[0] for k in self._by_ssl}

    def sweep_ended(self, alive: Callable[[int], bool], ts_mono_ns: int) -> list[Record]:
        """Close the connections of processes that ended without an exit event we
        saw (it was dropped while the ring was full): counted, never silent."""
        out: list[Record] = []
        for tgid in self.tgids():
            if not alive(tgid):
                self.stats.exits_recovered += 1
                out.extend(self.on_exit(tgid, ts_mono_ns))
        return out

    def on_exit(self, tgid: int, ts_mono_ns: int) -> list[Record]:
        """A process ended: every connection it still had is closed."""
        out = []
        for table in (self._by_fd, self._by_ssl):
            for key in [k for k in table if k[0] == tgid]:
                conn = table.pop(key)
                out.append(self._close_record(conn, ts_mono_ns, tgid))
                if table is self._by_fd:
                    # Its fds were closed by the kernel, not by close(): the
                    # kernel's TLS socket table only lets go when told.
                    self.kernel_registrations.append(
                        KernelRegistration(tgid, conn.fd, conn.gen, None, None, "unknown",
                                           False, forget=True)
                    )  # fmt: skip
        return out

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
            out.append(self._close_record(conn, ts_mono_ns, conn.tgid))
            self.stats.evicted_connections += 1

    @staticmethod
    def _same_socket(conn: Connection, gen: int) -> bool:
        # gen 0: the event was sent before the kernel knew the socket (ours to
        # register, or in flight while we did).  A connection neither the
        # kernel nor /proc could identify keeps gen 0, so any socket the kernel
        # later sees created on its fd is a new one.
        return gen == 0 or gen == conn.gen

    def _open_socket_conn(self, call: TlsCall) -> Connection:
        gen = call.socket.gen
        conn_id = f"{call.tgid}-{call.fd}-{call.ts_mono_ns:x}"
        adopted = self._adopted.pop((call.tgid, call.fd), None)
        if adopted is not None and gen in (0, adopted.gen):
            return self._open_adopted_conn(call, conn_id, adopted)
        conn = self._new_conn(call, conn_id, gen)
        conn.local = call.socket.local
        if conn.local is not None and conn.remote is not None and conn.role != "unknown":
            return conn  # the kernel saw it all: no need to look at /proc
        facts = self._resolver.resolve(call.tgid, call.fd)
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
                    KernelRegistration(
                        call.tgid, call.fd, conn.gen, conn.remote, conn.local, conn.role, True
                    )
                )
        return conn

    def _open_adopted_conn(
        self, call: TlsCall, conn_id: str, reg: KernelRegistration
    ) -> Connection:
        conn = self._new_conn(call, conn_id, reg.gen)
        conn.local = call.socket.local or reg.local
        conn.remote = call.socket.remote or reg.remote
        conn.role = reg.role if call.socket.role == "unknown" else call.socket.role
        if call.socket.gen == 0:
            # The kernel marks a socket TLS-carrying on its calls; this one's
            # first call beat the registration, so mark it ourselves.
            self.kernel_registrations.append(replace(reg, tls_seen=True))
        return conn

    def _new_conn(self, call: TlsCall, conn_id: str, gen: int) -> Connection:
        self.stats.connections += 1
        return Connection(
            conn_id=conn_id,
            tgid=call.tgid,
            fd=call.fd,
            gen=gen,
            comm=call.comm,
            cgroup_id=call.cgroup_id,
            source=call.source,
            local=None,
            remote=call.socket.remote,
            role=call.socket.role,
            last_used=call.ts_mono_ns,
        )

    def _check_offset(self, conn: Connection, call: TlsCall) -> None:
        expected = conn.next_offset[call.direction]
        if call.offset > expected:
            self.stats.gaps += 1
            self.stats.gap_bytes += call.offset - expected
        elif call.offset < expected:
            self.stats.overlaps += 1
        conn.next_offset[call.direction] = call.offset + call.len

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

    def _close_record(self, conn: Connection, ts_mono: int, tid: int) -> Record:
        return self._lifecycle_record("close", conn, ts_mono, tid)
