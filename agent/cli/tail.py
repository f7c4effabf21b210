"""`tlscap tail`: print the records a collector (or a local store) receives."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

from agent.cli import tls_options
from agent.cli.argtypes import add_output_view_arguments
from agent.cli.errors import fail
from agent.cli.filter_options import add_filter_arguments, filter_from_args

log = logging.getLogger(__name__)


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
        "--after-cursor",
        type=int,
        metavar="N",
        help="replay from just after this cursor (the collector's; with --backend nats, "
        "the stream sequence), then follow; at exit tail prints the last cursor it saw, "
        "so a later tail can resume there",
    )
    p.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="stop after the replayed history instead of following live records",
    )
    add_filter_arguments(p)
    tls_options.add_tls_arguments(p, server=False)
    add_output_view_arguments(p)
    p.set_defaults(handler=tail_command)


def open_sink(args: argparse.Namespace):
    from agent.sinks.jsonl import JsonlSink
    from agent.sinks.terminal import TerminalSink

    if args.output == "jsonl":
        return JsonlSink.open(str(args.output_file) if args.output_file else "-")
    if args.output_file:
        stream = open(args.output_file, "w", encoding="utf-8")  # noqa: SIM115 - sink owns it
        return TerminalSink(stream, color=False, show_node=True, detail=args.verbose, raw=args.raw)
    return TerminalSink(sys.stdout, show_node=True, detail=args.verbose, raw=args.raw)


def tail_command(args: argparse.Namespace) -> int:
    from agent.consumer.subscriber import (
        Missed,
        ReplayFinished,
        SubscriptionError,
        read_store,
        subscribe,
    )

    replay = (
        args.since is not None
        or args.until is not None
        or not args.follow
        or args.after_cursor is not None
    )
    live = args.follow and not args.until
    flt = filter_from_args(args)
    stop = threading.Event()
    position: dict[str, int] = {}
    if args.after_cursor is not None and (args.store or args.after_cursor < 0):
        return fail("--after-cursor needs --collector and a cursor >= 0")
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
            after_cursor=args.after_cursor or 0,
            on_cursor=lambda cursor: position.__setitem__("cursor", cursor),
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
    if "cursor" in position:
        cursor = position["cursor"]
        print(
            f"tlscap: last cursor {cursor} (resume with --after-cursor {cursor})", file=sys.stderr
        )
    return 0
