"""Human-readable sink, in the spirit of bcc's sslsniff but with the connection shown.

    14:03:07.123456 curl[4211/4211] openssl egress  127.0.0.1:51234 -> 127.0.0.1:8443 client conn=c1 fd=5 off=0 len=78
      GET / HTTP/1.1
      Host: localhost:8443
    14:03:07.125031 curl[4211/4211] openssl ingress 127.0.0.1:51234 <- 127.0.0.1:8443 client conn=c1 fd=5 off=0 len=2 captured=1 TRUNCATED
      00000000  17                                                |.|
      ... (1 byte not captured)

The local endpoint is always on the left and the arrow is the direction the bytes
moved relative to the process (-> it wrote them, <- it read them), so a column
always means the same side of the connection.  Payload lines are indented by two
spaces so they cannot be mistaken for headers.
"""  # noqa: E501

from __future__ import annotations

import os
import time
from typing import TextIO

from agent.records.record import Endpoint, Record
from agent.sinks.base import PeriodicFlusher

TEXT_THRESHOLD = 0.9  # share of printable characters for a payload to be shown as text
INDENT = "  "


class _Style:
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


def _bytes(n: int, adjective: str = "") -> str:
    return f"{n} {adjective}{'byte' if n == 1 else 'bytes'}"


class TerminalSink:
    """Writes Records for a human reading a terminal (or a log file).

    color=None means: color when `stream` is a TTY and $NO_COLOR is unset.
    At most `max_bytes` of each payload are shown.
    """

    def __init__(
        self,
        stream: TextIO,
        color: bool | None = None,
        max_bytes: int = 4096,
        flush_interval: float = 0.1,
        show_node: bool = False,
    ) -> None:
        if color is None:
            color = _isatty(stream) and "NO_COLOR" not in os.environ
        self._style = _Style(color)
        self.max_bytes = max_bytes
        self.show_node = show_node  # records from many nodes (tlscap tail)
        self._out = PeriodicFlusher(stream, flush_interval)

    def write(self, record: Record) -> None:
        self._out.write("".join(line + "\n" for line in self.render(record)))

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        """Flush; the stream (usually stdout) stays open."""
        self._out.close()

    def render(self, record: Record) -> list[str]:
        """The lines (without newlines) shown for one record."""
        if record.type == "stats":
            return [self._stats_line(record)]
        if record.type in ("open", "close"):
            return [self._lifecycle_line(record)]
        return [self._data_header(record), *self._payload_lines(record)]

    # --- lines -------------------------------------------------------------------------

    def _who(self, r: Record) -> str:
        s = self._style
        comm = s(safe(r.comm) or "?", BOLD)
        node = f"{safe(r.node) or '?'} " if self.show_node else ""
        # People read a cluster by pod, not by pid: namespace/pod first when known.
        pod = f"{safe(r.pod.namespace)}/{safe(r.pod.name)} " if r.pod else ""
        return f"{s(format_time(r.ts_ns), DIM)} {node}{pod}{comm}[{r.pid}/{r.tid}] {r.source}"

    def _conn(self, r: Record, arrow: str) -> str:
        return (
            f"{format_endpoint(r.local)} {arrow} {format_endpoint(r.remote)} {r.role} "
            f"conn={r.conn_id or '?'} fd={r.fd}"
        )

    def _data_header(self, r: Record) -> str:
        s = self._style
        if r.direction == "egress":
            word, arrow, color = "egress ", "->", GREEN
        elif r.direction == "ingress":
            word, arrow, color = "ingress", "<-", YELLOW
        else:
            word, arrow, color = "?      ", "--", DIM
        line = f"{self._who(r)} {s(word, color)} {self._conn(r, arrow)} off={r.offset} len={r.len}"
        if r.truncated or r.captured_len < r.len:
            line += f" captured={r.captured_len} " + s("TRUNCATED", RED)
        return line

    def _payload_lines(self, r: Record) -> list[str]:
        data = r.data
        shown = data[: self.max_bytes]
        body = render_text(shown) if looks_like_text(shown) else render_hexdump(shown)
        lines = [INDENT + line for line in body]
        s = self._style
        if len(data) > len(shown):
            lines.append(INDENT + s(f"... ({_bytes(len(data) - len(shown), 'more ')})", DIM))
        not_captured = r.len - r.captured_len
        if not_captured > 0:
            lines.append(INDENT + s(f"... ({_bytes(not_captured)} not captured)", RED))
        return lines

    def _lifecycle_line(self, r: Record) -> str:
        s = self._style
        word = s(f"{r.type:<7}", CYAN if r.type == "open" else MAGENTA)
        return f"{self._who(r)} {word} {self._conn(r, '<->')}"

    def _stats_line(self, r: Record) -> str:
        s = self._style
        fields = []
        for key, value in r.stats.items():
            item = f"{key}={value}"
            fields.append(s(item, RED) if key == "lost" and value else item)
        return f"{s(format_time(r.ts_ns), DIM)} {s('stats', BOLD)} " + " ".join(fields)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False
