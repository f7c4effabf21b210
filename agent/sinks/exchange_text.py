"""One line per HTTP/gRPC exchange for the terminal, curl -v style detail below it.

14:03:07.123456 curl[4211/4211] openssl http1 127.0.0.1:51234 -> 127.0.0.1:8443 GET localhost:8443/api/users -> 200 OK 3.2 ms req=0B resp=1.2KB conn=c1
  > host: localhost:8443                      (-v: request headers)
  < content-type: application/json            (-v: response headers)
  < {"users": []}                             (-vv: bodies)
"""  # noqa: E501

from __future__ import annotations

from agent.l7.exchange import Exchange, GrpcMessage, Headers, HttpMessage
from agent.records.record import Record
from agent.sinks.textfmt import (
    BOLD,
    CYAN,
    DIM,
    GREEN,
    MAGENTA,
    RED,
    YELLOW,
    Style,
    format_endpoint,
    render_payload,
    safe,
)

BODY_SHOWN = 2048  # bytes of a body printed with -vv


def format_duration(ns: int | None) -> str:
    if ns is None:
        return "?"
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.1f} ms"
    return f"{ns / 1_000_000_000:.2f} s"


def format_size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    if n < 1 << 20:
        return f"{n / 1024:.1f}KB"
    return f"{n / (1 << 20):.1f}MB"


def _status_color(status: int) -> str:
    return GREEN if status < 300 else YELLOW if status < 400 else RED


def _summary(ex: Exchange, s: Style) -> str:
    req, resp = ex.request, ex.response
    if req is not None:
        what = f"{s(safe(req.method) or '?', BOLD)} {safe(req.authority)}{safe(req.target)}"
    else:
        what = s("(request not seen)", DIM)
    if resp is None:
        outcome = s("(no response)", RED)
    else:
        outcome = s(f"{resp.status} {safe(resp.reason)}".rstrip(), _status_color(resp.status))
    if ex.grpc is not None:
        status = ex.grpc.status
        label = "?" if status is None else str(status)
        color = GREEN if status == 0 else RED
        outcome += " " + s(f"grpc-status={label}", color)
        if ex.grpc.message:
            outcome += f" {safe(ex.grpc.message)!r}"
    sizes = (
        f"req={format_size(req.body_len) if req else '?'}"
        f" resp={format_size(resp.body_len) if resp else '?'}"
    )
    return f"{what} -> {outcome} {format_duration(ex.latency_ns)} {sizes}"


def render_exchange(r: Record, who: str, s: Style, detail: int) -> list[str]:
    ex = r.exchange
    if ex is None:
        return []
    stream = f" stream={ex.stream_id}" if ex.protocol != "http1" else ""
    line = (
        f"{who} {s(ex.protocol, CYAN)} {format_endpoint(r.local)} -> {format_endpoint(r.remote)} "
        f"{_summary(ex, s)} conn={r.conn_id or '?'}{stream}"
    )
    if ex.redactions:
        line += " " + s("redacted=" + ",".join(ex.redactions), MAGENTA)
    lines = [line]
    lines += [f"  {s('! ' + safe(note), DIM)}" for note in ex.notes]
    if detail >= 1:
        lines += _message_lines(ex.request, ">", s, detail)
        if ex.grpc is not None and detail >= 2:
            lines += _grpc_lines(ex.grpc.request_messages, ">", s)
        lines += _message_lines(ex.response, "<", s, detail)
        if ex.grpc is not None and detail >= 2:
            lines += _grpc_lines(ex.grpc.response_messages, "<", s)
    return lines


def _header_lines(headers: Headers, mark: str, s: Style) -> list[str]:
    return [f"  {s(mark, DIM)} {s(safe(k), BOLD)}: {safe(v)}" for k, v in headers]


def _message_lines(msg: HttpMessage | None, mark: str, s: Style, detail: int) -> list[str]:
    if msg is None:
        return []
    lines = _header_lines(msg.headers, mark, s)
    if detail >= 2 and msg.body:
        lines += render_payload(msg.body[:BODY_SHOWN], BODY_SHOWN, s, f"  {mark} ")
        if msg.body_len > len(msg.body[:BODY_SHOWN]):
            rest = msg.body_len - len(msg.body[:BODY_SHOWN])
            lines.append(f"  {mark} " + s(f"... ({rest} more body bytes)", DIM))
    lines += _header_lines(msg.trailers, mark + " trailer", s)
    return lines


def _grpc_lines(messages: list[GrpcMessage], mark: str, s: Style) -> list[str]:
    lines = []
    for i, m in enumerate(messages):
        flag = " compressed" if m.compressed else ""
        lines.append(f"  {mark} " + s(f"grpc message {i}: {m.length} bytes{flag}", DIM))
        lines += render_payload(m.data[:BODY_SHOWN], BODY_SHOWN, s, f"  {mark} ")
    return lines
