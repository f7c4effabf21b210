"""Records/s and latency from an agent's exporter through the collector to a subscriber.

Three processes, as in production: a producer (the agent's GrpcExporter fed
synthetic 1 KiB data records, as fast as it takes them or at a fixed rate), a
`tlscap collector` storing into SQLite, and a live subscriber (this process)
counting what arrives and when.  Measured:

- throughput: N records written flat out; records/s from the first write to the
  last record stored (acked) and to the last record received by the subscriber;
- latency: at fixed rates, capture-time (the record's ts_ns, set at write) to
  subscriber-receipt, p50/p99 — this includes the exporter's batching linger.

    .venv/bin/python bench/collector_path.py [--records 200000] [--rates 2000,10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from agent.records.record import Endpoint, Record  # noqa: E402
from agent.schema import pb, pb_grpc  # noqa: E402


def synthetic(seq: int, payload: bytes, agent_id: str) -> Record:
    return Record(
        type="data", ts_ns=time.time_ns(), agent_id=agent_id, node="bench", seq=seq,
        pid=1000, tid=1000, comm="bench", source="openssl", conn_id="1000-5-1", fd=5,
        local=Endpoint("127.0.0.1", 40000), remote=Endpoint("127.0.0.1", 443), role="client",
        direction="egress", offset=seq * len(payload), len=len(payload),
        captured_len=len(payload), data=payload,
    )  # fmt: skip


def producer(args: argparse.Namespace) -> int:
    """Child process: an exporter writing `--records` records (at `--rate`, 0 = flat out)."""
    from agent.export.exporter import GrpcExporter

    payload = os.urandom(args.payload)
    with tempfile.TemporaryDirectory() as spool:
        exp = GrpcExporter(
            args.target,
            channel_factory=lambda: grpc.insecure_channel(args.target),
            spool_dir=spool,
        )
        agent_id = f"bench-{os.getpid()}"
        t0 = time.perf_counter()
        for seq in range(1, args.records + 1):
            if args.rate:
                due = t0 + seq / args.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            exp.write(synthetic(seq, payload, agent_id))
        t_written = time.perf_counter()
        exp.close(timeout=120)
        t_acked = time.perf_counter()
        print(json.dumps({
            "written_s": t_written - t0, "acked_s": t_acked - t0, **exp.stats(),
        }), flush=True)  # fmt: skip
    return 0


class Subscriber:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.call = pb_grpc.CollectorStub(self.channel).Subscribe(pb.SubscribeRequest(live=True))
        self.count = 0
        self.missed = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.latencies_ns: list[int] = []
        self.sample_every = 1
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for resp in self.call:
                now_ns = time.time_ns()
                if resp.WhichOneof("event") == "lagged":
                    self.missed += resp.lagged.missed
                    continue
                records = resp.records.records
                if not records:
                    continue
                if not self.count:
                    self.first_at = time.perf_counter()
                for r in records[:: self.sample_every]:
                    self.latencies_ns.append(now_ns - r.ts_ns)
                self.count += len(records)
                self.last_at = time.perf_counter()
        except grpc.RpcError:
            pass

    def reset(self) -> None:
        self.count, self.missed, self.latencies_ns = 0, 0, []

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def run_producer(target: str, records: int, rate: int, payload: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--producer", "--target", target, "--records", str(records),
         "--rate", str(rate), "--payload", str(payload)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"producer failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_count(sub: Subscriber, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sub.count + sub.missed < n and time.monotonic() < deadline:
        time.sleep(0.01)


def latency_at_rates(target: str, sub: Subscriber, args: argparse.Namespace) -> list[dict]:
    """Capture-to-subscriber latency at each of args.rates (records/s), for
    args.latency_seconds each: p50, p99 and mean in ms."""
    out = []
    for rate in args.rates:
        sub.reset()
        n = int(rate * args.latency_seconds)
        run_producer(target, n, rate, args.payload)
        wait_count(sub, n, 60)
        lat = sub.latencies_ns
        out.append({
            "rate": rate, "records": n, "received": sub.count, "missed": sub.missed,
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "mean_ms": statistics.fmean(lat) / 1e6 if lat else float("nan"),
        })  # fmt: skip
    return out


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1e6


def run(args: argparse.Namespace) -> dict:
    results: dict = {"payload": args.payload}
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "addr"
        collector = subprocess.Popen(
            [sys.executable, "-m", "agent", "collector", "--listen", "127.0.0.1:0",
             "--store", f"{tmp}/bench.db", "--insecure", "--allow-anonymous-subscribe",
             "--ready-file", str(ready),
             "--subscriber-queue", "1000000"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        sub = None
        try:
            deadline = time.monotonic() + 30
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            target = ready.read_text().strip()
            sub = Subscriber(target)
            time.sleep(0.5)

            # Throughput, flat out.
            t0 = time.perf_counter()
            prod = run_producer(target, args.records, args.producer_rate, args.payload)
            wait_count(sub, args.records, 120)
            elapsed_sub = sub.last_at - t0 if sub.count else float("nan")
            results["throughput"] = {
                "records": args.records,
                "offered_rate": args.producer_rate,
                "acked": prod["export_acked_records"],
                "dropped_by_exporter": prod["export_lost_records"],
                "written_per_s": args.records / prod["written_s"],
                "acked_per_s": prod["export_acked_records"] / prod["acked_s"],
                "received_per_s": sub.count / elapsed_sub,
                "received": sub.count,
                "missed_by_subscriber": sub.missed,
                "producer": prod,
            }
            results["latency"] = latency_at_rates(target, sub, args)
        finally:
            if sub is not None:
                sub.close()
            collector.send_signal(signal.SIGTERM)
            try:
                collector.wait(30)
            except subprocess.TimeoutExpired:
                collector.kill()
    return results


def print_table(r: dict) -> None:
    t = r["throughput"]
    offered = f"at {t['offered_rate']}/s" if t["offered_rate"] else "flat out"
    print(f"payload {r['payload']} B, {t['records']} records offered {offered}:")
    print(f"  exporter took      {t['written_per_s']:>9,.0f} records/s")
    print(f"  collector stored   {t['acked_per_s']:>9,.0f} records/s (acked end to end; "
          f"{t['dropped_by_exporter']} dropped and counted by the exporter)")  # fmt: skip
    print(f"  subscriber got     {t['received_per_s']:>9,.0f} records/s "
          f"({t['received']} received, {t['missed_by_subscriber']} missed)")  # fmt: skip
    print("latency, capture -> subscriber (includes the exporter's 20 ms linger):")
    for x in r["latency"]:
        print(f"  {x['rate']:>6}/s: p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms "
              f"({x['received']}/{x['records']} received, {x['missed']} missed)")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument(
        "--producer-rate",
        type=int,
        default=0,
        help="records/s the producer offers in the throughput run (0 = flat out; the "
        "exporter then drops, and counts, what its queue cannot hold)",
    )
    p.add_argument("--payload", type=int, default=1024)
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 10000])
    p.add_argument("--latency-seconds", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--producer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.producer:
        return producer(args)
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
