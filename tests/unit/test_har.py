"""Exchange record -> HAR entry, and the HAR file: valid after every flush, 0600."""

from __future__ import annotations

import base64
import gzip
import json
import os
import stat
import time
from pathlib import Path

from agent.har.entries import har_entry, iso_time
from agent.l7.exchange import Exchange, GrpcCall, HttpMessage
from agent.records.record import Endpoint, PodRef, Record
from agent.sinks.har import HarSink
from tests.unit.har_check import check_har

T0 = 1_700_000_000_123_456_789


def record(
    req: HttpMessage | None,
    resp: HttpMessage | None,
    role: str = "client",
    protocol: str = "http1",
    grpc: GrpcCall | None = None,
) -> Record:
    client, server = Endpoint("127.0.0.1", 50000), Endpoint("127.0.0.1", 8443)
    local, remote = (client, server) if role == "client" else (server, client)
    return Record(
        type="exchange", ts_ns=T0, node="node-a", pid=77, comm="curl", source="openssl",
        conn_id="conn-9", local=local, remote=remote, role=role,  # type: ignore[arg-type]
        pod=PodRef("web-1", "shop", container="app"), protocol=protocol,
        exchange=Exchange(protocol=protocol, request=req, response=resp, grpc=grpc),  # type: ignore[arg-type]
    )  # fmt: skip


def post_form() -> Record:
    req = HttpMessage(
        ts_ns=T0, end_ts_ns=T0 + 2_000_000, method="POST", target="/login?next=%2Fhome&x=",
        authority="shop.example", version="1.1",
        headers=[("host", "shop.example"), ("authorization", "[REDACTED]"),
                 ("content-type", "application/x-www-form-urlencoded")],
        body=b"user=ada&remember=1", body_len=19, complete=True,
    )  # fmt: skip
    resp = HttpMessage(
        ts_ns=T0 + 5_000_000, end_ts_ns=T0 + 6_500_000, status=302, reason="Found",
        version="1.1", headers=[("location", "/home"), ("content-type", "text/html")],
        body=b"<a>moved</a>", body_len=12, complete=True,
    )  # fmt: skip
    return record(req, resp)


def test_entry_fields() -> None:
    e = har_entry(post_form())
    check_har({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"},
                       "entries": [e]}})  # fmt: skip
    assert e["startedDateTime"] == "2023-11-14T22:13:20.123456+00:00"
    assert e["request"]["method"] == "POST"
    assert e["request"]["url"] == "https://shop.example/login?next=%2Fhome&x="
    assert e["request"]["httpVersion"] == "HTTP/1.1"
    assert e["request"]["queryString"] == [
        {"name": "next", "value": "/home"},
        {"name": "x", "value": ""},
    ]
    assert {"name": "authorization", "value": "[REDACTED]"} in e["request"]["headers"]
    post = e["request"]["postData"]
    assert post["mimeType"] == "application/x-www-form-urlencoded"
    assert post["text"] == "user=ada&remember=1"
    assert post["params"] == [{"name": "user", "value": "ada"}, {"name": "remember", "value": "1"}]
    r = e["response"]
    assert (r["status"], r["statusText"], r["redirectURL"]) == (302, "Found", "/home")
    assert r["content"] == {"size": 12, "mimeType": "text/html", "text": "<a>moved</a>"}
    assert e["timings"]["send"] == 2.0
    assert e["timings"]["wait"] == 3.0
    assert e["timings"]["receive"] == 1.5
    assert e["time"] == 6.5
    assert e["serverIPAddress"] == "127.0.0.1"
    assert e["connection"] == "conn-9"
    x = e["_tlscap"]
    assert (x["pid"], x["comm"], x["node"], x["role"]) == (77, "curl", "node-a", "client")
    assert x["pod"] == {"name": "web-1", "namespace": "shop", "container": "app"}


def test_binary_grpc_http2_and_server_side() -> None:
    frame = b"\x00\x00\x00\x00\x03\x01\xff\x00"
    req = HttpMessage(
        ts_ns=T0, end_ts_ns=T0, method="POST", target="/test.Echo/Say", version="2",
        headers=[(":method", "POST"), (":path", "/test.Echo/Say"), (":authority", "localhost"),
                 ("content-type", "application/grpc")],
        authority="localhost", body=frame, body_len=len(frame), complete=True,
    )  # fmt: skip
    resp = HttpMessage(
        ts_ns=T0 + 1000, end_ts_ns=T0 + 2000, status=200, version="2",
        headers=[(":status", "200"), ("content-type", "application/grpc")],
        trailers=[("grpc-status", "0")], body=frame, body_len=len(frame), complete=True,
    )  # fmt: skip
    call = GrpcCall(service="test.Echo", method="Say", status=0)
    e = har_entry(record(req, resp, role="server", protocol="grpc", grpc=call))
    assert e["request"]["httpVersion"] == "HTTP/2"
    assert all(not h["name"].startswith(":") for h in e["request"]["headers"])
    assert e["request"]["postData"]["encoding"] == "base64"
    assert base64.b64decode(e["request"]["postData"]["text"]) == frame
    c = e["response"]["content"]
    assert c["encoding"] == "base64" and base64.b64decode(c["text"]) == frame
    assert e["response"]["_trailers"] == [{"name": "grpc-status", "value": "0"}]
    assert e["response"]["statusText"] == "OK"
    assert e["_tlscap"]["grpc"]["method"] == "Say"
    assert e["serverIPAddress"] == "127.0.0.1"  # the server's own (local) address


def test_gzip_body_is_decoded_when_whole_and_kept_when_truncated() -> None:
    text = b"hello hello hello hello " * 20
    packed = gzip.compress(text)
    req = HttpMessage(ts_ns=T0, method="GET", target="/g", authority="h", version="1.1")
    resp = HttpMessage(
        ts_ns=T0 + 10, end_ts_ns=T0 + 20, status=200, version="1.1",
        headers=[("content-encoding", "gzip"), ("content-type", "text/plain")],
        body=packed, body_len=len(packed), complete=True,
    )  # fmt: skip
    c = har_entry(record(req, resp))["response"]["content"]
    assert c["text"] == text.decode() and c["size"] == len(text)
    assert c["compression"] == len(text) - len(packed)
    resp.body, resp.body_truncated, resp.body_len = packed[:10], True, len(packed)
    c = har_entry(record(req, resp))["response"]["content"]
    assert c["encoding"] == "base64" and base64.b64decode(c["text"]) == packed[:10]
    assert "truncated" in c["comment"]


def test_unanswered_and_requestless_exchanges() -> None:
    req = HttpMessage(ts_ns=T0, method="GET", target="/slow", authority="h", version="1.1")
    e = har_entry(record(req, None))
    assert e["response"]["status"] == 0 and e["response"]["comment"] == "no response seen"
    check_har({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"},
                       "entries": [e]}})  # fmt: skip
    assert har_entry(record(None, HttpMessage(status=200))) is None
    assert har_entry(Record(type="data", ts_ns=T0)) is None


def test_iso_time() -> None:
    assert iso_time(0) == "1970-01-01T00:00:00.000000+00:00"


def test_har_file_valid_after_each_flush_and_at_close(tmp_path: Path) -> None:
    path = tmp_path / "out.har"
    path.write_text("old")
    os.chmod(path, 0o644)
    sink = HarSink.open(str(path), flush_interval=60)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["log"]["entries"] == []  # valid from the start
    sink.write(post_form())
    sink.write(Record(type="data", ts_ns=T0))
    sink.write(record(None, HttpMessage(status=200)))
    sink.flush()
    assert len(check_har(json.loads(path.read_text()))) == 1  # valid mid-run
    sink.write(post_form())
    sink.close()
    entries = check_har(json.loads(path.read_text()))
    assert len(entries) == 2
    assert sink.stats() == {"har_entries": 2, "har_skipped_exchanges": 1}


def test_har_file_flushes_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "live.har"
    sink = HarSink.open(str(path), flush_interval=0.05)
    sink.write(post_form())
    deadline = time.monotonic() + 5
    while len(json.loads(path.read_text())["log"]["entries"]) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sink.close()
