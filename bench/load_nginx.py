"""A busy node: nginx (1 worker, keep-alive, a 1.5 KiB body) under wrk, both ends captured.

Modes, run round-robin in one run (the order rotates every round):

  none       no capture
  l7_jsonl   tlscap run --comm nginx --comm wrk --output jsonl --output-file F  (L7 on)
  raw_none   tlscap run --comm nginx --comm wrk --l7 off --output none
  l7_jsonl_w2, raw_none_w2   the same with --workers 2 (the pipeline in two processes;
             the agent's CPU is then its own and its workers')
  probes_only  raw_none on bpf_variants.py's `no_emit` copy of bpf/: every probe fires
             and tracks its call, but no call reaches the ring, so the agent has
             nothing to do.  Not a capture: the floor any capture's probes put under
             nginx and wrk, whatever the agent costs.

Per sample: nginx started, then the agent (ready file waited for), then
`wrk -t1 -c<N> -d<S>` with a unique target per request (tests/ebpf/nginx_lab.py).
Reported: req/s (wrk's, and nginx's access log lines over wrk's duration) and the ratio
to the same round's `none`; the agent's CPU per request served (from ready until it
went idle after wrk, and over the wrk window alone, from /proc/<pid>/stat); nginx's
worker CPU per request; `lost` / `kernel_lost_events` (the jsonl stats line, or the
agent's /metrics for --output none, which writes no stats line anywhere); and for
l7_jsonl the exchange records on nginx's and wrk's side against the requests served.

    .venv/bin/python bench/load_nginx.py [--rounds 3] [--seconds 5] [--wrk-connections 16]
        [--modes none,l7_jsonl,raw_none] [--agent-cwd DIR | --pythonpath DIR] [--json]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
import bpf_variants

from tests.ebpf import nginx_lab

MODES = ("none", "l7_jsonl", "raw_none", "l7_jsonl_w2", "raw_none_w2", "probes_only")
DEFAULT_MODES = ("none", "l7_jsonl", "raw_none")
COMMS = ["--comm", "nginx", "--comm", "wrk"]
# /metrics names of the stats keys reported here (agent/health/metrics.py).
METRIC_KEYS = {
    "lost": "tlscap_lost_events_total",
    "kernel_lost_events": "tlscap_kernel_lost_events_total",
    "events": "tlscap_events_total",
    "records": "tlscap_records_total",
    "decode_errors": "tlscap_decode_errors_total",
    # Load shedding (whole connections left out when the agent falls behind), where the
    # agent has it: absent (None) in older versions.
    "shed_connections": "tlscap_shed_connections_total",
    "shed_calls": "tlscap_shed_calls_total",
    # Followed connections cut by a full ring until it drains (one gap each).
    "shed_midstream": "tlscap_shed_midstream_total",
    "flow_gaps": "tlscap_flow_gaps_total",
    # Records the ring refused with room to spare and took on a second try.
    "kernel_ring_retried": "tlscap_kernel_ring_retried_total",
    # How full the ring ever was at a drain: near ring_bytes, the agent itself fell
    # behind; far from it while `lost` > 0, the kernel refused records for another reason.
    "ring_peak_pending_bytes": "tlscap_ring_peak_pending_bytes",
    "ring_bytes": "tlscap_ring_bytes",
}
STATS_KEYS = (*METRIC_KEYS, "incomplete_calls", "l7_exchanges", "l7_gaps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="wrk duration per sample")
    p.add_argument("--wrk-connections", type=int, default=16)
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--body-size", type=int, default=nginx_lab.BODY_SIZE)
    p.add_argument(
        "--modes",
        type=bl.comma_list,
        default=list(DEFAULT_MODES),
        help=f"comma-separated subset of {','.join(MODES)} (none is needed for the ratios)",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--agent-cwd", type=Path, help="run `python -m agent` in DIR (e.g. an old worktree)"
    )
    who.add_argument("--pythonpath", type=Path, help="run the agent with PYTHONPATH=DIR")
    p.add_argument(
        "--agent-arg", action="append", default=[], help="extra argument for `tlscap run`"
    )
    p.add_argument(
        "--idle-limit",
        type=float,
        default=60.0,
        help="seconds to wait, after wrk, for the agent to work off its backlog",
    )
    p.add_argument(
        "--quiet-budget",
        type=float,
        default=60.0,
        help="seconds, in all, to wait for other processes' BPF probes to go away",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print every sample as JSON")
    args = p.parse_args(argv)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s): {bad}")
    if args.rounds < 1 or args.seconds <= 0 or args.wrk_connections < 1:
        p.error("--rounds, --seconds and --wrk-connections must be positive")
    for d in (args.agent_cwd, args.pythonpath):
        if d is not None and not (d / "agent" / "__main__.py").exists():
            p.error(f"{d} has no agent/__main__.py")
    args.command = bl.AgentCommand(
        cwd=args.agent_cwd.resolve() if args.agent_cwd else None,
        pythonpath=args.pythonpath.resolve() if args.pythonpath else None,
    )
    return args


def log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def agent_run_args(mode: str, output: Path, health_port: int) -> list[str]:
    health = ["--health-listen", f"127.0.0.1:{health_port}"]
    if mode.endswith("_w2"):
        return [*agent_run_args(mode[:-3], output, health_port), "--workers", "2"]
    if mode == "l7_jsonl":
        return [*COMMS, "--output", "jsonl", "--output-file", str(output), *health]
    if mode in ("raw_none", "probes_only"):
        return [*COMMS, "--l7", "off", "--output", "none", *health]
    raise ValueError(mode)


def wait_until_idle(pid: int, limit: float, interval: float = 0.25, busy: float = 0.1) -> float:
    """Seconds until process `pid` used less than `busy` of a CPU over `interval` s:
    how long the agent kept working off its backlog after the load stopped."""
    t0 = time.monotonic()
    last = bl.process_tree_cpu_seconds(pid)
    while time.monotonic() - t0 < limit:
        time.sleep(interval)
        now = bl.process_tree_cpu_seconds(pid)
        if now - last < busy * interval:
            return time.monotonic() - t0 - interval
        last = now
    return time.monotonic() - t0


def measured_wrk(
    url: str, args: argparse.Namespace, workdir: Path, sample: dict
) -> nginx_lab.WrkResult:
    """wrk's run, with its own CPU (it is the one child of ours that exits meanwhile)
    and the host's busy share over it put in `sample`: what nginx and the agent left
    of the two CPUs says whether the agent is what holds nginx back."""
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = bl.host_cpu_ticks()
    wrk = nginx_lab.run_wrk(url, args.wrk_connections, args.seconds, workdir, args.wrk_threads)
    busy1, total1 = bl.host_cpu_ticks()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sample["wrk_cpu_s"] = (children1.ru_utime + children1.ru_stime) - (
        children0.ru_utime + children0.ru_stime
    )
    sample["host_busy"] = (busy1 - busy0) / (total1 - total0) if total1 > total0 else None
    return wrk


def one_sample(mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    workdir.mkdir(parents=True)
    sample: dict = {"mode": mode, "loadavg": bl.loadavg()}
    own = {os.getpid()}
    lab = nginx_lab.start_nginx(workdir / "nginx", args.body_size)
    (worker,) = lab.workers
    try:
        if mode == "none":
            worker_cpu0 = bl.process_cpu_seconds(worker)
            with bl.ForeignProbeMonitor(own) as monitor:
                wrk = measured_wrk(lab.url, args, workdir, sample)
            worker_cpu1 = bl.process_cpu_seconds(worker)
        else:
            output = workdir / "capture.jsonl"
            health_port = nginx_lab.free_port()
            run_args = [*agent_run_args(mode, output, health_port), *args.agent_arg]
            bpf_dir = bpf_variants.build_variant("no_emit") if mode == "probes_only" else None
            launch = bl.running_agent_command(workdir, run_args, args.command, bpf_dir=bpf_dir)
            with launch as agent:
                own.add(agent.proc.pid)
                own.update(bl.child_pids(agent.proc.pid))  # --workers: its capture workers
                cpu_before_wrk = agent.cpu_seconds()
                worker_cpu0 = bl.process_cpu_seconds(worker)
                with bl.ForeignProbeMonitor(own) as monitor:
                    wrk = measured_wrk(lab.url, args, workdir, sample)
                worker_cpu1 = bl.process_cpu_seconds(worker)
                cpu_after_wrk = agent.cpu_seconds()
                sample["agent_backlog_s"] = wait_until_idle(agent.proc.pid, args.idle_limit)
                try:
                    metrics = bl.scrape_metrics("127.0.0.1", health_port)
                except OSError as exc:
                    metrics = {}
                    sample["metrics_error"] = str(exc)
                cpu_before_stop = agent.cpu_seconds()
                sample["agent_stop_s"] = agent.stop()
            sample["agent_ready_s"] = agent.ready_after_s
            sample["agent_cpu_s"] = {
                "startup": agent.cpu_at_ready_s,
                "ready_to_wrk": cpu_before_wrk - agent.cpu_at_ready_s,
                "wrk_window": cpu_after_wrk - cpu_before_wrk,
                "ready_to_stop": cpu_before_stop - agent.cpu_at_ready_s,
                "total_with_final_drain": agent.total_cpu_s,
            }
            sample["metrics_before_stop"] = {
                k: int(metrics[name]) if name in metrics else None
                for k, name in METRIC_KEYS.items()
            }
            if mode.startswith("l7_jsonl"):
                found = nginx_lab.read_exchanges(output, lab.pids, wrk.pid)
                sample["stats_from"] = "jsonl stats line"
                sample["agent_stats"] = {k: found.stats.get(k) for k in STATS_KEYS}
                sample["exchanges_server"] = found.server_total
                sample["exchanges_client"] = found.client_total
                served_targets = {e.target for e in lab.served()}
                sample["served_with_server_exchange"] = len(served_targets & found.server.keys())
                sample["capture_mb"] = round(output.stat().st_size / 1e6, 1)
                if not args.keep:
                    output.unlink()
            else:
                # --output none writes the stats record to no sink: /metrics is the only
                # place the counters can be read.
                sample["stats_from"] = "/metrics before SIGINT"
                sample["agent_stats"] = dict(sample["metrics_before_stop"])
            if sample["agent_stats"].get("lost") is None:
                sample["agent_log_tail"] = agent.log_tail()
        served = lab.served_count()
    finally:
        lab.stop()
    sample.update(
        wrk_requests=wrk.requests,
        wrk_duration_s=wrk.duration_s,
        wrk_req_per_s=wrk.req_per_s,
        wrk_errors=wrk.errors,
        served=served,
        log_req_per_s=served / wrk.duration_s,
        nginx_worker_us_per_req=(worker_cpu1 - worker_cpu0) / served * 1e6 if served else None,
        wrk_us_per_req=sample["wrk_cpu_s"] / served * 1e6 if served else None,
        foreign=sorted(monitor.seen),
        contaminated=bool(monitor.seen),
    )
    if mode != "none" and served:
        cpu = sample["agent_cpu_s"]
        sample["agent_us_per_req"] = cpu["ready_to_stop"] / served * 1e6
        sample["agent_us_per_req_wrk_window"] = cpu["wrk_window"] / served * 1e6
        events = sample["agent_stats"].get("events")
        # Per event the agent did handle (the lost ones cost it nothing).
        sample["agent_us_per_event"] = cpu["ready_to_stop"] / events * 1e6 if events else None
    return sample


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    nginx_lab.require_tools()
    modes = list(args.modes)
    samples: list[dict] = []
    budget = args.quiet_budget
    t_start = time.monotonic()
    with bl.scratch_dir(keep=args.keep) as workdir:
        for r in range(args.rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                t0 = time.monotonic()
                bl.wait_for_quiet_machine({os.getpid()}, min(budget, 30.0))
                budget = max(0.0, budget - (time.monotonic() - t0))
                sample = one_sample(mode, args, workdir / f"round{r}-{mode}")
                sample["round"] = r
                samples.append(sample)
                log(args, "  " + sample_line(sample))
    for s in samples:
        base = next((b for b in samples if b["mode"] == "none" and b["round"] == s["round"]), None)
        s["ratio_to_none"] = s["wrk_req_per_s"] / base["wrk_req_per_s"] if base else None
    return {
        "benchmark": "load_nginx",
        "machine": bl.machine_info(),
        "args": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "wrk_connections": args.wrk_connections,
            "wrk_threads": args.wrk_threads,
            "body_size": args.body_size,
            "modes": modes,
            "agent": args.command.describe(),
            "agent_arg": args.agent_arg,
        },
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "summary": summarize(samples, modes),
        "samples": samples,
    }


def summarize(samples: list[dict], modes: list[str]) -> dict:
    """Per mode, medians over rounds (contaminated samples included, and counted)."""
    out: dict = {}
    for m in modes:
        ss = [s for s in samples if s["mode"] == m]

        def med(key: str, ss: list[dict] = ss) -> float:
            return bl.median([s[key] for s in ss if s.get(key) is not None])

        row = {
            "samples": len(ss),
            "contaminated": sum(s["contaminated"] for s in ss),
            "wrk_req_per_s": med("wrk_req_per_s"),
            "log_req_per_s": med("log_req_per_s"),
            "ratio_to_none": med("ratio_to_none"),
            "nginx_worker_us_per_req": med("nginx_worker_us_per_req"),
            "wrk_us_per_req": med("wrk_us_per_req"),
            "host_busy": med("host_busy"),
        }
        if m != "none":
            row["agent_us_per_req"] = med("agent_us_per_req")
            row["agent_us_per_req_wrk_window"] = med("agent_us_per_req_wrk_window")
            row["agent_us_per_event"] = med("agent_us_per_event")
            row["lost_total"] = sum(s["agent_stats"].get("lost") or 0 for s in ss)
            row["kernel_lost_events_total"] = sum(
                s["agent_stats"].get("kernel_lost_events") or 0 for s in ss
            )
            row["shed_connections_total"] = sum(
                s["agent_stats"].get("shed_connections") or 0 for s in ss
            )
        if m.startswith("l7_jsonl"):
            row["served_total"] = sum(s["served"] for s in ss)
            row["exchanges_server_total"] = sum(s["exchanges_server"] for s in ss)
            row["exchanges_client_total"] = sum(s["exchanges_client"] for s in ss)
        out[m] = row
    return out


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def ring_peak(stats: dict) -> str:
    """The ring's peak fill at a drain, in percent of its size."""
    peak, size = stats.get("ring_peak_pending_bytes"), stats.get("ring_bytes")
    return "-" if peak is None or not size else f"{100 * peak / size:.1f}%"


def sample_line(s: dict) -> str:
    line = (
        f"round {s.get('round', '?')} {s['mode']:<9} wrk {s['wrk_req_per_s']:8.0f} req/s, "
        f"log {s['log_req_per_s']:8.0f} req/s"
    )
    if s["mode"] != "none":
        st = s["agent_stats"]
        line += (
            f", agent {fmt(s.get('agent_us_per_req'), '.1f')} us/req, "
            f"lost {st.get('lost')}, ring retried {st.get('kernel_ring_retried')}, "
            f"peak {ring_peak(st)}, shed conns {st.get('shed_connections')}, "
            f"cuts {st.get('shed_midstream')}, gaps {st.get('flow_gaps')}, "
            f"backlog {s['agent_backlog_s']:.1f} s"
        )
    if s["mode"].startswith("l7_jsonl"):
        line += f", exchanges {s['exchanges_server']}/{s['served']} (nginx)"
    return line + ("  (CONTAMINATED)" if s["contaminated"] else "")


def print_table(result: dict) -> None:
    a = result["args"]
    print(
        f"nginx (1 worker, keep-alive, {a['body_size']} B body) under wrk -t{a['wrk_threads']} "
        f"-c{a['wrk_connections']} -d{a['seconds']:g}s, {a['rounds']} round(s) round-robin; "
        f"agent: {a['agent']}"
    )
    head = (
        f"{'rnd':>3} {'mode':<9} {'wrk req/s':>9} {'log req/s':>9} {'ratio':>5} "
        f"{'agent us/req':>12} {'(wrk win)':>9} {'nginx us/req':>12} {'wrk us/req':>10} "
        f"{'host busy':>9} {'lost':>8} "
        f"{'k_lost':>8} {'ring peak':>9} {'backlog s':>9} {'exch nginx/served':>18} "
        f"{'exch wrk/wrk reqs':>18}"
    )
    print(head)
    for s in result["samples"]:
        st = s.get("agent_stats", {})
        srv = cli = ""
        if s["mode"].startswith("l7_jsonl"):
            srv = f"{s['exchanges_server']}/{s['served']}"
            cli = f"{s['exchanges_client']}/{s['wrk_requests']}"
        print(
            f"{s['round']:>3} {s['mode']:<9} {s['wrk_req_per_s']:>9.0f} "
            f"{s['log_req_per_s']:>9.0f} {fmt(s['ratio_to_none'], '.2f'):>5} "
            f"{fmt(s.get('agent_us_per_req'), '.1f'):>12} "
            f"{fmt(s.get('agent_us_per_req_wrk_window'), '.1f'):>9} "
            f"{fmt(s['nginx_worker_us_per_req'], '.1f'):>12} "
            f"{fmt(s.get('wrk_us_per_req'), '.1f'):>10} {pct(s.get('host_busy')):>9} "
            f"{fmt(st.get('lost')):>8} {fmt(st.get('kernel_lost_events')):>8} "
            f"{ring_peak(st):>9} {fmt(s.get('agent_backlog_s'), '.1f'):>9} {srv:>18} {cli:>18}"
            + ("  CONTAMINATED" if s["contaminated"] else "")
        )
    print("medians over rounds:")
    for m, v in result["summary"].items():
        line = (
            f"  {m:<9} wrk {v['wrk_req_per_s']:.0f} req/s, log {v['log_req_per_s']:.0f} req/s, "
            f"ratio {fmt(v['ratio_to_none'], '.2f')}, "
            f"nginx {fmt(v['nginx_worker_us_per_req'], '.1f')} us/req, "
            f"wrk {fmt(v['wrk_us_per_req'], '.1f')} us/req, host busy {pct(v['host_busy'])}"
        )
        if m != "none":
            line += (
                f", agent {fmt(v['agent_us_per_req'], '.1f')} us/req "
                f"({fmt(v['agent_us_per_req_wrk_window'], '.1f')} in the wrk window; "
                f"{fmt(v.get('agent_us_per_event'), '.1f')} per event handled), "
                f"lost {v['lost_total']} (kernel {v['kernel_lost_events_total']}), "
                f"shed connections {v['shed_connections_total']} in all"
            )
        if m.startswith("l7_jsonl"):
            line += (
                f"; exchanges: nginx side {v['exchanges_server_total']}, wrk side "
                f"{v['exchanges_client_total']}, of {v['served_total']} requests served"
            )
        if v["contaminated"]:
            line += f"  [{v['contaminated']} sample(s) ran next to other BPF probes]"
        print(line)
    stats_from = {s["mode"]: s["stats_from"] for s in result["samples"] if "stats_from" in s}
    for m, where in stats_from.items():
        print(f"  {m}: lost/kernel_lost from the {where}")


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
