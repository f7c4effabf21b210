"""The pcapng file format, for the packets agent/pcap/packets.py synthesizes.

One section, one interface of link type LINKTYPE_RAW (101: each packet starts
at its IPv4 or IPv6 header, so no Ethernet addresses are invented) with
if_tsresol 9 (timestamps in ns, as records carry them), and one Enhanced
Packet Block per packet with its opt_comment.  Little-endian throughout; readers
take the byte order from the section header's magic.

The blocks are packed with struct rather than with the python-pcapng library:
that library writes correct files, but it builds an object per block and encodes
its options field by field, ~19 µs per packet against ~1 µs here (measured by
bench/pcapng_writer.py), and a live sink has to keep up with the capture.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Protocol

from agent import __version__
from agent.pcap.packets import Packet

LINKTYPE_RAW = 101

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D

OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9

_EPB_HEAD = struct.Struct("<IIIIIII")  # type, length, interface, ts high/low, caplen, len
_U32 = struct.Struct("<I")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_END = struct.pack("<HH", OPT_ENDOFOPT, 0)


class _BinaryWriter(Protocol):
    def write(self, data: bytes, /) -> object: ...


def option(code: int, value: bytes) -> bytes:
    """One TLV option, its value padded to 32 bits."""
    return struct.pack("<HH", code, len(value)) + value + _PAD[len(value) % 4]


def block(block_type: int, body: bytes) -> bytes:
    """A whole block: type, total length, body (a multiple of 4 bytes), total length."""
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + _U32.pack(length)


def section_header(application: str = f"tlscap {__version__}") -> bytes:
    body = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)  # version 1.0, length unknown
    body += option(SHB_USERAPPL, application.encode()) + _END
    return block(_SHB, body)


def interface_description(link_type: int = LINKTYPE_RAW, name: str = "tlscap") -> bytes:
    body = struct.pack("<HHI", link_type, 0, 0)  # snaplen 0: no limit
    body += option(IF_NAME, name.encode())
    body += option(IF_DESCRIPTION, b"TLS plaintext captured by tlscap, TCP/IP synthesized")
    body += option(IF_TSRESOL, b"\x09") + _END  # 10^-9 s
    return block(_IDB, body)


def enhanced_packet(ts_ns: int, data: bytes, comment: str = "") -> bytes:
    """An Enhanced Packet Block on interface 0; `comment` becomes its opt_comment."""
    n = len(data)
    opts = b""
    if comment:
        text = comment.encode("utf-8", "backslashreplace")  # comm may hold surrogate escapes
        opts = struct.pack("<HH", OPT_COMMENT, len(text)) + text + _PAD[len(text) % 4] + _END
    pad = _PAD[n % 4]
    length = 32 + n + len(pad) + len(opts)
    head = _EPB_HEAD.pack(_EPB, length, 0, ts_ns >> 32 & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF, n, n)
    return b"".join((head, data, pad, opts, _U32.pack(length)))


class PcapngWriter:
    """Writes the section header and the interface at once, then blocks of packets."""

    def __init__(self, stream: _BinaryWriter, link_type: int = LINKTYPE_RAW) -> None:
        self.stream = stream
        self.packets = 0
        stream.write(section_header() + interface_description(link_type))

    def write_packets(self, packets: Iterable[Packet]) -> None:
        """Packets in one write() (one lock round for a periodically flushed stream)."""
        blocks = [enhanced_packet(p.ts_ns, p.data, p.comment) for p in packets]
        if blocks:
            self.stream.write(b"".join(blocks))
            self.packets += len(blocks)
