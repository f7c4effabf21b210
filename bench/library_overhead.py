"""What capturing costs a real client of each C TLS library: OpenSSL (curl), GnuTLS
(wget) and NSS (tstclnt) downloading one large file over HTTPS, without and with
`tlscap run` capturing every byte, side by side in each round.

Each round downloads the file once per client with no agent, then starts the agent and
downloads it once per client again; the figure is the ratio of the two medians, and the
time added per captured TLS call (the records the agent wrote for that client).  Every
agent run must capture the whole file for each client with nothing lost.

    .venv/bin/python bench/library_overhead.py [--size-mb 32] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl

CLIENTS = ("curl", "wget", "tstclnt")
LIBRARY = {"curl": "openssl", "wget": "gnutls", "tstclnt": "nss"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="accepted for run_all symmetry")
    return p.parse_args(argv)


def download(client: str, port: int, workdir: Path) -> float:
    """Seconds one client takes to fetch /big over HTTPS (its output is discarded)."""
    url = f"https://127.0.0.1:{port}/big"
    if client == "curl":
        cmd, stdin = ["curl", "-sk", "--http1.1", "-o", "/dev/null", url], None
    elif client == "wget":
        cmd, stdin = ["wget", "-q", "--no-check-certificate", "-O", "/dev/null", url], None
    else:
        # NSS's test client copies stdin to the connection and the answer to stdout.
        request = workdir / "request"
        request.write_bytes(b"GET /big HTTP/1.0\r\n\r\n")
        cmd = ["tstclnt", "-h", "127.0.0.1", "-p", str(port), "-D", "-o", "-f"]
        stdin = request.open("rb")
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, stdin=stdin, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=300)  # fmt: skip
    finally:
        if stdin is not None:
            stdin.close()
    return time.perf_counter() - t0


def captured(output: Path) -> dict[str, dict[str, int]]:
    """Per client comm: ingress bytes captured and data records (TLS calls) written."""
    out: dict[str, dict[str, int]] = {c: {"bytes": 0, "calls": 0} for c in CLIENTS}
    stats: dict = {}
    with output.open() as f:
        for line in f:
            r = json.loads(line)
            if r["type"] == "stats":
                stats = r
            elif r["type"] == "data" and r["comm"] in out and r["direction"] == "ingress":
                out[r["comm"]]["bytes"] += len(base64.b64decode(r["data_b64"]))
                out[r["comm"]]["calls"] += 1
    out["_stats"] = {"lost": stats.get("lost", -1)}
    return out


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    missing = [c for c in (*CLIENTS, "openssl") if shutil.which(c) is None]
    if missing:
        raise bl.BenchError(f"not installed: {', '.join(missing)} (`make setup` adds them)")
    size = args.size_mb << 20
    times: dict[str, dict[str, list[float]]] = {
        c: {"off": [], "on": [], "entry": []} for c in CLIENTS
    }
    calls: dict[str, list[int]] = {c: [] for c in CLIENTS}
    with bl.scratch_dir() as work, bl.big_file_server(work, size) as port:
        for rnd in range(args.rounds):
            for c in CLIENTS:
                times[c]["off"].append(download(c, port, work))
            # "on": probes where agent/probes/prologue.py places them; "entry":
            # every probe on its function's first instruction (the old placement).
            for mode in ("on", "entry") if rnd % 2 == 0 else ("entry", "on"):
                agent_dir = work / f"agent{rnd}-{mode}"
                agent_dir.mkdir()
                only_clients = [a for c in CLIENTS for a in ("--comm", c)]
                env = {"TLSCAP_PROBE_PLACEMENT": "entry"} if mode == "entry" else {}
                with bl.running_agent(agent_dir, extra=only_clients, env=env) as agent:
                    for c in CLIENTS:
                        times[c][mode].append(download(c, port, work))
                        # Let the agent work off the download before the next
                        # client connects: a connection that starts while the
                        # ring is over half full is shed whole (by design), and
                        # this bench measures the clients, not the agent.
                        bl.wait_for_records(agent.output, want=1 << 62, idle=1.0, limit=120)
                    agent.stop()
                got = captured(agent.output)
                for c in CLIENTS:
                    if got[c]["bytes"] < size or got["_stats"]["lost"] != 0:
                        raise bl.BenchError(
                            f"round {rnd} ({mode}): {c} captured {got[c]['bytes']} of "
                            f">= {size} bytes, lost {got['_stats']['lost']}"
                        )
                    if mode == "on":
                        calls[c].append(got[c]["calls"])
    rows = {}
    for c in CLIENTS:
        off, on = bl.median(times[c]["off"]), bl.median(times[c]["on"])
        n_calls = bl.median([float(x) for x in calls[c]])
        rows[LIBRARY[c]] = {
            "client": c,
            "mb_per_s_without": args.size_mb / off,
            "mb_per_s_with": args.size_mb / on,
            "ratio_with_over_without": on / off,
            "ratio_entry_placement_over_without": bl.median(times[c]["entry"]) / off,
            "added_us_per_call_entry_placement": (
                (bl.median(times[c]["entry"]) - off) / n_calls * 1e6 if n_calls else None
            ),
            "tls_calls_per_download": n_calls,
            "added_us_per_call": (on - off) / n_calls * 1e6 if n_calls else None,
        }
    return {"size_mb": args.size_mb, "rounds": args.rounds, "libraries": rows,
            "machine": bl.machine_info()}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"{result['size_mb']} MiB download, median of {result['rounds']} rounds each way")
    print(f"{'library':8} {'client':8} {'MB/s off':>9} {'MB/s on':>8} {'time x':>7} "
          f"{'calls':>6} {'+us/call':>9} {'entry: x':>8} {'+us/call':>9}")  # fmt: skip
    for lib, r in result["libraries"].items():
        added = r["added_us_per_call"]
        print(f"{lib:8} {r['client']:8} {r['mb_per_s_without']:9.0f} {r['mb_per_s_with']:8.0f} "
              f"{r['ratio_with_over_without']:7.2f} {r['tls_calls_per_download']:6.0f} "
              f"{added if added is not None else float('nan'):9.1f} "
              f"{r['ratio_entry_placement_over_without']:8.2f} "
              f"{r['added_us_per_call_entry_placement'] or float('nan'):9.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
