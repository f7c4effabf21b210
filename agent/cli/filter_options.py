"""The record filter flags `tlscap tail` and `tlscap export` share, and the
RecordFilter they build: one spelling of "--port 443" or "--status 5xx" everywhere."""

from __future__ import annotations

import argparse
import ipaddress

from agent.cli.argtypes import parse_time
from agent.records.filter import RecordFilter

DIRECTIONS = ("egress", "ingress")
TYPES = ("data", "open", "close", "exchange", "stats")
PROTOCOLS = ("http1", "http2", "grpc")


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--since",
        type=parse_time,
        metavar="TIME",
        help="stored records from TIME: 10m (ago), 2h, all, or 2026-11-23T14:03:07",
    )
    p.add_argument("--until", type=parse_time, metavar="TIME", help="stored records up to TIME")
    f = p.add_argument_group("filters")
    f.add_argument("--node", action="append", default=[], help="records from this node")
    f.add_argument("--agent-id", action="append", default=[], help="records from this agent run")
    f.add_argument("--pid", type=int, action="append", default=[], help="process id")
    f.add_argument("--comm", action="append", default=[], help="process name")
    f.add_argument(
        "--source", action="append", default=[], help="openssl, gnutls, nss, gotls, proxy"
    )
    f.add_argument("--direction", choices=DIRECTIONS, action="append", default=[])
    f.add_argument("--type", choices=TYPES, action="append", default=[], help="record type")
    f.add_argument("--conn-id", action="append", default=[], help="one connection")
    f.add_argument("--remote-ip", type=_ip, action="append", default=[])
    f.add_argument("--remote-port", type=_port, action="append", default=[])
    f.add_argument("--local-ip", type=_ip, action="append", default=[])
    f.add_argument("--local-port", type=_port, action="append", default=[])
    f.add_argument("--namespace", action="append", default=[], help="Kubernetes namespace")
    f.add_argument("--pod", action="append", default=[], help="Kubernetes pod name")
    f.add_argument("--container-id", action="append", default=[], help="container id (64 hex)")
    l7 = p.add_argument_group(
        "HTTP/gRPC filters (select parsed exchanges; --protocol also selects raw records)"
    )
    l7.add_argument("--protocol", choices=PROTOCOLS, action="append", default=[])
    l7.add_argument(
        "--method", type=str.upper, action="append", default=[], help="HTTP method, e.g. GET"
    )
    l7.add_argument(
        "--path-prefix", action="append", default=[], help="request target starting with this"
    )
    l7.add_argument(
        "--status",
        type=_statuses,
        action="append",
        default=[],
        help="response status: 404, or a class such as 5xx",
    )
    l7.add_argument(
        "--grpc-method",
        action="append",
        default=[],
        help="gRPC pkg.Service/Method, or pkg.Service for all its methods",
    )


def filter_from_args(args: argparse.Namespace) -> RecordFilter:
    kwargs = {}
    if args.type:
        kwargs["types"] = frozenset(args.type)
    return RecordFilter(
        nodes=frozenset(args.node),
        agent_ids=frozenset(args.agent_id),
        pids=frozenset(args.pid),
        comms=frozenset(args.comm),
        sources=frozenset(args.source),
        directions=frozenset(args.direction),
        conn_ids=frozenset(args.conn_id),
        remote_ips=frozenset(args.remote_ip),
        remote_ports=frozenset(args.remote_port),
        local_ips=frozenset(args.local_ip),
        local_ports=frozenset(args.local_port),
        since_ns=args.since or 0,
        until_ns=args.until or 0,
        namespaces=frozenset(args.namespace),
        pods=frozenset(args.pod),
        container_ids=frozenset(args.container_id),
        protocols=frozenset(args.protocol),
        methods=frozenset(args.method),
        path_prefixes=frozenset(args.path_prefix),
        statuses=frozenset(code for codes in args.status for code in codes),
        grpc_methods=frozenset(args.grpc_method),
        **kwargs,
    )


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(text)


def _statuses(text: str) -> tuple[int, ...]:
    """ "404" -> (404,); "5xx" -> (500, ..., 599)."""
    t = text.strip().lower()
    if len(t) == 3 and t[0] in "12345" and t[1:] == "xx":
        base = int(t[0]) * 100
        return tuple(range(base, base + 100))
    if t.isdigit() and 100 <= int(t) <= 999:
        return (int(t),)
    raise argparse.ArgumentTypeError(f"not a status or status class: {text!r} (e.g. 404, 5xx)")
