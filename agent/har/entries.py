"""Exchange record -> one HAR 1.2 entry (pure: no I/O).

HAR (http://www.softwareishard.com/blog/har-12-spec/) is what browsers' devtools,
mitmproxy, Postman and replay tools trade.  Every field HAR 1.2 requires is
written; what the capture cannot know is written as HAR says unknowns are
(-1 sizes, -1 for the blocked/dns/connect/ssl timings).

- Headers are the captured ones, redacted by the agent before any sink sees them.
  HTTP/2 pseudo-headers (":method", ":path", ...) are left out of `headers`:
  their values are the entry's method, url and status.  gRPC trailers go to
  `_trailers` (HAR has no field for trailers).
- Bodies: `text` holds the body when it is UTF-8 text, else its base64 with
  `encoding: "base64"` (request bodies too, where HAR 1.2 has no `encoding`: the
  extension follows the response's).  A gzip/deflate body is decoded when it was
  captured whole (HAR's `text` is the decoded body; `compression` says how much
  the encoding saved); otherwise it stays as captured and `comment` says so.
- Timings: send = request's first to last byte, wait = request's last byte to the
  response's first, receive = response's first to last byte (ms; 0 when a side
  was not seen).
- `_tlscap`: the capture's view (pid, comm, pod, node, role, conn_id, ...).

Exchanges whose request was never seen (capture began mid-connection) have no
method or URL to write: they are skipped, and counted by the writers.
"""

from __future__ import annotations

import base64
import zlib
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from agent.l7.exchange import Exchange, HttpMessage
from agent.records.record import Endpoint, Record

HAR_VERSION = "1.2"
CREATOR = {"name": "tlscap", "version": "0.1.0"}
DECODE_LIMIT = 16 << 20  # bytes a gzip/deflate body may inflate to before we give up
_TEXT_TYPES = ("json", "xml", "javascript", "x-www-form-urlencoded", "html", "csv", "yaml")


def har_log_head(comment: str = "") -> dict[str, Any]:
    """The `log` object without its entries."""
    head: dict[str, Any] = {"version": HAR_VERSION, "creator": dict(CREATOR), "pages": []}
    if comment:
        head["comment"] = comment
    return head


def iso_time(ts_ns: int) -> str:
    """ISO 8601 with microseconds and the UTC offset, as HAR wants."""
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    dt = datetime.fromtimestamp(seconds, UTC).replace(microsecond=ns // 1000)
    return dt.isoformat(timespec="microseconds")


def _ms(ns: int) -> float:
    return round(max(0, ns) / 1e6, 3)


def _headers(msg: HttpMessage | None) -> list[dict[str, str]]:
    if msg is None:
        return []
    return [{"name": k, "value": v} for k, v in msg.headers if not k.startswith(":")]


def _http_version(msg: HttpMessage | None) -> str:
    version = msg.version if msg is not None else ""
    if version == "2":
        return "HTTP/2"
    return f"HTTP/{version}" if version else ""


def _server_endpoint(record: Record) -> Endpoint | None:
    if record.role == "server":
        return record.local
    if record.role == "client":
        return record.remote
    return None


def request_url(record: Record, req: HttpMessage) -> str:
    """https://authority/target; the server's address when no Host/:authority was sent."""
    target = req.target or "/"
    if "://" in target:  # absolute-form (proxies)
        return target
    authority = req.authority
    if not authority:
        server = _server_endpoint(record)
        authority = str(server) if server else "unknown"
    if not target.startswith("/"):  # authority-form (CONNECT) or asterisk-form
        return f"https://{authority}/" if target == "*" else f"https://{target}"
    return f"https://{authority}{target}"


def _query_string(target: str) -> list[dict[str, str]]:
    _, sep, query = target.split("#", 1)[0].partition("?")
    if not sep:
        return []
    return [{"name": k, "value": v} for k, v in parse_qsl(query, keep_blank_values=True)]


def _is_text(mime: str, body: bytes) -> bool:
    mime = mime.lower()
    if mime.startswith("application/grpc"):
        return False
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if mime.startswith("text/") or any(t in mime for t in _TEXT_TYPES):
        return True
    # Unknown type: text only if it reads like text (no control bytes but whitespace).
    return all(c >= " " or c in "\t\n\r" for c in text)


def decoded_body(msg: HttpMessage) -> tuple[bytes, str | None]:
    """(body, note): a whole gzip/deflate body inflated, else the captured bytes and,
    when it stays content-encoded, why."""
    encoding = (msg.header("content-encoding") or "").strip().lower()
    if not encoding or encoding == "identity" or not msg.body:
        return msg.body, None
    if msg.body_truncated:
        return msg.body, f"body kept as captured ({encoding}): only part of it was captured"
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(msg.body, DECODE_LIMIT)
            if not d.unconsumed_tail:
                return out, None
        except zlib.error:
            if encoding == "deflate":  # raw deflate, as some servers send
                try:
                    return zlib.decompress(msg.body, -zlib.MAX_WBITS), None
                except zlib.error:
                    pass
    return msg.body, f"body kept as captured ({encoding}): not decoded"


def _body_text(body: bytes, mime: str) -> dict[str, Any]:
    if _is_text(mime, body):
        return {"text": body.decode("utf-8")}
    return {"text": base64.b64encode(body).decode("ascii"), "encoding": "base64"}


def _post_data(req: HttpMessage) -> dict[str, Any] | None:
    if not req.body and not req.body_len:
        return None
    mime = req.header("content-type") or ""
    body, note = decoded_body(req)
    post: dict[str, Any] = {"mimeType": mime, "params": [], **_body_text(body, mime)}
    if mime.lower().startswith("application/x-www-form-urlencoded") and "encoding" not in post:
        post["params"] = [
            {"name": k, "value": v} for k, v in parse_qsl(post["text"], keep_blank_values=True)
        ]
    comments = [note] if note else []
    if req.body_truncated:
        comments.append(f"body truncated: {len(req.body)} of {req.body_len} bytes captured")
    if comments:
        post["comment"] = "; ".join(comments)
    return post


def _content(resp: HttpMessage | None) -> dict[str, Any]:
    if resp is None:
        return {"size": 0, "mimeType": "x-unknown"}
    mime = resp.header("content-type") or "x-unknown"
    body, note = decoded_body(resp)
    content: dict[str, Any] = {"size": resp.body_len, "mimeType": mime}
    if body is not resp.body:  # inflated
        content["size"] = len(body)
        content["compression"] = len(body) - resp.body_len
    if body or resp.body_len:
        content.update(_body_text(body, mime))
    comments = [note] if note else []
    if resp.body_truncated:
        comments.append(f"body truncated: {len(resp.body)} of {resp.body_len} bytes captured")
    if comments:
        content["comment"] = "; ".join(comments)
    return content


def _timings(ex: Exchange) -> dict[str, float]:
    req, resp = ex.request, ex.response
    send = wait = receive = 0.0
    if req is not None and req.end_ts_ns:
        send = _ms(req.end_ts_ns - req.ts_ns)
    if resp is not None:
        if req is not None and resp.ts_ns:
            wait = _ms(resp.ts_ns - (req.end_ts_ns or req.ts_ns))
        if resp.end_ts_ns:
            receive = _ms(resp.end_ts_ns - resp.ts_ns)
    return {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1,
            "send": send, "wait": wait, "receive": receive}  # fmt: skip


def tlscap_extension(record: Record) -> dict[str, Any]:
    ex = record.exchange
    assert ex is not None
    pod = record.pod
    out: dict[str, Any] = {
        "pid": record.pid,
        "comm": record.comm,
        "pod": {"name": pod.name, "namespace": pod.namespace, "container": pod.container}
        if pod
        else None,
        "node": record.node,
        "role": record.role,
        "conn_id": record.conn_id,
        "source": record.source,
        "container_id": record.container_id,
        "agent_id": record.agent_id,
        "seq": record.seq,
        "protocol": ex.protocol,
        "stream_id": ex.stream_id,
        "local": record.local.to_json() if record.local else None,
        "remote": record.remote.to_json() if record.remote else None,
        "notes": list(ex.notes),
        "redactions": list(ex.redactions),
    }
    if ex.grpc is not None:
        out["grpc"] = {"service": ex.grpc.service, "method": ex.grpc.method,
                       "status": ex.grpc.status, "message": ex.grpc.message}  # fmt: skip
    return out


def har_entry(record: Record) -> dict[str, Any] | None:
    """The HAR entry of an exchange record; None for other records and for exchanges
    whose request was not seen."""
    ex = record.exchange
    if record.type != "exchange" or ex is None or ex.request is None:
        return None
    req, resp = ex.request, ex.response
    timings = _timings(ex)
    status = resp.status if resp is not None else 0
    reason = resp.reason if resp is not None else ""
    if resp is not None and not reason and status:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    response: dict[str, Any] = {
        "status": status,
        "statusText": reason,
        "httpVersion": _http_version(resp) or _http_version(req),
        "cookies": [],
        "headers": _headers(resp),
        "content": _content(resp),
        "redirectURL": (resp.header("location") or "") if resp is not None else "",
        "headersSize": -1,
        "bodySize": resp.body_len if resp is not None else -1,
    }
    if resp is not None and resp.trailers:
        response["_trailers"] = [{"name": k, "value": v} for k, v in resp.trailers]
    if resp is None:
        response["comment"] = "no response seen"
    request: dict[str, Any] = {
        "method": req.method,
        "url": request_url(record, req),
        "httpVersion": _http_version(req) or _http_version(resp),
        "cookies": [],
        "headers": _headers(req),
        "queryString": _query_string(req.target),
        "headersSize": -1,
        "bodySize": req.body_len,
    }
    post = _post_data(req)
    if post is not None:
        request["postData"] = post
    entry: dict[str, Any] = {
        "startedDateTime": iso_time(req.ts_ns or record.ts_ns),
        "time": round(sum(v for v in timings.values() if v > 0), 3),
        "request": request,
        "response": response,
        "cache": {},
        "timings": timings,
        "connection": record.conn_id,
        "_tlscap": tlscap_extension(record),
    }
    server = _server_endpoint(record)
    if server is not None:
        entry["serverIPAddress"] = server.ip
    if ex.notes:
        entry["comment"] = "; ".join(ex.notes)
    return entry
