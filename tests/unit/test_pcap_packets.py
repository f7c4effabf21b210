"""Synthesized TCP/IP for captured plaintext: handshake, seq/ack numbers, gaps,
truncation, IPv6, unknown endpoints, segmenting, close, and checksums (recomputed
here word by word, independently of the module's big-integer shortcut)."""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass

import pytest

from agent.pcap.packets import ACK, FIN, PSH, SYN, PacketBuilder, checksum
from agent.records.record import Endpoint, Record

TS = 1_795_442_587_000_000_000
LOCAL = Endpoint("10.1.2.3", 51234)
REMOTE = Endpoint("93.184.216.34", 443)


@dataclass
class Seg:
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes
    options: bytes
    ts_ns: int
    comment: str
    version: int


def _sum16(data: bytes) -> int:
    """RFC 1071, the slow and obvious way."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def parse(pkt) -> Seg:
    raw = pkt.data
    version = raw[0] >> 4
    if version == 4:
        ihl = (raw[0] & 0xF) * 4
        total_len = struct.unpack("!H", raw[2:4])[0]
        assert total_len == len(raw) <= 65535
        assert raw[9] == 6
        assert _sum16(raw[:ihl]) == 0xFFFF, "bad IPv4 header checksum"
        src, dst = raw[12:16], raw[16:20]
        tcp = raw[ihl:]
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        assert version == 6
        payload_len, next_header = struct.unpack("!HB", raw[4:7])
        assert payload_len == len(raw) - 40 and next_header == 6
        src, dst = raw[8:24], raw[24:40]
        tcp = raw[40:]
        pseudo = src + dst + struct.pack("!I3xB", len(tcp), 6)
    assert _sum16(pseudo + tcp) == 0xFFFF, "bad TCP checksum"
    sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", tcp[:14])
    hlen = (off >> 4) * 4
    return Seg(
        str(ipaddress.ip_address(src)),
        str(ipaddress.ip_address(dst)),
        sport,
        dport,
        seq,
        ack,
        flags,
        bytes(tcp[hlen:]),
        bytes(tcp[20:hlen]),
        pkt.ts_ns,
        pkt.comment,
        version,
    )


def rec(kind: str = "data", **kw) -> Record:
    base = dict(
        type=kind,
        ts_ns=TS,
        agent_id="a1",
        pid=4211,
        comm="curl",
        source="openssl",
        conn_id="c1",
        local=LOCAL,
        remote=REMOTE,
        role="client",
    )
    base.update(kw)
    return Record(**base)


def data(direction: str, offset: int, payload: bytes, ts: int = 0, **kw) -> Record:
    kw.setdefault("len", len(payload))
    return rec(
        "data",
        ts_ns=TS + ts,
        direction=direction,
        offset=offset,
        captured_len=len(payload),
        data=payload,
        **kw,
    )


def feed(builder: PacketBuilder, *records: Record) -> list[Seg]:
    return [parse(p) for r in records for p in builder.feed(r)]


def test_checksum_matches_the_word_sum():
    rng = random.Random(7)
    blobs = [b"", b"\x00", b"\xff\xff", b"abc", bytes(range(256)) * 3, b"\xff" * 7, b"\0" * 5000]
    blobs += [rng.randbytes(n) for n in (2047, 2048, 2049, 4096, 5001, 32768, 65495)]
    for blob in blobs:
        assert checksum(blob) == (~_sum16(blob) & 0xFFFF or (0 if any(blob) else 0xFFFF))


def test_handshake_then_data_with_seq_and_ack_numbers():
    b = PacketBuilder()
    segs = feed(
        b,
        rec("open", ts_ns=TS - 50_000),
        data("egress", 0, b"GET / HTTP/1.1\r\n\r\n", ts=10),
        data("ingress", 0, b"HTTP/1.1 200 OK\r\n\r\n", ts=20),
        data("egress", 18, b"GET /2 HTTP/1.1\r\n\r\n", ts=30),
    )
    syn, synack, ack, req, resp, req2 = segs
    assert (syn.flags, synack.flags, ack.flags) == (SYN, SYN | ACK, ACK)
    assert (syn.src, syn.sport, syn.dst, syn.dport) == ("10.1.2.3", 51234, "93.184.216.34", 443)
    assert synack.ack == syn.seq + 1 and ack.ack == synack.seq + 1 and ack.seq == syn.seq + 1
    assert b"\x03\x03\x0e" in syn.options and b"\x03\x03\x0e" in synack.options  # wscale 14
    # The handshake ends 1 µs before the open record.
    assert [s.ts_ns for s in (syn, synack, ack)] == [TS - 53_000, TS - 52_000, TS - 51_000]
    c_isn, s_isn = syn.seq, synack.seq
    assert req.flags == PSH | ACK and req.seq == c_isn + 1 and req.ack == s_isn + 1
    assert resp.src == "93.184.216.34" and resp.sport == 443
    assert resp.seq == s_isn + 1 and resp.ack == c_isn + 1 + 18
    assert req2.seq == c_isn + 1 + 18 and req2.ack == s_isn + 1 + 19
    assert req.comment == "pid=4211 comm=curl source=openssl conn=c1 egress offset=0 len=18"
    assert req.ts_ns == TS + 10
    assert b.connections == 1 and b.packets == 6


def test_server_role_makes_the_peer_the_client():
    segs = feed(PacketBuilder(), data("ingress", 0, b"GET / HTTP/1.1\r\n\r\n", role="server"))
    syn, synack, _, req = segs
    assert (syn.src, syn.sport) == ("93.184.216.34", 443) and syn.flags == SYN
    assert (synack.src, req.src) == ("10.1.2.3", "93.184.216.34")
    # No open record: the handshake ends 1 µs before the first data.
    assert syn.ts_ns == TS - 3_000 and req.ts_ns == TS


def test_unknown_role_the_first_sender_is_the_client():
    b = PacketBuilder()
    assert b.feed(rec("open", role="unknown", ts_ns=TS - 9_000)) == []
    segs = feed(b, data("ingress", 0, b"hello", role="unknown"))
    assert segs[0].flags == SYN and segs[0].src == "93.184.216.34"
    assert segs[0].ts_ns == TS - 12_000  # from the open record's time
    assert "role=unknown" in segs[0].comment


def test_gap_in_offsets_leaves_a_hole_in_sequence_space():
    segs = feed(PacketBuilder(), data("egress", 0, b"a" * 100), data("egress", 1100, b"b" * 10))
    isn = segs[0].seq
    assert segs[3].seq == isn + 1 and segs[4].seq == isn + 1 + 1100


def test_truncated_record_carries_only_captured_bytes_and_the_peer_acks_it_all():
    segs = feed(
        PacketBuilder(),
        data("egress", 0, b"x" * 4096, len=10000, truncated=True),
        data("egress", 10000, b"y" * 10),
        data("ingress", 0, b"ok"),
    )
    isn = segs[0].seq
    first, second, reply = segs[3:]
    assert first.payload == b"x" * 4096 and first.seq == isn + 1
    assert "truncated: 5904 bytes not captured" in first.comment
    assert second.seq == isn + 1 + 10000
    assert reply.ack == isn + 1 + 10010


def test_redactions_in_the_comment():
    segs = feed(PacketBuilder(), data("egress", 0, b"x" * 8, redactions=["header:authorization"]))
    assert segs[-1].comment.endswith("redacted=header:authorization")


def test_large_record_is_split_into_segments():
    payload = bytes(range(256)) * 512  # 128 KiB + odd tail below
    payload += b"z"
    segs = feed(PacketBuilder(max_segment=32768), data("egress", 7, payload))[3:]
    assert [len(s.payload) for s in segs] == [32768] * 4 + [1]
    assert b"".join(s.payload for s in segs) == payload
    isn_plus_1 = segs[0].seq - 7
    assert [s.seq - isn_plus_1 for s in segs] == [7 + i * 32768 for i in range(5)]
    assert segs[1].comment.endswith("part=2/5")


def test_largest_segment_fits_ipv4_total_length():
    b = PacketBuilder(max_segment=65535 - 60 - 40)
    pkts = b.feed(data("egress", 0, b"q" * 70000))
    assert max(len(p.data) for p in pkts) <= 65535
    with pytest.raises(ValueError):
        PacketBuilder(max_segment=65536)


def test_ipv6_and_ipv4_mapped_endpoints():
    v6 = feed(
        PacketBuilder(),
        data(
            "egress", 0, b"hi", local=Endpoint("2001:db8::5", 40000), remote=Endpoint("::1", 8443)
        ),
    )
    assert {s.version for s in v6} == {6} and v6[-1].src == "2001:db8::5" and v6[-1].dport == 8443
    mapped = feed(
        PacketBuilder(),
        data(
            "egress",
            0,
            b"hi",
            local=Endpoint("::ffff:10.0.0.1", 40000),
            remote=Endpoint("::ffff:10.0.0.2", 80),
        ),
    )
    assert {s.version for s in mapped} == {4} and mapped[-1].dst == "10.0.0.2"
    mixed = feed(
        PacketBuilder(),
        data("egress", 0, b"hi", local=Endpoint("10.0.0.1", 1), remote=Endpoint("fe80::1%eth0", 2)),
    )
    mapped_src = ipaddress.ip_address(mixed[-1].src)
    assert mapped_src.ipv4_mapped == ipaddress.ip_address("10.0.0.1")
    assert mixed[-1].dst == "fe80::1"


def test_unknown_endpoints_get_distinct_documentation_placeholders():
    b = PacketBuilder()
    seen = set()
    for i in range(300):
        segs = feed(b, data("egress", 0, b"x", conn_id=f"c{i}", local=None, remote=None))
        s = segs[-1]
        assert ipaddress.ip_address(s.src) in ipaddress.ip_network("192.0.2.0/24")
        assert ipaddress.ip_address(s.dst) in ipaddress.ip_network("198.51.100.0/24")
        assert 49152 <= s.sport <= 65535 and 49152 <= s.dport <= 65535
        assert "endpoint unknown: local and remote" in s.comment
        assert "endpoint unknown" in segs[0].comment
        seen.add((s.src, s.sport, s.dst, s.dport))
    assert len(seen) == 300
    # Stable per connection id.
    again = feed(PacketBuilder(), data("egress", 0, b"x", conn_id="c0", local=None, remote=None))
    assert (
        again[-1].sport
        == feed(PacketBuilder(), data("egress", 0, b"x", conn_id="c0", local=None, remote=None))[
            -1
        ].sport
    )
    # Only the local side unknown, next to an IPv6 peer: a 2001:db8:: placeholder.
    half = feed(PacketBuilder(), data("egress", 0, b"x", local=None, remote=Endpoint("::1", 443)))
    s = half[-1]
    assert ipaddress.ip_address(s.src) in ipaddress.ip_network("2001:db8::/32")
    assert (s.dst, s.dport) == ("::1", 443) and s.comment.endswith("local (placeholder)")


def test_same_port_reuse_by_unknown_endpoints_is_avoided():
    b = PacketBuilder()
    tuples = set()
    for i in range(50):
        s = feed(b, data("egress", 0, b"x", conn_id=f"k{i}", local=None))[-1]
        tuples.add((s.src, s.sport))
    assert len(tuples) == 50


def test_close_ends_the_conversation_and_forgets_the_connection():
    b = PacketBuilder()
    segs = feed(
        b,
        rec("open"),
        data("egress", 0, b"abc", ts=10),
        data("ingress", 0, b"hello", ts=20),
        rec("close", ts_ns=TS + 30),
    )
    syn, synack = segs[0], segs[1]
    fin1, fin2, last = segs[-3:]
    assert fin1.flags == FIN | ACK and fin1.src == "10.1.2.3"
    assert fin1.seq == syn.seq + 1 + 3 and fin1.ack == synack.seq + 1 + 5
    assert fin2.flags == FIN | ACK and fin2.seq == synack.seq + 1 + 5 and fin2.ack == fin1.seq + 1
    assert last.flags == ACK and last.seq == fin1.seq + 1 and last.ack == fin2.seq + 1
    assert fin1.ts_ns == TS + 30 < fin2.ts_ns < last.ts_ns
    # A later record of the same id is a new conversation (with a handshake).
    again = feed(b, data("egress", 3, b"d"))
    assert again[0].flags == SYN and b.connections == 2


def test_close_of_an_unseen_connection_makes_no_packets():
    b = PacketBuilder()
    assert b.feed(rec("close")) == []
    assert b.feed(rec("exchange")) == [] and b.feed(rec("stats")) == []
    # Open with unknown role then close without data: handshake (local as client) and FINs.
    b.feed(rec("open", conn_id="z", role="unknown"))
    segs = feed(b, rec("close", conn_id="z"))
    assert [s.flags for s in segs] == [SYN, SYN | ACK, ACK, FIN | ACK, FIN | ACK, ACK]
    assert segs[0].src == "10.1.2.3"


def test_empty_capture_is_an_empty_ack_at_its_place():
    segs = feed(PacketBuilder(), data("egress", 500, b"", len=40, truncated=True))
    assert segs[-1].flags == ACK and segs[-1].payload == b""
    assert segs[-1].seq == segs[0].seq + 1 + 500
    assert "truncated: 40 bytes not captured" in segs[-1].comment


def test_connections_of_different_agents_are_different():
    b = PacketBuilder()
    feed(b, data("egress", 0, b"x"), data("egress", 0, b"x", agent_id="a2"))
    assert b.connections == 2


def test_sequence_numbers_wrap():
    b = PacketBuilder()
    first = feed(b, data("egress", 0, b"x"))
    big = feed(b, data("egress", 2**32 + 5, b"y"))
    assert big[0].seq == (first[-1].seq + 2**32 + 5) % 2**32


def test_checksums_of_odd_sized_segments_verify():
    rng = random.Random(3)
    for n in (1, 2049, 5001, 40001):
        payload = rng.randbytes(n)
        segs = feed(PacketBuilder(max_segment=4097), data("egress", 0, payload))  # parse checks
        assert b"".join(s.payload for s in segs) == payload


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # python-pcapng's own
def test_pcapng_file_reads_back_with_python_pcapng():
    """An independent reader agrees on link type, ns timestamps, bytes and comments."""
    import io

    import pcapng

    from agent.pcap.writer import LINKTYPE_RAW, PcapngWriter

    b = PacketBuilder()
    packets = [p for r in (rec("open"), data("egress", 0, b"abcde", ts=7)) for p in b.feed(r)]
    buf = io.BytesIO()
    PcapngWriter(buf).write_packets(packets)
    buf.seek(0)
    blocks = list(pcapng.FileScanner(buf))
    idb = blocks[1]
    assert idb.link_type == LINKTYPE_RAW and idb.timestamp_resolution == 1e-9
    epbs = [blk for blk in blocks if isinstance(blk, pcapng.blocks.EnhancedPacket)]
    assert len(epbs) == len(packets) == 4
    for blk, p in zip(epbs, packets, strict=True):
        assert (blk.timestamp_high << 32 | blk.timestamp_low) == p.ts_ns
        assert blk.packet_data == p.data and blk.packet_len == len(p.data)
        assert blk.options["opt_comment"] == p.comment
