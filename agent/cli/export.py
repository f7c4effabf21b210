"""`tlscap export`: write stored records in a format other tools read.

For now one format, pcapng: the captured plaintext as synthesized TCP/IP packets
over the connections' original addresses and ports, so Wireshark and tshark
dissect it as HTTP, HTTP/2 or gRPC (agent/pcap).  Another format would be one
more mutually exclusive output option beside --pcapng.

HTTP/gRPC filters (--method, --status, --path-prefix, --grpc-method, --protocol)
select connections here: the parsed exchanges (or data records) that match name
the connections, and every data/open/close record of those is exported, since a
packet trace of half a conversation would not dissect.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from agent.cli.errors import fail
from agent.cli.filter_options import add_filter_arguments, filter_from_args
from agent.records.filter import RecordFilter
from agent.records.record import Record
from agent.sinks.base import Sink

PACKET_TYPES = frozenset({"data", "open", "close"})
# Above this many connections the second pass filters them in Python, not in SQL.
_MAX_SQL_CONN_IDS = 500


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write stored records as a pcapng file for Wireshark/tshark",
        description="Read a local store (tlscap run --store, or a collector's) and write "
        "its data/open/close records as TCP/IP packets over the original addresses and "
        "ports, with a synthesized handshake and close per connection. Filters combine "
        "with AND; HTTP/gRPC filters select whole connections.",
    )
    p.add_argument("--store", type=Path, required=True, metavar="PATH", help="store to read")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--pcapng", metavar="FILE", help="write a pcapng file here ('-': stdout)")
    out.add_argument(
        "--har",
        metavar="FILE",
        help="write the HTTP/gRPC exchanges as a HAR 1.2 file here ('-': stdout); "
        "filters select exchanges",
    )
    add_filter_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.set_defaults(handler=export_command)


def export_command(args: argparse.Namespace) -> int:
    from agent.sinks.pcapng import PcapngSink

    if not args.store.exists():
        return fail(f"no store at {args.store}")
    if args.har:
        from agent.har.export import export_har

        return export_har(args)
    flt = filter_from_args(args)
    types = flt.types & PACKET_TYPES if args.type else PACKET_TYPES
    if not types:
        return fail("--type: only data, open and close records become packets")
    flt = dataclasses.replace(flt, types=types)
    try:
        sink = PcapngSink.open(args.pcapng)
    except OSError as exc:
        return fail(str(exc))
    failed = copy_records(args.store, select_records(args.store, flt), sink)
    if failed is not None:
        return failed
    where = "stdout" if args.pcapng == "-" else args.pcapng
    print(
        f"wrote {sink.packets} packets for {sink.connections} connections to {where}",
        file=sys.stderr,
    )
    if sink.http2_ports:
        hint = " ".join(f"-d tcp.port=={port},http2" for port in sink.http2_ports)
        print(f"HTTP/2 inside: open it with wireshark/tshark {hint}", file=sys.stderr)
    return 0


def select_records(path: Path, flt: RecordFilter) -> Iterator[Record]:
    """The stored records `flt` selects, in store order; with HTTP/gRPC criteria,
    every packet-type record of the connections they select."""
    if not (flt.selects_exchanges_only or flt.protocols):
        yield from read_stored(path, flt)
        return
    # Pass 1: which connections.  Exchange records have no direction and only
    # data records carry a protocol, so each pass gets the criteria it can match.
    first = dataclasses.replace(
        flt,
        types=frozenset({"exchange"} if flt.selects_exchanges_only else {"data", "exchange"}),
        directions=frozenset(),
    )
    conns = {(r.agent_id, r.conn_id) for r in read_stored(path, first)}
    if not conns:
        return
    clear = frozenset()
    second = dataclasses.replace(
        flt,
        protocols=clear,
        methods=clear,
        path_prefixes=clear,
        statuses=clear,
        grpc_methods=clear,
    )
    if len(conns) <= _MAX_SQL_CONN_IDS:
        second = dataclasses.replace(
            second,
            conn_ids=frozenset(c for _, c in conns),
            agent_ids=frozenset(a for a, _ in conns),
        )
    for record in read_stored(path, second):
        if (record.agent_id, record.conn_id) in conns:
            yield record


def copy_records(store: Path, records: Iterator[Record], sink: Sink) -> int | None:
    """Write `records` (read from `store`) to `sink` and close it: None when all went,
    else the exit status (a store that cannot be read fails; a closed pipe is done)."""
    from agent.collector.store import StoreError

    try:
        for record in records:
            sink.write(record)
    except StoreError as exc:
        return fail(f"cannot read {store}: {exc}")
    except BrokenPipeError:
        return 0
    finally:
        sink.close()
    return None


def read_stored(path: Path, flt: RecordFilter) -> Iterator[Record]:
    """The stored records `flt` selects, in store order."""
    from agent.consumer.subscriber import read_store

    stop = threading.Event()
    for event in read_store(path, flt, replay=True, live=False, stop=stop):
        if isinstance(event, Record):
            yield event
