"""What OTLP export (--otlp-endpoint) costs per exchange, with JSON lines on as well.

    .venv/bin/python bench/otlp_cost.py [--exchanges 5000] [--body 1024] [--rounds 3] [--json]

Side by side in one run, alternating rounds: RecordWriter -> JSON lines only, and
RecordWriter -> JSON lines + the OTLP sink exporting to a real OTLP/gRPC endpoint
(opentelemetry-proto's TraceService, served by grpcio in a separate process so its
CPU is not counted).  Each exchange goes through as a real run hands it over: its
request and response data records, then the exchange record.  The cost is this
process's CPU time (every thread: the drain-side write(), the sink's worker building
spans, the exporter's protobuf encoding and gRPC) from the first write to the end of
close(), which waits until every span is acknowledged; divided by the exchanges.
The difference between the two columns is what OTLP adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # also puts the repository on sys.path

from agent.l7.exchange import Exchange, HttpMessage
from agent.records.record import Endpoint, Record
from agent.records.writer import RecordWriter
from agent.sinks.jsonl import JsonlSink

RECEIVER = """
import sys, threading
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as g
class S(g.TraceServiceServicer):
    spans = 0
    def Export(self, request, context):
        S.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return pb.ExportTraceServiceResponse()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
g.add_TraceServiceServicer_to_server(S(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
print(S.spans, flush=True)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exchanges", type=int, default=5000)
    p.add_argument("--body", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def workload(n: int, body: int) -> list[Record]:
    """n exchanges of 8 connections of 4 processes: data, data, exchange each."""
    out: list[Record] = []
    ts = time.time_ns()
    payload = (b'{"items":[' + b'"x",' * (body // 4))[:body]
    for i in range(n):
        pid, conn = 1000 + i % 4, f"conn-{i % 8}"
        local, remote = Endpoint("10.0.0.1", 40000 + i % 8), Endpoint("198.18.0.2", 443)
        common = dict(pid=pid, comm="client", source="openssl", conn_id=conn, fd=5,
                      local=local, remote=remote, role="client", protocol="http1")  # fmt: skip
        head = (b"GET /api/items?page=%d HTTP/1.1\r\nHost: api.example\r\n"
                b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
                b"User-Agent: bench\r\n\r\n" % i)  # fmt: skip
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body + payload
        for direction, data in (("egress", head), ("ingress", resp)):
            ts += 50_000
            out.append(Record(type="data", ts_ns=ts, direction=direction, data=data,  # type: ignore[arg-type]
                              len=len(data), captured_len=len(data), **common))  # fmt: skip
        ex = Exchange(
            protocol="http1",
            request=HttpMessage(ts_ns=ts - 50_000, end_ts_ns=ts - 50_000, method="GET",
                                target=f"/api/items?page={i}", authority="api.example",
                                version="1.1", complete=True,
                                headers=[("host", "api.example"), ("user-agent", "bench"),
                                         ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736"
                                                         "-00f067aa0ba902b7-01")]),
            response=HttpMessage(ts_ns=ts, end_ts_ns=ts, status=200, reason="OK",
                                 version="1.1", headers=[("content-length", str(body))],
                                 body=payload, body_len=body, complete=True),
            stream_id=i,
        )  # fmt: skip
        out.append(Record(type="exchange", ts_ns=ts, exchange=ex, **common))  # type: ignore[arg-type]
    return out


def one_round(records: list[Record], endpoint: str | None, out_dir: Path) -> dict:
    from agent.otlp.options import add_otlp_arguments, otlp_sink_from_args

    sinks: list = [JsonlSink.open(str(out_dir / "out.jsonl"))]
    otlp = None
    if endpoint:
        p = argparse.ArgumentParser()
        add_otlp_arguments(p)
        args = p.parse_args(["--otlp-endpoint", endpoint, "--otlp-insecure",
                             "--otlp-queue", str(len(records))])  # fmt: skip
        otlp = otlp_sink_from_args(args)
        sinks.append(otlp)
    writer = RecordWriter(sinks, agent_id="bench", node="bench")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for record in records:
        writer.write(record)
    writer.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    result = {"cpu_s": cpu, "wall_s": wall}
    if otlp is not None:
        result.update(otlp.stats())
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        endpoint = f"127.0.0.1:{int(receiver.stdout.readline())}"
        records = workload(args.exchanges, args.body)
        runs: dict[str, list[dict]] = {"jsonl": [], "jsonl+otlp": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                for mode in runs:
                    runs[mode].append(
                        one_round(records, endpoint if "otlp" in mode else None, Path(tmp))
                    )
        receiver.stdin.close()
        received = int(receiver.stdout.readline())
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait()
    n = args.exchanges
    us = {m: statistics.median(r["cpu_s"] for r in rs) / n * 1e6 for m, rs in runs.items()}
    otlp_runs = runs["jsonl+otlp"]
    summary = {
        "exchanges": n,
        "body": args.body,
        "rounds": args.rounds,
        "cpu_us_per_exchange": {m: round(v, 2) for m, v in us.items()},
        "otlp_added_cpu_us_per_exchange": round(us["jsonl+otlp"] - us["jsonl"], 2),
        "spans_exported": sum(r["otlp_spans_exported"] for r in otlp_runs),
        "spans_dropped": sum(r["otlp_spans_dropped"] for r in otlp_runs),
        "spans_received": received,
        "machine": bl.machine_info(),
        "loadavg": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{n} exchanges ({args.body} B bodies), median of {args.rounds} rounds, CPU time:")
    for mode, v in us.items():
        print(f"  {mode:<11} {v:8.1f} µs/exchange")
    print(f"  OTLP adds   {summary['otlp_added_cpu_us_per_exchange']:8.1f} µs/exchange "
          f"({summary['spans_exported']} spans exported, {summary['spans_dropped']} dropped, "
          f"{received} received)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
