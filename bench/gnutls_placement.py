"""What a probe on GnuTLS's receive path costs per gnutls_record_recv, by placement:
gnutls_read_loop (1 KiB reads of a stream of 16 KiB records from its own forked GnuTLS
server) timed with no probe, with empty probes where a tool could put them, and under
the agent in both of its placements.

Modes, round-robin in one run (the order rotated every round, so that noise on a shared
machine hits every mode alike):

  baseline      no probes
  empty_entry   an empty bcc uprobe + uretprobe on gnutls_record_recv's first
                instruction (`sub rsp`: single-stepped; the floor of the entry placement)
  empty_worker  the same at the worker the agent probes instead, _gnutls_recv_int
                (`push r15`: emulated; the floor of the worker placement)
  tlscap        `tlscap run --comm gnutls_read_loo`: probes where the agent places them
  tlscap_entry  the same with TLSCAP_PROBE_PLACEMENT=entry (every probe on its
                function's first instruction)

The library is the libgnutls the load generator links, found as the agent finds system
libraries (agent/probes/targets.py); the worker's address is the agent's own proof for
that file (agent/probes/gnutls_worker.py `find_recv_worker`). When the proof fails,
empty_worker and tlscap are skipped and the reason is printed. Each sample's number is
the loop's wall time per call; "added" is the median over rounds of the mode minus the
same round's baseline. Every tlscap sample must capture every byte the client read, one
record per read that returned data, with `lost` 0.

    .venv/bin/python bench/gnutls_placement.py [--size-mb 32] [--rounds 3] [--read-size 1024]
        [--modes baseline,empty_entry,...] [--json]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl

if TYPE_CHECKING:
    from agent.probes.gnutls_worker import RecvWorker
    from agent.probes.targets import TlsLibrary

LOADGEN_SRC = bl.BENCH_DIR / "gnutls_read_loop.c"
ALL_MODES = ("baseline", "empty_entry", "empty_worker", "tlscap", "tlscap_entry")
WORKER_MODES = ("empty_worker", "tlscap")  # need the proved worker
RECV = "gnutls_record_recv"
EMPTY_PROBE = "int probe(struct pt_regs *ctx) { return 0; }"
# The load generator's comm, as the kernel truncates it (TASK_COMM_LEN 16).
COMM = LOADGEN_SRC.stem[:15]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=32, help="MiB the client reads per sample")
    p.add_argument("--read-size", type=int, default=1024, help="bytes per gnutls_record_recv")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--modes",
        type=bl.comma_list,
        default=list(ALL_MODES),
        help=f"comma-separated subset of {','.join(ALL_MODES)} (baseline is required)",
    )
    p.add_argument(
        "--quiet-budget",
        type=float,
        default=120.0,
        help="seconds, in all, to wait for other processes' BPF probes to go away",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    unknown = [m for m in args.modes if m not in ALL_MODES]
    if unknown or "baseline" not in args.modes:
        p.error(f"--modes: need baseline, from {','.join(ALL_MODES)} (got {unknown or 'none'})")
    return args


def log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


# -- the library, the worker, the load generator -------------------------------------


def build_loadgen() -> Path:
    """Compile gnutls_read_loop.c (gcc -O2) into bench/.build/ unless it is up to date."""
    out = bl.BUILD_DIR / LOADGEN_SRC.stem
    if out.exists() and out.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return out
    if shutil.which("gcc") is None or not Path("/usr/include/gnutls/gnutls.h").exists():
        raise bl.BenchError("needs gcc and the GnuTLS headers (libgnutls28-dev)")
    return bl.compile_c(LOADGEN_SRC, ["-lgnutls"])[0]


def linked_gnutls(binary: Path) -> str:
    """The libgnutls file `binary` loads (ldd)."""
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30).stdout
    for line in ldd.splitlines():
        name, sep, rest = line.strip().partition(" => ")
        if sep and name.startswith("libgnutls.so"):
            path = rest.split(" (")[0].strip()
            if os.path.exists(path):
                return path
    raise bl.BenchError(f"{binary} links no libgnutls (ldd: {ldd.strip()})")


def find_library(binary: Path) -> TlsLibrary:
    """The agent's view (TlsLibrary) of the libgnutls `binary` loads: found among the
    system TLS libraries the way `tlscap run` finds them before anything maps them."""
    from agent.probes.targets import TargetScanner

    linked = linked_gnutls(binary)
    found = [
        lib
        for lib in TargetScanner(exclude_pids=[os.getpid()]).system_libraries()
        if lib.kind == "gnutls" and os.path.samefile(lib.host_path, linked)
    ]
    if not found:
        raise bl.BenchError(
            f"{binary} loads {linked}, which the agent's discovery of system libraries "
            "does not report as a GnuTLS library"
        )
    if RECV not in found[0].symbols:
        raise bl.BenchError(f"{found[0].host_path} defines no {RECV}")
    return found[0]


def find_worker(library: TlsLibrary) -> tuple[RecvWorker | None, str]:
    """(RecvWorker, "") when the agent's proof holds for this file, else (None, why):
    the same call agent/probes/library_probes.py `_plan_gnutls_recv_worker` makes."""
    from agent.probes.gnutls_worker import find_recv_worker
    from agent.probes.prologue import FunctionReader

    reader = FunctionReader(library.host_path)
    return find_recv_worker(library.host_path, library.symbols, reader.import_name)


def read_loop(binary: Path, cert: Path, key: Path, total: int, read_size: int) -> dict:
    """One gnutls_read_loop run: its JSON line."""
    proc = subprocess.run(
        [str(binary), str(cert), str(key), str(total), str(read_size)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if proc.returncode != 0:
        raise bl.BenchError(
            f"{binary.name} exited {proc.returncode}: {proc.stderr.strip()} {proc.stdout.strip()}"
        )
    result = json.loads(proc.stdout)
    if result["bytes"] != total or result["child_status"] != 0:
        raise bl.BenchError(f"{binary.name}: read {result['bytes']} of {total} bytes: {result}")
    return result


# -- the modes -----------------------------------------------------------------------


class EmptyProbes:
    """An empty program, compiled once, attached (uretprobe first, then uprobe, as the
    agent does) at gnutls_record_recv's entry or at the worker for one sample at a time."""

    def __init__(self, path: str, worker: int | None) -> None:
        bl.prepare_bcc_env()
        from bcc import BPF

        self.path = path
        self.worker = worker
        self.bpf = BPF(text=EMPTY_PROBE)
        self.attached: dict | None = None

    def attach(self, mode: str) -> None:
        at = {"sym": RECV} if mode == "empty_entry" else {"addr": self.worker}
        self.bpf.attach_uretprobe(name=self.path, fn_name="probe", **at)
        self.attached = at
        self.bpf.attach_uprobe(name=self.path, fn_name="probe", **at)

    def detach(self) -> None:
        if self.attached is None:
            return
        at, self.attached = self.attached, None
        for detach in (self.bpf.detach_uprobe, self.bpf.detach_uretprobe):
            # The uprobe's attach may have failed, leaving only the uretprobe on.
            with contextlib.suppress(Exception):
                detach(name=self.path, **at)

    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()


def check_capture(output: Path, pid: int, result: dict, total: int) -> dict:
    """What the agent wrote for the client: every byte it read (payload included), one
    data record per read that returned data, nothing lost."""
    got = captured = records = bad_payload = 0
    stats: dict = {}
    with output.open() as f:
        for line in f:
            rec = json.loads(line)
            if rec["type"] == "stats":
                stats = rec
            elif rec["type"] == "data" and rec["pid"] == pid and rec["direction"] == "ingress":
                got += rec["len"]
                captured += rec["captured_len"]
                records += 1
                data = base64.b64decode(rec["data_b64"])
                if data != b"x" * len(data):  # the server sends only 'x'
                    bad_payload += 1
    reads = result["calls"] - 1  # the last call returned 0 (close_notify): no record
    ok = (got == captured == total and records == reads and not bad_payload
          and stats.get("lost") == 0)  # fmt: skip
    return {
        "ok": ok,
        "ingress_bytes": got,
        "ingress_captured_bytes": captured,
        "ingress_records": records,
        "payload_mismatches": bad_payload,
        "lost": stats.get("lost"),
        "incomplete_calls": stats.get("incomplete_calls"),
        "probe_placements_emulated": stats.get("probe_placements_emulated"),
        "probe_placements_entry_fallback": stats.get("probe_placements_entry_fallback"),
    }


def agent_sample(mode: str, loop, workdir: Path, total: int) -> dict:
    """One read loop under `tlscap run`, which must capture all of it."""
    workdir.mkdir()
    # "" and not unset: a TLSCAP_PROBE_PLACEMENT=entry in our own environment must not
    # turn the worker placement into the entry one.
    env = {"TLSCAP_PROBE_PLACEMENT": "entry" if mode == "tlscap_entry" else ""}
    with bl.running_agent(workdir, extra=["--comm", COMM], env=env) as agent:
        result = loop()
        # Let the agent drain the run before stopping it (SIGINT drains too, but this
        # keeps a slow drain from being taken for loss).
        bl.wait_for_records(agent.output, want=1 << 62, idle=1.0, limit=120)
        agent.stop()
    check = check_capture(agent.output, result["pid"], result, total)
    if not check["ok"]:
        raise bl.BenchError(f"{mode}: capture incomplete: {check}\n{agent.log_tail()}")
    shutil.rmtree(workdir, ignore_errors=True)
    return {**result, "capture": check}


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    binary = build_loadgen()
    library = find_library(binary)
    worker, why = find_worker(library)
    modes = list(args.modes)
    skipped = None
    if worker is None:
        skipped = {
            "modes": [m for m in modes if m in WORKER_MODES],
            "reason": f"the agent's proof of the receive worker fails for "
            f"{library.host_path}: {why}",
        }
        modes = [m for m in modes if m not in WORKER_MODES]
        print(f"gnutls_placement: skipping {', '.join(skipped['modes']) or 'no modes'}: "
              f"{skipped['reason']}", file=sys.stderr, flush=True)  # fmt: skip
    else:
        log(args, f"{library.host_path}: {RECV} -> worker {worker.address:#x} "
                  f"({worker.first})")  # fmt: skip
    total = args.size_mb << 20
    samples: list[dict] = []
    empty = None
    quiet_budget = args.quiet_budget
    try:
        if any(m.startswith("empty") for m in modes):
            empty = EmptyProbes(library.host_path, worker.address if worker else None)
        with bl.scratch_dir() as work:
            cert, key = bl.self_signed_cert(work)

            def loop() -> dict:
                return read_loop(binary, cert, key, total, args.read_size)

            for rnd in range(args.rounds):
                order = modes[rnd % len(modes) :] + modes[: rnd % len(modes)]
                for mode in order:
                    # Another tool's uprobes on this libgnutls (a test run) slow every
                    # mode, the baseline too: wait a little for them to go, note them.
                    t0 = time.monotonic()
                    foreign = bl.wait_for_quiet_machine({os.getpid()}, min(quiet_budget, 30.0))
                    quiet_budget = max(0.0, quiet_budget - (time.monotonic() - t0))
                    load = bl.loadavg()
                    if mode.startswith("empty"):
                        assert empty is not None
                        try:
                            empty.attach(mode)
                            result = loop()
                        finally:
                            empty.detach()
                    elif mode.startswith("tlscap"):
                        result = agent_sample(mode, loop, work / f"agent-{rnd}-{mode}", total)
                    else:
                        result = loop()
                    sample = {"round": rnd, "mode": mode, "loadavg": load,
                              "foreign_probes": foreign, **result}  # fmt: skip
                    samples.append(sample)
                    note = f"  (other probes: {len(foreign)})" if foreign else ""
                    ns, cpu = result["ns_per_call"], result["cpu_ns_per_call"]
                    log(args, f"  round {rnd} {mode:<12} {ns:8.0f} ns/call cpu {cpu:6.0f}  "
                              f"load {load:.2f}{note}")  # fmt: skip
    finally:
        if empty is not None:
            empty.close()
    return {
        "benchmark": "gnutls_placement",
        "library": {"path": library.path, "host_path": library.host_path},
        "worker": (
            {"address": worker.address, "first": worker.first, "proof": worker.placement().reason}
            if worker is not None
            else None
        ),
        "skipped": skipped,
        "size_mb": args.size_mb,
        "read_size": args.read_size,
        "rounds": args.rounds,
        "modes": summarize(samples, modes),
        "samples": samples,
        "machine": bl.machine_info(),
    }


def summarize(samples: list[dict], modes: list[str]) -> dict:
    """Per mode: medians over rounds, and the median of (mode - same round's baseline)."""
    base = {s["round"]: s for s in samples if s["mode"] == "baseline"}

    def added(ss: list[dict], key: str) -> float:
        return bl.median([s[key] - base[s["round"]][key] for s in ss])

    out = {}
    for mode in modes:
        ss = [s for s in samples if s["mode"] == mode]
        out[mode] = {
            "samples": len(ss),
            "median_ns": bl.median([s["ns_per_call"] for s in ss]),
            "added_ns": added(ss, "ns_per_call"),
            "cpu_ns": bl.median([s["cpu_ns_per_call"] for s in ss]),
            "added_cpu_ns": added(ss, "cpu_ns_per_call"),
            "per_round_ns": [s["ns_per_call"] for s in ss],
            "calls": ss[0]["calls"] if ss else None,
            "loadavg": [s["loadavg"] for s in ss],
        }
    return out


LABELS = {
    "baseline": "baseline",
    "empty_entry": f"empty uprobe+uretprobe at {RECV}",
    "empty_worker": "empty uprobe+uretprobe at the worker",
    "tlscap": "tlscap (worker placement)",
    "tlscap_entry": "tlscap, TLSCAP_PROBE_PLACEMENT=entry",
}


def print_table(result: dict) -> None:
    modes = result["modes"]
    calls = next(iter(modes.values()))["calls"]
    print(f"{RECV} of {result['read_size']} B, {result['size_mb']} MiB per sample "
          f"({calls} calls), {result['rounds']} rounds round-robin; ns per call, "
          "added = median of (mode - same round's baseline)")  # fmt: skip
    print(f"library {result['library']['path']}", end="")
    w = result["worker"]
    print(f", worker {w['address']:#x} ({w['first']})" if w else ", no proved worker")
    width = max(len(LABELS[m]) for m in modes)
    print(f"{'mode':<{width}} {'median':>7} {'added':>7} {'cpu':>7} {'+cpu':>7}  per round")
    for mode, r in modes.items():
        added = "" if mode == "baseline" else f"{r['added_ns']:.0f}"
        added_cpu = "" if mode == "baseline" else f"{r['added_cpu_ns']:.0f}"
        rounds = " ".join(f"{x:.0f}" for x in r["per_round_ns"])
        print(f"{LABELS[mode]:<{width}} {r['median_ns']:7.0f} {added:>7} "
              f"{r['cpu_ns']:7.0f} {added_cpu:>7}  {rounds}")  # fmt: skip
    if "tlscap" in modes and "tlscap_entry" in modes and modes["tlscap"]["added_ns"] > 0:
        ratio = modes["tlscap_entry"]["added_ns"] / modes["tlscap"]["added_ns"]
        print(f"entry / worker placement (tlscap's added ns) = {ratio:.2f}")
    caps = [s for s in result["samples"] if "capture" in s]
    if caps:
        records = sorted({s["capture"]["ingress_records"] for s in caps})
        fallbacks = {m: sorted({s["capture"]["probe_placements_entry_fallback"]
                                for s in caps if s["mode"] == m})
                     for m in ("tlscap", "tlscap_entry")}  # fmt: skip
        print(f"capture: {len(caps)} agent samples, every byte read captured, lost 0, "
              f"records {records}")  # fmt: skip
        print(
            "single-stepped probes of the agent (probe_placements_entry_fallback): "
            f"tlscap {fallbacks['tlscap']}, tlscap_entry {fallbacks['tlscap_entry']}"
        )
    loads = [s["loadavg"] for s in result["samples"]]
    print(f"load average during the run: {min(loads):.2f}-{max(loads):.2f}")
    foreign = sum(1 for s in result["samples"] if s["foreign_probes"])
    if foreign:
        print(f"note: {foreign} sample(s) ran while another process had BPF probes "
              "attached (see foreign_probes in --json output)")  # fmt: skip
    if result["skipped"]:
        print(f"skipped {', '.join(result['skipped']['modes'])}: {result['skipped']['reason']}")


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
