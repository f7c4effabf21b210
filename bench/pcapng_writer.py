"""What the pcapng sink costs: PcapngSink.write on data records of 1 KiB and 64 KiB
(alternating egress/ingress over a few keep-alive connections) into a temporary
file, as records/s, packets/s and MB/s of payload; beside it, the cost of framing
the same packets with the python-pcapng library instead of agent/pcap/writer.py.

    .venv/bin/python bench/pcapng_writer.py [--sizes 1024,65536] [--mb 64] [--json]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # also puts the repository on sys.path

from agent.pcap.packets import PacketBuilder
from agent.pcap.writer import enhanced_packet
from agent.records.record import Endpoint, Record
from agent.sinks.pcapng import PcapngSink

TS = 1_795_442_587_000_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024,65536", help="record payload sizes, bytes")
    p.add_argument("--mb", type=float, default=64.0, help="payload per sample, MiB")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def make_records(size: int, count: int, conns: int) -> list[Record]:
    payload = os.urandom(size)
    offsets: dict[tuple[int, str], int] = {}
    out = []
    for i in range(count):
        c, direction = i % conns, ("egress", "ingress")[i // conns % 2]
        off = offsets.get((c, direction), 0)
        offsets[(c, direction)] = off + size
        out.append(Record(type="data", ts_ns=TS + i * 1000, pid=4211, comm="bench",
                          source="openssl", conn_id=f"c{c}", role="client",
                          local=Endpoint("10.0.0.1", 40000 + c), remote=Endpoint("10.0.0.2", 443),
                          direction=direction, offset=off, len=size, captured_len=size,
                          data=payload))  # fmt: skip
    return out


def time_sink(records: list[Record], path: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    sink = PcapngSink(path)
    for r in records:
        sink.write(r)
    sink.close()
    return time.perf_counter() - t0, sink.packets


def time_framing(records: list[Record]) -> tuple[float, float, int]:
    """(s with writer.py, s with python-pcapng, packets) to frame the same packets."""
    import pcapng
    from pcapng import blocks

    builder = PacketBuilder()
    packets = [p for r in records for p in builder.feed(r)]
    t0 = time.perf_counter()
    sink = io.BytesIO()
    for p in packets:
        sink.write(enhanced_packet(p.ts_ns, p.data, p.comment))
    ours = time.perf_counter() - t0
    shb = blocks.SectionHeader(options={"shb_userappl": "tlscap"})
    shb.new_member(blocks.InterfaceDescription, link_type=101, options={"if_tsresol": b"\x09"})
    writer = pcapng.FileWriter(io.BytesIO(), shb)
    t0 = time.perf_counter()
    for p in packets:
        writer.write_block(shb.new_member(
            blocks.EnhancedPacket, interface_id=0, packet_data=p.data,
            timestamp_high=p.ts_ns >> 32, timestamp_low=p.ts_ns & 0xFFFFFFFF,
            options={"opt_comment": p.comment}))  # fmt: skip
    return ours, time.perf_counter() - t0, len(packets)


def run(args: argparse.Namespace) -> dict:
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        count = max(int(args.mb * (1 << 20)) // size, args.conns * 2)
        records = make_records(size, count, args.conns)
        samples = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                samples.append(time_sink(records, os.path.join(tmp, "bench.pcapng")))
        secs = bl.median([s for s, _ in samples])
        packets = samples[0][1]
        frame_n = min(count, 20000)
        ours, lib, framed = time_framing(records[:frame_n])
        results.append({
            "size": size, "records": count, "packets": packets, "seconds": secs,
            "records_per_s": count / secs, "packets_per_s": packets / secs,
            "mb_per_s": count * size / secs / 1e6, "us_per_record": secs / count * 1e6,
            "framing_us_per_packet": ours / framed * 1e6,
            "python_pcapng_us_per_packet": lib / framed * 1e6,
        })  # fmt: skip
    return {"results": results, "machine": bl.machine_info()}


def print_table(r: dict) -> None:
    print("PcapngSink.write, data records into a file (median of rounds)")
    print(f"{'size':>7} {'records/s':>10} {'packets/s':>10} {'MB/s':>8} {'µs/rec':>8}"
          f" {'EPB µs/pkt':>11} {'python-pcapng':>14}")  # fmt: skip
    for x in r["results"]:
        ours, lib = x["framing_us_per_packet"], x["python_pcapng_us_per_packet"]
        rate = f"{x['records_per_s']:>10.0f} {x['packets_per_s']:>10.0f} {x['mb_per_s']:>8.1f}"
        print(f"{x['size']:>7} {rate} {x['us_per_record']:>8.1f} {ours:>11.2f} {lib:>14.2f}")


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
