"""FlowTable: TLS calls and socket events -> open/data/close Records and kernel registrations."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import pytest
from agent.flows._known_calls import KnownCalls

from agent.events import layout
from agent.events.calls import CallAssembler
from agent.events.decode import KernelSocket, SocketBound, SocketClosed, TlsCall, decode_event
from agent.flows.connection import Connection, KernelRegistration, WallClock
from agent.flows.table import MAX_HELD_PER_CONN, USER_GEN_BIT, FlowTable
from agent.records.record import Endpoint, Record, Role
from tests.unit.eventbuild import (
    ROLE_CLIENT,
    ROLE_SERVER,
    ROLE_UNKNOWN,
    _fill_conn,
    call_chunks,
    close_record,
    conn,
    conn_v4,
    make_call,
)

TGID = 4242
OTHER_TGID = 777
WALL_SHIFT = 1_000

REMOTE = Endpoint("93.184.216.34", 443)
LOCAL = Endpoint("10.0.0.2", 51000)
KERNEL_GEN = 0x1_0000_0001


@dataclass
class Facts:
    local: Endpoint | None
    remote: Endpoint | None
    role: Role


class FakeResolver:
    def __init__(self, facts: Facts | None = None) -> None:
        self.facts = facts
        self.calls: list[tuple[int, int]] = []

    def resolve(self, pid: int, fd: int) -> Facts | None:
        self.calls.append((pid, fd))
        return self.facts


PROC_FACTS = Facts(
    local=Endpoint("192.168.1.5", 40404), remote=Endpoint("1.1.1.1", 443), role="client"
)


def table(facts: Facts | None = PROC_FACTS) -> tuple[FlowTable, FakeResolver]:
    resolver = FakeResolver(facts)
    return FlowTable(resolver, lambda ns: ns + WALL_SHIFT), resolver


def known(gen: int = KERNEL_GEN) -> dict[str, Any]:
    """A socket the kernel saw connected: remote, local and role all known."""
    return conn_v4((REMOTE.ip, REMOTE.port), (LOCAL.ip, LOCAL.port), gen=gen, role=ROLE_CLIENT)


def call(data: bytes = b"hello", **fields: Any) -> TlsCall:
    fields.setdefault("tgid", TGID)
    return make_call(data, **fields)


def closed(**fields: Any) -> SocketClosed:
    fields.setdefault("tgid", TGID)
    ev = decode_event(close_record(**fields))
    assert isinstance(ev, SocketClosed)
    return ev


def bound(
    ssl: int, fd: int = 9, ts_ns: int = 50, socket: dict[str, Any] | None = None, **fields: Any
) -> SocketBound:
    """A bind event as the kernel lays it out (bpf/calls.c, membio_sent)."""
    e = layout.BindEvent(
        kind=layout.EV_BIND,
        tgid=fields.get("tgid", TGID),
        tid=fields.get("tid", 4243),
        fd=fd,
        ts_ns=ts_ns,
        ssl=ssl,
    )
    _fill_conn(e.conn, socket if socket is not None else known())
    ev = decode_event(bytes(e))
    assert isinstance(ev, SocketBound)
    return ev


def types(records: list[Record]) -> list[str]:
    return [r.type for r in records]


# --- opening and data ------------------------------------------------------------------------


def test_first_call_opens_then_data_with_same_conn_id() -> None:
    t, resolver = table()
    out = t.on_call(call(b"GET /", fd=7, tid=4250, ts_ns=5_000, comm=b"curl", socket=known()))
    assert types(out) == ["open", "data"]
    opened, data = out
    assert opened.conn_id == data.conn_id != ""
    assert opened == Record(
        type="open",
        ts_ns=5_000 + WALL_SHIFT,
        pid=TGID,
        tid=4250,
        comm="curl",
        source="openssl",
        conn_id=opened.conn_id,
        fd=7,
        local=LOCAL,
        remote=REMOTE,
        role="client",
    )
    assert t.stats.connections == 1
    assert len(t) == 1
    assert resolver.calls == []
    assert t.kernel_registrations == []


def test_data_record_fields() -> None:
    t, _ = table()
    data = bytes(range(256)) * 3
    out = t.on_call(
        call(
            data,
            fd=7,
            tid=4251,
            ts_ns=123_456,
            offset=0,
            direction=layout.DIR_INGRESS,
            comm=b"wget",
            cgroup_id=4321,
            socket=known(),
        )
    )
    rec = out[-1]
    # The table builds data records with Record.for_call (C, reading the call's
    # slots): every field must be what a keyword-built Record holds.
    assert rec == Record(
        type="data",
        ts_ns=123_456 + WALL_SHIFT,
        pid=TGID,
        tid=4251,
        comm="wget",
        cgroup_id=4321,
        source="openssl",
        conn_id=out[0].conn_id,
        fd=7,
        local=LOCAL,
        remote=REMOTE,
        role="client",
        direction="ingress",
        offset=0,
        len=len(data),
        captured_len=len(data),
        truncated=False,
        data=data,
    )


def test_data_record_of_truncated_call() -> None:
    t, _ = table()
    captured = b"x" * 40000
    rec = t.on_call(call(captured, len=1 << 21, socket=known()))[-1]
    assert rec.len == 1 << 21
    assert rec.captured_len == 40000
    assert rec.truncated
    assert rec.data == captured


def test_data_record_of_incomplete_call() -> None:
    t, _ = table()
    a = CallAssembler()
    chunks = call_chunks(b"y" * 40000, tgid=TGID, ts_ns=10, socket=known())
    assert a.feed(chunks[0]) == []
    [incomplete] = a.flush()
    rec = t.on_call(incomplete)[-1]
    assert rec.len == 40000
    assert rec.captured_len == layout.CHUNK_SIZE
    assert rec.truncated
    assert rec.data == b"y" * layout.CHUNK_SIZE


def test_later_calls_emit_only_data() -> None:
    t, _ = table()
    first = t.on_call(call(b"a" * 10, ts_ns=1, socket=known()))
    second = t.on_call(call(b"b" * 5, ts_ns=2, offset=10, socket=known()))
    third = t.on_call(call(b"c", ts_ns=3, direction=layout.DIR_INGRESS, socket=known()))
    assert types(second) == ["data"] and types(third) == ["data"]
    assert {r.conn_id for r in first + second + third} == {first[0].conn_id}
    assert second[0].offset == 10
    assert t.stats.connections == 1
    assert t.stats.gaps == t.stats.overlaps == 0


def test_kernel_known_socket_does_not_call_resolver() -> None:
    t, resolver = table()
    t.on_call(call(socket=known()))
    t.on_call(call(ts_ns=2_000_000, offset=5, socket=known()))
    assert resolver.calls == []
    assert t.kernel_registrations == []


def test_kernel_without_local_end_asks_resolver_but_keeps_kernel_facts() -> None:
    t, resolver = table()
    sock = conn_v4((REMOTE.ip, REMOTE.port), None, gen=KERNEL_GEN, role=ROLE_CLIENT)
    opened = t.on_call(call(fd=8, socket=sock))[0]
    assert resolver.calls == [(TGID, 8)]
    assert opened.local == PROC_FACTS.local
    assert opened.remote == REMOTE  # the kernel's, not /proc's
    assert opened.role == "client"
    assert t.kernel_registrations == []  # the kernel already tracks it
    assert types(t.on_close(closed(fd=8, gen=KERNEL_GEN))) == ["close"]


def test_kernel_role_unknown_takes_resolver_role() -> None:
    t, resolver = table(Facts(local=LOCAL, remote=REMOTE, role="server"))
    # accept() with its entry unseen: gen known, role server; or here: role unknown.
    sock = conn(gen=KERNEL_GEN)
    opened = t.on_call(call(fd=8, socket=sock))[0]
    assert resolver.calls == [(TGID, 8)]
    assert (opened.local, opened.remote, opened.role) == (LOCAL, REMOTE, "server")


# --- sockets the kernel does not know ---------------------------------------------------------


def test_gen0_socket_resolved_and_registered() -> None:
    t, resolver = table()
    out = t.on_call(call(fd=11, ts_ns=50, socket=conn()))
    assert types(out) == ["open", "data"]
    assert resolver.calls == [(TGID, 11)]
    for rec in out:
        assert rec.local == PROC_FACTS.local
        assert rec.remote == PROC_FACTS.remote
        assert rec.role == "client"
    [reg] = t.kernel_registrations
    assert reg.gen & USER_GEN_BIT
    assert reg.gen != USER_GEN_BIT
    assert reg == KernelRegistration(
        tgid=TGID,
        fd=11,
        gen=reg.gen,
        remote=PROC_FACTS.remote,
        local=PROC_FACTS.local,
        role="client",
        tls_seen=True,
    )


def test_gen0_in_flight_after_registration_maps_to_same_conn() -> None:
    t, resolver = table()
    conn_id = t.on_call(call(fd=11, ts_ns=50, socket=conn()))[0].conn_id
    [reg] = t.kernel_registrations
    # Sent before the kernel applied the registration: still gen 0.
    in_flight = t.on_call(call(fd=11, ts_ns=60, offset=5, socket=conn()))
    # Sent after: carries the registered gen and endpoints.
    kernel_sock = conn_v4(
        (PROC_FACTS.remote.ip, PROC_FACTS.remote.port),  # type: ignore[union-attr]
        (PROC_FACTS.local.ip, PROC_FACTS.local.port),  # type: ignore[union-attr]
        gen=reg.gen,
    )
    after = t.on_call(call(fd=11, ts_ns=70, offset=10, socket=kernel_sock))
    assert types(in_flight) == ["data"] and types(after) == ["data"]
    assert in_flight[0].conn_id == after[0].conn_id == conn_id
    assert resolver.calls == [(TGID, 11)]
    assert len(t.kernel_registrations) == 1
    assert t.stats.inferred_closes == 0
    assert t.stats.connections == 1
    assert types(t.on_close(closed(fd=11, gen=reg.gen))) == ["close"]


def test_gen0_socket_resolver_fails() -> None:
    t, resolver = table(facts=None)
    opened = t.on_call(call(fd=12, socket=conn()))[0]
    assert resolver.calls == [(TGID, 12)]
    assert (opened.local, opened.remote, opened.role) == (None, None, "unknown")
    assert t.kernel_registrations == []


def test_user_gens_are_unique() -> None:
    t, _ = table()
    for fd in (20, 21, 22):
        t.on_call(call(fd=fd, socket=conn()))
    t.adopt_existing_socket(TGID, 23, PROC_FACTS)
    gens = [r.gen for r in t.kernel_registrations]
    assert len(set(gens)) == 4
    assert all(g & USER_GEN_BIT for g in gens)


def test_adopt_existing_socket_queues_registration_without_tls_seen() -> None:
    t, resolver = table()
    t.adopt_existing_socket(TGID, 30, PROC_FACTS)
    [reg] = t.kernel_registrations
    assert reg == KernelRegistration(
        tgid=TGID,
        fd=30,
        gen=reg.gen,
        remote=PROC_FACTS.remote,
        local=PROC_FACTS.local,
        role="client",
        tls_seen=False,
    )
    assert reg.gen & USER_GEN_BIT
    assert len(t) == 0
    assert t.stats.connections == 0
    assert resolver.calls == []


def test_adopted_socket_data_uses_kernel_facts() -> None:
    t, resolver = table()
    t.adopt_existing_socket(TGID, 30, Facts(local=LOCAL, remote=REMOTE, role="client"))
    [reg] = t.kernel_registrations
    out = t.on_call(call(fd=30, socket=known(gen=reg.gen)))
    assert types(out) == ["open", "data"]
    assert resolver.calls == []
    assert len(t.kernel_registrations) == 1
    assert types(t.on_close(closed(fd=30, gen=reg.gen))) == ["close"]


def test_adopted_socket_with_gen0_event_in_flight_stays_one_connection() -> None:
    # The session attaches the uprobes, then adopts the process's existing
    # sockets (registering gen U1 in the kernel).  A call made in between is
    # in the ring with gen 0, followed by calls carrying U1: all one socket.
    t, _ = table(Facts(local=LOCAL, remote=REMOTE, role="client"))
    t.adopt_existing_socket(TGID, 30, Facts(local=LOCAL, remote=REMOTE, role="client"))
    adopted_gen = t.kernel_registrations[0].gen
    t.kernel_registrations.clear()  # the shell handed it to the kernel

    out = t.on_call(call(b"a" * 10, fd=30, ts_ns=100, socket=conn()))  # in flight: gen 0
    out += t.on_call(call(b"b" * 10, fd=30, ts_ns=200, offset=10, socket=known(adopted_gen)))
    assert types(out) == ["open", "data", "data"]
    assert t.stats.inferred_closes == 0
    assert t.stats.connections == 1


# --- fd reuse and closes -----------------------------------------------------------------------


def test_fd_reuse_with_new_gen_infers_close_and_opens_new_conn() -> None:
    t, _ = table()
    old_id = t.on_call(call(fd=7, ts_ns=100, socket=known(gen=1000)))[0].conn_id
    out = t.on_call(call(fd=7, ts_ns=900, tid=4299, socket=known(gen=2000)))
    assert types(out) == ["close", "open", "data"]
    close, opened, data = out
    assert close.conn_id == old_id
    assert close.ts_ns == 900 + WALL_SHIFT
    assert opened.conn_id == data.conn_id != old_id
    assert t.stats.inferred_closes == 1
    assert t.stats.connections == 2
    assert len(t) == 1
    # The old gen's close is no longer ours; the new one's is.
    assert t.on_close(closed(fd=7, gen=1000)) == []
    assert [r.conn_id for r in t.on_close(closed(fd=7, gen=2000))] == [opened.conn_id]


def test_fd_reuse_after_registered_socket() -> None:
    t, _ = table()
    old_id = t.on_call(call(fd=7, socket=conn()))[0].conn_id
    out = t.on_call(call(fd=7, ts_ns=2_000_000, socket=known(gen=5000)))
    assert types(out) == ["close", "open", "data"]
    assert out[0].conn_id == old_id
    assert t.stats.inferred_closes == 1


def test_on_close_with_matching_gen() -> None:
    t, _ = table()
    opened = t.on_call(call(fd=7, socket=known()))[0]
    out = t.on_close(closed(fd=7, tid=4300, ts_ns=9_000, gen=KERNEL_GEN))
    assert out == [
        Record(
            type="close",
            ts_ns=9_000 + WALL_SHIFT,
            pid=TGID,
            tid=4300,
            comm="curl",
            source="openssl",
            conn_id=opened.conn_id,
            fd=7,
            local=LOCAL,
            remote=REMOTE,
            role="client",
        )
    ]
    assert len(t) == 0
    assert t.on_close(closed(fd=7, gen=KERNEL_GEN)) == []
    # The next call on the fd is a new connection.
    assert types(t.on_call(call(fd=7, ts_ns=10_000, socket=known()))) == ["open", "data"]
    assert t.stats.inferred_closes == 0


def test_on_close_with_other_gen_does_nothing() -> None:
    t, _ = table()
    conn_id = t.on_call(call(fd=7, socket=known()))[0].conn_id
    assert t.on_close(closed(fd=7, gen=KERNEL_GEN + 1)) == []
    assert len(t) == 1
    out = t.on_call(call(fd=7, ts_ns=2_000_000, offset=5, socket=known()))
    assert types(out) == ["data"] and out[0].conn_id == conn_id


def test_on_close_of_unknown_fd_or_other_process() -> None:
    t, _ = table()
    t.on_call(call(fd=7, socket=known()))
    assert t.on_close(closed(fd=8, gen=KERNEL_GEN)) == []
    assert t.on_close(closed(tgid=OTHER_TGID, fd=7, gen=KERNEL_GEN)) == []
    assert len(t) == 1


def test_on_close_of_registered_socket() -> None:
    t, _ = table()
    conn_id = t.on_call(call(fd=7, socket=conn()))[0].conn_id
    [reg] = t.kernel_registrations
    assert [r.conn_id for r in t.on_close(closed(fd=7, gen=reg.gen))] == [conn_id]


def test_on_exit_closes_all_conns_of_that_process_only() -> None:
    t, _ = table()
    mine = {
        t.on_call(call(fd=7, socket=known()))[0].conn_id,
        t.on_call(call(fd=8, socket=known(gen=KERNEL_GEN + 1)))[0].conn_id,
    }
    theirs = {t.on_call(call(tgid=OTHER_TGID, fd=7, socket=known()))[0].conn_id}
    # Memory-BIO connections hold their records until their socket is known.
    assert t.on_call(call(fd=-1, ssl=0xAAA0, socket=conn())) == []
    assert t.on_call(call(tgid=OTHER_TGID, fd=-1, ssl=0xAAA0, socket=conn())) == []
    out = t.on_exit(TGID, 50_000)
    # What the memory-BIO one held goes out (without a socket) before its close.
    assert types(out) == ["close", "close", "open", "data", "close"]
    closes = [r for r in out if r.type == "close"]
    assert {r.conn_id for r in closes[:2]} == mine
    assert all(r.pid == TGID and r.ts_ns == 50_000 + WALL_SHIFT for r in closes)
    assert out[-1].conn_id == out[-2].conn_id and out[-1].fd == -1
    assert t.stats.unbound_connections == 1
    assert len(t) == 2
    assert t.on_exit(TGID, 60_000) == []
    out = t.on_exit(OTHER_TGID, 70_000)
    assert types(out) == ["close", "open", "data", "close"]
    assert out[0].conn_id in theirs
    assert len(t) == 0


# --- memory BIOs (no fd) ---------------------------------------------------------------------


def test_memory_bio_conns_keyed_by_ssl_pointer() -> None:
    t, resolver = table()
    assert t.on_call(call(b"a", fd=-1, ssl=0x1000, ts_ns=1, socket=conn())) == []
    assert t.on_call(call(b"b", fd=-1, ssl=0x2000, ts_ns=2, socket=conn())) == []
    assert t.on_call(call(b"c", fd=-1, ssl=0x1000, ts_ns=3, offset=1, socket=conn())) == []
    out = t.release_held()
    assert types(out) == ["open", "data", "data", "open", "data"]
    a1, a2, b1 = out[1], out[2], out[4]
    assert a1.conn_id == a2.conn_id != b1.conn_id
    assert (a1.data, a2.data, b1.data) == (b"a", b"c", b"b")
    assert a1.fd == -1 and a1.remote is None and a1.role == "unknown"
    assert resolver.calls == []
    assert t.kernel_registrations == []
    assert t.stats.connections == 2
    # Released: later calls go out at once.
    assert types(t.on_call(call(b"d", fd=-1, ssl=0x1000, ts_ns=4, offset=2, socket=conn()))) == [
        "data"
    ]
    assert (t.stats.unbound_connections, t.stats.unbound_records) == (2, 4)
    # There is no socket to close.
    assert t.on_close(closed(fd=-1, gen=0)) == []
    assert len(t) == 2


def test_memory_bio_does_not_collide_with_fd_conn() -> None:
    t, _ = table()
    fd_id = t.on_call(call(fd=7, ssl=0x1000, socket=known()))[0].conn_id
    t.on_call(call(fd=-1, ssl=0x1000, tgid=OTHER_TGID, socket=conn()))
    bio_id = t.release_held()[0].conn_id
    assert fd_id != bio_id
    assert len(t) == 2


def test_fd_learned_after_the_first_calls_keeps_one_connection() -> None:
    """A server's first read served from what the handshake buffered makes no
    syscall, so it comes without an fd; the next call of the same TLS object
    names the socket, and the kernel's offsets simply continue."""
    t, _ = table()
    assert t.on_call(call(b"a" * 10, fd=-1, ssl=0x1000, ts_ns=1, socket=conn())) == []
    out = t.on_call(call(b"b" * 5, fd=7, ssl=0x1000, ts_ns=2, offset=10, socket=known()))
    # What waited for the socket goes out with it, ahead of the call that named it.
    assert types(out) == ["open", "data", "data"]
    assert len({r.conn_id for r in out}) == 1
    for r in out:
        assert r.fd == 7 and r.remote == REMOTE and r.local == LOCAL and r.role == "client"
    assert [r.data for r in out[1:]] == [b"a" * 10, b"b" * 5]
    assert t.stats.bound_connections == 1 and t.stats.unbound_records == 0
    assert (t.stats.gaps, t.stats.overlaps, t.stats.fds_learned_late) == (0, 0, 1)
    assert t.stats.connections == 1
    assert len(t) == 1  # no longer tracked by SSL pointer
    # It is now a socket connection: its close is reported under the same id.
    (close,) = t.on_close(closed(fd=7, gen=KERNEL_GEN))
    assert close.conn_id == out[0].conn_id


# --- memory BIOs: binding to the socket (bpf/calls.c, membio_bind) ---------------------------


def test_bind_releases_held_records_with_the_socket() -> None:
    """asyncio/Node: SSL_write goes to a memory BIO; the kernel binds the object when
    its thread sends the ciphertext, after the call's record was already sent."""
    t, resolver = table()
    assert t.on_call(call(b"GET /", fd=-1, ssl=0x1000, ts_ns=1, socket=conn())) == []
    assert t.stats.held_records == 1
    out = t.on_bind(bound(0x1000, fd=9, ts_ns=2))
    assert types(out) == ["open", "data"]
    assert len({r.conn_id for r in out}) == 1
    for r in out:
        assert (r.fd, r.local, r.remote, r.role) == (9, LOCAL, REMOTE, "client")
    assert out[1].data == b"GET /" and out[1].ts_ns == 1 + WALL_SHIFT
    assert resolver.calls == []  # the kernel knew the whole socket
    # Later calls come with the fd and continue the same connection.
    (later,) = t.on_call(call(b"ok", fd=9, ssl=0x1000, ts_ns=3, direction=layout.DIR_INGRESS,
                              socket=known()))  # fmt: skip
    assert later.conn_id == out[0].conn_id and later.remote == REMOTE
    (close,) = t.on_close(closed(fd=9, gen=KERNEL_GEN))
    assert close.conn_id == out[0].conn_id
    assert (t.stats.connections, t.stats.bound_connections, t.stats.unbound_records) == (1, 1, 0)
    assert len(t) == 0


def test_bind_of_an_object_with_no_data_yet_does_nothing() -> None:
    t, _ = table()
    assert t.on_bind(bound(0x1000)) == []
    assert len(t) == 0


def test_bind_to_a_socket_the_kernel_knows_only_partly_asks_proc() -> None:
    t, resolver = table()
    t.on_call(call(fd=-1, ssl=0x1000, socket=conn()))
    out = t.on_bind(bound(0x1000, fd=9, socket=conn_v4((REMOTE.ip, REMOTE.port))))
    assert resolver.calls == [(TGID, 9)]
    assert all(r.local == PROC_FACTS.local and r.remote == REMOTE for r in out)


def test_bind_to_an_adopted_socket_uses_its_registration() -> None:
    """A connection opened before the agent: its socket was registered at start-up."""
    t, resolver = table()
    t.adopt_existing_socket(TGID, 9, PROC_FACTS)
    [reg] = t.kernel_registrations
    t.on_call(call(fd=-1, ssl=0x1000, socket=conn()))
    registered = conn_v4(("1.1.1.1", 443), ("192.168.1.5", 40404), gen=reg.gen)
    out = t.on_bind(bound(0x1000, fd=9, socket=registered))
    assert all(r.local == PROC_FACTS.local and r.remote == PROC_FACTS.remote for r in out)
    assert out[0].role == "client"
    assert resolver.calls == []


def test_hold_times_out_then_a_late_bind_still_joins() -> None:
    t, _ = table()
    t.on_call(call(b"a", fd=-1, ssl=0x1000, ts_ns=10, socket=conn()))
    t.on_call(call(b"b", fd=-1, ssl=0x2000, ts_ns=30, socket=conn()))
    assert t.release_held(older_than_mono_ns=10) == []  # not older yet
    out = t.release_held(older_than_mono_ns=20)
    assert types(out) == ["open", "data"] and out[1].data == b"a" and out[1].remote is None
    assert (t.stats.unbound_connections, t.stats.unbound_records) == (1, 1)
    # No longer held: the next call goes out at once, counted unbound.
    assert types(t.on_call(call(b"c", fd=-1, ssl=0x1000, ts_ns=40, offset=1, socket=conn()))) == [
        "data"
    ]
    assert t.stats.unbound_records == 2
    # The bind comes late: nothing held to release, later calls carry the socket
    # under the same connection id.
    assert t.on_bind(bound(0x1000, fd=9)) == []
    (d,) = t.on_call(call(b"d", fd=9, ssl=0x1000, ts_ns=50, offset=2, socket=known()))
    assert d.conn_id == out[0].conn_id and d.remote == REMOTE
    # The other one still holds until its own time.
    assert types(t.release_held()) == ["open", "data"]


def test_a_connection_holds_a_bounded_number_of_records() -> None:
    t, _ = table()
    out: list[Record] = []
    for n in range(MAX_HELD_PER_CONN + 1):
        out += t.on_call(call(b"x", fd=-1, ssl=0x1000, ts_ns=n + 1, offset=n, socket=conn()))
    assert types(out) == ["open"] + ["data"] * (MAX_HELD_PER_CONN + 1)
    assert t.stats.unbound_connections == 1


def test_all_connections_together_hold_a_bounded_amount(monkeypatch) -> None:
    import agent.flows.table as flows

    monkeypatch.setattr(flows, "MAX_HELD_RECORDS", 3)
    t, _ = table()
    out: list[Record] = []
    for n in range(4):
        out += t.on_call(call(b"x", fd=-1, ssl=0x1000 + n, ts_ns=n + 1, socket=conn()))
    # The oldest hold went out to make room.
    assert types(out) == ["open", "data"] and out[0].conn_id.startswith(f"{TGID}-ssl1000-")


def test_guessed_fd_that_is_no_socket_waits_for_the_bind() -> None:
    """Node: a timezone file read inside the handshake gave the call a guessed fd."""
    t, resolver = table(facts=None)
    assert t.on_call(call(b"req", fd=20, flags=layout.DATA_FD_WEAK, ssl=0x1000, ts_ns=1,
                          socket=conn())) == []  # fmt: skip
    assert resolver.calls == [(TGID, 20)]
    # Asked once: further calls of the object go to its socket-less connection.
    t.on_call(call(b"more", fd=20, flags=layout.DATA_FD_WEAK, ssl=0x1000, ts_ns=2, offset=3,
                   socket=conn()))  # fmt: skip
    assert resolver.calls == [(TGID, 20)]
    out = t.on_bind(bound(0x1000, fd=19))
    assert types(out) == ["open", "data", "data"]
    assert all(r.fd == 19 and r.remote == REMOTE for r in out)


def test_guessed_fd_that_is_a_socket_is_its_connection() -> None:
    """A socket nobody registered (open before the agent, passed over a unix socket)."""
    t, resolver = table()
    out = t.on_call(call(fd=7, flags=layout.DATA_FD_WEAK, ssl=0x1000, socket=conn()))
    assert types(out) == ["open", "data"]
    assert out[1].fd == 7 and out[1].remote == PROC_FACTS.remote
    assert resolver.calls == [(TGID, 7)]  # once: the facts were passed on
    assert len(t.kernel_registrations) == 1


def test_reused_ssl_object_whose_offsets_restart_is_a_new_connection() -> None:
    """The kernel drops a bound object's state when its socket closes, so an SSL*
    reused for a new connection starts at offset 0 again."""
    t, _ = table()
    t.on_call(call(b"a" * 10, fd=-1, ssl=0x1000, ts_ns=1, socket=conn()))
    first = t.on_bind(bound(0x1000, fd=9, ts_ns=2))
    closed_out = t.on_close(closed(fd=9, gen=KERNEL_GEN))
    assert types(closed_out) == ["close"]
    assert t.on_call(call(b"b" * 4, fd=-1, ssl=0x1000, ts_ns=3, socket=conn())) == []
    second = t.on_bind(bound(0x1000, fd=11, ts_ns=4, socket=known(gen=KERNEL_GEN + 5)))
    assert second[0].conn_id != first[0].conn_id and second[1].offset == 0
    # Never bound: an offset restart is the only trace of the new connection.
    t.on_call(call(b"c" * 4, fd=-1, ssl=0x2000, ts_ns=5, socket=conn()))
    t.release_held()
    out = t.on_call(call(b"d" * 4, fd=-1, ssl=0x2000, ts_ns=6, socket=conn()))
    out += t.release_held()  # the new connection holds its records afresh
    assert types(out) == ["close", "open", "data"] and out[0].conn_id != out[1].conn_id
    assert (t.stats.ssl_reused, t.stats.overlaps) == (1, 0)


def test_bind_to_an_fd_whose_old_connection_was_not_seen_closing() -> None:
    t, _ = table()
    old = t.on_call(call(fd=9, ssl=0x9999, socket=known(gen=1)))[0].conn_id
    t.on_call(call(fd=-1, ssl=0x1000, socket=conn()))
    out = t.on_bind(bound(0x1000, fd=9, socket=known(gen=2)))
    assert types(out) == ["close", "open", "data"] and out[0].conn_id == old
    assert t.stats.inferred_closes == 1


# --- offsets ---------------------------------------------------------------------------------


def test_offset_gap_detection() -> None:
    t, _ = table()
    s = known()
    t.on_call(call(b"a" * 10, ts_ns=1, offset=0, socket=s))
    t.on_call(call(b"b" * 5, ts_ns=2, offset=10, socket=s))
    assert (t.stats.gaps, t.stats.gap_bytes) == (0, 0)
    t.on_call(call(b"c" * 5, ts_ns=3, offset=100, socket=s))  # 85 bytes lost
    assert (t.stats.gaps, t.stats.gap_bytes) == (1, 85)
    t.on_call(call(b"d" * 5, ts_ns=4, offset=105, socket=s))
    assert (t.stats.gaps, t.stats.gap_bytes) == (1, 85)
    t.on_call(call(b"e", ts_ns=5, offset=200, socket=s))
    assert (t.stats.gaps, t.stats.gap_bytes) == (2, 175)
    assert t.stats.overlaps == 0


def test_offsets_use_call_len_not_captured_len() -> None:
    t, _ = table()
    s = known()
    t.on_call(call(b"a" * 100, len=1_000_000, ts_ns=1, offset=0, socket=s))
    t.on_call(call(b"b", ts_ns=2, offset=1_000_000, socket=s))
    assert (t.stats.gaps, t.stats.overlaps) == (0, 0)


def test_offsets_are_per_direction() -> None:
    t, _ = table()
    s = known()
    t.on_call(call(b"a" * 10, ts_ns=1, offset=0, direction=layout.DIR_EGRESS, socket=s))
    t.on_call(call(b"b" * 7, ts_ns=2, offset=0, direction=layout.DIR_INGRESS, socket=s))
    t.on_call(call(b"c" * 3, ts_ns=3, offset=10, direction=layout.DIR_EGRESS, socket=s))
    t.on_call(call(b"d", ts_ns=4, offset=7, direction=layout.DIR_INGRESS, socket=s))
    assert (t.stats.gaps, t.stats.gap_bytes, t.stats.overlaps) == (0, 0, 0)
    t.on_call(call(b"e", ts_ns=5, offset=20, direction=layout.DIR_INGRESS, socket=s))
    assert (t.stats.gaps, t.stats.gap_bytes) == (1, 12)


def test_offset_overlap_counted() -> None:
    t, _ = table()
    s = known()
    t.on_call(call(b"a" * 10, ts_ns=1, offset=0, socket=s))
    t.on_call(call(b"b" * 10, ts_ns=2, offset=5, socket=s))
    assert t.stats.overlaps == 1
    assert t.stats.gaps == 0
    # Tracking resumes from the overlapping call's end.
    t.on_call(call(b"c", ts_ns=3, offset=15, socket=s))
    assert (t.stats.overlaps, t.stats.gaps) == (1, 0)


def test_first_call_at_nonzero_offset_is_a_gap() -> None:
    t, _ = table()
    t.on_call(call(b"a", offset=300, socket=known()))
    assert (t.stats.gaps, t.stats.gap_bytes) == (1, 300)


def test_new_conn_after_fd_reuse_starts_offsets_again() -> None:
    t, _ = table()
    t.on_call(call(b"a" * 50, ts_ns=1, offset=0, socket=known(gen=1)))
    t.on_call(call(b"b" * 5, ts_ns=2, offset=0, socket=known(gen=2)))
    assert (t.stats.gaps, t.stats.overlaps) == (0, 0)


def test_memory_bio_offsets_checked_per_ssl() -> None:
    t, _ = table()
    t.on_call(call(b"a" * 10, fd=-1, ssl=0x1000, ts_ns=1, socket=conn()))
    t.on_call(call(b"b" * 10, fd=-1, ssl=0x2000, ts_ns=2, socket=conn()))
    t.on_call(call(b"c" * 10, fd=-1, ssl=0x1000, ts_ns=3, offset=10, socket=conn()))
    assert (t.stats.gaps, t.stats.overlaps) == (0, 0)


# --- stats -----------------------------------------------------------------------------------


def test_stats_as_dict() -> None:
    t, _ = table()
    t.on_call(call(fd=7, socket=known(gen=1)))
    t.on_call(call(fd=7, ts_ns=2, offset=9, socket=known(gen=2)))
    assert t.stats.as_dict() == {
        "connections": 2,
        "inferred_closes": 1,
        "gaps": 1,
        "gap_bytes": 9,
        "overlaps": 0,
        "fds_learned_late": 0,
        "evicted_connections": 0,
        "evicted_adoptions": 0,
        "exits_recovered": 0,
        "bound_connections": 0,
        "held_records": 0,
        "unbound_connections": 0,
        "unbound_records": 0,
        "ssl_reused": 0,
        "closes_recovered": 0,
        "sweep_reopened": 0,
    }


# --- the step for calls on followed connections (agent/flows/_known_calls.c) ------------------


def test_a_wall_clock_is_an_offset_that_the_c_step_adds_itself() -> None:
    """A WallClock's offset is added in C, any other clock is called: the same records,
    times past 64 bits too."""
    assert WallClock(WALL_SHIFT)(5) == 5 + WALL_SHIFT
    runs = []
    for clock in (lambda ns: ns + WALL_SHIFT, WallClock(WALL_SHIFT)):
        t = FlowTable(FakeResolver(PROC_FACTS), clock)
        out = t.on_call(call(b"first", fd=7, ts_ns=10, socket=known()))
        later = [
            call(b"second", fd=7, ts_ns=20, offset=5, socket=known()),
            call(b"third", fd=7, ts_ns=2**64 - 1, offset=11, socket=known()),
        ]
        assert t.on_known_calls(later, 0, out) == 2
        out += t.on_call(call(b"fourth", fd=7, ts_ns=30, offset=16, socket=known()))
        runs.append([r.to_json() for r in out])
    assert runs[0] == runs[1]
    ts = [10, 10, 20, 2**64 - 1, 30]
    assert [r["ts_ns"] for r in runs[1]] == [t + WALL_SHIFT for t in ts]


def test_the_c_step_moves_the_connection_on_in_its_slots() -> None:
    t, _ = table()
    t.on_call(call(b"first", fd=7, ts_ns=10, comm=b"curl", cgroup_id=5, socket=known()))
    conn = t._by_fd[(TGID, 7)]
    out: list[Record] = []
    later = [
        call(b"second", fd=7, ts_ns=20, offset=5, comm=b"curl-2", cgroup_id=6, socket=known()),
        # No comm, no cgroup: the connection keeps its own.
        call(b"in", fd=7, ts_ns=30, comm=b"", cgroup_id=0, direction=layout.DIR_INGRESS,
             socket=known()),
    ]  # fmt: skip
    assert t.on_known_calls(later, 0, out) == 2
    assert (conn.last_used, conn.comm, conn.cgroup_id) == (30, "curl-2", 6)
    assert conn.next_offset == {"egress": 11, "ingress": 2}
    assert [(r.conn_id, r.local, r.remote, r.role) for r in out] == [
        (conn.conn_id, LOCAL, REMOTE, "client")
    ] * 2
    # A field never set fails as reading it in Python would.
    del conn.role
    with pytest.raises(AttributeError, match="role"):
        t.on_known_calls([call(b"x", fd=7, ts_ns=40, offset=11, socket=known())], 0, out)


def test_the_c_step_follows_by_fd_as_it_changes() -> None:
    """The C step remembers by_fd's answers while by_fd is unchanged
    (_known_calls.c: connection_of): a connection replaced or removed under the same
    (tgid, fd) is seen at the next call."""
    t, _ = table()
    t.on_call(call(b"first", fd=7, ts_ns=10, socket=known()))
    out: list[Record] = []
    assert t.on_known_calls([call(b"a", fd=7, ts_ns=20, offset=5, socket=known())], 0, out) == 1
    old = t._by_fd[(TGID, 7)]
    other = copy.copy(old)
    other.conn_id, other.next_offset = "other", dict(old.next_offset)
    t._by_fd[(TGID, 7)] = other
    assert t.on_known_calls([call(b"b", fd=7, ts_ns=30, offset=6, socket=known())], 0, out) == 1
    assert [r.conn_id for r in out] == [old.conn_id, "other"]
    assert (old.next_offset["egress"], other.next_offset["egress"]) == (6, 7)
    del t._by_fd[(TGID, 7)]
    assert t.on_known_calls([call(b"c", fd=7, ts_ns=40, offset=7, socket=known())], 0, out) == 0
    t._by_fd[(TGID, 7)] = old
    assert t.on_known_calls([call(b"c", fd=7, ts_ns=40, offset=6, socket=known())], 0, out) == 1
    assert out[-1].conn_id == old.conn_id


def test_the_c_step_calls_record_for_call_directly_and_any_other_maker_as_python() -> None:
    t, _ = table()
    t.on_call(call(b"first", fd=7, ts_ns=10, socket=known()))
    conn = t._by_fd[(TGID, 7)]
    out: list[Record] = []
    assert t.on_known_calls([call(b"a", fd=7, ts_ns=20, offset=5, socket=known())], 0, out) == 1
    assert type(out[0]) is Record and out[0].data == b"a"

    def maker(*args: Any) -> tuple[str, int]:
        return "made", len(args)

    known_calls = KnownCalls({}, WallClock(0), maker, TlsCall, Connection, KernelSocket, 0)
    assert known_calls.take(conn, call(b"b", fd=7, offset=6, socket=known()), 7) == ("made", 7)


def test_known_calls_takes_only_connections_with_their_fields_in_slots() -> None:
    @dataclass
    class Unslotted:
        conn_id: str = ""

    args = ({}, WallClock(0), Record.for_call, TlsCall)
    with pytest.raises(TypeError, match="not an object slot"):
        KnownCalls(*args, Unslotted, KernelSocket)
    with pytest.raises(TypeError, match="wall_offset"):
        KnownCalls(*args, Connection, KernelSocket, 1.5)
    known_calls = KnownCalls(*args, Connection, KernelSocket, 0)
    with pytest.raises(TypeError, match="Connection"):
        known_calls.take(Unslotted(), call(socket=known()), 7)


# --- bounds ----------------------------------------------------------------------------------


def bounded(max_connections: int, max_adopted: int = 4) -> FlowTable:
    return FlowTable(
        FakeResolver(PROC_FACTS),
        lambda ns: ns + WALL_SHIFT,
        max_connections=max_connections,
        max_adopted=max_adopted,
    )


def test_past_the_bound_the_least_recently_used_connection_is_closed() -> None:
    t = bounded(4)
    ids = {}
    for fd in (10, 11, 12, 13):
        ids[fd] = t.on_call(call(fd=fd, ts_ns=fd, socket=known(gen=fd)))[0].conn_id
    # fd 10 is the oldest connection but the most recently used one.
    t.on_call(call(b"again", fd=10, ts_ns=100, offset=5, socket=known(gen=10)))
    out = t.on_call(call(fd=14, ts_ns=200, socket=known(gen=14)))
    # 4 - 4 // 16 (at least 1): the table goes back to 3 connections.
    assert types(out) == ["open", "close", "close", "data"]
    assert {r.conn_id for r in out if r.type == "close"} == {ids[11], ids[12]}
    assert all(r.ts_ns == 200 + WALL_SHIFT for r in out)
    assert len(t) == 3
    assert t.stats.evicted_connections == 2
    # The survivors are the recently used and the new one.
    assert t.on_call(call(fd=10, ts_ns=300, offset=10, socket=known(gen=10)))[0].type == "data"
    assert t.on_call(call(fd=13, ts_ns=301, offset=5, socket=known(gen=13)))[0].type == "data"
    assert (t.stats.gaps, t.stats.overlaps) == (0, 0)


def test_an_evicted_connection_that_speaks_again_is_opened_again() -> None:
    t = bounded(2)
    first = t.on_call(call(fd=10, ts_ns=1, socket=known(gen=10)))[0].conn_id
    t.on_call(call(fd=11, ts_ns=2, socket=known(gen=11)))
    t.on_call(call(fd=12, ts_ns=3, socket=known(gen=12)))
    assert t.stats.evicted_connections == 2  # back to 2 - max(1, 2 // 16) = 1, plus the new one
    out = t.on_call(call(b"late", fd=10, ts_ns=4, offset=5, socket=known(gen=10)))
    assert types(out)[0] == "open" and out[0].conn_id != first
    # Its close (the kernel still knows the socket) closes the new one.
    assert [r.conn_id for r in t.on_close(closed(fd=10, gen=10))] == [out[0].conn_id]


def test_memory_bio_connections_count_toward_the_bound() -> None:
    t = bounded(3)
    for n in range(10):
        t.on_call(call(fd=-1, ssl=0x1000 + n, ts_ns=n, socket=conn()))
    assert len(t) <= 3
    assert t.stats.evicted_connections == 10 - len(t)


def test_adopted_sockets_are_bounded_oldest_first() -> None:
    t = bounded(16, max_adopted=2)
    facts = Facts(local=LOCAL, remote=REMOTE, role="client")
    for fd in (30, 31, 32):
        t.adopt_existing_socket(TGID, fd, facts)
    assert t.stats.evicted_adoptions == 1
    regs = {r.fd: r for r in t.kernel_registrations}
    # 31 is still adopted: a gen-0 call in flight joins its registration.
    out = t.on_call(call(fd=31, socket=conn()))
    assert out[0].remote == REMOTE
    assert [r.gen for r in t.kernel_registrations if r.fd == 31][-1] == regs[31].gen
    # 30 was forgotten: its call is resolved like any unknown socket.
    t.on_call(call(fd=30, socket=conn()))
    assert [r.gen for r in t.kernel_registrations if r.fd == 30][-1] != regs[30].gen


def test_exit_asks_the_kernel_to_forget_the_process_sockets() -> None:
    t, _ = table()
    t.on_call(call(fd=7, socket=known()))
    t.on_call(call(fd=-1, ssl=0xAAA0, socket=conn()))
    t.on_call(call(tgid=OTHER_TGID, fd=7, socket=known()))
    t.kernel_registrations.clear()
    t.on_exit(TGID, 50_000)
    assert [(r.tgid, r.fd, r.forget) for r in t.kernel_registrations] == [(TGID, 7, True)]


def test_bounds_must_be_sane() -> None:
    with pytest.raises(ValueError):
        bounded(0)


def test_sweep_closes_connections_of_processes_that_ended_unseen() -> None:
    """An exit event dropped while the ring was full: the sweep that finds the
    process gone closes nothing yet (its exit event may still be on its way); the
    next one, nothing having come meanwhile, writes its close records and counts it."""
    t, _ = table()
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=10))
    t.on_call(call(tgid=200, fd=6, socket=known(gen=2), ts_ns=10))
    assert t.sweep_ended(lambda tgid: tgid != 100, ts_mono_ns=99) == []
    closed = t.sweep_ended(lambda tgid: tgid != 100, ts_mono_ns=199)
    assert [(r.type, r.pid) for r in closed] == [("close", 100)]
    assert t.stats.exits_recovered == 1
    assert t.tgids() == {200}
    assert t.sweep_ended(lambda tgid: True, ts_mono_ns=299) == []


def test_sweep_leaves_a_gone_process_to_its_exit_event_still_in_the_ring() -> None:
    """The process exited while the agent was behind: /proc has let go of it, but
    its last calls and its exit are still in the ring.  They close it; the sweep
    counts nothing."""
    t, _ = table()
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=1_000))
    assert t.sweep_ended(lambda tgid: False, ts_mono_ns=60_000) == []
    late = t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=40_000, offset=5))
    assert types(late) == ["data"]
    assert types(t.on_exit(100, 50_000)) == ["close"]
    assert t.sweep_ended(lambda tgid: False, ts_mono_ns=70_000) == []
    assert t.stats.exits_recovered == 0 and t.stats.gaps == 0


def test_sweep_of_a_gone_process_spares_the_connections_of_a_new_one_with_its_pid() -> None:
    t, _ = table()
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=1_000))
    assert t.sweep_ended(lambda tgid: False, ts_mono_ns=10_000) == []
    # The pid is reused: a new process's connection, seen after the look.
    t.on_call(call(tgid=100, fd=6, socket=known(gen=2), ts_ns=12_000))
    out = t.sweep_ended(lambda tgid: True, ts_mono_ns=20_000)
    assert [(r.type, r.fd) for r in out] == [("close", 5)]
    assert t.stats.exits_recovered == 1
    assert t.tgids() == {100}


def test_sweep_closes_idle_connections_whose_socket_is_gone() -> None:
    """A close event dropped while the ring was full, the process alive: the sweep
    asks about connections idle since the last sweep; those whose fd is no socket
    any more are closed (and counted) by the next sweep, nothing having come
    meanwhile.  Busy ones are not asked about."""
    t, _ = table()
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=1_000))
    t.on_call(call(tgid=100, fd=6, socket=known(gen=2), ts_ns=1_000))
    t.on_call(call(tgid=100, fd=7, socket=known(gen=3), ts_ns=9_000))  # busy: not asked
    asked: list[tuple[int, int]] = []

    def is_socket(tgid: int, fd: int) -> bool:
        asked.append((tgid, fd))
        return fd == 6  # fd 5 was closed, its close event lost

    assert t.sweep_closed(is_socket, idle_before_mono_ns=5_000, ts_mono_ns=10_000) == []
    assert sorted(asked) == [(100, 5), (100, 6)]
    assert t.stats.closes_recovered == 0
    out = t.sweep_closed(is_socket, idle_before_mono_ns=5_000, ts_mono_ns=20_000)
    assert [(r.type, r.fd) for r in out] == [("close", 5)]
    assert t.stats.closes_recovered == 1
    # The same fd reopened for a new socket starts a new connection.
    again = t.on_call(call(tgid=100, fd=5, socket=known(gen=4), ts_ns=21_000))
    assert types(again) == ["open", "data"]
    assert again[0].conn_id != out[0].conn_id
    assert t.stats.sweep_reopened == 0


def test_sweep_does_not_close_live_connections_of_an_exited_process_the_agent_is_behind() -> None:
    """The CI flake (tests/ebpf/test_go_idle_connections.py under load): a process
    exits right after its last requests while the agent is >10 s behind.  A
    zombie's /proc/<pid>/fd is empty, so every one of its fds "is no socket" -
    but its last calls and its exit event are still in the ring.  The sweep must
    not close its connections: the calls stay on them (same id, role, endpoints,
    no gap), and the exit closes them, with nothing counted as recovered."""
    t, _ = table(facts=None)  # /proc knows nothing of a dead process
    server = conn_v4(("127.0.0.1", 51000), ("127.0.0.1", 8443), gen=7, role=ROLE_SERVER)
    client = conn_v4(("127.0.0.1", 8443), ("127.0.0.1", 51000), gen=8)
    first = t.on_call(call(b"GET /r/1/1", tgid=100, fd=5, socket=client, ts_ns=1_000))
    t.on_call(call(b"GET /r/1/1", tgid=100, fd=6, socket=server, ts_ns=1_100,
                   direction=layout.DIR_INGRESS))  # fmt: skip
    # Round 2, then the exit, were sent at 40-50 s; the agent, behind, sweeps at 60 s.
    out = t.sweep_closed(lambda tgid, fd: False, idle_before_mono_ns=50_000, ts_mono_ns=60_000)
    assert out == []
    late = t.on_call(call(b"GET /r/1/2", tgid=100, fd=6, socket=server, ts_ns=40_000,
                          offset=10, direction=layout.DIR_INGRESS))  # fmt: skip
    assert types(late) == ["data"]
    assert late[0].role == "server" and late[0].conn_id.startswith("100-6-")
    assert late[0].remote == Endpoint("127.0.0.1", 51000)
    assert types(t.on_exit(100, 50_000)) == ["close", "close"]
    assert t.sweep_closed(lambda tgid, fd: False, 50_000, ts_mono_ns=70_000) == []
    assert t.stats.closes_recovered == 0 and t.stats.gaps == 0
    assert t.stats.connections == 2 and first[0].type == "open"


def test_sweep_waits_while_the_agent_is_behind_its_look() -> None:
    """Events keep coming but all older than the sweep's look at /proc: the agent is
    still behind it, so nothing is closed yet; once an event newer than the look
    has been handled, the lost close is recovered."""
    t, _ = table()
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=1_000))
    t.on_call(call(tgid=100, fd=6, socket=known(gen=2), ts_ns=1_000))

    def is_socket(tgid: int, fd: int) -> bool:
        return fd == 6

    assert t.sweep_closed(is_socket, 5_000, ts_mono_ns=60_000) == []
    t.on_call(call(tgid=100, fd=6, socket=known(gen=2), ts_ns=30_000, offset=5))
    assert t.sweep_closed(is_socket, 5_000, ts_mono_ns=70_000) == []  # still behind 60 s
    t.on_call(call(tgid=100, fd=6, socket=known(gen=2), ts_ns=61_000, offset=10))
    out = t.sweep_closed(is_socket, 5_000, ts_mono_ns=80_000)
    assert [(r.type, r.fd) for r in out] == [("close", 5)]
    assert t.stats.closes_recovered == 1


def test_sweep_spares_a_connection_that_spoke_after_the_look() -> None:
    """/proc said "no socket" (wrongly), but the connection made a call after the
    look: it is alive, and stays open."""
    t, _ = table()
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=1_000))
    assert t.sweep_closed(lambda tgid, fd: False, 5_000, ts_mono_ns=10_000) == []
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=11_000, offset=5))
    assert t.sweep_closed(lambda tgid, fd: False, 5_000, ts_mono_ns=20_000) == []
    assert t.stats.closes_recovered == 0 and len(t) == 1


def test_sweep_spares_a_connection_whose_fd_is_a_socket_again_at_the_second_look() -> None:
    t, _ = table()
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=1_000))
    answers = iter([False, True])
    assert t.sweep_closed(lambda tgid, fd: next(answers), 5_000, ts_mono_ns=10_000) == []
    assert t.sweep_closed(lambda tgid, fd: next(answers), 5_000, ts_mono_ns=20_000) == []
    assert t.stats.closes_recovered == 0 and len(t) == 1


def test_connection_swept_wrongly_comes_back_with_its_identity_and_offsets() -> None:
    """Should the sweep still close a live connection (/proc wrong twice, no call
    in between), its next call on the same socket (same gen) reopens it with the
    endpoints and role it had and its offsets going on: no false gap, counted."""
    t, _ = table(facts=PROC_FACTS)
    sock = conn_v4((REMOTE.ip, REMOTE.port), gen=KERNEL_GEN, role=ROLE_UNKNOWN)  # /proc tells
    first = t.on_call(call(b"12345", tgid=100, fd=5, socket=sock, ts_ns=1_000))
    t.on_call(call(b"abc", tgid=100, fd=5, socket=sock, ts_ns=1_500,
                   direction=layout.DIR_INGRESS))  # fmt: skip
    assert t.sweep_closed(lambda tgid, fd: False, 5_000, ts_mono_ns=10_000) == []
    swept = t.sweep_closed(lambda tgid, fd: False, 5_000, ts_mono_ns=20_000)
    assert types(swept) == ["close"] and t.stats.closes_recovered == 1
    t._resolver.facts = None  # /proc cannot tell any more
    again = t.on_call(call(b"678", tgid=100, fd=5, socket=sock, ts_ns=21_000, offset=5))
    assert types(again) == ["open", "data"]
    opened, data = again
    assert data.conn_id != first[0].conn_id  # a new id, as after an eviction
    assert (data.local, data.remote, data.role) == (PROC_FACTS.local, REMOTE, "client")
    assert (opened.local, opened.role) == (PROC_FACTS.local, "client")
    assert t.stats.gaps == 0 and t.stats.sweep_reopened == 1
    more = t.on_call(call(b"de", tgid=100, fd=5, socket=sock, ts_ns=22_000, offset=3,
                          direction=layout.DIR_INGRESS))  # fmt: skip
    assert types(more) == ["data"] and t.stats.gaps == 0


def test_swept_connection_is_not_revived_by_another_socket_on_its_fd() -> None:
    t, _ = table(facts=None)
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=1_000))
    t.sweep_closed(lambda tgid, fd: False, 5_000, ts_mono_ns=10_000)
    assert types(t.sweep_closed(lambda tgid, fd: False, 5_000, ts_mono_ns=20_000)) == ["close"]
    other = conn_v4(("198.18.0.9", 443), gen=2)
    again = t.on_call(call(tgid=100, fd=5, socket=other, ts_ns=21_000, offset=0))
    assert again[1].remote == Endpoint("198.18.0.9", 443) and again[1].local is None
    assert t.stats.sweep_reopened == 0


def test_close_event_of_a_swept_connection_forgets_it() -> None:
    t, _ = table(facts=None)
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=1_000, offset=0))
    t.sweep_closed(lambda tgid, fd: False, 5_000, ts_mono_ns=10_000)
    t.sweep_closed(lambda tgid, fd: False, 5_000, ts_mono_ns=20_000)
    assert t.on_close(closed(tgid=100, fd=5, gen=1, ts_ns=20_500)) == []
    # A call with gen 1 now is not that connection: it opens afresh.
    t.on_call(call(tgid=100, fd=5, socket=known(gen=1), ts_ns=21_000, offset=5))
    assert t.stats.sweep_reopened == 0 and t.stats.gaps == 1


def test_fd_is_socket_reads_proc(tmp_path) -> None:
    import socket as socketlib

    from agent.flows.resolve import fd_is_socket

    sock = socketlib.socket()
    try:
        assert fd_is_socket(os.getpid(), sock.fileno())
    finally:
        fd = sock.fileno()
        sock.close()
    assert not fd_is_socket(os.getpid(), fd)
    with open(tmp_path / "f", "w") as f:
        assert not fd_is_socket(os.getpid(), f.fileno())
