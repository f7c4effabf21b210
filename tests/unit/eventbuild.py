"""Build raw ring-buffer records the way the kernel lays them out.

Every record is made by filling the ctypes mirrors in agent.events.layout and
taking `bytes(struct) + payload`, so tests that decode them exercise the real
byte layout shared with bpf/tlscap.h.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
from typing import Any

from agent.events import layout
from agent.events.calls import CallAssembler
from agent.events.decode import TlsCall, decode_event

ROLE_UNKNOWN = 0
ROLE_CLIENT = 1
ROLE_SERVER = 2

# Defaults for a data event header; any field can be overridden by name.
DATA_DEFAULTS: dict[str, Any] = {
    "kind": layout.EV_DATA,
    "tgid": 4242,
    "tid": 4243,
    "fd": 7,
    "ts_ns": 1_000_000,
    "ssl": 0x5555_0000_1000,
    "offset": 0,
    "chunk_off": 0,
    "direction": layout.DIR_EGRESS,
    "source": 1,
    "comm": b"curl",
}


def conn(
    *,
    gen: int = 0,
    family: int = 0,
    raddr: str | None = None,
    laddr: str | None = None,
    rport: int = 0,
    lport: int = 0,
    role: int = ROLE_UNKNOWN,
    flags: int = 0,
) -> dict[str, Any]:
    """The kernel's conn_info of an event, as keyword arguments."""
    return {
        "gen": gen,
        "family": family,
        "raddr": raddr,
        "laddr": laddr,
        "rport": rport,
        "lport": lport,
        "role": role,
        "flags": flags,
    }


def conn_v4(
    remote: tuple[str, int],
    local: tuple[str, int] | None = None,
    *,
    gen: int = 0x1_0000_0001,
    role: int = ROLE_CLIENT,
) -> dict[str, Any]:
    """A socket the kernel saw being connected/accepted (AF_INET)."""
    return conn(
        gen=gen,
        family=layout.AF_INET,
        raddr=remote[0],
        rport=remote[1],
        laddr=local[0] if local else None,
        lport=local[1] if local else 0,
        role=role,
    )


def _fill_conn(c: layout.ConnInfo, spec: dict[str, Any]) -> None:
    for name in ("gen", "family", "rport", "lport", "role", "flags"):
        setattr(c, name, spec.get(name, 0))
    for name in ("raddr", "laddr"):
        ip = spec.get(name)
        if ip is not None:
            packed = ipaddress.ip_address(ip).packed
            ct.memmove(getattr(c, name), packed, len(packed))


def data_header(
    *, chunk_len: int, socket: dict[str, Any] | None = None, **fields: Any
) -> layout.DataEventHeader:
    values = {**DATA_DEFAULTS, **fields}
    h = layout.DataEventHeader()
    for name, value in values.items():
        setattr(h, name, value)
    h.chunk_len = chunk_len
    _fill_conn(h.conn, socket or {})
    return h


def data_record(
    payload: bytes = b"",
    *,
    chunk_len: int | None = None,
    socket: dict[str, Any] | None = None,
    **fields: Any,
) -> bytes:
    """One data chunk record: header + payload.  len/captured_len default to
    the payload size, chunk_len to the payload size (override to lie)."""
    fields.setdefault("len", len(payload))
    fields.setdefault("captured_len", len(payload))
    h = data_header(
        chunk_len=len(payload) if chunk_len is None else chunk_len, socket=socket, **fields
    )
    return bytes(h) + payload


def call_records(
    captured: bytes,
    *,
    socket: dict[str, Any] | None = None,
    **fields: Any,
) -> list[bytes]:
    """The chunk records of one TLS call whose captured payload is `captured`
    (the kernel splits it into CHUNK_SIZE pieces sharing one header)."""
    fields.setdefault("len", len(captured))
    fields["captured_len"] = len(captured)
    out = []
    for off in range(0, max(len(captured), 1), layout.CHUNK_SIZE):
        piece = captured[off : off + layout.CHUNK_SIZE]
        out.append(data_record(piece, socket=socket, chunk_off=off, **fields))
    return out


def call_chunks(
    captured: bytes, *, socket: dict[str, Any] | None = None, **fields: Any
) -> list[TlsCall]:
    """call_records, decoded."""
    chunks = []
    for raw in call_records(captured, socket=socket, **fields):
        ev = decode_event(raw)
        assert isinstance(ev, TlsCall)
        chunks.append(ev)
    return chunks


def make_call(
    captured: bytes = b"hello", *, socket: dict[str, Any] | None = None, **fields: Any
) -> TlsCall:
    """A complete TlsCall, built from raw records through decode + assembler."""
    assembler = CallAssembler()
    calls: list[TlsCall] = []
    for chunk in call_chunks(captured, socket=socket, **fields):
        calls += assembler.feed(chunk)
    assert len(calls) == 1 and calls[0].complete
    return calls[0]


def close_record(
    *, tgid: int = 4242, tid: int = 4243, fd: int = 7, ts_ns: int = 2_000_000, gen: int = 0
) -> bytes:
    e = layout.CloseEvent(kind=layout.EV_CLOSE, tgid=tgid, tid=tid, fd=fd, ts_ns=ts_ns, gen=gen)
    return bytes(e)


def proc_record(
    kind: int, *, tgid: int = 4242, ts_ns: int = 3_000_000, comm: bytes = b"curl"
) -> bytes:
    return bytes(layout.ProcEvent(kind=kind, tgid=tgid, ts_ns=ts_ns, comm=comm))
