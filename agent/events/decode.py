"""Turn raw ring-buffer records into typed events.

Pure: bytes in, dataclasses out, so it is tested without a kernel.  A record
that does not match any layout raises DecodeError; the caller logs it, counts
it and carries on.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal, TypeVar

from agent.events import layout
from agent.records.record import Direction, Endpoint, Role

_S = TypeVar("_S", bound=ct.Structure)


class DecodeError(ValueError):
    """A ring-buffer record that is too short or of an unknown kind."""


@dataclass(frozen=True)
class KernelSocket:
    """What the kernel knew of the socket at the time of the call."""

    gen: int  # 0: the kernel has no record of this socket
    remote: Endpoint | None
    local: Endpoint | None  # None until the TCP handshake told the kernel
    role: Role


@dataclass(frozen=True)
class DataChunk:
    tgid: int
    tid: int
    fd: int
    ts_mono_ns: int
    ssl: int
    len: int
    offset: int
    captured_len: int
    chunk_off: int
    direction: Direction
    source: str
    comm: str
    socket: KernelSocket
    data: bytes
    cgroup_id: int = 0


@dataclass(frozen=True)
class SocketClosed:
    tgid: int
    tid: int
    fd: int
    ts_mono_ns: int
    gen: int


@dataclass(frozen=True)
class ProcessEvent:
    kind: Literal["exec", "exec_map", "exit"]
    tgid: int
    ts_mono_ns: int
    comm: str


Event = DataChunk | SocketClosed | ProcessEvent

_PROC_KINDS: dict[int, Literal["exec", "exec_map", "exit"]] = {
    layout.EV_EXEC: "exec",
    layout.EV_EXEC_MAP: "exec_map",
    layout.EV_EXIT: "exit",
}


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def endpoint(family: int, addr: bytes, port: int) -> Endpoint | None:
    """An address as the kernel recorded it (sockaddr or TCP tracepoint bytes)."""
    if family == layout.AF_INET:
        return Endpoint(str(ipaddress.IPv4Address(addr[:4])), port)
    if family == layout.AF_INET6:
        ip6 = ipaddress.IPv6Address(addr[:16])
        # A v4 peer on a dual-stack socket: report it as the v4 address that
        # the other end sees itself as.
        ip = str(ip6.ipv4_mapped) if ip6.ipv4_mapped else str(ip6)
        return Endpoint(ip, port)
    return None


def _kernel_socket(conn: layout.ConnInfo) -> KernelSocket:
    return KernelSocket(
        gen=conn.gen,
        remote=endpoint(conn.family, bytes(conn.raddr), conn.rport),
        local=endpoint(conn.family, bytes(conn.laddr), conn.lport) if conn.lport else None,
        role=layout.ROLES.get(conn.role, "unknown"),  # type: ignore[arg-type]
    )


def decode_event(raw: bytes) -> Event:
    if len(raw) < 4:
        raise DecodeError(f"ring-buffer record of {len(raw)} bytes is too short")
    (kind,) = struct.unpack_from("<I", raw)
    if kind == layout.EV_DATA:
        return _decode_data(raw)
    if kind == layout.EV_CLOSE:
        e = _struct(layout.CloseEvent, raw)
        return SocketClosed(e.tgid, e.tid, e.fd, e.ts_ns, e.gen)
    if kind in _PROC_KINDS:
        p = _struct(layout.ProcEvent, raw)
        return ProcessEvent(_PROC_KINDS[kind], p.tgid, p.ts_ns, _comm(p.comm))
    raise DecodeError(f"unknown event kind {kind} ({len(raw)} bytes)")


def _struct(cls: type[_S], raw: bytes) -> _S:
    size = ct.sizeof(cls)
    if len(raw) < size:
        raise DecodeError(f"{cls.__name__} needs {size} bytes, got {len(raw)}")
    return cls.from_buffer_copy(raw[:size])


def _decode_data(raw: bytes) -> DataChunk:
    h = _struct(layout.DataEventHeader, raw)
    end = layout.DATA_HEADER_SIZE + h.chunk_len
    if h.chunk_len > layout.CHUNK_SIZE or len(raw) < end:
        raise DecodeError(
            f"data chunk claims {h.chunk_len} payload bytes, record has "
            f"{len(raw) - layout.DATA_HEADER_SIZE}"
        )
    if h.chunk_off + h.chunk_len > h.captured_len or h.captured_len > h.len:
        raise DecodeError(
            f"inconsistent data chunk: off={h.chunk_off} len={h.chunk_len} "
            f"captured={h.captured_len} call_len={h.len}"
        )
    return DataChunk(
        tgid=h.tgid,
        tid=h.tid,
        fd=h.fd,
        ts_mono_ns=h.ts_ns,
        ssl=h.ssl,
        len=h.len,
        offset=h.offset,
        captured_len=h.captured_len,
        chunk_off=h.chunk_off,
        direction="ingress" if h.direction == layout.DIR_INGRESS else "egress",
        source=layout.SOURCES.get(h.source, f"source{h.source}"),
        comm=_comm(h.comm),
        socket=_kernel_socket(h.conn),
        data=bytes(raw[layout.DATA_HEADER_SIZE : end]),
        cgroup_id=h.cgroup_id,
    )
