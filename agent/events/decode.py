"""Turn raw ring-buffer records into typed events, a batch at a time.

Pure: bytes in, objects out, so it is tested without a kernel.  A record that
does not match any layout raises DecodeError (decode_event) or is returned as a
DecodeError in its place (EventDecoder.decode_batch); the caller logs it, counts
it and carries on.

This is the first step of the hot path, so data records - nearly all of a busy
ring - are decoded in C (agent/events/_decode.c): one header read in place and
one payload copy each, into the TlsCall the flow table makes its Record from.
What repeats from event to event - the socket's endpoints, the process
name - is decoded once, here in Python, and looked up after.  The rarer kinds
are decoded here too (decode_other).

TlsCall (C, its fields documented on the type) is one SSL_read/SSL_write - or
equivalent - and the plaintext it moved.  The decoder makes one per chunk
record; a call larger than one chunk is folded into its first chunk's object by
CallAssembler, so each TLS call is one object from the ring to its Record.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Literal

from agent.events import _decode, layout
from agent.events._decode import BatchDecoder, TlsCall
from agent.events.ring import RingBatch
from agent.records.record import Endpoint, Role

__all__ = [
    "DecodeError", "Event", "EventDecoder", "KernelSocket", "ProcessEvent", "SocketBound",
    "SocketClosed", "TlsCall", "decode_event", "decode_other", "endpoint", "kernel_socket",
]  # fmt: skip


class DecodeError(ValueError):
    """A ring-buffer record that is too short or of an unknown kind."""


@dataclass(frozen=True, slots=True)
class KernelSocket:
    """What the kernel knew of the socket at the time of the call."""

    gen: int  # 0: the kernel has no record of this socket
    remote: Endpoint | None
    local: Endpoint | None  # None until the TCP handshake told the kernel
    role: Role


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
_CONN = struct.Struct("<Q16s16sHHHBB")
_CLOSE = struct.Struct("<4xIIiQQ")
_PROC = struct.Struct("<4xIQ16s")
_BIND = struct.Struct("<4xIIiQQ48s")
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"

# Data events are decoded in C (struct data_header in _decode.c, offsets checked
# there), against the same sizes as layout.py's mirror.
_DATA_SIZE = layout.DATA_HEADER_SIZE
_CHUNK_SIZE = layout.CHUNK_SIZE
assert (_DATA_SIZE, _CHUNK_SIZE) == (_decode.HEADER_SIZE, _decode.CHUNK_SIZE)
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


class EventDecoder(BatchDecoder):
    """Decodes ring-buffer records, remembering the sockets and process names it
    has decoded (each cache holds at most `cache_size` entries, then starts over:
    a busy node has many connections, but each is seen for many events).

    `decode_batch(batch)` (C, agent/events/_decode.c) returns one event -
    or the DecodeError that refused it - per record of a RingBatch, in order.
    Headers are read in place; payloads are copied out, so the batch's memory
    may be reused afterwards.  Data records, nearly all of a busy ring, are
    decoded there in full: one header read and one payload copy each, and what
    repeats - the socket, the process name - looked up from what was decoded
    before (`kernel_socket`, `_comm` on a miss).  Every other kind goes to
    `decode_other`.
    """

    def __init__(self, cache_size: int = 65536) -> None:
        super().__init__(
            kernel_socket, _comm, decode_other, _bad_chunk, DecodeError, layout.SOURCES,
            cache_size,
        )  # fmt: skip

    def decode(self, raw: bytes | memoryview) -> Event:
        [event] = self.decode_batch(RingBatch(raw, [0, len(raw)]))
        if isinstance(event, DecodeError):
            raise event
        return event


def decode_other(raw: bytes) -> Event:
    """A record that is not a data event (or is too short to be one)."""
    if len(raw) < 4:
        raise DecodeError(f"ring-buffer record of {len(raw)} bytes is too short")
    (kind,) = _KIND.unpack_from(raw)
    if kind == layout.EV_DATA:  # decode_batch takes every data event long enough
        raise DecodeError(f"data event needs {_DATA_SIZE} bytes, got {len(raw)}")
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
    if chunk_len > _CHUNK_SIZE or _DATA_SIZE + chunk_len > length:
        return DecodeError(
            f"data chunk claims {chunk_len} payload bytes, record has {length - _DATA_SIZE}"
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
