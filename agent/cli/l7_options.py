"""`tlscap run` flags for HTTP/gRPC parsing and redaction, and the L7Options they make."""

from __future__ import annotations

import argparse

from agent.cli.argtypes import parse_size
from agent.l7.connection import L7Options
from agent.redact.rules import DEFAULT_HEADERS, build_rules


def add_l7_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP/gRPC parsing and redaction")
    g.add_argument(
        "--l7",
        choices=("on", "off"),
        default="on",
        help="parse HTTP/1.x, HTTP/2 and gRPC into exchange records (default on); "
        "other protocols stay raw data records",
    )
    g.add_argument(
        "--l7-body-max",
        type=parse_size,
        default=4096,
        metavar="SIZE",
        help="body bytes kept per request/response in an exchange record (default 4K)",
    )
    g.add_argument(
        "--redact-header",
        action="append",
        default=[],
        metavar="NAME",
        help="also mask this header's values (defaults: "
        + ", ".join(sorted(DEFAULT_HEADERS))
        + ")",
    )
    g.add_argument(
        "--no-redact-header",
        action="append",
        default=[],
        metavar="NAME",
        help="do not mask this header (switches a default rule off)",
    )
    g.add_argument(
        "--redact-regex",
        action="append",
        default=[],
        metavar="[NAME=]REGEX",
        help="mask every match of REGEX in payloads and bodies (same length, '*')",
    )
    g.add_argument(
        "--no-redact",
        action="store_true",
        help="switch every redaction rule off (captured secrets then leave the agent)",
    )


def l7_options_from_args(args: argparse.Namespace) -> L7Options:
    """Raises RedactionConfigError (a ValueError) with a one-line message."""
    rules = build_rules(
        args.redact_header, args.no_redact_header, args.redact_regex, disabled=args.no_redact
    )
    return L7Options(parse=args.l7 == "on", body_limit=args.l7_body_max, rules=rules)
