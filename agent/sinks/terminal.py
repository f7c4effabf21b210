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
from typing import TextIO

from agent.records.record import Record
from agent.sinks.base import PeriodicFlusher
from agent.sinks.exchange_text import render_exchange
from agent.sinks.textfmt import (
    BOLD,
    CYAN,
    DIM,
    GREEN,
    INDENT,
    MAGENTA,
    RED,
    YELLOW,
    Style,
    byte_count,
    format_endpoint,
    format_time,
    looks_like_text,
    render_hexdump,
    render_payload,
    render_text,
    safe,
)

__all__ = ["TerminalSink", "looks_like_text", "render_hexdump", "render_text"]


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
        detail: int = 0,
        raw: bool = False,
    ) -> None:
        if color is None:
            color = _isatty(stream) and "NO_COLOR" not in os.environ
        self._style = Style(color)
        self.max_bytes = max_bytes
        self.show_node = show_node  # records from many nodes (tlscap tail)
        self.detail = detail  # exchanges: 0 one line, 1 + headers, 2 + bodies
        self.raw = raw  # also the data records of connections parsed as HTTP
        self._out = PeriodicFlusher(stream, flush_interval)

    def write(self, record: Record) -> None:
        lines = self.render(record)
        if lines:
            self._out.write("".join(line + "\n" for line in lines))

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
        if record.type == "exchange":
            return render_exchange(record, self._who(record), self._style, self.detail)
        if record.protocol and not self.raw:
            return []  # its connection is shown as exchanges
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
        if r.redactions:
            line += " " + s("redacted=" + ",".join(r.redactions), MAGENTA)
        return line

    def _payload_lines(self, r: Record) -> list[str]:
        lines = render_payload(r.data, self.max_bytes, self._style)
        s = self._style
        not_captured = r.len - r.captured_len
        if not_captured > 0:
            lines.append(INDENT + s(f"... ({byte_count(not_captured)} not captured)", RED))
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
