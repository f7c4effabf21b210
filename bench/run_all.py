"""Run the tlscap benchmarks (`make bench`): per-call overhead and capture throughput, for
OpenSSL's SSL_write and Go's crypto/tls.(*Conn).Write, the collector path, HTTPS
requests/s through proxy mode next to mitmproxy, what capture costs OpenSSL, GnuTLS
and NSS clients downloading a file, and nginx under wrk load with both ends captured.

Prints each benchmark's table and a short summary; --json prints everything as one
JSON object instead, and --save writes it to bench/results/<benchmark>-<date>.json.

    .venv/bin/python bench/run_all.py [--quick] [--json] [--save]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
import collector_path
import gotls_overhead
import library_overhead
import load_nginx
import overhead
import proxy_overhead
import throughput


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and sizes (a smoke run)")
    p.add_argument("--json", action="store_true", help="print all results as one JSON object")
    p.add_argument("--save", action="store_true", help="write bench/results/all-<date>.json")
    args = p.parse_args(argv)
    bl.require_root()

    quiet = ["--quiet"] if args.json else []
    if args.quick:
        ov_args = ["--rounds", "2", "--count", "5000", *quiet]
        tp_args = ["--sizes", "4096", "--duration", "2", "--steps", "2", *quiet]
        go_ov_args = ["--rounds", "2", "--count", "5000", *quiet]
        go_tp_args = ["--go", "pypi", *tp_args, "--small-ring-mb", "0"]
    else:
        ov_args = ["--rounds", "5", "--modes", "baseline,empty,empty_ret,empty_emul,tlscap", *quiet]
        tp_args = [*quiet]
        go_ov_args = ["--rounds", "5", *quiet]
        # The small-ring check is the ring's, not the probes': the OpenSSL run covers it.
        go_tp_args = ["--go", "pypi", "--small-ring-mb", "0", *quiet]

    t0 = time.monotonic()

    def run_one(title: str, module: ModuleType, bench_args: list[str]) -> dict:
        result = module.run(module.parse_args(bench_args))
        if not args.json:
            print(f"== {title} ==")
            module.print_table(result)
            print(flush=True)
        return result

    ov = run_one("overhead", overhead, ov_args)
    tp = run_one("throughput", throughput, tp_args)
    go_ov = run_one("Go crypto/tls overhead", gotls_overhead, go_ov_args)
    go_tp = run_one("Go crypto/tls throughput", throughput, go_tp_args)
    cp_args = ["--records", "50000" if args.quick else "150000", "--producer-rate", "40000"]
    title = "collector path (exporter -> collector -> subscriber)"
    cp = run_one(title, collector_path, cp_args)
    px_args = ["--quick", *quiet] if args.quick else [*quiet]
    px = run_one("proxy mode vs mitmproxy (HTTPS requests/s)", proxy_overhead, px_args)
    lib_args = ["--size-mb", "8" if args.quick else "32", "--rounds", "1" if args.quick else "3"]
    libs = run_one("OpenSSL / GnuTLS / NSS clients, download with and without capture",
                   library_overhead, lib_args)  # fmt: skip
    ln_args = ["--rounds", "1" if args.quick else "3", "--seconds", "3" if args.quick else "5"]
    ln = run_one("nginx under wrk, both ends captured (busy node)", load_nginx, [*ln_args, *quiet])

    s = ov["summary"]
    modes = s["modes"]
    checks = s.get("tlscap_checks", {})
    gs = go_ov["summary"]
    go_modes, go_checks = gs["modes"], gs.get("tlscap_checks", {})
    summary = {
        "baseline_ns_per_call": modes["baseline"]["median_ns"],
        "empty_probe_added_ns": modes["empty"]["added_ns"],
        "empty_probe_with_return_added_ns": modes.get("empty_ret", {}).get("added_ns"),
        "empty_probe_emulated_insn_added_ns": modes.get("empty_emul", {}).get("added_ns"),
        "tlscap_added_ns": modes["tlscap"]["added_ns"],
        "ratio_vs_empty_probe": s.get("ratio_vs_empty"),
        "ratio_goal": 1.2,
        "overhead_lost": checks.get("lost_total"),
        "overhead_bytes_match": checks.get("bytes_match_all_rounds"),
        "throughput_max_zero_loss": zero_loss_rates(tp),
        "go_baseline_ns_per_call": go_modes["baseline"]["median_ns"],
        "go_empty_probe_added_ns": go_modes["empty"]["added_ns"],
        "go_empty_probe_with_rets_added_ns": go_modes["empty_rets"]["added_ns"],
        "go_tlscap_added_ns": go_modes["tlscap"]["added_ns"],
        "go_ratio_vs_empty_probe": gs["ratios"].get("tlscap", {}).get("vs_empty"),
        "go_ratio_vs_empty_probe_with_rets": gs["ratios"].get("tlscap", {}).get("vs_empty_rets"),
        "go_overhead_lost": go_checks.get("lost_total"),
        "go_overhead_bytes_match": go_checks.get("bytes_match_all_rounds"),
        "go_throughput_max_zero_loss": zero_loss_rates(go_tp),
        "small_ring_loss_counted": (tp["small_ring"] or {}).get("accounted"),
        "collector_path_acked_per_s": round(cp["throughput"]["acked_per_s"]),
        "collector_path_latency_ms": {
            str(x["rate"]): {"p50": round(x["p50_ms"], 1), "p99": round(x["p99_ms"], 1)}
            for x in cp["latency"]
        },
        "proxy_mode": proxy_summary(px),
        "library_download_time_ratio": {
            lib: round(r["ratio_with_over_without"], 2) for lib, r in libs["libraries"].items()
        },
        "load_nginx": load_summary(ln),
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    everything = {
        "summary": summary,
        "overhead": ov,
        "throughput": tp,
        "gotls_overhead": go_ov,
        "gotls_throughput": go_tp,
        "collector_path": cp,
        "proxy_overhead": px,
        "library_overhead": libs,
        "load_nginx": ln,
    }
    if args.save:
        out = bl.BENCH_DIR / "results" / f"all-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(everything, indent=1) + "\n")
        print(f"saved {out}", file=sys.stderr)
    if args.json:
        json.dump(everything, sys.stdout, indent=1)
        print()
        return 0
    print("== summary ==")
    ratio = summary["ratio_vs_empty_probe"]
    print(
        f"SSL_write 4 KiB: baseline {summary['baseline_ns_per_call']:.0f} ns/call; "
        f"empty uprobe +{summary['empty_probe_added_ns']:.0f} ns; "
        f"tlscap +{summary['tlscap_added_ns']:.0f} ns; "
        f"ratio {ratio:.2f} (goal <= 1.2)"
        if ratio is not None
        else "ratio: not available (see tables above)"
    )
    print(
        f"tlscap lost {summary['overhead_lost']}, captured bytes match: "
        f"{summary['overhead_bytes_match']}"
    )
    print_zero_loss("SSL_write", summary["throughput_max_zero_loss"])
    print(f"small ring: loss counted, not silent: {summary['small_ring_loss_counted']}")
    go_ratio, go_ratio_rets = (
        summary["go_ratio_vs_empty_probe"],
        summary["go_ratio_vs_empty_probe_with_rets"],
    )
    print(
        f"Go Write 4 KiB: baseline {summary['go_baseline_ns_per_call']:.0f} ns/call; "
        f"empty uprobe +{summary['go_empty_probe_added_ns']:.0f} ns; "
        f"empty entry+RET probes +{summary['go_empty_probe_with_rets_added_ns']:.0f} ns; "
        f"tlscap +{summary['go_tlscap_added_ns']:.0f} ns; ratio vs empty "
        f"{fmt_ratio(go_ratio)}, vs entry+RET floor {fmt_ratio(go_ratio_rets)}"
    )
    print(
        f"Go tlscap lost {summary['go_overhead_lost']}, captured bytes match: "
        f"{summary['go_overhead_bytes_match']}"
    )
    print_zero_loss("Go Write", summary["go_throughput_max_zero_loss"])
    for workload, v in summary["proxy_mode"].items():
        rates = ", ".join(f"{m} {r}" for m, r in v["req_per_s"].items())
        print(
            f"proxy mode, {workload}: req/s {rates}; tlscap/direct "
            f"{fmt_ratio(v['tlscap_vs_direct'])}, tlscap/mitmproxy "
            f"{fmt_ratio(v['tlscap_vs_mitmproxy'])}"
        )
    ratios = ", ".join(f"{lib} x{r}" for lib, r in summary["library_download_time_ratio"].items())
    print(f"download time with capture / without: {ratios}")
    for mode, v in summary["load_nginx"].items():
        extra = (
            "" if mode == "none" else f", agent {v['agent_us_per_req']} us/req, lost {v['lost']}"
        )
        print(f"nginx under wrk, {mode}: {v['req_per_s']} req/s (x{v['ratio_to_none']}){extra}")
    return 0


def load_summary(ln: dict) -> dict:
    """Per load_nginx mode: req/s, ratio to no capture, agent CPU per request, loss."""
    out = {}
    for mode, v in ln["summary"].items():
        row = {"req_per_s": round(v["wrk_req_per_s"]), "ratio_to_none": rounded(v["ratio_to_none"])}
        if mode != "none":
            row["agent_us_per_req"] = round(v["agent_us_per_req"], 1)
            row["lost"] = v["lost_total"]
        out[mode] = row
    return out


def proxy_summary(px: dict) -> dict:
    """Per workload: req/s of each path and tlscap's ratios (None where not measured)."""
    out = {}
    for workload, res in px["summary"].items():
        modes = res["modes"]
        out[workload] = {
            "req_per_s": {m: round(v["req_per_s"]) for m, v in modes.items()},
            "tlscap_vs_direct": rounded(modes.get("tlscap", {}).get("ratio_vs_direct")),
            "tlscap_vs_mitmproxy": rounded(res.get("tlscap_vs_mitmproxy_req_per_s")),
        }
    return out


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def zero_loss_rates(tp: dict) -> dict:
    """Per write size, the highest rate throughput.py found captured with zero loss."""
    return {
        str(x["size"]): (
            {
                "calls_per_s": round(x["max_zero_loss"]["calls_per_s"]),
                "mb_per_s": round(x["max_zero_loss"]["mb_per_s"], 1),
            }
            if x["max_zero_loss"]
            else None
        )
        for x in tp["sizes"]
    }


def print_zero_loss(call: str, rates: dict) -> None:
    for size, v in rates.items():
        if v:
            rate = f"{v['calls_per_s']} calls/s, {v['mb_per_s']} MB/s"
            print(f"zero-loss capture, {size} B {call}s: {rate}")
        else:
            print(f"zero-loss capture, {size} B {call}s: none of the tried rates")


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


if __name__ == "__main__":
    sys.exit(main())
