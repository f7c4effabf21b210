"""What the L7 stage (HTTP parsing + redaction) adds to the record path: RecordWriter.write
without a stage, with redaction only (--l7 off), and with parsing and redaction (the
default), side by side in one run, on the data records of real-shaped conversations;
and the L7 stage alone (L7Stage.process, parsing + default redaction) in exchanges/s.

    .venv/bin/python bench/l7_cost.py [--exchanges 5000] [--body 1024] [--rounds 5] [--json]
        [--workloads http1,http2,grpc,bulk]

Before/after comparisons: PYTHONPATH=/path/to/other/checkout runs this script against
that checkout's `agent` package (the path in use is printed).

Workloads (each exchange is one request record and one response record, as curl and
a server write them):
- http1: keep-alive GET with an Authorization header, a JSON body of --body bytes
- http2: curl-like GET streams on one connection (the h2 library makes the bytes)
- grpc:  unary calls with a --body byte message each way
- bulk:  one 16 KiB-record HTTP/1 download of 64 MiB (what parsing a large body costs)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # also puts the repository (or PYTHONPATH's checkout) on sys.path
import h2.config
import h2.connection
import h2.events

import agent
from agent.l7.connection import L7Options
from agent.l7.stage import L7Stage
from agent.records.record import Endpoint, Record
from agent.records.writer import RecordWriter
from agent.redact.rules import DEFAULT_RULES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exchanges", type=int, default=5000)
    p.add_argument("--body", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--workloads", default="http1,http2,grpc,bulk")
    return p.parse_args(argv)


def records_of(chunks: list[tuple[str, bytes]], conn_id: str = "c1") -> list[Record]:
    offsets = {"egress": 0, "ingress": 0}
    out = []
    for i, (direction, data) in enumerate(chunks):
        out.append(
            Record(type="data", ts_ns=1_000_000 * (i + 1), pid=1, comm="curl", source="openssl",
                   conn_id=conn_id, fd=3, local=Endpoint("127.0.0.1", 5000),
                   remote=Endpoint("127.0.0.1", 443), role="client", direction=direction,
                   offset=offsets[direction], len=len(data), captured_len=len(data), data=data)
        )  # fmt: skip
        offsets[direction] += len(data)
    return out


def http1_chunks(n: int, body: int) -> list[tuple[str, bytes]]:
    payload = b'{"k":"' + b"v" * max(0, body - 8) + b'"}'
    request = (b"GET /api/items HTTP/1.1\r\nHost: api.example\r\nUser-Agent: curl/7.88\r\n"
               b"Accept: */*\r\nAuthorization: Bearer 0123456789abcdef\r\n\r\n")  # fmt: skip
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s") % (len(payload), payload)  # fmt: skip
    return [c for _ in range(n) for c in (("egress", request), ("ingress", response))]


def h2_chunks(n: int, body: int, grpc: bool) -> list[tuple[str, bytes]]:
    """n request/response streams on one HTTP/2 connection, as each side writes them."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    message = b"\x00" + body.to_bytes(4, "big") + b"x" * body
    chunks: list[tuple[str, bytes]] = []

    def client_writes() -> None:
        out = client.data_to_send()
        if out:
            chunks.append(("egress", out))
            for ev in server.receive_data(out):
                if isinstance(ev, h2.events.DataReceived):
                    server.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    respond(ev.stream_id)

    def server_writes() -> None:
        out = server.data_to_send()
        if out:
            chunks.append(("ingress", out))
            for ev in client.receive_data(out):
                if isinstance(ev, h2.events.DataReceived):
                    client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)

    def respond(sid: int) -> None:
        extra = [("content-type", "application/grpc")] if grpc else []
        server.send_headers(sid, [(":status", "200"), *extra])
        server.send_data(sid, message if grpc else b"y" * body, end_stream=not grpc)
        if grpc:
            server.send_headers(sid, [("grpc-status", "0")], end_stream=True)

    client_writes()
    server_writes()
    for _ in range(n):
        sid = client.get_next_available_stream_id()
        headers = [
            (":method", "POST" if grpc else "GET"),
            (":scheme", "https"),
            (":path", "/shop.Cart/Add" if grpc else "/api/items"),
            (":authority", "api.example"),
            ("authorization", "Bearer 0123456789abcdef"),
        ]
        if grpc:
            headers += [("content-type", "application/grpc"), ("te", "trailers")]
        client.send_headers(sid, headers, end_stream=not grpc)
        if grpc:
            client.send_data(sid, message, end_stream=True)
        client_writes()
        server_writes()
        client_writes()  # window updates
    return chunks


def bulk_chunks(size_mb: int = 64, record: int = 16384) -> list[tuple[str, bytes]]:
    total = size_mb << 20
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total
    chunks = [("egress", b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"), ("ingress", head)]
    block = bytes(range(256)) * (record // 256)
    chunks += [("ingress", block)] * (total // record)
    return chunks


class DropSink:
    """A sink that keeps nothing: RecordWriter leaves a redaction-only stage out when
    there is no sink at all (nothing to protect), which would time nothing."""

    def write(self, record: Record) -> None:
        pass

    def write_many(self, records: list[Record]) -> None:
        pass

    def close(self) -> None:
        pass


def time_writes(make_stage, chunks: list[tuple[str, bytes]]) -> float:
    """Seconds for one pass of fresh records through a RecordWriter with this stage."""
    records = records_of(chunks)
    writer = RecordWriter([DropSink()], "a", "n", l7=make_stage())
    t0 = time.perf_counter()
    for r in records:
        writer.write(r)
    writer.close()
    return time.perf_counter() - t0


def time_stage(chunks: list[tuple[str, bytes]]) -> float:
    """Seconds for one pass of fresh records through the L7 stage alone (parsing and
    default redaction), its end-of-run flush included."""
    records = records_of(chunks)
    stage = L7Stage(L7Options(parse=True, rules=DEFAULT_RULES))
    process = stage.process
    t0 = time.perf_counter()
    for r in records:
        process(r)
    stage.flush()
    return time.perf_counter() - t0


MODES = {
    "none": lambda: None,
    "redact": lambda: L7Stage(L7Options(parse=False, rules=DEFAULT_RULES)),
    "parse+redact": lambda: L7Stage(L7Options(parse=True, rules=DEFAULT_RULES)),
}


def run(args: argparse.Namespace) -> dict:
    makers = {
        "http1": lambda: (http1_chunks(args.exchanges, args.body), args.exchanges),
        "http2": lambda: (h2_chunks(args.exchanges, args.body, grpc=False), args.exchanges),
        "grpc": lambda: (h2_chunks(args.exchanges, args.body, grpc=True), args.exchanges),
        "bulk": lambda: (bulk_chunks(), 1),
    }
    out = {}
    for name in args.workloads.split(","):
        chunks, exchanges = makers[name]()
        times: dict[str, list[float]] = {m: [] for m in (*MODES, "stage")}
        for _ in range(args.rounds):
            for mode, make in MODES.items():  # side by side in each round
                times[mode].append(time_writes(make, chunks))
            times["stage"].append(time_stage(chunks))
        med = {m: bl.median(t) for m, t in times.items()}
        nbytes = sum(len(d) for _, d in chunks)
        out[name] = {
            "records": len(chunks),
            "exchanges": exchanges,
            "mb": nbytes / 1e6,
            **{f"{m}_us_per_exchange": med[m] / exchanges * 1e6 for m in MODES},
            **{f"{m}_mb_s": nbytes / med[m] / 1e6 for m in MODES},
            "redact_ratio": med["redact"] / med["none"],
            "parse_ratio": med["parse+redact"] / med["none"],
            "stage_us_per_exchange": med["stage"] / exchanges * 1e6,
            "stage_exchanges_per_s": exchanges / med["stage"],
            "stage_exchanges_per_s_rounds": [exchanges / t for t in times["stage"]],
        }
    return out


def main() -> None:
    args = parse_args()
    result = run(args)
    if args.json:
        import json

        print(json.dumps({"agent": str(Path(agent.__file__).parent), **result}, indent=2))
        return
    print(f"agent code: {Path(agent.__file__).parent}")
    print(f"{'workload':8} {'records':>8} {'MB':>6} {'none µs/ex':>11} {'redact µs/ex':>13} "
          f"{'parse+redact µs/ex':>19} {'parse+redact MB/s':>18} {'stage ex/s':>11}")  # fmt: skip
    for name, r in result.items():
        print(f"{name:8} {r['records']:>8} {r['mb']:>6.1f} {r['none_us_per_exchange']:>11.1f} "
              f"{r['redact_us_per_exchange']:>13.1f} {r['parse+redact_us_per_exchange']:>19.1f} "
              f"{r['parse+redact_mb_s']:>18.0f} {r['stage_exchanges_per_s']:>11.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
