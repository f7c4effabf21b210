"""`tlscap` command line: one subcommand per module (run, ...)."""

from __future__ import annotations

import argparse
import logging
import sys

from agent import __version__
from agent.cli import ca, certs, collector, run, tail, targets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlscap", description="Capture TLS plaintext with eBPF, mapped to flows and processes."
    )
    parser.add_argument("--version", action="version", version=f"tlscap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parser(sub)
    collector.add_parser(sub)
    tail.add_parser(sub)
    certs.add_parser(sub)
    ca.add_parser(sub)
    targets.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="tlscap: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
