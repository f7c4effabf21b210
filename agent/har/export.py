"""`tlscap export --har FILE`: the stored exchanges the filters select, as one HAR 1.2 file.

Unlike pcapng (whole connections), HAR is per exchange: the HTTP/gRPC filters
(--method, --status, --path-prefix, --grpc-method, --protocol) select exchanges
themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from agent.cli.errors import fail
from agent.cli.filter_options import filter_from_args

EXCHANGE = frozenset({"exchange"})


def export_har(args: argparse.Namespace) -> int:
    from agent.cli.export import copy_records, read_stored
    from agent.sinks.har import HarSink

    flt = filter_from_args(args)
    if args.type and "exchange" not in flt.types:
        return fail("--type: only exchange records become HAR entries")
    flt = dataclasses.replace(flt, types=EXCHANGE, directions=frozenset())
    try:
        sink = HarSink.open(args.har)
    except OSError as exc:
        return fail(str(exc))
    failed = copy_records(args.store, read_stored(args.store, flt), sink)
    if failed is not None:
        return failed
    where = "stdout" if args.har == "-" else args.har
    skipped = f" ({sink.skipped} without a request skipped)" if sink.skipped else ""
    print(f"wrote {sink.entries} HAR entries to {where}{skipped}", file=sys.stderr)
    return 0
