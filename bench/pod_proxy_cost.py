"""What proxy mode for pods costs, next to the node-namespace proxy, in one run.

Topology (all lab namespaces; the host's iptables are never touched):

  C1 --veth-- S --veth-- C2        S: https_echo on 8443 (direct) and 443
                                   C1: a "node" with the classic proxy: `tlscap run
                                       --mode proxy` inside C1, its rules and listener there
                                   C2: a pod's namespace; the pod proxy agent runs in a
                                       separate node namespace N and reaches into C2
                                       (rules, listeners and upstream sockets made there)

Samples go round-robin (order rotating per round), each one `proxy_overhead.py client`
(Python ssl, 1 KiB POST, response checked) for `--seconds`:

  direct      C1 -> S:8443
  host_proxy  C1 -> S:443, redirected in C1 to the agent in C1
  pod_proxy   C2 -> S:443, redirected in C2 to the agent in N (the client runs in the
              pod's cgroup, so its process is found through sock_diag in C2)

in two workloads: new_conn (a TLS connection per request) and keepalive.  Then the
pod agent is given `--pods` more pods (each a namespace with a sleeping process in a
kubelet-style cgroup, annotated tlscap.io/capture), and the script reports how long
until every one had its rules, the agent's RSS, fds and threads before and after, its
idle CPU while reconciling them, and how long SIGTERM takes to clean them all.

    .venv/bin/python bench/pod_proxy_cost.py [--rounds 3] [--seconds 1.5] [--pods 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
import proxy_overhead as po

MODES = ("direct", "host_proxy", "pod_proxy")
CAPTURE = {"tlscap.io/capture": "true"}


def proc_usage(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def add_pod_link(lab, name: str, index: int) -> tuple[str, str]:
    """A veth between the pod namespace `name` and the server namespace."""
    from pyroute2 import NetNS

    pod_ip, server_ip = f"198.19.{index}.1", f"198.19.{index}.2"
    with NetNS(name) as ipr:
        ipr.link("add", ifname="veth-p", kind="veth", peer={"ifname": "veth-ps",
                 "net_ns_fd": lab.server})  # fmt: skip
        (idx,) = ipr.link_lookup(ifname="veth-p")
        ipr.addr("add", index=idx, address=pod_ip, prefixlen=24)
        ipr.link("set", index=idx, state="up")
    with NetNS(lab.server) as ipr:
        (idx,) = ipr.link_lookup(ifname="veth-ps")
        ipr.addr("add", index=idx, address=server_ip, prefixlen=24)
        ipr.link("set", index=idx, state="up")
    return pod_ip, server_ip


def start_agent(lab, ns: str, work: Path, tag: str, args: list[str]) -> tuple:
    ready, out, logf = work / f"{tag}.ready", work / f"{tag}.jsonl", work / f"{tag}.log"
    cmd = [
        *bl.tlscap_command(), "run", "--mode", "proxy", "--intercept-ports", "443",
        "--ca-dir", str(work / "ca"), "--output", "jsonl", "--output-file", str(out),
        "--ready-file", str(ready), "--log-level", "info", *args,
    ]  # fmt: skip
    with open(logf, "w") as f:
        proc = lab.popen(ns, cmd, stdout=f, stderr=subprocess.STDOUT, cwd=bl.REPO,
                         start_new_session=True)  # fmt: skip
    po.wait_for(f"{tag} agent", ready.exists, 60, proc, logf)
    return proc, out, logf


def client(argv_prefix: list[str], host: str, port: int, bundle: Path, workload: str, args):
    cmd = [
        *argv_prefix, sys.executable, str(Path(po.__file__).resolve()), "client",
        "--host", host, "--port", str(port), "--cafile", str(bundle), "--workload", workload,
        "--seconds", str(args.seconds), "--body", "1024",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 60)
    if out.returncode != 0 or not out.stdout.strip():
        raise bl.BenchError(f"client failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_all(check, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise bl.BenchError(f"{what}: not after {timeout} s")
        time.sleep(0.1)
    return round(time.monotonic() - t0, 2)


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    from tests import golang
    from tests.fallback.podlab import PodLab
    from tests.netns import lab_unavailable_reason, netns_lab

    reason = lab_unavailable_reason()
    if reason:
        raise bl.BenchError(reason)
    chains = golang.toolchains()
    echo = golang.build(chains["pypi"] or chains["debian"], po.ECHO_SRC)
    samples: list[dict] = []
    result: dict = {"benchmark": "pod_proxy_cost", "machine": bl.machine_info(), "args": vars(args)}
    procs: list[subprocess.Popen] = []
    with bl.scratch_dir(keep=False) as work, netns_lab() as lab:
        pods = PodLab(lab, work)
        try:
            certs = po.make_certs(work)
            for port in (8443, 443):
                proc = lab.popen(lab.server, [str(echo), "-listen", f":{port}", "-cert",
                                 str(certs["cert"]), "-key", str(certs["key"])],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
                procs.append(proc)
                po.wait_line(proc, "ready", 20)
            pod_ns = pods.new_netns()
            _, server_ip2 = add_pod_link(lab, pod_ns, int(lab.client_ip.split(".")[2]))
            pod = pods.pod("bench-client", pod_ns, CAPTURE)
            pods.publish(pod)
            ca = ["--upstream-ca", str(certs["ca"])]
            host_agent, _, _ = start_agent(lab, lab.client, work, "host", ca)
            procs.append(host_agent)
            pod_agent, pod_out, pod_log = start_agent(
                lab, pods.node, work, "pod",
                [*ca, *pods.agent_args("--capture-scope", "annotated")],
            )  # fmt: skip
            procs.append(pod_agent)
            wait_all(lambda: pods.listeners(pod_ns), 10, "the pod's listener")
            bundle = work / "trust.pem"
            bundle.write_bytes(certs["ca"].read_bytes() + (work / "ca" / "ca.crt").read_bytes())
            paths = {
                "direct": (["ip", "netns", "exec", lab.client], lab.server_ip, 8443),
                "host_proxy": (["ip", "netns", "exec", lab.client], lab.server_ip, 443),
                "pod_proxy": (pod.argv([]), server_ip2, 443),
            }
            agents = {"host_proxy": host_agent.pid, "pod_proxy": pod_agent.pid}
            for r in range(args.rounds):
                for workload in ("new_conn", "keepalive"):
                    order = MODES[r % 3 :] + MODES[: r % 3]
                    for mode in order:
                        prefix, host, port = paths[mode]
                        cpu0 = bl.process_cpu_seconds(agents[mode]) if mode in agents else 0
                        s = client(prefix, host, port, bundle, workload, args)
                        if mode in agents:
                            cpu = bl.process_cpu_seconds(agents[mode]) - cpu0
                            s["proxy_cpu_us_per_req"] = cpu * 1e6 / max(1, s["requests"])
                        s.update(mode=mode, workload=workload, round=r)
                        samples.append(s)
                        print(f"  round {r} {workload:<9} {mode:<10} {s['req_per_s']:8.0f} req/s"
                              f"  median {s['median_us']:7.0f} us  errors {s['errors']}",
                              file=sys.stderr, flush=True)  # fmt: skip
            result["latency"] = summarize(samples)

            # -- one agent, many pod namespaces
            before = proc_usage(pod_agent.pid)
            extra = []
            t0 = time.monotonic()
            for i in range(args.pods):
                extra.append(pods.pod(f"idle-{i}", pods.new_netns(), CAPTURE))
            pods.publish(*extra, before_agent=False)
            created = round(time.monotonic() - t0, 2)
            all_ready = wait_all(
                lambda: all(pods.listeners(p.netns) for p in extra[-5:])
                and _installed(pod_log) >= args.pods + 1,
                120, "every pod's rules",
            )  # fmt: skip
            time.sleep(1.0)
            after = proc_usage(pod_agent.pid)
            cpu0 = bl.process_cpu_seconds(pod_agent.pid)
            time.sleep(args.idle)
            idle_cpu = (bl.process_cpu_seconds(pod_agent.pid) - cpu0) / args.idle
            t_stop = time.monotonic()
            pod_agent.send_signal(signal.SIGTERM)
            pod_agent.wait(timeout=120)
            stop_s = round(time.monotonic() - t_stop, 2)
            left = sum(1 for p in [pod, *extra] if pods.rules(p.netns))
            result["scale"] = {
                "pods": args.pods + 1,
                "pods_and_namespaces_created_s": created,
                "all_rules_in_place_s_after_publish": all_ready,
                "agent_before": before,
                "agent_after": after,
                "rss_mib_per_pod": round((after["rss_mib"] - before["rss_mib"]) / args.pods, 3),
                "fds_per_pod": round((after["fds"] - before["fds"]) / args.pods, 2),
                "idle_cpu_percent": round(idle_cpu * 100, 1),
                "sigterm_cleanup_s": stop_s,
                "namespaces_with_rules_left": left,
                "agent_stats": po.last_stats(pod_out),
            }
            host_agent.send_signal(signal.SIGTERM)
            host_agent.wait(timeout=60)
        finally:
            for proc in procs:
                bl.kill_tree(proc)
            pods.close()
    return result


def _installed(log: Path) -> int:
    return po.tail(log, 10**7).count("intercepting in its network namespace")


def summarize(samples: list[dict]) -> dict:
    out: dict = {}
    for w in ("new_conn", "keepalive"):
        direct = {s["round"]: s for s in samples if s["mode"] == "direct" and s["workload"] == w}
        rows = {}
        for m in MODES:
            ss = [s for s in samples if s["mode"] == m and s["workload"] == w]
            row = {
                "req_per_s": bl.median([s["req_per_s"] for s in ss]),
                "median_us": bl.median([s["median_us"] for s in ss]),
                "p90_us": bl.median([s["p90_us"] for s in ss]),
                "errors": sum(s["errors"] for s in ss),
                "issuers": sorted({str(s["issuer"]) for s in ss}),
            }
            if m != "direct":
                row["added_median_us"] = bl.median(
                    [s["median_us"] - direct[s["round"]]["median_us"] for s in ss]
                )
                row["proxy_cpu_us_per_req"] = bl.median([s["proxy_cpu_us_per_req"] for s in ss])
            rows[m] = row
        pod, host = rows["pod_proxy"], rows["host_proxy"]
        rows["pod_minus_host_added_us"] = round(pod["added_median_us"] - host["added_median_us"], 1)
        out[w] = rows
    return out


def print_tables(result: dict) -> None:
    print("| workload | mode | req/s | median µs | p90 µs | added median µs | proxy CPU µs/req |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for w, rows in result["latency"].items():
        for m in MODES:
            r = rows[m]
            print(f"| {w} | {m} | {r['req_per_s']:.0f} | {r['median_us']:.0f} | "
                  f"{r['p90_us']:.0f} | {r.get('added_median_us', float('nan')):.0f} | "
                  f"{r.get('proxy_cpu_us_per_req', float('nan')):.0f} |")  # fmt: skip
        print(f"| {w} | pod - host | | | | {rows['pod_minus_host_added_us']} | |")
    s = dict(result["scale"])
    s.pop("agent_stats", None)
    print(json.dumps(s, indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--pods", type=int, default=100)
    p.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    try:
        result = run(args)
    except bl.BenchError as exc:
        print(f"pod_proxy_cost: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
