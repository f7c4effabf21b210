"""Text building blocks for the human-readable sinks: time, endpoints, escaping,
payloads as text or hex dumps, and ANSI styling."""

from __future__ import annotations

import time

from agent.records.record import Endpoint

TEXT_THRESHOLD = 0.9  # share of printable characters for a payload to be shown as text
INDENT = "  "


class Style:
    """ANSI SGR codes, or nothing when color is off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text


BOLD, DIM, RED, GREEN, YELLOW, CYAN, MAGENTA = "1", "2", "31", "32", "33", "36", "35"


def format_time(ts_ns: int) -> str:
    """Local wall-clock time with microseconds, e.g. 14:03:07.123456."""
    secs, ns = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(secs)) + f".{ns // 1000:06d}"


def format_endpoint(ep: Endpoint | None) -> str:
    return "?" if ep is None else str(ep)


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not valid UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if ch == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """`text` with every non-printable character escaped (process names are user-set)."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def looks_like_text(data: bytes) -> bool:
    """Mostly printable UTF-8 (tabs/newlines count as printable)."""
    if not data:
        return False
    text = _decode(data)
    printable = sum(1 for ch in text if ch.isprintable() or ch in "\n\t\r")
    return printable >= TEXT_THRESHOLD * len(text)


def render_text(data: bytes) -> list[str]:
    """Payload as text lines; control and non-UTF-8 bytes escaped, CRLF/LF kept as breaks.

    Escaping matters beyond looks: raw ESC sequences in captured traffic could
    drive the user's terminal.  CRLF is the norm in HTTP/SMTP headers, so it is
    shown as a plain line break; a lone CR is escaped.
    """
    lines = _decode(data).replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()  # a trailing newline ends the last line rather than starting one
    # Tabs stay raw so indented bodies (JSON, YAML) keep their shape.
    return ["\t".join(safe(part) for part in line.split("\t")) for line in lines]


def render_hexdump(data: bytes) -> list[str]:
    """Classic `hexdump -C` layout: offset, 16 hex bytes in two groups of 8, ASCII column."""
    out = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        ascii_col = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        out.append(f"{off:08x}  {left:<23}  {right:<23}  |{ascii_col}|")
    return out


def render_payload(data: bytes, max_bytes: int, style: Style, indent: str = INDENT) -> list[str]:
    """Up to max_bytes of `data` as text or a hex dump, indented; says what was cut."""
    shown = data[:max_bytes]
    body = render_text(shown) if looks_like_text(shown) else render_hexdump(shown)
    lines = [indent + line for line in body]
    if len(data) > len(shown):
        lines.append(indent + style(f"... ({byte_count(len(data) - len(shown), 'more ')})", DIM))
    return lines


def byte_count(n: int, adjective: str = "") -> str:
    return f"{n} {adjective}{'byte' if n == 1 else 'bytes'}"
