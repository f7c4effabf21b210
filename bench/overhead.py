"""Per-call SSL_write overhead of tlscap next to the floor any uprobe tool pays.

Modes, measured round-robin in one run so that machine noise hits all of them alike:

  baseline   no probes
  empty      an empty bcc uprobe on SSL_write in libssl.so.3 (the floor of any uprobe tool)
  empty_ret  the same plus an empty uretprobe (the floor of a tool that needs the return
             value, as every SSL_read capture does)
  tlscap     the real agent: `tlscap run --output jsonl --pid <load generator>`

Each sample is one ssl_write_loop process doing WARMUP + COUNT SSL_writes of SIZE bytes
over loopback TLS 1.3; its median per-call latency is the sample's number.  The report
gives, per mode, the median over rounds and the added latency over the same round's
baseline, and the ratio (tlscap - baseline) / (empty - baseline).  For tlscap it also
checks the agent's stats (lost must be 0) and that the `len` of the egress data records
of the load generator's pid adds up to what it wrote.

    .venv/bin/python bench/overhead.py [--rounds 5] [--count 10000] [--size 4096] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl

ALL_MODES = (
    "baseline", "empty", "empty_ret", "empty_emul", "empty_worker_ret", "tlscap", "tlscap_entry"
)  # fmt: skip
DEFAULT_MODES = ("baseline", "empty", "empty_ret", "tlscap")


def is_tlscap(mode: str) -> bool:
    """ "tlscap", or "tlscap@NAME": the agent on the bpf/ variant registered as NAME."""
    return mode in ("tlscap", "tlscap_entry") or mode.startswith("tlscap@")


# tlscap_entry: the agent with every probe on its function's first instruction, as
# before agent/probes/prologue.py (TLSCAP_PROBE_PLACEMENT=entry): the comparison run.
def agent_env(mode: str) -> dict[str, str]:
    return {"TLSCAP_PROBE_PLACEMENT": "entry"} if mode == "tlscap_entry" else {}


EMPTY_PROBE = "int probe(struct pt_regs *ctx) { return 0; }"

# The agent programs one SSL_write runs: its entry and return probes and the write(2)
# OpenSSL makes inside it; with --bpf-stats their run times add up to a per-call cost.
SSL_WRITE_PROGRAMS = {
    "probe_ssl_write_enter": "SSL_write entry",
    "probe_ssl_write_ex_enter": "ssl_write_internal entry",
    "probe_tls_return": "return",
    "tracepoint__syscalls__sys_enter_write": "sys_enter_write",
    "tracepoint__sock__sock_send_length": "sock_send_length",
}


def _ran(ns_per_run: float | None) -> bool:
    """A program's --bpf-stats median exists (NaN: it never ran in any sample)."""
    return ns_per_run is not None and ns_per_run == ns_per_run


class FloorProbe(Protocol):
    """Empty probes that a floor mode (`empty*`) attaches for the length of one sample."""

    def attach(self, mode: str) -> None: ...

    def detach(self) -> None: ...

    def close(self) -> None: ...


class EmptyProbe:
    """An empty program, compiled once, attached to SSL_write only while a sample runs."""

    def __init__(self) -> None:
        bl.prepare_bcc_env()
        from bcc import BPF

        self.bpf = BPF(text=EMPTY_PROBE)
        self.attached: list[tuple[str, int]] = []
        found = bl.first_emulated_instruction(bl.LIBSSL, "SSL_write")
        self.emulated_offset, self.emulated_insn = found if found else (None, None)
        self.worker = worker_address(bl.LIBSSL, "SSL_write_ex", "SSL_write")

    def attach(self, mode: str) -> None:
        if mode == "empty_worker_ret":
            # Where tlscap now probes SSL_write: its worker's entry (emulated) + return.
            if self.worker is None:
                raise bl.BenchError("no provable worker behind SSL_write")
            self.bpf.attach_uretprobe(name=bl.LIBSSL, addr=self.worker, fn_name="probe")
            self.bpf.attach_uprobe(name=bl.LIBSSL, addr=self.worker, fn_name="probe")
            self.attached += [("worker_return", self.worker), ("worker", self.worker)]
            return
        if mode == "empty_emul":
            if self.emulated_offset is None:
                raise bl.BenchError("no emulated instruction found in SSL_write")
            off = self.emulated_offset
            self.bpf.attach_uprobe(name=bl.LIBSSL, sym="SSL_write", sym_off=off, fn_name="probe")
            self.attached.append(("entry", off))
            return
        self.bpf.attach_uprobe(name=bl.LIBSSL, sym="SSL_write", fn_name="probe")
        self.attached.append(("entry", 0))
        if mode == "empty_ret":
            self.bpf.attach_uretprobe(name=bl.LIBSSL, sym="SSL_write", fn_name="probe")
            self.attached.append(("return", 0))

    def detach(self) -> None:
        for kind, off in reversed(self.attached):
            if kind == "worker_return":
                self.bpf.detach_uretprobe(name=bl.LIBSSL, addr=off)
            elif kind == "worker":
                self.bpf.detach_uprobe(name=bl.LIBSSL, addr=off)
            elif kind == "return":
                self.bpf.detach_uretprobe(name=bl.LIBSSL, sym="SSL_write")
            else:
                self.bpf.detach_uprobe(name=bl.LIBSSL, sym="SSL_write", sym_off=off)
        self.attached.clear()

    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()


def worker_address(lib: str, ex: str, plain: str) -> int | None:
    """The worker tlscap probes instead of `plain`/`ex` (agent/probes/prologue.py)."""
    from agent.probes.prologue import FunctionReader, worker_placement

    reader = FunctionReader(lib)
    ex_code, plain_code = reader.function(ex), reader.function(plain)
    if ex_code is None or plain_code is None:
        return None
    placement, _ = worker_placement(ex_code, plain_code, reader.read, reader.import_name)
    return placement.address if placement else None


def one_sample(
    mode: str,
    args: argparse.Namespace,
    binary: Path,
    probe: FloorProbe | None,
    workdir: Path,
    latency_key: str = "ssl_write",
    loadgen_extra: tuple[str, ...] = (),
) -> dict:
    """One load generator run in `mode`; latency_key names its per-call latency object."""
    loadgen_args = ["--count", str(args.count), "--warmup", str(args.warmup)]
    loadgen_args += ["--size", str(args.size), *loadgen_extra]
    run = bl.start_loadgen(binary, loadgen_args)
    own = {os.getpid()}
    sample: dict = {"mode": mode, "loadavg": bl.loadavg()}
    try:
        if is_tlscap(mode):
            name = mode.partition("@")[2]
            bpf_dir = args.variants.get(name)
            extra = [*args.agent_arg, *args.agent_variants.get(name, ())]
            with bl.running_agent(
                workdir, pids=[run.pid], extra=extra, bpf_dir=bpf_dir,
                env=agent_env(mode),
            ) as agent:  # fmt: skip
                own.add(agent.proc.pid)
                with bl.ForeignProbeMonitor(own) as monitor:
                    result = run.go(timeout=120)
                if args.bpf_stats:
                    sample["bpf_prog_stats"] = bl.bpf_prog_stats(agent.proc.pid)
                sample["agent_drain_s"] = agent.stop()
                sample["agent_ready_s"] = agent.ready_after_s
                # From ready to exit: draining, decoding and writing this sample's events.
                sample["agent_cpu_s"] = agent.total_cpu_s - agent.cpu_at_ready_s
            sample.update(check_capture(agent.output, run.pid, result))
            if not sample["bytes_match"] or sample["agent_stats"].get("lost"):
                sample["agent_log_tail"] = agent.log_tail()  # why, for the report
            agent.output.unlink(missing_ok=True)
        else:
            try:
                if mode.startswith("empty"):
                    assert probe is not None
                    probe.attach(mode)
                with bl.ForeignProbeMonitor(own) as monitor:
                    result = run.go(timeout=120)
            finally:
                if probe is not None:
                    probe.detach()
    finally:
        bl.kill_tree(run.proc)
    sample["loadgen"] = result
    sample["median_ns"] = result[latency_key]["median_ns"]
    sample["mean_ns"] = result[latency_key]["mean_ns"]
    sample["foreign"] = sorted(monitor.seen)
    sample["contaminated"] = bool(monitor.seen)
    return sample


def check_capture(output: Path, pid: int, result: dict) -> dict:
    """The agent's stats and whether its egress records add up to what was written."""
    cap = bl.read_capture(output, check_payload_pids={pid})
    keys = ("events", "records", "bytes", "lost", "kernel_lost_events", "incomplete_calls")
    keys += ("decode_errors", "kernel_calls", "kernel_read_errors", "flow_gaps")
    captured = cap.egress_len.get(pid, 0)
    return {
        "agent_stats": {k: cap.stats.get(k) for k in keys},
        "captured_egress_len": captured,
        "captured_egress_calls": cap.egress_calls.get(pid, 0),
        "payload_mismatches": cap.payload_mismatches,
        "bytes_match": captured == result["bytes_written"],
    }


def summarize(
    samples: list[dict],
    modes: list[str],
    floors: tuple[str, ...] = ("empty", "empty_ret"),
    hot_programs: dict[str, str] = SSL_WRITE_PROGRAMS,
) -> dict:
    """Median over rounds, using only samples no other tool's probes disturbed.

    `added_ns` is the median of paired differences (mode minus the baseline of the same
    round, both clean); `added_of_medians_ns` is the difference of the two medians.
    tlscap is compared with each floor mode in `floors`; `hot_programs` are the agent
    programs one call runs (for the --bpf-stats per-call sum).
    """
    clean = [s for s in samples if not s["contaminated"]]
    by_mode = {m: [s for s in clean if s["mode"] == m] for m in modes}
    base = {s["round"]: s for s in by_mode.get("baseline", [])}
    base_median = bl.median([s["median_ns"] for s in base.values()])
    out: dict = {"modes": {}}
    for m in modes:
        ss = by_mode[m]
        paired = [s["median_ns"] - base[s["round"]]["median_ns"] for s in ss if s["round"] in base]
        paired_mean = [s["mean_ns"] - base[s["round"]]["mean_ns"] for s in ss if s["round"] in base]
        med = bl.median([s["median_ns"] for s in ss])
        out["modes"][m] = {
            "samples": len(ss),
            "median_ns": med,
            "mean_ns": bl.median([s["mean_ns"] for s in ss]),
            "per_round_median_ns": {s["round"]: s["median_ns"] for s in ss},
            "added_ns": bl.median(paired) if paired else med - base_median,
            "added_of_medians_ns": med - base_median,
            "added_mean_ns": bl.median(paired_mean),
            "paired_rounds": len(paired),
        }
    ms = out["modes"]
    out["ratios"] = {}
    for m in (m for m in modes if is_tlscap(m)):
        r: dict = {}
        for floor in floors:
            if floor in ms and ms[floor]["added_ns"] > 0:
                r[f"vs_{floor}"] = ms[m]["added_ns"] / ms[floor]["added_ns"]
        if "empty" in ms:
            t_rounds, e_rounds = ms[m]["per_round_median_ns"], ms["empty"]["per_round_median_ns"]
            r["per_round_vs_empty"] = {
                rnd: (t_rounds[rnd] - base[rnd]["median_ns"])
                / (e_rounds[rnd] - base[rnd]["median_ns"])
                for rnd in sorted(set(t_rounds) & set(e_rounds) & set(base))
                if e_rounds[rnd] > base[rnd]["median_ns"]
            }
        out["ratios"][m] = r
    if "vs_empty" in out["ratios"].get("tlscap", {}):
        out["ratio_vs_empty"] = out["ratios"]["tlscap"]["vs_empty"]
    per_run: dict = {}
    for m in (m for m in modes if is_tlscap(m)):
        stats = [s["bpf_prog_stats"] for s in by_mode[m] if s.get("bpf_prog_stats")]
        names = sorted({n for st in stats for n in st})
        per_run[m] = {
            n: bl.median(
                [
                    st[n]["run_time_ns"] / st[n]["run_cnt"]
                    for st in stats
                    if st.get(n, {}).get("run_cnt")
                ]
            )
            for n in names
        }
        # Sum what ran: the placement decides which entry probe that is, and
        # sock_send_length exists on 6.3+ kernels only.
        ran = [per_run[m][h] for h in hot_programs if _ran(per_run[m].get(h))]
        if ran:
            per_run[m]["per_call"] = sum(ran)
    if any(per_run.values()):
        out["bpf_ns_per_run"] = per_run
        out["bpf_hot_programs"] = hot_programs
    out["capture_checks"] = {
        m: {
            "lost": sum(s["agent_stats"].get("lost") or 0 for s in samples if s["mode"] == m),
            "bytes_match": all(s["bytes_match"] for s in samples if s["mode"] == m),
        }
        for m in modes
        if is_tlscap(m)
    }
    if "tlscap" in ms and "tlscap_entry" in ms and ms["tlscap"]["added_ns"] > 0:
        # The headline of issue 23: what the entry placement adds over what the
        # emulated placement adds, same run.
        out["entry_over_placed"] = ms["tlscap_entry"]["added_ns"] / ms["tlscap"]["added_ns"]
    tl = [s for s in samples if s["mode"] == "tlscap"]
    if tl:
        out["tlscap_checks"] = {
            "lost_total": sum(s["agent_stats"].get("lost") or 0 for s in tl),
            "kernel_lost_events_total": sum(
                s["agent_stats"].get("kernel_lost_events") or 0 for s in tl
            ),
            "bytes_match_all_rounds": all(s["bytes_match"] for s in tl),
            "payload_mismatches": sum(s["payload_mismatches"] for s in tl),
            "stats_last_round": tl[-1]["agent_stats"],
            "agent_cpu_s_per_round": [round(s["agent_cpu_s"], 3) for s in tl],
            "agent_ready_s": [round(s["agent_ready_s"], 2) for s in tl],
            "first_failure_agent_log": next(
                (s["agent_log_tail"] for s in tl if s.get("agent_log_tail")), None
            ),
        }
    out["contaminated_samples"] = len(samples) - len(clean)
    return out


def print_table(result: dict, out=sys.stdout) -> None:
    a, s = result["args"], result["summary"]

    def p(*x: object) -> None:
        print(*x, file=out)

    call = a.get("call", "SSL_write")
    p(
        f"{call} of {a['size']} B, {a['count']} timed calls per sample, {a['rounds']} rounds "
        f"round-robin; ns per call (median over rounds of each sample's median)"
    )
    w = max(10, *(len(m) for m in s["modes"]))
    p(f"{'mode':<{w}} {'median':>8} {'added':>7} {'mean':>8} {'n':>2}  per-round medians")
    for m, v in s["modes"].items():
        added = "" if m == "baseline" else f"{v['added_ns']:.0f}"
        rounds = " ".join(f"{x:.0f}" for x in v["per_round_median_ns"].values())
        row = f"{m:<{w}} {v['median_ns']:>8.0f} {added:>7} {v['mean_ns']:>8.0f}"
        p(f"{row} {v['samples']:>2}  {rounds}")
    if "empty_emul" in s["modes"] and a.get("empty_emul_probe"):
        p(
            f"empty_emul: the empty probe on {a['empty_emul_probe']}, an instruction the "
            "kernel emulates (no out-of-line single step)"
        )
    # Results saved before "ratio_goal" existed are OpenSSL runs, whose goal is 1.2.
    goal = a.get("ratio_goal", 1.2)
    for m, r in s["ratios"].items():
        if "vs_empty" in r:
            per = " ".join(f"{x:.2f}" for x in r["per_round_vs_empty"].values())
            goal_note = f"goal <= {goal}; " if goal else ""
            p(
                f"ratio ({m} - baseline) / (empty - baseline) = {r['vs_empty']:.2f}"
                f"  ({goal_note}per round: {per})"
            )
        for key, value in r.items():
            if key.startswith("vs_") and key != "vs_empty":
                floor = key.removeprefix("vs_")
                p(f"ratio ({m} - baseline) / ({floor} - baseline) = {value:.2f}")
    c = s.get("tlscap_checks")
    if c:
        ok = c["lost_total"] == 0 and c["bytes_match_all_rounds"] and not c["payload_mismatches"]
        p(
            f"tlscap: lost={c['lost_total']} kernel_lost_events={c['kernel_lost_events_total']}"
            f" captured egress bytes == written: {c['bytes_match_all_rounds']}"
            f" payload mismatches: {c['payload_mismatches']} -> {'OK' if ok else 'FAIL'}"
        )
        p(
            f"tlscap: agent CPU s after ready, per round: {c['agent_cpu_s_per_round']};"
            f" ready after s: {c['agent_ready_s']}"
        )
        p(f"tlscap stats (last round): {json.dumps(c['stats_last_round'])}")
        if c.get("first_failure_agent_log"):
            p(f"tlscap: agent log of the first failing round:\n{c['first_failure_agent_log']}")
    if s.get("bpf_ns_per_run"):
        p("BPF program run time, ns per run (kernel bpf_stats; excludes the uprobe trap):")
        hot = s.get("bpf_hot_programs", SSL_WRITE_PROGRAMS)
        for m, progs in s["bpf_ns_per_run"].items():
            parts = "  ".join(
                f"{label} {progs[name]:6.0f}"
                for name, label in hot.items()
                if _ran(progs.get(name))
            )
            total = progs.get("per_call", float("nan"))
            p(f"  {m:<{w}} {parts}  = {total:6.0f} per {call}")
    for m, chk in s["capture_checks"].items():
        if m != "tlscap":
            p(f"{m}: lost={chk['lost']} captured egress bytes == written: {chk['bytes_match']}")
    if s["contaminated_samples"]:
        p(
            f"note: {s['contaminated_samples']} sample(s) ran while another process had BPF "
            f"probes attached; they are left out (see `foreign` in --json output)"
        )


def run_rounds(
    args: argparse.Namespace, modes: list[str], take_sample: Callable[[str, Path], dict]
) -> list[dict]:
    """`args.rounds` rounds of one sample per mode, the order rotated every round.

    Waits for a machine without foreign BPF probes before each sample and retakes a
    sample they disturbed (args.retries, args.quiet_budget); take_sample(mode, workdir)
    runs one.
    """
    samples: list[dict] = []
    wait_budget = args.quiet_budget
    with (
        bl.scratch_dir(keep=args.keep) as workdir,
        contextlib.ExitStack() as stack,
    ):
        if args.bpf_stats and not stack.enter_context(bl.bpf_run_time_stats()):
            log(args, "BPF run-time stats unavailable (BPF_ENABLE_STATS refused)")
        for r in range(args.rounds):
            # Rotate the order so that no mode always runs first.
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                for attempt in range(args.retries + 1):
                    t0 = time.monotonic()
                    bl.wait_for_quiet_machine({os.getpid()}, min(wait_budget, 30.0))
                    wait_budget = max(0.0, wait_budget - (time.monotonic() - t0))
                    sample = take_sample(mode, workdir)
                    sample["round"] = r
                    sample["attempt"] = attempt
                    if not sample["contaminated"] or attempt == args.retries:
                        break
                    log(args, f"  round {r} {mode}: other BPF probes appeared, retaking")
                samples.append(sample)
                flag = "  (CONTAMINATED)" if sample["contaminated"] else ""
                log(args, f"  round {r} {mode:<10} median {sample['median_ns']:.0f} ns{flag}")
    return samples


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    binary = bl.build_loadgen()
    modes = list(args.modes)
    probe = EmptyProbe() if any(m.startswith("empty") for m in modes) else None
    t_start = time.monotonic()
    try:
        samples = run_rounds(
            args, modes, lambda mode, workdir: one_sample(mode, args, binary, probe, workdir)
        )
    finally:
        if probe is not None:
            probe.close()
    return {
        "benchmark": "overhead",
        "machine": bl.machine_info(),
        "args": {
            "rounds": args.rounds,
            "count": args.count,
            "warmup": args.warmup,
            "size": args.size,
            "modes": modes,
            "agent_arg": args.agent_arg,
            "variants": {k: str(v) for k, v in args.variants.items()},
            "agent_variants": {k: " ".join(v) for k, v in args.agent_variants.items()},
            "empty_emul_probe": (
                f"SSL_write+{probe.emulated_offset:#x}: {probe.emulated_insn}"
                if probe is not None and probe.emulated_offset is not None
                else None
            ),
        },
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "summary": summarize(samples, modes),
        "samples": samples,
    }


def log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def add_sample_args(
    p: argparse.ArgumentParser,
    call: str,
    all_modes: tuple[str, ...],
    default_modes: tuple[str, ...],
) -> None:
    """The options every per-call overhead script shares (this one, gotls_overhead.py)."""
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--count", type=int, default=10000, help=f"timed {call} calls per sample")
    p.add_argument("--warmup", type=int, default=500, help="untimed calls before them")
    p.add_argument("--size", type=int, default=4096, help=f"bytes per {call}")
    p.add_argument(
        "--modes",
        type=bl.comma_list,
        default=list(default_modes),
        help=f"comma-separated subset of {','.join(all_modes)} (baseline is needed for 'added')",
    )
    p.add_argument(
        "--agent-arg", action="append", default=[], help="extra argument for `tlscap run`"
    )
    p.add_argument(
        "--quiet-budget",
        type=float,
        default=120.0,
        help="seconds, in all, to wait for other processes' BPF probes to go away",
    )
    p.add_argument("--retries", type=int, default=3, help="retakes of a contaminated sample")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also measure mode tlscap@NAME: the agent on the bpf/ copy in DIR",
    )
    p.add_argument(
        "--agent-variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also measure mode tlscap@NAME: the agent with these extra `tlscap run` "
        "arguments (space-separated), e.g. ring2='--ringbuf-mb 2'",
    )
    p.add_argument(
        "--bpf-stats",
        action="store_true",
        help="record the kernel's run time of each agent BPF program (adds a little "
        "overhead to every mode; for attribution, not for the headline numbers)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def check_sample_args(
    p: argparse.ArgumentParser, args: argparse.Namespace, all_modes: tuple[str, ...]
) -> argparse.Namespace:
    """Validate add_sample_args' options; turn each --variant into a tlscap@NAME mode."""
    args.variants = {}
    for v in args.variant:
        name, sep, path = v.partition("=")
        if not sep or not Path(path, "tlscap.h").exists():
            p.error(f"--variant {v!r}: want NAME=DIR with DIR a copy of bpf/")
        args.variants[name] = Path(path).resolve()
        args.modes.append(f"tlscap@{name}")
    args.agent_variants = {}
    for v in args.agent_variant:
        name, sep, extra = v.partition("=")
        if not sep or not name or name in args.variants or name in args.agent_variants:
            p.error(f"--agent-variant {v!r}: want NAME=ARGS with a new NAME")
        args.agent_variants[name] = extra.split()
        args.modes.append(f"tlscap@{name}")
    bad = [m for m in args.modes if m not in all_modes and not m.startswith("tlscap@")]
    if bad:
        p.error(f"unknown mode(s): {bad}")
    if args.rounds < 1 or args.count < 1:
        p.error("--rounds and --count must be positive")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sample_args(p, "SSL_write", ALL_MODES, DEFAULT_MODES)
    return check_sample_args(p, p.parse_args(argv), ALL_MODES)


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
