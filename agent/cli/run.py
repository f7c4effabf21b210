"""`tlscap run`: capture on this host and print or write the records."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from agent.capture.session import CaptureOptions, CaptureSession
from agent.probes import preflight
from agent.probes.kernel_headers import KernelHeadersMissing, bcc_environment

log = logging.getLogger(__name__)


def parse_size(text: str) -> int:
    """'1048576', '256K', '1M', '1MiB' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in units and t[-1:] != "" else ""
    number = t[: -len(suffix)] if suffix else t
    try:
        value = int(number) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 262144, 256K, 1M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="capture TLS plaintext on this host")
    p.add_argument(
        "--pid", type=int, action="append", default=[], help="trace only this process (repeatable)"
    )
    p.add_argument(
        "--comm",
        action="append",
        default=[],
        help="trace only processes with this name (repeatable)",
    )
    p.add_argument(
        "--output", choices=("text", "jsonl"), default="text", help="record format (default: text)"
    )
    p.add_argument("--output-file", type=Path, help="write records here instead of stdout")
    p.add_argument("--ready-file", type=Path, help="create this file once every probe is attached")
    p.add_argument("--duration", type=positive_float, help="stop after this many seconds")
    p.add_argument(
        "--max-capture",
        type=parse_size,
        default=1 << 20,
        help="per-call payload cap; larger calls are marked truncated (default 1M)",
    )
    p.add_argument(
        "--ringbuf-mb", type=int, default=64, help="kernel ring buffer size in MiB (default 64)"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.set_defaults(handler=run_command)


def fail(message: str) -> int:
    print(f"tlscap: error: {message}", file=sys.stderr)
    return 2


def open_sinks(args: argparse.Namespace) -> list:
    from agent.sinks.jsonl import JsonlSink
    from agent.sinks.terminal import TerminalSink

    if args.output == "jsonl":
        if args.output_file:
            return [JsonlSink.open(str(args.output_file))]
        return [JsonlSink(sys.stdout)]
    if args.output_file:
        return [TerminalSink(open(args.output_file, "w", encoding="utf-8"), color=False)]
    return [TerminalSink(sys.stdout)]


def run_command(args: argparse.Namespace) -> int:
    for pid in args.pid:
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            return fail(f"no such process: --pid {pid}")
    if args.ringbuf_mb <= 0:
        return fail("--ringbuf-mb must be positive")
    try:
        checked = preflight.check_environment()
    except preflight.EnvironmentProblem as exc:
        return fail("eBPF capture cannot run here:\n  " + "\n  ".join(exc.problems))
    except KernelHeadersMissing as exc:
        return fail(str(exc))
    if not os.environ.get("BCC_KERNEL_SOURCE"):
        os.environ.update(bcc_environment(checked.kernel_source))
    try:
        sinks = open_sinks(args)
    except (OSError, ValueError) as exc:
        return fail(f"cannot open output: {exc}")

    options = CaptureOptions(
        pids=args.pid,
        comms=args.comm,
        max_capture=args.max_capture,
        ringbuf_bytes=args.ringbuf_mb << 20,
        duration=args.duration,
        ready_file=args.ready_file,
    )
    session = CaptureSession(options, sinks)

    def stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        session.stop_event.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        session.start()
        session.run()
    except BrokenPipeError:
        # The reader went away (`tlscap run | head`): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        session.close()
        return 0
    except Exception as exc:  # bcc raises bare Exception on compile/load errors
        log.debug("capture failed", exc_info=True)
        session.close()
        return fail(f"capture failed: {exc}")
    session.close()
    return 0
