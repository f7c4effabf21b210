"""What NSS capture costs tstclnt itself: wall time and the client's own CPU time
(user + system, from its rusage) downloading one file over HTTPS with no agent, with
the agent's probes where it places them (NSS's SSL-layer methods), and with
TLSCAP_PROBE_PLACEMENT=entry (NSPR's PR_Recv/PR_Write), side by side in each round.

A probe's trap is charged to the traced thread's system time, so the CPU column shows
what the probes cost the program even when the wall time is swamped by a loaded
machine (the agent draining the ring competes for the same two cores). Every agent run
must capture the whole file with nothing lost.

    .venv/bin/python bench/nss_placement.py [--size-mb 32] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl

MODES = ("off", "on", "entry")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="accepted for run_all symmetry")
    return p.parse_args(argv)


def download(port: int, workdir: Path) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) of one tstclnt fetch of /big."""
    request = workdir / "request"
    request.write_bytes(b"GET /big HTTP/1.0\r\n\r\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with request.open("rb") as stdin:
        subprocess.run(["tstclnt", "-h", "127.0.0.1", "-p", str(port), "-D", "-o", "-f"],
                       stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True, timeout=300)  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def captured(output: Path) -> tuple[int, int, dict]:
    """(ingress bytes, ingress records, stats line) of tstclnt in the agent's output."""
    got = calls = 0
    stats: dict = {}
    with output.open() as f:
        for line in f:
            r = json.loads(line)
            if r["type"] == "stats":
                stats = r
            elif r["type"] == "data" and r["comm"] == "tstclnt" and r["direction"] == "ingress":
                got += len(base64.b64decode(r["data_b64"]))
                calls += 1
    return got, calls, stats


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    missing = [c for c in ("tstclnt", "openssl") if shutil.which(c) is None]
    if missing:
        raise bl.BenchError(f"not installed: {', '.join(missing)} (`make setup` adds them)")
    size = args.size_mb << 20
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    calls: list[int] = []
    plain: dict[str, list[int]] = {"on": [], "entry": []}
    with bl.scratch_dir() as work, bl.big_file_server(work, size) as port:
        for rnd in range(args.rounds):
            w, c = download(port, work)
            wall["off"].append(w)
            cpu["off"].append(c)
            for mode in ("on", "entry") if rnd % 2 == 0 else ("entry", "on"):
                agent_dir = work / f"agent{rnd}-{mode}"
                agent_dir.mkdir()
                env = {"TLSCAP_PROBE_PLACEMENT": "entry"} if mode == "entry" else {}
                with bl.running_agent(agent_dir, extra=["--comm", "tstclnt"], env=env) as a:
                    w, c = download(port, work)
                    bl.wait_for_records(a.output, want=1 << 62, idle=1.0, limit=120)
                    a.stop()
                wall[mode].append(w)
                cpu[mode].append(c)
                got, n, stats = captured(a.output)
                if got < size or stats.get("lost", -1) != 0:
                    raise bl.BenchError(f"round {rnd} ({mode}): captured {got} of >= "
                                        f"{size} bytes, lost {stats.get('lost')}")  # fmt: skip
                plain[mode].append(int(stats.get("kernel_nss_plain_calls", -1)))
                if mode == "on":
                    calls.append(n)
    n_calls = bl.median([float(x) for x in calls])
    rows = {}
    for mode in MODES:
        rows[mode] = {
            "wall_s": bl.median(wall[mode]),
            "cpu_s": bl.median(cpu[mode]),
            "wall_x": bl.median(wall[mode]) / bl.median(wall["off"]),
            "cpu_x": bl.median(cpu[mode]) / bl.median(cpu["off"]),
            "added_cpu_us_per_call": (
                (bl.median(cpu[mode]) - bl.median(cpu["off"])) / n_calls * 1e6 if n_calls else None
            ),
            "nss_plain_calls": bl.median([float(x) for x in plain.get(mode, [])]),
        }
    return {"size_mb": args.size_mb, "rounds": args.rounds, "tls_calls_per_download": n_calls,
            "modes": rows, "samples": {"wall": wall, "cpu": cpu},
            "machine": bl.machine_info()}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"tstclnt, {result['size_mb']} MiB download, median of {result['rounds']} rounds, "
          f"{result['tls_calls_per_download']:.0f} TLS reads")  # fmt: skip
    print(f"{'mode':6} {'wall s':>7} {'wall x':>7} {'cpu s':>7} {'cpu x':>6} "
          f"{'+cpu us/call':>12} {'plain traps':>11}")  # fmt: skip
    for mode, r in result["modes"].items():
        added = r["added_cpu_us_per_call"]
        print(f"{mode:6} {r['wall_s']:7.3f} {r['wall_x']:7.2f} {r['cpu_s']:7.3f} "
              f"{r['cpu_x']:6.2f} {added if added is not None else float('nan'):12.1f} "
              f"{r['nss_plain_calls']:11.0f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
