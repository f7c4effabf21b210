"""How fast can TLS writes go with tlscap capturing every byte (zero lost events)?

For each write size the load generator (ssl_write_loop, one or more instances) first
runs flat out for a few seconds under `tlscap run --pid ...`; the agent's final stats
tell whether anything was lost.  If it was, a short bisection over paced rates finds the
highest rate that is captured with lost == 0 *and* without a growing backlog (the agent
still had less than --max-backlog seconds of events queued when the writers stopped:
a big ring can hide, for a few seconds, an agent that is falling behind).

Last, the same flat-out run with a tiny ring (--ringbuf-mb 1) shows that loss is
counted, not silent: the bytes captured plus the bytes the kernel reports lost add up
to the bytes written.

--go measures Go's crypto/tls.(*Conn).Write instead of OpenSSL's SSL_write: the load
generator is then go_tls_write_loop.go (same flags and result line), built with the
venv's current Go (`--go pypi`) or Debian's Go 1.19 (`--go debian`).

    .venv/bin/python bench/throughput.py [--go pypi|debian] [--sizes 256,4096,16384]
        [--duration 3] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl


def one_run(
    args: argparse.Namespace,
    binary: Path,
    workdir: Path,
    size: int,
    rate: float = 0.0,
    ringbuf_mb: int | None = None,
) -> dict:
    """`clients` load generators for `duration` s at `rate` calls/s each (0: flat out)."""
    lg_args = ["--size", str(size), "--duration", str(args.duration)]
    if rate > 0:
        lg_args += ["--rate", f"{rate / args.clients:.1f}"]
    extra = [f"--ringbuf-mb={ringbuf_mb}"] if ringbuf_mb else []
    runs: list[bl.LoadgenRun] = []
    try:
        for _ in range(args.clients):
            runs.append(bl.start_loadgen(binary, lg_args))
        pids = [r.pid for r in runs]
        with bl.running_agent(workdir, pids=pids, extra=extra) as agent:
            foreign = bl.foreign_bpf_attachments({os.getpid(), agent.proc.pid})
            t0 = time.monotonic()
            for r in runs:
                r.send_go()
            results = [r.wait_result(timeout=args.duration + 30) for r in runs]
            wall = time.monotonic() - t0
            backlog_s = bl.wait_for_records(agent.output, sum(r["calls"] for r in results))
            # CPU from ready until the writers' events were written (not the detach at exit).
            agent_cpu = agent.cpu_seconds() - agent.cpu_at_ready_s
            stop_s = agent.stop()
        cap = bl.read_capture(agent.output)
        agent.output.unlink(missing_ok=True)
    finally:
        for r in runs:
            bl.kill_tree(r.proc)
    calls = sum(r["calls"] for r in results)
    written = sum(r["bytes_written"] for r in results)
    seconds = max(r["seconds"] for r in results)
    st = cap.stats
    captured = sum(cap.egress_captured.get(p, 0) for p in pids)
    lost_bytes = st.get("kernel_lost_bytes", 0) + st.get("kernel_truncated_bytes", 0)
    return {
        "size": size,
        "clients": args.clients,
        "target_rate": rate or None,
        "ringbuf_mb": ringbuf_mb or 64,
        "calls": calls,
        "calls_per_s": calls / seconds,
        "mb_per_s": written / seconds / 1e6,
        "bytes_written": written,
        "wall_s": round(wall, 3),
        "lost": st.get("lost"),
        "kernel_lost_events": st.get("kernel_lost_events"),
        "kernel_lost_bytes": st.get("kernel_lost_bytes"),
        "events": st.get("events"),
        "incomplete_calls": st.get("incomplete_calls"),
        "decode_errors": st.get("decode_errors"),
        "data_records": cap.data_records,
        "captured_egress_calls": sum(cap.egress_calls.get(p, 0) for p in pids),
        "captured_egress_bytes": captured,
        # Every byte written is either captured or counted lost.
        "accounted": captured + lost_bytes == written,
        "backlog_s": round(backlog_s, 3),
        "agent_stop_s": round(stop_s, 3),
        "agent_cpu_s": round(agent_cpu, 3),
        "agent_us_per_event": round(agent_cpu / st["events"] * 1e6, 2)
        if st.get("events")
        else None,
        "foreign_probes": foreign,
    }


def kept_up(run: dict, max_backlog: float) -> bool:
    return run["lost"] == 0 and run["backlog_s"] <= max_backlog and run["accounted"]


def describe(run: dict) -> str:
    rate = f"paced {run['target_rate']:.0f}/s" if run["target_rate"] else "flat out"
    return (
        f"size {run['size']:>6} {rate:<16} ring {run['ringbuf_mb']:>2} MiB: "
        f"{run['calls_per_s']:>9.0f} calls/s {run['mb_per_s']:>8.1f} MB/s  "
        f"lost {run['lost']:>6}  events {run['events']:>7}  incomplete {run['incomplete_calls']}"
        f"  backlog {run['backlog_s']:.2f} s  agent {run['agent_us_per_event']} us/event"
        f"{'' if run['accounted'] else '  NOT ACCOUNTED (captured + lost != written)'}"
    )


def measure_size(args: argparse.Namespace, binary: Path, workdir: Path, size: int) -> dict:
    runs = []
    flat = one_run(args, binary, workdir, size)
    runs.append(flat)
    log(args, describe(flat))
    out: dict = {"size": size, "flat_out": flat}
    if kept_up(flat, args.max_backlog):
        out["max_zero_loss"] = flat
        out["loss_begins_above"] = None  # the writers could not go faster
    else:
        # Bisect over paced rates between nothing and what the writers reached flat out.
        lo, hi = 0.0, flat["calls_per_s"]
        best = None
        for _ in range(args.steps):
            rate = (lo + hi) / 2
            run = one_run(args, binary, workdir, size, rate=rate)
            runs.append(run)
            log(args, describe(run))
            if kept_up(run, args.max_backlog):
                lo, best = rate, run
            else:
                hi = rate
        out["max_zero_loss"] = best
        out["loss_begins_above"] = hi
    out["runs"] = runs
    return out


def log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    binary = bl.build_go_loadgen(args.go) if args.go else bl.build_loadgen()
    t0 = time.monotonic()
    sizes = []
    with bl.scratch_dir(keep=args.keep) as workdir:
        for size in args.sizes:
            sizes.append(measure_size(args, binary, workdir, size))
        small_ring = None
        if args.small_ring_mb:
            small_ring = one_run(
                args, binary, workdir, args.small_ring_size, ringbuf_mb=args.small_ring_mb
            )
            log(args, describe(small_ring))
    return {
        "benchmark": "gotls_throughput" if args.go else "throughput",
        "machine": bl.machine_info(),
        "args": {
            "call": "crypto/tls.(*Conn).Write" if args.go else "SSL_write",
            "go_toolchain": args.go,
            "loadgen": str(binary),
            "sizes": args.sizes,
            "duration": args.duration,
            "clients": args.clients,
            "steps": args.steps,
            "max_backlog": args.max_backlog,
        },
        "elapsed_s": round(time.monotonic() - t0, 1),
        "sizes": sizes,
        "small_ring": small_ring,
    }


def print_table(result: dict, out=sys.stdout) -> None:
    def p(*x: object) -> None:
        print(*x, file=out)

    a = result["args"]
    p(
        f"tlscap throughput of {a.get('call', 'SSL_write')}: {a['clients']} writer(s), "
        f"{a['duration']} s per run; "
        f"zero loss = lost 0 and backlog <= {a['max_backlog']} s at the writers' end"
    )
    p(
        f"{'size':>6}  {'flat-out calls/s':>16} {'MB/s':>7} {'lost':>7}  "
        f"{'max zero-loss calls/s':>21} {'MB/s':>7}  loss above"
    )
    for s in result["sizes"]:
        f, m = s["flat_out"], s["max_zero_loss"]
        mz = f"{m['calls_per_s']:>21.0f} {m['mb_per_s']:>7.1f}" if m else f"{'none found':>29}"
        above = s["loss_begins_above"]
        above_s = "-" if above is None else f"{above:.0f} calls/s"
        p(
            f"{s['size']:>6}  {f['calls_per_s']:>16.0f} {f['mb_per_s']:>7.1f} {f['lost']:>7}  "
            f"{mz}  {above_s}"
        )
    sr = result.get("small_ring")
    if sr:
        p(
            f"small ring ({sr['ringbuf_mb']} MiB, {sr['size']} B flat out): lost {sr['lost']} "
            f"events ({sr['kernel_lost_bytes']} B), incomplete calls {sr['incomplete_calls']}; "
            f"captured + counted-lost bytes == written: {sr['accounted']}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[256, 4096, 16384],
        help="write sizes in bytes (comma-separated)",
    )
    p.add_argument("--duration", type=float, default=3.0, help="seconds of writing per run")
    p.add_argument("--clients", type=int, default=1, help="load generators writing at once")
    p.add_argument("--steps", type=int, default=4, help="bisection steps when flat out loses")
    p.add_argument(
        "--max-backlog",
        type=float,
        default=0.5,
        help="seconds the agent may still be draining after the writers stop",
    )
    p.add_argument("--small-ring-mb", type=int, default=1, help="0 skips the small-ring run")
    p.add_argument("--small-ring-size", type=int, default=16384)
    p.add_argument(
        "--go",
        choices=("pypi", "debian"),
        help="measure Go crypto/tls Writes (go_tls_write_loop built with this toolchain)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 8:
        p.error("--duration must be in (0, 8] s (each run is kept under ~10 s)")
    if args.clients < 1 or args.steps < 0:
        p.error("--clients must be >= 1 and --steps >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
