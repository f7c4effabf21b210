"""What the flow table keeps, and what it asks of the world outside it.

A Connection is one TLS connection as the table follows it; FlowStats its
counters.  The table turns kernel time into wall-clock time with the clock it is
given (a WallClock in the agent).  It asks the shell for two things: a socket's
endpoints from /proc when the kernel did not see it made (SocketLookup,
agent/flows/resolve.py answers), and that the kernel track a socket it found that
way (KernelRegistration, carried out by agent/probes/bpf_program.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from agent.records.record import Direction, Endpoint, Record, Role


class SocketFacts(Protocol):
    local: Endpoint | None
    remote: Endpoint | None
    role: Role


class SocketLookup(Protocol):
    def resolve(self, pid: int, fd: int) -> SocketFacts | None: ...


@dataclass(frozen=True, slots=True)
class WallClock:
    """Kernel time (CLOCK_MONOTONIC ns) to wall-clock ns by a fixed offset.

    Any callable does as the flow table's clock; this one the table's C step for
    known connections (agent/flows/_known_calls.c) adds itself, where another costs
    it a call into Python per record."""

    offset: int

    def __call__(self, mono_ns: int) -> int:
        return mono_ns + self.offset


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


@dataclass(slots=True)
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
    ssl: int = 0  # the TLS object, for connections that started without a socket
    # Records waiting for the socket (None: not holding).  A connection holds
    # from its first call until its socket is known or its hold is released.
    held: list[Record] | None = None
    held_since: int = 0  # ts of the first held call
    held_bytes: int = 0


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
    # Memory-BIO objects (no fd, or only a guessed fd that is no socket):
    bound_connections: int = 0  # joined to their socket after their first calls
    held_records: int = 0  # records held back until then
    # Connections whose held records had to go out without a socket (the hold
    # timed out or a bound was reached), and the records that went out so.
    unbound_connections: int = 0
    unbound_records: int = 0
    ssl_reused: int = 0  # a socket-less object's offsets restarted: a new connection
    # Connections found closed by the periodic sweep (their fd is no socket any
    # more): the close event was lost while the process lives on.
    closes_recovered: int = 0
    # Connections the sweep closed that spoke again on the same socket: the sweep
    # was wrong (should stay 0; logged).  They come back with their identity.
    sweep_reopened: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)
