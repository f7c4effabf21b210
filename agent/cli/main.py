"""`tlscap` command line: one subcommand per module (run, ...)."""

from __future__ import annotations

import argparse
import logging
import sys

from agent import __version__
from agent.cli import ca, certs, collector, export, run, tail, targets
from agent.cli.config_file import ConfigFileError, expand_argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlscap", description="Capture TLS plaintext with eBPF, mapped to flows and processes."
    )
    parser.add_argument("--version", action="version", version=f"tlscap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # These two take --config FILE and TLSCAP_<OPTION> variables (config_file.py).
    parser.configurable = {"run": run.add_parser(sub), "collector": collector.add_parser(sub)}
    tail.add_parser(sub)
    export.add_parser(sub)
    certs.add_parser(sub)
    ca.add_parser(sub)
    targets.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in parser.configurable:
        try:
            argv = [argv[0], *expand_argv(parser.configurable[argv[0]], argv[1:])]
        except ConfigFileError as exc:
            parser.configurable[argv[0]].error(str(exc))
    args = parser.parse_args(argv)
    log_level = getattr(args, "log_level", None)  # run, tail: -v is about output there
    if log_level is None:
        verbose = getattr(args, "verbose", 0)
        log_level = "debug" if verbose > 1 else "info" if verbose else "warning"
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="tlscap: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
