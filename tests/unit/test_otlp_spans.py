"""Exchange record -> span: kind, times, attributes, status, resource, traceparent; and the
OTLP sink's queue, drops, failures and backoff with an exporter that fails on command."""

from __future__ import annotations

import threading
import time

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from agent.export.backoff import Backoff
from agent.l7.exchange import Exchange, GrpcCall, HttpMessage
from agent.otlp.sink import OtlpSink
from agent.otlp.spans import ResourceCache, SpanBuilder, parse_traceparent, split_target
from agent.records.record import Endpoint, PodRef, Record

T0 = 1_700_000_000_000_000_000
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def exchange_record(
    role: str = "client",
    method: str = "GET",
    target: str = "/api/users?id=7&token=%5BREDACTED%5D",
    status: int = 200,
    version: str = "1.1",
    headers: list[tuple[str, str]] | None = None,
    grpc: GrpcCall | None = None,
    pod: PodRef | None = None,
    response: bool = True,
    pid: int = 4242,
) -> Record:
    req = HttpMessage(
        ts_ns=T0, end_ts_ns=T0 + 1_000, method=method, target=target,
        authority="api.example.com:8443", version=version,
        headers=[("host", "api.example.com:8443"), ("user-agent", "curl/8"), *(headers or [])],
        complete=True,
    )  # fmt: skip
    resp = HttpMessage(
        ts_ns=T0 + 5_000_000, end_ts_ns=T0 + 7_000_000, status=status, version=version,
        headers=[("content-type", "text/plain")], body=b"hello", body_len=5, complete=True,
    )  # fmt: skip
    client, server = Endpoint("10.1.2.3", 50000), Endpoint("198.18.0.9", 8443)
    local, remote = (client, server) if role == "client" else (server, client)
    return Record(
        type="exchange", ts_ns=T0 + 7_000_000, node="node-a", pid=pid, comm="curl",
        container_id="c0ffee" * 10 + "abcd", pod=pod, source="openssl", conn_id="conn-1",
        local=local, remote=remote, role=role,  # type: ignore[arg-type]
        protocol="grpc" if grpc else "http1",
        exchange=Exchange(protocol="grpc" if grpc else "http1", request=req,  # type: ignore[arg-type]
                          response=resp if response else None, grpc=grpc),
    )  # fmt: skip


def test_client_http_span() -> None:
    span = SpanBuilder().build(exchange_record())
    assert span is not None
    assert span.kind is SpanKind.CLIENT
    assert span.name == "GET"
    assert (span.start_time, span.end_time) == (T0, T0 + 7_000_000)
    a = dict(span.attributes)
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/api/users"
    assert a["url.query"] == "id=7&token=%5BREDACTED%5D"
    assert a["url.full"] == "https://api.example.com:8443/api/users?id=7&token=%5BREDACTED%5D"
    assert (a["server.address"], a["server.port"]) == ("api.example.com", 8443)
    assert (a["client.address"], a["client.port"]) == ("10.1.2.3", 50000)
    assert a["http.response.status_code"] == 200
    assert a["network.protocol.version"] == "1.1"
    assert "http.route" not in a
    assert "rpc.system" not in a
    assert span.status.status_code is StatusCode.UNSET
    assert span.parent is None


def test_server_span_kind_endpoints_and_error_rules() -> None:
    b = SpanBuilder()
    span = b.build(exchange_record(role="server", status=503))
    assert span.kind is SpanKind.SERVER
    a = dict(span.attributes)
    assert a["server.port"] == 8443  # the server's own (local) port
    assert (a["client.address"], a["client.port"]) == ("10.1.2.3", 50000)
    assert "url.full" not in a
    assert span.status.status_code is StatusCode.ERROR
    assert a["error.type"] == "503"
    # Only a 5xx is an error, on either side.
    for role in ("server", "client"):
        assert b.build(exchange_record(role=role, status=404)).status.status_code is (
            StatusCode.UNSET
        )
        assert b.build(exchange_record(role=role, status=500)).status.status_code is (
            StatusCode.ERROR
        )


def test_grpc_span() -> None:
    call = GrpcCall(service="test.Echo", method="Missing", status=5, message="nope")
    b = SpanBuilder()
    span = b.build(exchange_record(role="client", method="POST", target="/test.Echo/Missing",
                                   version="2", grpc=call))  # fmt: skip
    assert span.name == "test.Echo/Missing"
    a = dict(span.attributes)
    assert a["rpc.system"] == "grpc"
    assert (a["rpc.service"], a["rpc.method"], a["rpc.grpc.status_code"]) == (
        "test.Echo",
        "Missing",
        5,
    )
    assert a["network.protocol.version"] == "2"
    assert span.status.status_code is StatusCode.ERROR
    # Any non-zero status is an error on the server too; 0 is not.
    server = exchange_record(role="server", method="POST", target="/test.Echo/Missing",
                             version="2", grpc=call)  # fmt: skip
    assert b.build(server).status.status_code is StatusCode.ERROR
    call.status = 0
    assert b.build(server).status.status_code is StatusCode.UNSET


def test_resource_from_pod_and_process() -> None:
    pod = PodRef("shop-7d9", "shop", uid="u-1", container="web",
                 labels={"app.kubernetes.io/name": "shop-frontend"})  # fmt: skip
    cache = ResourceCache(size=2)
    span = SpanBuilder(cache).build(exchange_record(pod=pod))
    r = dict(span.resource.attributes)
    assert r["k8s.pod.name"] == "shop-7d9"
    assert r["k8s.namespace.name"] == "shop"
    assert r["k8s.container.name"] == "web"
    assert r["container.id"] == "c0ffee" * 10 + "abcd"
    assert r["host.name"] == "node-a"
    assert r["process.pid"] == 4242
    assert r["process.executable.name"] == "curl"
    assert r["service.name"] == "shop-frontend"
    plain = SpanBuilder().build(exchange_record(pid=1))
    assert dict(plain.resource.attributes)["service.name"] == "curl"  # no pod: the comm
    # One Resource object per process (the exporter groups by it); bounded.
    b = SpanBuilder(cache)
    assert b.build(exchange_record(pod=pod)).resource is span.resource
    b.build(exchange_record(pid=2))
    b.build(exchange_record(pid=3))
    assert len(cache) == 2


def test_traceparent_links_and_invalid_is_counted() -> None:
    b = SpanBuilder()
    header = [("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "vendor=x")]
    span = b.build(exchange_record(headers=header))
    assert span.context.trace_id == int(TRACE, 16)
    assert span.parent is not None and span.parent.span_id == int(PARENT, 16)
    assert span.parent.is_remote
    assert span.context.span_id != int(PARENT, 16)
    assert span.context.trace_state.get("vendor") == "x"
    assert b.traceparent_linked == 1
    bad = b.build(exchange_record(headers=[("traceparent", f"00-{'0' * 32}-{PARENT}-01")]))
    assert bad.parent is None and bad.context.trace_id != 0
    assert b.traceparent_invalid == 1
    # Encodable as OTLP protobuf, parent id and all.
    request = encode_spans([span, bad])
    pb = request.resource_spans[0].scope_spans[0].spans[0]
    assert pb.trace_id.hex() == TRACE and pb.parent_span_id.hex() == PARENT
    assert request.resource_spans[0].scope_spans[0].scope.name == "tlscap"


@pytest.mark.parametrize(
    "value,ok",
    [
        (f"00-{TRACE}-{PARENT}-01", True),
        (f"00-{TRACE}-{PARENT}-00", True),
        (f"01-{TRACE}-{PARENT}-01-future", True),
        (f"00-{TRACE}-{PARENT}-01-extra", False),
        (f"ff-{TRACE}-{PARENT}-01", False),
        (f"00-{TRACE.upper()}-{PARENT}-01", False),
        (f"00-{TRACE}-{'0' * 16}-01", False),
        ("garbage", False),
    ],
)
def test_parse_traceparent(value: str, ok: bool) -> None:
    assert (parse_traceparent(value) is not None) is ok


def test_split_target() -> None:
    assert split_target("/a/b?x=1#frag") == ("/a/b", "x=1")
    assert split_target("/a") == ("/a", None)
    assert split_target("https://h:1/p?q") == ("/p", "q")


def test_unanswered_request_and_non_exchange_records() -> None:
    b = SpanBuilder()
    span = b.build(exchange_record(response=False))
    assert (span.start_time, span.end_time) == (T0, T0 + 1_000)
    assert "http.response.status_code" not in dict(span.attributes)
    assert b.build(Record(type="data", ts_ns=T0)) is None


class FakeExporter:
    def __init__(self) -> None:
        self.up = True
        self.batches: list[list] = []
        self.calls = 0
        self.shut = False
        self.called = threading.Event()

    def export(self, spans):
        self.calls += 1
        self.called.set()
        if not self.up:
            return SpanExportResult.FAILURE
        self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True


def wait_until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sink_batches_and_ignores_other_records() -> None:
    exp = FakeExporter()
    sink = OtlpSink(exp, batch_size=3, flush_interval=0.05)
    sink.write(Record(type="data", ts_ns=T0))
    for _ in range(7):
        sink.write(exchange_record())
    wait_until(lambda: sink.exported == 7)
    assert sorted(len(b) for b in exp.batches)[-1] <= 3
    sink.close()
    assert exp.shut
    assert sink.stats()["otlp_spans_exported"] == 7
    assert sink.stats()["otlp_spans_dropped"] == 0


def test_sink_down_drops_counts_backs_off_and_recovers() -> None:
    exp = FakeExporter()
    exp.up = False
    sink = OtlpSink(exp, max_queue=5, batch_size=2, flush_interval=0.02,
                    backoff=Backoff(initial=0.3, maximum=0.3, jitter=0))  # fmt: skip
    t = time.monotonic()
    for _ in range(2):
        sink.write(exchange_record())
    wait_until(lambda: sink.failures == 1)
    # In backoff: writes never block; past the bound they are dropped, counted.
    for _ in range(10):
        sink.write(exchange_record())
    assert time.monotonic() - t < 0.3
    assert sink.stats()["otlp_queue_depth"] == 5
    calls = exp.calls
    time.sleep(0.15)
    assert exp.calls == calls, "no export attempt inside the backoff"
    exp.up = True
    wait_until(lambda: sink.exported == 5)
    s = sink.stats()
    assert s["otlp_export_failures"] == 1
    assert s["otlp_spans_dropped"] == 2 + 5  # the failed batch, and the overflow
    sink.close()


def test_sink_close_while_down_is_prompt_and_counts_the_queue() -> None:
    exp = FakeExporter()
    exp.up = False
    sink = OtlpSink(exp, batch_size=1, flush_interval=0.01,
                    backoff=Backoff(initial=10, maximum=10))  # fmt: skip
    sink.write(exchange_record())
    wait_until(lambda: sink.failures == 1)
    sink.write(exchange_record())
    sink.write(exchange_record())
    t = time.monotonic()
    sink.close()
    assert time.monotonic() - t < 1.0
    assert sink.stats()["otlp_spans_dropped"] == 3
