"""`tlscap targets`: which processes use which TLS library, whether tlscap is attached
to it, and for the ones it cannot trace, why - the first question every user asks."""

from __future__ import annotations

import argparse
import json
import os
import sys

from agent.cli.argtypes import positive_int
from agent.probes.inventory import AttachedProbes, Inventory, format_table
from agent.probes.placement_report import placements


def _file_id(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return path
    return f"{st.st_dev}:{st.st_ino}"


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
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line; each traceable library also lists, per "
                   "probed function, where its probe goes and why (placements)")  # fmt: skip
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
        cache: dict[tuple[str, str], list] = {}
        for row in rows:
            out = row.to_json()
            if row.path and row.status in ("attached", "traceable"):
                host_path = f"/proc/{row.pid}/root{row.path}"
                key = (row.library, _file_id(host_path))
                if key not in cache:
                    cache[key] = placements(row.library, host_path)
                out["placements"] = cache[key]
            print(json.dumps(out))
    else:
        print(format_table(rows))
    return 0
