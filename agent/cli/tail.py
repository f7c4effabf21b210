"""`tlscap tail`: print the records a collector (or a local store) receives."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import signal
import sys
import threading
from pathlib import Path

from agent.cli import tls_options
from agent.cli.argtypes import parse_time
from agent.cli.errors import fail
from agent.records.filter import RecordFilter

log = logging.getLogger(__name__)

DIRECTIONS = ("egress", "ingress")
TYPES = ("data", "open", "close", "stats")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tail",
        help="print records from a collector (live and/or history) or a local store",
        description="Without --since: the live stream. With --since: stored history from "
        "that time, then live (unless --no-follow). Filters combine with AND; a filter "
        "given several times matches any of its values.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--collector", metavar="HOST:PORT", help="collector to subscribe to")
    where.add_argument(
        "--store", type=Path, metavar="PATH", help="read a local store (tlscap run --store)"
    )
    p.add_argument(
        "--output", choices=("text", "jsonl"), default="text", help="record format (default: text)"
    )
    p.add_argument("--output-file", type=Path, help="write records here instead of stdout")
    p.add_argument(
        "--since",
        type=parse_time,
        metavar="TIME",
        help="replay stored records from TIME: 10m (ago), 2h, all, or 2026-11-23T14:03:07",
    )
    p.add_argument("--until", type=parse_time, metavar="TIME", help="stored records up to TIME")
    p.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="stop after the replayed history instead of following live records",
    )
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
    tls_options.add_tls_arguments(p, server=False)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.set_defaults(handler=tail_command)


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(text)


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
        **kwargs,
    )


def open_sink(args: argparse.Namespace):
    from agent.sinks.jsonl import JsonlSink
    from agent.sinks.terminal import TerminalSink

    if args.output == "jsonl":
        return JsonlSink.open(str(args.output_file) if args.output_file else "-")
    if args.output_file:
        stream = open(args.output_file, "w", encoding="utf-8")  # noqa: SIM115 - sink owns it
        return TerminalSink(stream, color=False, show_node=True)
    return TerminalSink(sys.stdout, show_node=True)


def tail_command(args: argparse.Namespace) -> int:
    from agent.consumer.subscriber import (
        Missed,
        ReplayFinished,
        SubscriptionError,
        read_store,
        subscribe,
    )

    replay = args.since is not None or args.until is not None or not args.follow
    live = args.follow and not args.until
    flt = filter_from_args(args)
    stop = threading.Event()
    if args.collector:
        try:
            settings = tls_options.tls_settings_from_args(args, server=False)
        except tls_options.TlsConfigError as exc:
            return fail(str(exc))
        events = subscribe(
            lambda: tls_options.open_channel(args.collector, settings),
            flt,
            replay=replay,
            live=live,
            stop=stop,
        )
    else:
        if not args.store.exists():
            return fail(f"no store at {args.store}")
        events = read_store(args.store, flt, replay=replay, live=live, stop=stop)
    try:
        sink = open_sink(args)
    except OSError as exc:
        return fail(f"cannot open output: {exc}")

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    missed = 0
    try:
        for event in events:
            if isinstance(event, Missed):
                missed += event.count
                print(
                    f"tlscap: warning: fell behind: the collector dropped {event.count} "
                    "record(s) for this subscriber",
                    file=sys.stderr,
                )
            elif isinstance(event, ReplayFinished):
                log.info("replayed %d stored record(s)%s", event.replayed, "; following" * live)
            else:
                sink.write(event)
    except SubscriptionError as exc:
        return fail(f"subscription refused: {exc}")
    except BrokenPipeError:
        return 0
    finally:
        stop.set()
        with contextlib.suppress(BrokenPipeError):
            sink.close()
    if missed:
        print(f"tlscap: warning: {missed} record(s) missed in total", file=sys.stderr)
    return 0
