"""`tlscap targets`: which processes use which TLS library, whether tlscap is attached
to it, and for the ones it cannot trace, why - the first question every user asks."""

from __future__ import annotations

import argparse
import json
import os
import sys

from agent.cli.argtypes import positive_int
from agent.probes.inventory import AttachedProbes, Inventory, format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "targets",
        help="list processes, their TLS libraries, and whether tlscap traces them",
        description="List the processes on this host that use TLS: the library (path, "
        "version), whether a running tlscap agent has probes on it (attached), could "
        "(traceable), or cannot, and why (Java's JSSE, rustls, a stripped static build, "
        "an unreadable binary). Needs root to see every process.",
    )
    p.add_argument("--pid", type=positive_int, action="append", default=[], metavar="PID",
                   help="only this process (repeatable)")  # fmt: skip
    p.add_argument("--all", action="store_true", help="also list processes without TLS")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    p.set_defaults(handler=targets_command)


def targets_command(args: argparse.Namespace) -> int:
    attached = AttachedProbes.from_bpftool()
    if attached.error:
        print(f"tlscap: warning: {attached.error}; 'attached' cannot be told apart from "
              "'traceable'", file=sys.stderr)  # fmt: skip
    if os.geteuid() != 0:
        print("tlscap: warning: not root: other users' processes are listed as unreadable",
              file=sys.stderr)  # fmt: skip
    rows = Inventory(attached).rows(args.pid or None, include_all=args.all)
    if args.json:
        for row in rows:
            print(json.dumps(row.to_json()))
    else:
        print(format_table(rows))
    return 0
