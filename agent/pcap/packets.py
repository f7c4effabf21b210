"""Turn captured TLS plaintext back into the TCP/IP packets it would have been.

Wireshark and tshark only dissect HTTP, HTTP/2 and gRPC inside TCP streams, so
to show captured plaintext there we synthesize, per connection, a TCP
conversation over the connection's real 4-tuple that carries exactly the bytes
we captured at exactly the stream positions they had:

* a 3-way handshake (SYN with MSS and window-scale 14 options, so that tshark's
  window analysis never calls a long one-way transfer "window full") ends 1 µs
  before the connection's open record, or before its first data record if no
  open was seen.  The client is the side the record's `role` says; with role
  "unknown", the side that sent first.
* a data record becomes segments (at most `max_segment` bytes each) whose
  sequence number is ISN + 1 + record.offset.  A gap in offsets therefore shows
  up as a missing segment, which is the truth; a truncated record contributes
  only its captured bytes, at the right place.  Every segment acknowledges
  everything the peer had sent so far (its highest offset + len, captured or not).
* a close record becomes FIN/ACK from the local side, FIN/ACK from the peer and
  the last ACK: the process closed its socket, and the capture has no more to say.

Headers are real: IPv4 (DF set) or IPv6, with correct lengths and IP/TCP
checksums, so tshark shows no checksum errors when asked to verify them.
Endpoints the capture did not know (None) get placeholders from the
documentation ranges (192.0.2.0/24 for the local side, 198.51.100.0/24 for the
remote side, 2001:db8::/32 when the other side is IPv6) and a port in
49152-65535, both derived from the connection id and bumped until the 4-tuple is
unused in this output; such packets carry "endpoint unknown" in their comment.
IPv4-mapped IPv6 endpoints are written as IPv4 unless the other side is IPv6.

What tshark/Wireshark 4.0 need to dissect the result: nothing for HTTP/1.x, on
any port (a non-TLS payload on 443 is refused by the TLS dissector and TCP's HTTP
heuristic takes it); for HTTP/2 and gRPC off the HTTP ports, `-d
tcp.port==PORT,http2` (there is no HTTP/2 heuristic on TCP).  `http2_ports`
collects the server ports that need it.  Checksums are only checked when asked:
`-o tcp.check_checksum:TRUE -o ip.check_checksum:TRUE`.

Sans-I/O: PacketBuilder.feed(record) returns Packets; agent/pcap/writer.py
frames them as pcapng (raw IP link type, no invented MAC addresses).
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass

from agent.records.record import Endpoint, Record

MAX_SEGMENT = 32 * 1024  # an IPv4 datagram must stay <= 65535 bytes with its headers
WINDOW_SCALE = 14  # window field 65535 << 14: about 1 GiB, never "full"
HANDSHAKE_STEP_NS = 1_000

FIN, SYN, PSH, ACK = 0x01, 0x02, 0x08, 0x10
_TCP = struct.Struct("!HHIIBBHHH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_SYN_OPTIONS = struct.pack("!BBHBBBB", 2, 4, 1460, 1, 3, 3, WINDOW_SCALE)  # MSS, NOP, WS
_U32 = 0xFFFFFFFF
_RUN = 2048  # bytes per int.from_bytes in _word_sum (even)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Packet:
    ts_ns: int
    data: bytes  # one IPv4 or IPv6 packet, starting at the IP header
    comment: str


def checksum(data: bytes | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    return _fold(_word_sum(data))


def _word_sum(data: bytes | memoryview) -> int:
    """A number congruent, modulo 0xFFFF, to the sum of `data`'s 16-bit big-endian
    words (an odd length padded with a zero byte), and 0 only if they all are.

    2**16 is 1 modulo 0xFFFF, so any even-length run of bytes read as one big-endian
    integer is congruent to its word sum: reading 2 KiB runs with int.from_bytes
    and adding them does in C what a loop over words would do in Python, ~50x
    faster (one 32 KiB int would cost twice as much in its final division).
    """
    n = len(data)
    if n <= _RUN:
        total = int.from_bytes(data, "big")
        return total << 8 if n % 2 else total
    even = n - n % 2
    view = memoryview(data)[:even]
    total = sum([int.from_bytes(view[i : i + _RUN], "big") for i in range(0, even, _RUN)])
    if n % 2:
        total += data[n - 1] << 8
    return total


def _fold(total: int) -> int:
    rest = total % 0xFFFF
    # rest 0 from a non-zero sum means the one's complement sum is 0xFFFF: checksum 0.
    return 0xFFFF - rest if rest else (0 if total else 0xFFFF)


class _Side:
    __slots__ = ("addr", "ep", "isn", "port", "sent")

    def __init__(self, addr: bytes, port: int, isn: int, ep: str) -> None:
        self.addr = addr  # packed, 4 or 16 bytes
        self.port = port
        self.isn = isn
        self.sent = 0  # highest offset + len this side has sent
        self.ep = ep  # printable, for tuples in use


class _Conn:
    __slots__ = ("client_is_local", "ident", "local", "note", "pseudo", "remote", "v6")

    def __init__(self, local: _Side, remote: _Side, v6: bool, client_is_local: bool) -> None:
        self.local = local
        self.remote = remote
        self.v6 = v6
        self.client_is_local = client_is_local
        self.ident = 0
        self.note = ""


class PacketBuilder:
    """Packets for a stream of Records (data, open and close; others are ignored).

    Connections are keyed by (agent_id, conn_id) and forgotten at their close.
    """

    def __init__(self, max_segment: int = MAX_SEGMENT) -> None:
        if not 0 < max_segment <= 65535 - 60 - 40:
            raise ValueError(f"max_segment out of range: {max_segment}")
        self.max_segment = max_segment
        self.connections = 0  # connections given a handshake
        self.packets = 0
        self.skipped = 0  # records that could not become packets (no direction, ...)
        # Server ports of connections seen speaking HTTP/2 (its preface, or a record's
        # protocol): tshark needs "-d tcp.port==PORT,http2" for those (not for HTTP/1).
        self.http2_ports: set[int] = set()
        self._conns: dict[tuple[str, str], _Conn] = {}
        self._pending_open: dict[tuple[str, str], Record] = {}
        self._tuples: set[tuple[str, int, str, int]] = set()

    def feed(self, record: Record) -> list[Packet]:
        key = (record.agent_id, record.conn_id)
        if record.type == "data":
            out = self._data(key, record)
        elif record.type == "open":
            out = self._open(key, record)
        elif record.type == "close":
            out = self._close(key, record)
        else:
            out = []
        self.packets += len(out)
        return out

    # -- record kinds ---------------------------------------------------------

    def _open(self, key: tuple[str, str], record: Record) -> list[Packet]:
        if key in self._conns:
            return []
        if record.role == "unknown":
            # Who is the client shows only when someone sends: wait for that.
            self._pending_open[key] = record
            return []
        out: list[Packet] = []
        self._start(key, record, record.role == "client", record.ts_ns, record, out)
        return out

    def _data(self, key: tuple[str, str], record: Record) -> list[Packet]:
        if record.direction not in ("egress", "ingress"):
            self.skipped += 1
            return []
        out: list[Packet] = []
        conn = self._conns.get(key)
        if conn is None:
            opened = self._pending_open.pop(key, None)
            if record.role != "unknown":
                client_is_local = record.role == "client"
            else:
                client_is_local = record.direction == "egress"
            end = record.ts_ns if opened is None else min(opened.ts_ns, record.ts_ns)
            conn = self._start(key, record, client_is_local, end, opened, out)
        local_sends = record.direction == "egress"
        if record.protocol in ("http2", "grpc") or (
            record.offset == 0 and record.data[:24] == H2_PREFACE
        ):
            self.http2_ports.add(conn.remote.port if conn.client_is_local else conn.local.port)
        src, dst = (conn.local, conn.remote) if local_sends else (conn.remote, conn.local)
        data = record.data
        n = len(data)
        comment = self._comment(record, conn)
        ack = (dst.isn + 1 + dst.sent) & _U32
        if n == 0:
            # Nothing captured: an empty ACK still shows the call (and the gap) in place.
            seq = (src.isn + 1 + record.offset) & _U32
            out.append(Packet(record.ts_ns, self._segment(conn, src, dst, seq, ack, ACK), comment))
        else:
            view = memoryview(data)
            parts = range(0, n, self.max_segment)
            for i, start in enumerate(parts):
                seq = (src.isn + 1 + record.offset + start) & _U32
                chunk = view[start : start + self.max_segment]
                note = comment if len(parts) == 1 else f"{comment} part={i + 1}/{len(parts)}"
                pkt = self._segment(conn, src, dst, seq, ack, PSH | ACK, chunk)
                out.append(Packet(record.ts_ns, pkt, note))
        src.sent = max(src.sent, record.offset + max(record.len, n))
        return out

    def _close(self, key: tuple[str, str], record: Record) -> list[Packet]:
        out: list[Packet] = []
        conn = self._conns.pop(key, None)
        if conn is None:
            opened = self._pending_open.pop(key, None)
            if opened is None:
                return []  # nothing of it was seen: no conversation to end
            conn = self._start(key, record, True, opened.ts_ns, opened, out)
            self._conns.pop(key)
        loc, rem = conn.local, conn.remote
        lseq = (loc.isn + 1 + loc.sent) & _U32
        rseq = (rem.isn + 1 + rem.sent) & _U32
        base = f"pid={record.pid} comm={record.comm} source={record.source} conn={record.conn_id}"
        ts = record.ts_ns
        seg = self._segment
        out += [
            Packet(ts, seg(conn, loc, rem, lseq, rseq, FIN | ACK), f"{base} close{conn.note}"),
            Packet(ts + HANDSHAKE_STEP_NS, seg(conn, rem, loc, rseq, (lseq + 1) & _U32, FIN | ACK),
                   f"{base} close (peer FIN synthesized){conn.note}"),
            Packet(ts + 2 * HANDSHAKE_STEP_NS,
                   seg(conn, loc, rem, (lseq + 1) & _U32, (rseq + 1) & _U32, ACK),
                   f"{base} close{conn.note}"),
        ]  # fmt: skip
        self._tuples.discard((loc.ep, loc.port, rem.ep, rem.port))
        return out

    # -- connections ----------------------------------------------------------

    def _start(
        self,
        key: tuple[str, str],
        record: Record,
        client_is_local: bool,
        end_ns: int,
        opened: Record | None,
        out: list[Packet],
    ) -> _Conn:
        """A new connection, its handshake appended to `out` (ending 1 µs before end_ns)."""
        conn = self._new_conn(key, record, opened, client_is_local)
        self._conns[key] = conn
        self.connections += 1
        client, server = (conn.local, conn.remote) if client_is_local else (conn.remote, conn.local)
        who = opened or record
        base = f"pid={who.pid} comm={who.comm} source={who.source} conn={who.conn_id}"
        note = f"{base} handshake synthesized role={who.role}{conn.note}"
        t = end_ns - 3 * HANDSHAKE_STEP_NS
        cs, ss = client.isn, server.isn
        seg = self._segment
        out += [
            Packet(t, seg(conn, client, server, cs, 0, SYN, b"", _SYN_OPTIONS), note),
            Packet(t + HANDSHAKE_STEP_NS,
                   seg(conn, server, client, ss, (cs + 1) & _U32, SYN | ACK, b"", _SYN_OPTIONS),
                   note),
            Packet(t + 2 * HANDSHAKE_STEP_NS,
                   seg(conn, client, server, (cs + 1) & _U32, (ss + 1) & _U32, ACK), note),
        ]  # fmt: skip
        return conn

    def _new_conn(
        self, key: tuple[str, str], record: Record, opened: Record | None, client_is_local: bool
    ) -> _Conn:
        local_ep = record.local or (opened.local if opened else None)
        remote_ep = record.remote or (opened.remote if opened else None)
        local, remote = _parse(local_ep), _parse(remote_ep)
        v6 = any(
            a is not None and a.version == 6 and a.ipv4_mapped is None for a in (local, remote)
        )
        local, remote = _family(local, v6), _family(remote, v6)
        h = zlib.crc32(f"{key[0]}\0{key[1]}".encode(errors="surrogatepass"))
        unknown = []
        if local is None:
            unknown.append("local")
            local = _placeholder(v6, 0, h)
        if remote is None:
            unknown.append("remote")
            remote = _placeholder(v6, 1, h)
        lport = local_ep.port if local_ep and "local" not in unknown else _port(h)
        rport = remote_ep.port if remote_ep and "remote" not in unknown else _port(h >> 8)
        # Distinct connections must not share a 4-tuple, or tshark would merge them;
        # real endpoints are kept as they are (a real reuse is a real reuse).
        lkey, rkey = str(local), str(remote)
        for _ in range(16384 if unknown else 0):
            if (lkey, lport, rkey, rport) not in self._tuples:
                break
            if "local" in unknown:
                lport = 49152 + (lport - 49151) % 16384
            else:
                rport = 49152 + (rport - 49151) % 16384
        self._tuples.add((lkey, lport, rkey, rport))
        isn = h * 2654435761 & _U32
        conn = _Conn(
            _Side(local.packed, lport, isn, lkey),
            _Side(remote.packed, rport, (isn ^ 0x5A5A5A5A) * 40503 & _U32, rkey),
            v6,
            client_is_local,
        )
        if unknown:
            conn.note = f" endpoint unknown: {' and '.join(unknown)} (placeholder)"
        return conn

    # -- packets --------------------------------------------------------------

    def _comment(self, r: Record, conn: _Conn) -> str:
        text = (
            f"pid={r.pid} comm={r.comm} source={r.source} conn={r.conn_id} "
            f"{r.direction} offset={r.offset} len={r.len}"
        )
        if r.pod is not None:
            text += f" pod={r.pod.namespace}/{r.pod.name}"
        if r.redactions:
            text += f" redacted={','.join(r.redactions)}"
        missing = r.len - len(r.data)
        if r.truncated or missing > 0:
            text += f" truncated: {max(missing, 0)} bytes not captured"
        return text + conn.note

    def _segment(
        self,
        conn: _Conn,
        src: _Side,
        dst: _Side,
        seq: int,
        ack: int,
        flags: int,
        payload: bytes | memoryview = b"",
        options: bytes = b"",
    ) -> bytes:
        tcp_len = 20 + len(options) + len(payload)
        offset = (5 + len(options) // 4) << 4
        header = _TCP.pack(src.port, dst.port, seq, ack, offset, flags, 65535, 0, 0) + options
        if conn.v6:
            pseudo = src.addr + dst.addr + struct.pack("!IxxxB", tcp_len, 6)
        else:
            pseudo = src.addr + dst.addr + struct.pack("!xBH", 6, tcp_len)
        csum = _fold(int.from_bytes(pseudo + header, "big") + _word_sum(payload))
        header = header[:16] + csum.to_bytes(2, "big") + header[18:]
        if conn.v6:
            ip = _IP6.pack(6 << 28, tcp_len, 6, 64, src.addr, dst.addr)
        else:
            conn.ident = (conn.ident + 1) & 0xFFFF
            ip = _IP4.pack(0x45, 0, 20 + tcp_len, conn.ident, 0x4000, 64, 6, 0, src.addr, dst.addr)
            ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
        return b"".join((ip, header, payload))


def _parse(ep: Endpoint | None) -> _Address | None:
    if ep is None:
        return None
    try:
        return ipaddress.ip_address(ep.ip.split("%", 1)[0])
    except ValueError:
        return None


def _family(addr: _Address | None, v6: bool) -> _Address | None:
    if addr is None:
        return None
    if v6 and addr.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{addr}")
    if not v6 and addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _placeholder(v6: bool, side: int, h: int) -> _Address:
    host = 1 + (h >> (16 * side)) % 254
    if v6:
        return ipaddress.IPv6Address(f"2001:db8::{side + 1}:{host:x}")
    return ipaddress.IPv4Address(f"{'192.0.2' if side == 0 else '198.51.100'}.{host}")


def _port(h: int) -> int:
    return 49152 + (h & 0xFFFF) % 16384
