"""Turn raw ring-buffer records into typed events, a batch at a time.

Pure: bytes in, objects out, so it is tested without a kernel.  A record that
does not match any layout raises DecodeError (decode_event) or is returned as a
DecodeError in its place (EventDecoder.decode_batch); the caller logs it, counts
it and carries on.

This is the first step of the hot path, so it is written for speed: one
precompiled struct read per header, and what repeats from event to event - the
socket's endpoints, the process name - is decoded once and looked up after.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Literal

from agent.events import layout
from agent.events.ring import RingBatch
from agent.records.record import Direction, Endpoint, Role


class DecodeError(ValueError):
    """A ring-buffer record that is too short or of an unknown kind."""


@dataclass(frozen=True, slots=True)
class KernelSocket:
    """What the kernel knew of the socket at the time of the call."""

    gen: int  # 0: the kernel has no record of this socket
    remote: Endpoint | None
    local: Endpoint | None  # None until the TCP handshake told the kernel
    role: Role


@dataclass(slots=True)
class TlsCall:
    """One SSL_read/SSL_write (or equivalent) and the plaintext it moved.

    The decoder makes one per chunk record; a call larger than one chunk is
    folded into its first chunk's object by CallAssembler, so each TLS call is
    one object from the ring to its Record.
    """

    tgid: int
    tid: int
    fd: int
    ts_mono_ns: int
    ssl: int
    len: int  # bytes the call moved
    offset: int
    captured_len: int  # bytes of it the kernel sent (the payload cap)
    chunk_off: int  # where `data` starts within the call (0 once assembled)
    direction: Direction
    source: str
    comm: str
    socket: KernelSocket
    data: bytes
    cgroup_id: int = 0
    complete: bool = True  # False: some chunks were lost in the kernel
    # fd came from a read/write on an fd the kernel did not know as a socket
    # (a file read inside the call, or a socket nobody registered yet).
    fd_weak: bool = False

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.len


@dataclass(frozen=True, slots=True)
class SocketClosed:
    tgid: int
    tid: int
    fd: int
    ts_mono_ns: int
    gen: int


@dataclass(frozen=True, slots=True)
class SocketBound:
    """The kernel bound a memory-BIO TLS object (`ssl`) to its socket: its
    earlier data went out without a socket, its later data carries this one."""

    tgid: int
    tid: int
    fd: int
    ts_mono_ns: int
    ssl: int
    socket: KernelSocket


@dataclass(frozen=True, slots=True)
class ProcessEvent:
    kind: Literal["exec", "exec_map", "exit", "hold"]
    tgid: int
    ts_mono_ns: int
    comm: str


Event = TlsCall | SocketClosed | SocketBound | ProcessEvent

_PROC_KINDS: dict[int, Literal["exec", "exec_map", "exit", "hold"]] = {
    layout.EV_EXEC: "exec",
    layout.EV_EXEC_MAP: "exec_map",
    layout.EV_EXIT: "exit",
    layout.EV_HOLD: "hold",
}

# bpf/tlscap.h's structs as struct formats (layout.py's ctypes mirrors are the
# reference; tests check that both agree).
_KIND = struct.Struct("<I")
_DATA = struct.Struct("<IIIiQQQQIIIBBBx16s48sQ")  # kind first
_CONN = struct.Struct("<Q16s16sHHHBB")
_CLOSE = struct.Struct("<4xIIiQQ")
_PROC = struct.Struct("<4xIQ16s")
_BIND = struct.Struct("<4xIIiQQ48s")
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"

assert _DATA.size == layout.DATA_HEADER_SIZE
_CHUNK_SIZE = layout.CHUNK_SIZE
assert _CONN.size == 48
assert _BIND.size == layout.BIND_EVENT_SIZE


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def endpoint(family: int, addr: bytes, port: int) -> Endpoint | None:
    """An address as the kernel recorded it (sockaddr or TCP tracepoint bytes)."""
    if family == layout.AF_INET:
        return Endpoint(socket.inet_ntop(socket.AF_INET, addr[:4]), port)
    if family == layout.AF_INET6:
        # A v4 peer on a dual-stack socket: report it as the v4 address that
        # the other end sees itself as.
        if addr[:12] == _V4_MAPPED:
            return Endpoint(socket.inet_ntop(socket.AF_INET, addr[12:16]), port)
        return Endpoint(socket.inet_ntop(socket.AF_INET6, addr[:16]), port)
    return None


def kernel_socket(conn: bytes) -> KernelSocket:
    """The 48 bytes of a struct conn_info."""
    gen, raddr, laddr, family, rport, lport, role, _flags = _CONN.unpack(conn)
    return KernelSocket(
        gen=gen,
        remote=endpoint(family, raddr, rport),
        local=endpoint(family, laddr, lport) if lport else None,
        role=layout.ROLES.get(role, "unknown"),  # type: ignore[arg-type]
    )


class EventDecoder:
    """Decodes ring-buffer records, remembering the sockets and process names it
    has decoded (each cache holds at most `cache_size` entries, then starts over:
    a busy node has many connections, but each is seen for many events)."""

    def __init__(self, cache_size: int = 65536) -> None:
        self._cache_size = cache_size
        self._sockets: dict[bytes, KernelSocket] = {}
        self._comms: dict[bytes, str] = {}

    def decode_batch(self, batch: RingBatch) -> list[Event | DecodeError]:
        """One event (or the DecodeError that refused it) per record, in order.

        Headers are read in place; payloads are copied out, so the batch's
        memory may be reused afterwards.  Data events are nearly all of a busy
        ring, so their decoding is inline here: one struct read and one payload
        copy per event, and what repeats - the socket, the process name - looked
        up from what was decoded before.
        """
        out: list[Event | DecodeError] = []
        append = out.append
        data, spans = batch.data, batch.spans
        unpack = _DATA.unpack_from
        header_size = _DATA.size
        data_kind, ingress, fd_weak = layout.EV_DATA, layout.DIR_INGRESS, layout.DATA_FD_WEAK
        sources = layout.SOURCES
        sockets, comms = self._sockets, self._comms
        for i in range(0, len(spans), 2):
            start, length = spans[i], spans[i + 1]
            try:
                if length < header_size:
                    append(self._other(bytes(data[start : start + length])))
                    continue
                (
                    kind, tgid, tid, fd, ts_ns, ssl, call_len, offset, captured_len, chunk_off,
                    chunk_len, direction, source, flags, comm_raw, conn_raw, cgroup_id,
                ) = unpack(data, start)  # fmt: skip
                if kind != data_kind:
                    append(self._other(bytes(data[start : start + length])))
                    continue
                if (
                    chunk_len > _CHUNK_SIZE
                    or header_size + chunk_len > length
                    or chunk_off + chunk_len > captured_len
                    or captured_len > call_len
                ):
                    raise _bad_chunk(length, call_len, captured_len, chunk_off, chunk_len)
                sock = sockets.get(conn_raw)
                if sock is None:
                    if len(sockets) >= self._cache_size:
                        sockets.clear()
                    sock = sockets[conn_raw] = kernel_socket(conn_raw)
                comm = comms.get(comm_raw)
                if comm is None:
                    if len(comms) >= self._cache_size:
                        comms.clear()
                    comm = comms[comm_raw] = _comm(comm_raw)
                payload = start + header_size
                call = TlsCall(
                    tgid, tid, fd, ts_ns, ssl, call_len, offset, captured_len, chunk_off,
                    "ingress" if direction == ingress else "egress",
                    sources.get(source) or f"source{source}",
                    comm, sock, bytes(data[payload : payload + chunk_len]), cgroup_id, True,
                    bool(flags & fd_weak),
                )  # fmt: skip
                append(call)
            except DecodeError as exc:
                append(exc)
        return out

    def decode(self, raw: bytes | memoryview) -> Event:
        [event] = self.decode_batch(RingBatch.of([bytes(raw)]))
        if isinstance(event, DecodeError):
            raise event
        return event

    def _other(self, raw: bytes | memoryview) -> Event:
        if len(raw) < 4:
            raise DecodeError(f"ring-buffer record of {len(raw)} bytes is too short")
        (kind,) = _KIND.unpack_from(raw)
        if kind == layout.EV_DATA:  # decode_batch takes every data event long enough
            raise DecodeError(f"data event needs {_DATA.size} bytes, got {len(raw)}")
        if kind == layout.EV_CLOSE:
            tgid, tid, fd, ts_ns, gen = _unpack(_CLOSE, raw, "CloseEvent")
            return SocketClosed(tgid, tid, fd, ts_ns, gen)
        if kind == layout.EV_BIND:
            tgid, tid, fd, ts_ns, ssl, conn_raw = _unpack(_BIND, raw, "BindEvent")
            return SocketBound(tgid, tid, fd, ts_ns, ssl, kernel_socket(conn_raw))
        if kind in _PROC_KINDS:
            tgid, ts_ns, comm = _unpack(_PROC, raw, "ProcEvent")
            return ProcessEvent(_PROC_KINDS[kind], tgid, ts_ns, _comm(comm))
        raise DecodeError(f"unknown event kind {kind} ({len(raw)} bytes)")


def _bad_chunk(
    length: int, call_len: int, captured_len: int, chunk_off: int, chunk_len: int
) -> DecodeError:
    if chunk_len > _CHUNK_SIZE or _DATA.size + chunk_len > length:
        return DecodeError(
            f"data chunk claims {chunk_len} payload bytes, record has {length - _DATA.size}"
        )
    return DecodeError(
        f"inconsistent data chunk: off={chunk_off} len={chunk_len} "
        f"captured={captured_len} call_len={call_len}"
    )


def _unpack(layout_struct: struct.Struct, raw: bytes | memoryview, name: str) -> tuple:
    if len(raw) < layout_struct.size:
        raise DecodeError(f"{name} needs {layout_struct.size} bytes, got {len(raw)}")
    return layout_struct.unpack_from(raw)


def decode_event(raw: bytes | memoryview) -> Event:
    """One record, without caches (tests, and anything not on the hot path)."""
    return EventDecoder(cache_size=0).decode(raw)
