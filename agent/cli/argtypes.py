"""argparse `type=` converters shared by the subcommands (sizes, durations, times)."""

from __future__ import annotations

import argparse
import re
import time
from datetime import datetime

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


def parse_size(text: str) -> int:
    """'1048576', '256K', '1M', '1MiB' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in _SIZE_UNITS and t[-1:] != "" else ""
    number = t[: -len(suffix)] if suffix else t
    try:
        value = int(number) * _SIZE_UNITS[suffix]
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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def parse_duration(text: str) -> float:
    """'90' (seconds), '500ms', '30s', '15m', '12h', '7d', '2w' -> seconds (> 0)."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (e.g. 30s, 15m, 12h, 7d)"
        ) from None
    value = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return value


def parse_time(text: str, now_ns: int | None = None) -> int:
    """A point in time as wall-clock ns: a duration ago ('10m', '2h'), 'all' (the
    beginning), an ISO 8601 timestamp ('2026-11-23T14:03:07', local time unless
    it carries an offset), or Unix seconds ('1795000000.5')."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    t = text.strip()
    if t.lower() in ("all", "0", "beginning"):
        return 1  # 0 means "no bound" on the wire; 1 ns after the epoch is everything
    if _DURATION.match(t) and not re.fullmatch(r"\d{9,}(\.\d+)?", t):
        return now_ns - int(parse_duration(t) * 1e9)
    if re.fullmatch(r"\d{9,}(\.\d+)?", t):
        return int(float(t) * 1e9)
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (e.g. 10m for ten minutes ago, all, 2026-11-23T14:03:07)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as a person typing it means
    return int(when.timestamp() * 1e9)


LOG_LEVELS = ("warning", "info", "debug")


def add_output_view_arguments(p: argparse.ArgumentParser) -> None:
    """How much the text output shows (`run`, `tail`); their -v is about output, so
    logging gets its own `--log-level`."""
    p.add_argument(
        "--raw",
        action="store_true",
        help="text output: also show the raw data records of connections parsed as HTTP",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="text output: show exchange headers (-vv: and bodies)",
    )
    p.add_argument(
        "--log-level", choices=LOG_LEVELS, default="warning", help="log messages (default warning)"
    )
