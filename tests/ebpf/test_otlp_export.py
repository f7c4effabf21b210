"""Exchanges of a real capture as OTLP spans, received by a real OTLP/gRPC endpoint.

`tlscap run` (a subprocess, real probes) captures curl over HTTP/1.1 and HTTP/2 and a
grpcio client against programs/http_server.py; tests/ebpf/otlp_receiver.py serves the
opentelemetry-proto TraceService on loopback and keeps what arrives.  Each span is
checked against the exchange the same run wrote as JSON lines.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.ebpf.conftest import REPO, TLSCAP, free_port, run_program, wait_for, wait_for_port
from tests.ebpf.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.ebpf.test_l7_capture import curl

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SPAN_KIND = {1: "internal", 2: "server", 3: "client"}
STATUS_ERROR = 2


@pytest.fixture
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.stop()


def ours(spans: list[ReceivedSpan], port: int) -> list[ReceivedSpan]:
    """Spans of exchanges with our server (other programs on this machine may be busy)."""
    return [s for s in spans if s.attrs.get("server.port") == port]


def by_key(spans: list[ReceivedSpan]) -> dict[tuple, ReceivedSpan]:
    return {(s.attrs["tlscap.conn_id"], s.span.start_time_unix_nano): s for s in spans}


def exchange_key(r: dict) -> tuple:
    return (r["conn_id"], r["exchange"]["request"]["ts_ns"])


def test_spans_from_http1_http2_and_grpc(agent, receiver, http_server, tls_cert) -> None:
    port = http_server
    a = agent("--otlp-endpoint", receiver.endpoint, "--otlp-insecure",
              "--otlp-header", "X-Tenant=lab")  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    curl("--http1.1", "-H", f"traceparent: 00-{TRACE}-{PARENT}-01",
         f"{url}/api/items?id=7&token=hunter2")  # fmt: skip
    curl("--http1.1", "-H", "traceparent: 00-not-a-trace-id-01", f"{url}/bad-parent")
    curl("--http2", f"{url}/two", f"{url}/status/503")
    run_program("grpc_client.py", str(tls_cert[0]), str(port))
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    exchanges = [
        r for r in cap.of_type("exchange")
        if port in (r["local"]["port"], r["remote"]["port"]) and r["exchange"]["request"]
    ]  # fmt: skip
    # curl: 4 client + 4 server exchanges; grpcio's BoringSSL is not probed: 3 server calls.
    assert len(exchanges) == 11, [e["exchange"]["request"]["target"] for e in exchanges]
    spans = ours(receiver.wait_spans(len(exchanges)), port)
    assert len(spans) == len(exchanges)
    got = by_key(spans)
    assert set(got) == {exchange_key(r) for r in exchanges}
    stats = cap.stats
    # The stats line is taken before outputs close; the sink's last log line is final.
    assert stats["otlp_spans_exported"] + stats["otlp_queue_depth"] >= len(exchanges)
    assert stats["otlp_spans_dropped"] == 0 and stats["otlp_export_failures"] == 0
    final = re.search(r"OTLP export to \S+: (\d+) spans exported, 0 dropped", cap.stderr)
    assert final and int(final.group(1)) >= len(exchanges), cap.stderr
    assert stats["otlp_traceparent_invalid"] == 2  # /bad-parent, seen by curl and the server
    assert stats["otlp_traceparent_linked"] == 2
    assert all(s.metadata.get("x-tenant") == "lab" for s in spans)
    assert all(s.scope == "tlscap" for s in spans)

    for r in exchanges:
        s = got[exchange_key(r)]
        ex, req, resp = r["exchange"], r["exchange"]["request"], r["exchange"]["response"]
        attrs, span = s.attrs, s.span
        role = r["role"]
        client_end, server_end = (
            (r["local"], r["remote"]) if role == "client" else (r["remote"], r["local"])
        )
        where = (role, req["target"])
        assert SPAN_KIND[span.kind] == role, where
        assert span.start_time_unix_nano == req["ts_ns"], where
        assert span.end_time_unix_nano == resp["end_ts_ns"], where
        # From Host/:authority (grpcio sends the TLS name it was told: localhost).
        assert attrs["server.address"] == req["authority"].rsplit(":", 1)[0]
        assert attrs["server.address"] in ("127.0.0.1", "localhost")
        assert attrs["server.port"] == port == server_end["port"]
        assert (attrs["client.address"], attrs["client.port"]) == (
            client_end["ip"], client_end["port"],
        )  # fmt: skip
        assert attrs["network.protocol.version"] == req["version"]
        assert "http.route" not in attrs
        # Resource: the captured process, not the agent.
        res = s.resource
        assert res["process.pid"] == r["pid"]
        assert res["process.executable.name"] == r["comm"]
        assert res["service.name"] == r["comm"]  # no pod here: the comm
        assert res["host.name"] == r["node"]
        if ex["protocol"] == "grpc":
            g = ex["grpc"]
            assert (attrs["rpc.system"], attrs["rpc.service"], attrs["rpc.method"]) == (
                "grpc", "test.Echo", g["method"],
            )  # fmt: skip
            assert attrs["rpc.grpc.status_code"] == g["status"]
            assert span.name == f"test.Echo/{g['method']}"
            # Any non-zero gRPC status is an error (NOT_FOUND for /Missing); OK is not.
            assert (span.status.code == STATUS_ERROR) == (g["status"] != 0), where
            continue
        assert attrs["http.request.method"] == req["method"] == span.name
        assert attrs["http.response.status_code"] == resp["status"]
        path, _, query = req["target"].partition("?")
        assert attrs["url.path"] == path
        if query:
            # Redacted before any sink: the token's value never leaves the agent.
            assert attrs["url.query"] == query and "hunter2" not in query
            assert query.startswith("id=7&token=")
        assert (span.status.code == STATUS_ERROR) == (resp["status"] >= 500), where
        if role == "client":
            assert attrs["url.full"] == f"https://127.0.0.1:{port}{req['target']}"
        linked = req["target"].startswith("/api/items")
        if linked:
            assert span.trace_id.hex() == TRACE and span.parent_span_id.hex() == PARENT
            assert span.span_id.hex() != PARENT
        else:
            assert not span.parent_span_id and span.trace_id.hex() != TRACE
    assert "hunter2" not in str([s.span for s in spans])


def test_endpoint_down_capture_goes_on_and_drops_are_counted(agent, http_server) -> None:
    port = http_server
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    a = agent("--otlp-endpoint", dead, "--otlp-insecure", "--otlp-queue", "4")
    urls = [f"https://127.0.0.1:{port}/down/{i}" for i in range(10)]
    curl("--http1.1", *urls[:5])
    failed = f"OTLP export to {dead} failed"
    wait_for(lambda: failed in a.stderr_text(), 30, "the first failed export")
    curl("--http1.1", *urls[5:])  # captured while the endpoint is down
    t = time.monotonic()
    cap = a.stop()
    assert time.monotonic() - t < 20, "exit must not wait on a dead endpoint for long"
    assert cap.returncode == 0, cap.stderr
    ex = [
        r
        for r in cap.of_type("exchange")
        if r["exchange"]["request"]["target"].startswith("/down/")
    ]
    assert len(ex) == 20  # capture went on: curl's and the server's side of each
    stats = cap.stats
    assert stats["otlp_spans_exported"] == 0
    # The stats line is a snapshot taken before the sinks close: what was still queued
    # then is dropped at exit, which the sink's last log line counts.
    assert stats["otlp_spans_dropped"] >= 10  # at least the batch whose failure was logged
    assert stats["otlp_queue_depth"] <= 4 + 512  # the bound, and one batch in flight
    assert stats["otlp_export_failures"] >= 1
    # Other programs on this machine may add exchanges of their own.
    final = re.search(rf"OTLP export to {dead}: 0 spans exported, (\d+) dropped", cap.stderr)
    assert final and int(final.group(1)) >= 20, cap.stderr


def test_collector_exports_its_agents_exchanges(agent, receiver, http_server, tmp_path) -> None:
    port = http_server
    cport = free_port()
    collector = subprocess.Popen(
        [*TLSCAP, "collector", "--listen", f"127.0.0.1:{cport}", "--store",
         str(tmp_path / "c.db"), "--insecure", "--otlp-endpoint", receiver.endpoint,
         "--otlp-insecure"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", cport)
        a = agent("--collector", f"127.0.0.1:{cport}", "--insecure",
                  "--spool-dir", str(tmp_path / "spool"), "--node", "node-otlp")  # fmt: skip
        curl("--http2", f"https://127.0.0.1:{port}/via-collector")
        cap = a.stop()
        assert cap.returncode == 0, cap.stderr
        spans = [s for s in ours(receiver.wait_spans(2), port)
                 if s.attrs.get("url.path") == "/via-collector"]  # fmt: skip
        assert sorted(SPAN_KIND[s.span.kind] for s in spans) == ["client", "server"]
        assert {s.resource["host.name"] for s in spans} == {"node-otlp"}
        assert "curl" in {s.resource["process.executable.name"] for s in spans}
    finally:
        collector.terminate()
        _, err = collector.communicate(timeout=30)
    assert "otlp_spans_exported=" in err
