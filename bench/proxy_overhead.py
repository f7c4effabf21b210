"""HTTPS requests/s and added latency through tlscap's proxy mode, next to mitmproxy.

Three paths to the same HTTPS server, measured round-robin in one run (the order rotates
every round) so that machine noise hits all of them alike:

  direct     client -> server:8443, no rules
  tlscap     client -> server:443, redirected by the agent's own iptables rules to
             `tlscap run --mode proxy --intercept-ports 443 --output jsonl`
  mitmproxy  client -> server:9443, redirected (by a rule this script adds, exempting
             mitmdump's own uid) to `mitmdump --mode transparent`, run as nobody

Everything runs in a two-namespace lab (tests/netns.py): the client, the agent and
mitmdump in the client namespace, three https_echo (Go) listeners, one per port, in the
server namespace.  The host's iptables are never touched.  The client is this script
(`proxy_overhead.py client ...`), a Python ssl HTTP/1.1 client that POSTs a small body
and checks the echo, in two workloads:

  new_conn   one request per TLS connection (connect, full TLS 1.3 handshake, request,
             response, close): what a proxy costs a client that does not reuse connections
  keepalive  requests back to back on one kept-alive connection: the relay path alone

It trusts the server's CA, tlscap's and mitmproxy's, and checks which of them issued
each path's certificate, so a number always belongs to the path it is reported for.

    .venv/bin/python bench/proxy_overhead.py [--rounds 3] [--seconds 1.5] [--concurrency 1]
        [--body 1024] [--modes direct,tlscap,mitmproxy] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl

ALL_MODES = ("direct", "tlscap", "mitmproxy")
WORKLOADS = ("new_conn", "keepalive")
PORTS = {"direct": 8443, "tlscap": 443, "mitmproxy": 9443}
SNI = "bench.lab.test"
SERVER_CA_NAME = "tlscap bench server CA"
MITM_PORT = 18080
MITM_UID = 65534  # nobody: its own connections are exempt from the redirect
ECHO_SRC = bl.REPO / "tests" / "fallback" / "programs" / "https_echo.go"
MITM_MISSING = "mitmproxy not installed (pip install mitmproxy): skipping that column"


# -- the client (runs inside the client namespace) -----------------------------------


def _request(body: bytes) -> bytes:
    head = (
        f"POST /bench HTTP/1.1\r\nHost: {SNI}\r\nUser-Agent: tlscap-bench\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _exchange(sock: ssl.SSLSocket, request: bytes, want_tail: bytes) -> None:
    """Send one request and read its whole response (Content-Length framed); check it."""
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response headers")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected status line {lines[0][:80]!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ConnectionError("response without Content-Length")
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside the response body")
        rest += chunk
    if not rest.endswith(want_tail) or f"sni={SNI}".encode() not in rest:
        raise ConnectionError(f"response does not echo the request: {rest[:120]!r}")


def _issuer_cn(sock: ssl.SSLSocket) -> str:
    for rdn in sock.getpeercert().get("issuer", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return "?"


def _worker(args: argparse.Namespace, t_start: float, t_end: float) -> dict:
    """Requests until t_end; latencies (ns) of those that ended in [t_start, t_end)."""
    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    body = (b"tlscap-bench " * (args.body // 13 + 1))[: args.body]
    request = _request(body)
    want_tail = b"body=" + body + b"\n"
    lat: list[int] = []
    errors = 0
    first_error = None
    issuer = None

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection((args.host, args.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ctx.wrap_socket(raw, server_hostname=SNI)

    sock = None
    while True:
        t0 = time.monotonic_ns()
        if t0 >= t_end * 1e9:
            break
        try:
            if sock is None:
                sock = connect()
                if issuer is None:
                    issuer = _issuer_cn(sock)
            _exchange(sock, request, want_tail)
            if args.workload == "new_conn":
                sock.close()
                sock = None
        except (OSError, ssl.SSLError) as exc:
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            if sock is not None:
                sock.close()
                sock = None
            time.sleep(0.01)
            continue
        t1 = time.monotonic_ns()
        if t_start * 1e9 <= t1 < t_end * 1e9:
            lat.append(t1 - t0)
    if sock is not None:
        sock.close()
    return {"lat": lat, "errors": errors, "first_error": first_error, "issuer": issuer}


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="proxy_overhead.py client")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--body", type=int, default=1024)
    args = p.parse_args(argv)
    t_start = time.monotonic() + args.warmup
    t_end = t_start + args.seconds
    if args.concurrency == 1:
        parts = [_worker(args, t_start, t_end)]
    else:
        import multiprocessing

        # Processes, not threads: the GIL would make the client the bottleneck.
        with multiprocessing.get_context("fork").Pool(args.concurrency) as pool:
            parts = pool.starmap(_worker, [(args, t_start, t_end)] * args.concurrency)
    lat = sorted(x for part in parts for x in part["lat"])

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e3 if lat else float("nan")

    print(
        json.dumps(
            {
                "requests": len(lat),
                "req_per_s": len(lat) / args.seconds,
                "median_us": pct(0.5),
                "p90_us": pct(0.9),
                "p99_us": pct(0.99),
                "errors": sum(part["errors"] for part in parts),
                "first_error": next((x["first_error"] for x in parts if x["first_error"]), None),
                "issuer": next((x["issuer"] for x in parts if x["issuer"]), None),
            }
        ),
        flush=True,
    )
    return 0


# -- processes in the lab --------------------------------------------------------------


def find_mitmdump() -> str | None:
    for candidate in (
        os.environ.get("TLSCAP_MITMDUMP"),
        shutil.which("mitmdump"),
        "/tmp/mitmvenv/bin/mitmdump",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Signal a process we started (by its pid), wait, SIGKILL it if it does not go."""
    bl.kill_tree(proc, sig, timeout)
    bl.kill_tree(proc)


def wait_line(proc: subprocess.Popen, want: str, timeout: float) -> None:
    if bl.wait_for_line(proc, lambda line: line.strip() == want, timeout) is None:
        err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        raise bl.BenchError(f"{proc.args[-6:]} did not print {want!r}: {err.strip()}")


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise bl.BenchError(f"{what}: exited {proc.returncode}: {tail(log)}")
        if time.monotonic() > deadline:
            raise bl.BenchError(f"{what}: not ready after {timeout} s: {tail(log)}")
        time.sleep(0.05)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def listening(lab, port: int) -> bool:
    out = lab.run(lab.client, ["ss", "-Hltn", f"sport = :{port}"]).stdout
    return bool(out.strip())


def make_certs(work: Path) -> dict[str, Path]:
    from agent.certs.authority import CertificateAuthority

    ca = CertificateAuthority.create(SERVER_CA_NAME)
    leaf = ca.issue(SNI, dns_names=[SNI])
    paths = {"ca": work / "server-ca.pem", "cert": work / "server.crt", "key": work / "server.key"}
    paths["ca"].write_bytes(ca.cert_pem)
    paths["cert"].write_bytes(leaf.cert_pem)
    paths["key"].write_bytes(leaf.key_pem)
    return paths


def iptables_nat(lab) -> str:
    return lab.run(lab.client, ["iptables-save", "-t", "nat"]).stdout


class Lab:
    """The servers, the agent and mitmdump, started once for the whole run."""

    def __init__(self, lab, work: Path, args: argparse.Namespace) -> None:
        self.lab, self.work, self.args = lab, work, args
        self.servers: list[subprocess.Popen] = []
        self.agent: subprocess.Popen | None = None
        self.mitm: subprocess.Popen | None = None
        self.mitm_rule: list[str] | None = None
        self.agent_log = work / "agent.log"
        self.agent_out = work / "tlscap.jsonl"
        self.mitm_log = work / "mitm" / "mitmdump.log"
        self.checks: dict = {}

    def start(self, modes: list[str], mitmdump: str | None) -> None:
        from tests import golang

        lab, work = self.lab, self.work
        found = golang.toolchains()
        toolchain = found["pypi"] or found["debian"]
        if toolchain is None:
            raise bl.BenchError(golang.MISSING_REASON["pypi"])
        echo = golang.build(toolchain, ECHO_SRC)
        if self.args.client_tw_buckets is not None:
            knob = f"net.ipv4.tcp_max_tw_buckets={self.args.client_tw_buckets}"
            out = lab.run(lab.client, ["sysctl", "-w", knob])  # this namespace's own
            if out.returncode != 0:
                raise bl.BenchError(f"sysctl {knob} (client namespace): {out.stderr.strip()}")
        certs = make_certs(work)
        for mode in modes:
            proc = lab.popen(
                lab.server,
                [str(echo), "-listen", f":{PORTS[mode]}", "-cert", str(certs["cert"]),
                 "-key", str(certs["key"])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )  # fmt: skip
            self.servers.append(proc)
            wait_line(proc, "ready", 20)
        bundle = [certs["ca"].read_bytes()]
        if "tlscap" in modes:
            bundle.append(self._start_agent(certs["ca"]))
        if "mitmproxy" in modes:
            assert mitmdump is not None
            bundle.append(self._start_mitmdump(mitmdump, certs["ca"]))
        self.bundle = work / "client-trust.pem"
        self.bundle.write_bytes(b"".join(bundle))

    def _start_agent(self, server_ca: Path) -> bytes:
        ready, ca_dir = self.work / "tlscap.ready", self.work / "tlscap-ca"
        cmd = [
            *bl.tlscap_command(), "run", "--mode", "proxy", "--intercept-ports", "443",
            "--ca-dir", str(ca_dir), "--upstream-ca", str(server_ca), "--output", "jsonl",
            "--output-file", str(self.agent_out), "--ready-file", str(ready),
            *self.args.agent_arg,
        ]  # fmt: skip
        with open(self.agent_log, "w") as logf:
            self.agent = self.lab.popen(
                self.lab.client, cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=bl.REPO,
                start_new_session=True,
            )  # fmt: skip
        t0 = time.monotonic()
        wait_for("tlscap agent", ready.exists, 60, self.agent, self.agent_log)
        self.checks["tlscap_ready_s"] = round(time.monotonic() - t0, 2)
        self.checks["tlscap_rules"] = [
            line for line in iptables_nat(self.lab).splitlines() if "TLSCAP" in line
        ]
        return (ca_dir / "ca.crt").read_bytes()

    def _start_mitmdump(self, mitmdump: str, server_ca: Path) -> bytes:
        lab = self.lab
        confdir = self.work / "mitm"
        confdir.mkdir()
        upstream_ca = confdir / "server-ca.pem"
        shutil.copy(server_ca, upstream_ca)
        for p in (confdir, upstream_ca):
            os.chown(p, MITM_UID, MITM_UID)
        self.work.chmod(0o711)  # nobody must reach its confdir
        self.mitm_rule = [
            "OUTPUT", "-p", "tcp", "-d", lab.server_ip, "--dport", str(PORTS["mitmproxy"]),
            "-m", "owner", "!", "--uid-owner", str(MITM_UID),
            "-j", "REDIRECT", "--to-ports", str(MITM_PORT),
        ]  # fmt: skip
        out = lab.run(lab.client, ["iptables", "-t", "nat", "-A", *self.mitm_rule])
        if out.returncode != 0:
            self.mitm_rule = None
            raise bl.BenchError(f"iptables (client namespace): {out.stderr.strip()}")
        cmd = [
            "setpriv", f"--reuid={MITM_UID}", f"--regid={MITM_UID}", "--clear-groups",
            mitmdump, "--mode", "transparent", "--listen-port", str(MITM_PORT),
            "--set", f"confdir={confdir}",
            "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}", "-q",
        ]  # fmt: skip
        env = dict(os.environ, HOME=str(confdir))  # else it reads root's ~/.mitmproxy
        with open(self.mitm_log, "w") as logf:
            self.mitm = lab.popen(
                lab.client, cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=confdir, env=env,
                start_new_session=True,
            )  # fmt: skip
        ca_file = confdir / "mitmproxy-ca-cert.pem"
        t0 = time.monotonic()
        wait_for(
            "mitmdump",
            lambda: ca_file.exists() and listening(lab, MITM_PORT),
            60,
            self.mitm,
            self.mitm_log,
        )
        self.checks["mitmproxy_ready_s"] = round(time.monotonic() - t0, 2)
        return ca_file.read_bytes()

    def pids(self) -> dict[str, int]:
        return {
            m: p.pid for m, p in (("tlscap", self.agent), ("mitmproxy", self.mitm)) if p is not None
        }

    def close(self) -> None:
        """Stop everything (agent first: on SIGTERM it removes its own rules)."""
        try:
            if self.agent is not None:
                t0 = time.monotonic()
                stop(self.agent, signal.SIGTERM)
                self.checks["tlscap_stop_s"] = round(time.monotonic() - t0, 2)
                self.checks["tlscap_exit"] = self.agent.returncode
                left = [ln for ln in iptables_nat(self.lab).splitlines() if "TLSCAP" in ln]
                self.checks["tlscap_rules_left"] = left
                self.checks["tlscap_stats"] = last_stats(self.agent_out)
                self.checks["tlscap_log_tail"] = tail(self.agent_log, 1500)
            stop(self.mitm, signal.SIGTERM, timeout=10)
            if self.mitm is not None:
                self.checks["mitmproxy_log_tail"] = tail(self.mitm_log, 1500)
            if self.mitm_rule is not None:
                self.lab.run(self.lab.client, ["iptables", "-t", "nat", "-D", *self.mitm_rule])
        finally:
            for proc in (self.agent, self.mitm, *self.servers):
                bl.kill_tree(proc)


def last_stats(path: Path) -> dict | None:
    stats = None
    with contextlib.suppress(OSError), open(path, "rb") as f:
        for line in f:
            if b'"type":"stats"' in line or b'"type": "stats"' in line:
                stats = json.loads(line)
    return stats


# -- measuring ---------------------------------------------------------------------------


def one_sample(lab, env: Lab, mode: str, workload: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "client",
        "--host", lab.server_ip, "--port", str(PORTS[mode]), "--cafile", str(env.bundle),
        "--workload", workload, "--seconds", str(args.seconds),
        "--concurrency", str(args.concurrency), "--body", str(args.body),
    ]  # fmt: skip
    proxy_pid = env.pids().get(mode)
    # tlscap's owner lookup parses every row of /proc/net/tcp{,6}, TIME_WAIT ones too.
    tcp_sockets = tcp_socket_count(lab)
    cpu0 = bl.process_cpu_seconds(proxy_pid) if proxy_pid else None
    out = lab.run(lab.client, cmd, timeout=args.seconds + 60)
    if out.returncode != 0 or not out.stdout.strip():
        raise bl.BenchError(f"client ({mode}, {workload}) failed: {out.stderr.strip()[-2000:]}")
    sample = json.loads(out.stdout.strip().splitlines()[-1])
    if proxy_pid:
        # Includes the warm-up requests; per timed request it is an upper bound.
        cpu = bl.process_cpu_seconds(proxy_pid) - cpu0
        sample["proxy_cpu_us_per_req"] = cpu * 1e6 / max(1, sample["requests"])
    sample.update(mode=mode, workload=workload, client_ns_tcp_sockets=tcp_sockets)
    return sample


def tcp_socket_count(lab) -> int:
    """TCP sockets in the client namespace, in every state (TIME_WAIT included)."""
    return len(lab.run(lab.client, ["ss", "-Htan"]).stdout.splitlines())


EXPECTED_ISSUER = {"direct": SERVER_CA_NAME, "tlscap": "tlscap CA", "mitmproxy": "mitmproxy"}


def summarize(samples: list[dict], modes: list[str]) -> dict:
    out: dict = {}
    for w in dict.fromkeys(s["workload"] for s in samples):
        by_mode = {m: [s for s in samples if s["mode"] == m and s["workload"] == w] for m in modes}
        direct = {s["round"]: s for s in by_mode.get("direct", [])}
        rows: dict = {}
        for m, ss in by_mode.items():
            if not ss:
                continue
            row = {
                "samples": len(ss),
                "req_per_s": bl.median([s["req_per_s"] for s in ss]),
                "median_us": bl.median([s["median_us"] for s in ss]),
                "p90_us": bl.median([s["p90_us"] for s in ss]),
                "p99_us": bl.median([s["p99_us"] for s in ss]),
                "per_round_req_per_s": [round(s["req_per_s"]) for s in ss],
                "errors": sum(s["errors"] for s in ss),
                "first_error": next((s["first_error"] for s in ss if s["first_error"]), None),
                "issuers": sorted({str(s["issuer"]) for s in ss}),
            }
            row["issuer_ok"] = row["issuers"] == [EXPECTED_ISSUER[m]]
            cpu = [s["proxy_cpu_us_per_req"] for s in ss if "proxy_cpu_us_per_req" in s]
            if cpu:
                row["proxy_cpu_us_per_req"] = bl.median(cpu)
            paired = [s for s in ss if s["round"] in direct]
            if m != "direct" and paired:
                # Paired with the same round's direct sample, then the median over rounds.
                row["ratio_vs_direct"] = bl.median(
                    [s["req_per_s"] / direct[s["round"]]["req_per_s"] for s in paired]
                )
                row["added_median_us"] = bl.median(
                    [s["median_us"] - direct[s["round"]]["median_us"] for s in paired]
                )
                row["added_p90_us"] = bl.median(
                    [s["p90_us"] - direct[s["round"]]["p90_us"] for s in paired]
                )
            rows[m] = row
        counts = [s["client_ns_tcp_sockets"] for ss in by_mode.values() for s in ss]
        res: dict = {"modes": rows, "client_ns_tcp_sockets": [min(counts), max(counts)]}
        if "tlscap" in rows and "mitmproxy" in rows:
            t = {s["round"]: s for s in by_mode["tlscap"]}
            mm = {s["round"]: s for s in by_mode["mitmproxy"]}
            both = sorted(set(t) & set(mm))
            res["tlscap_vs_mitmproxy_req_per_s"] = bl.median(
                [t[r]["req_per_s"] / mm[r]["req_per_s"] for r in both]
            )
        out[w] = res
    return out


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    from tests.netns import lab_unavailable_reason, netns_lab

    reason = lab_unavailable_reason()
    if reason:
        raise bl.BenchError(reason)
    modes = list(args.modes)
    mitmdump = find_mitmdump() if "mitmproxy" in modes else None
    notes: list[str] = []
    if "mitmproxy" in modes and mitmdump is None:
        print(MITM_MISSING, file=sys.stderr, flush=True)
        notes.append(MITM_MISSING)
        modes.remove("mitmproxy")
    mitm_version = None
    if mitmdump:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            v = subprocess.run([mitmdump, "--version"], capture_output=True, text=True, timeout=30)
            mitm_version = v.stdout.splitlines()[0].split()[-1] if v.stdout else None
    samples: list[dict] = []
    t_start = time.monotonic()
    lab_names: list[str] = []
    with bl.scratch_dir(keep=args.keep) as work:
        env: Lab | None = None
        try:
            with netns_lab() as lab:
                lab_names = [lab.client, lab.server]
                env = Lab(lab, work, args)
                try:
                    env.start(modes, mitmdump)
                    for r in range(args.rounds):
                        for w in args.workloads:
                            order = modes[r % len(modes) :] + modes[: r % len(modes)]
                            for mode in order:
                                s = one_sample(lab, env, mode, w, args)
                                s["round"] = r
                                samples.append(s)
                                log(
                                    args,
                                    f"  round {r} {w:<9} {mode:<9} {s['req_per_s']:8.0f} req/s"
                                    f"  median {s['median_us']:7.0f} us  errors {s['errors']}",
                                )
                finally:
                    env.close()
        finally:
            leftover = leftover_netns(lab_names)
    checks = env.checks if env else {}
    checks["leftover_netns"] = leftover
    return {
        "benchmark": "proxy_overhead",
        "machine": bl.machine_info(),
        "args": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "body": args.body,
            "client_tw_buckets": args.client_tw_buckets,
            "modes": modes,
            "workloads": args.workloads,
            "agent_arg": args.agent_arg,
            "mitmdump": mitmdump,
            "mitmproxy_version": mitm_version,
        },
        "notes": notes,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "summary": summarize(samples, modes),
        "checks": checks,
        "samples": samples,
    }


def leftover_netns(names: list[str]) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    present = {line.split()[0] for line in out.splitlines() if line.strip()}
    return sorted(n for n in names if n in present)


def print_table(result: dict, out=sys.stdout) -> None:
    a, s, c = result["args"], result["summary"], result["checks"]

    def p(*x: object) -> None:
        print(*x, file=out)

    for note in result.get("notes", []):
        p(note)
    p(
        f"HTTPS POST of {a['body']} B, echoed back (Go https_echo in the server namespace); "
        f"{a['rounds']} rounds x {a['seconds']} s per sample, round-robin; "
        f"concurrency {a['concurrency']}; latency per request in us"
    )
    p(
        f"{'workload':<10}{'mode':<10}{'req/s':>8}{'vs direct':>10}{'median':>8}{'p90':>8}"
        f"{'+median':>9}{'+p90':>8}{'proxy CPU/req':>14}{'errors':>7}  per-round req/s"
    )
    for w, res in s.items():
        for m, v in res["modes"].items():
            ratio = f"{v['ratio_vs_direct']:.2f}" if "ratio_vs_direct" in v else ""
            added = f"{v['added_median_us']:.0f}" if "added_median_us" in v else ""
            added90 = f"{v['added_p90_us']:.0f}" if "added_p90_us" in v else ""
            cpu = f"{v['proxy_cpu_us_per_req']:.0f}" if "proxy_cpu_us_per_req" in v else ""
            flag = "" if v["issuer_ok"] else f"  WRONG ISSUER {v['issuers']}"
            p(
                f"{w:<10}{m:<10}{v['req_per_s']:>8.0f}{ratio:>10}{v['median_us']:>8.0f}"
                f"{v['p90_us']:>8.0f}{added:>9}{added90:>8}{cpu:>14}{v['errors']:>7}  "
                + " ".join(str(x) for x in v["per_round_req_per_s"])
                + flag
            )
            if v["first_error"]:
                p(f"    first error: {v['first_error']}")
        if "tlscap_vs_mitmproxy_req_per_s" in res:
            p(f"{w}: tlscap req/s / mitmproxy req/s = {res['tlscap_vs_mitmproxy_req_per_s']:.2f}")
        lo, hi = res["client_ns_tcp_sockets"]
        p(f"{w}: TCP sockets in the client namespace before a sample (TIME_WAIT too): {lo}-{hi}")
    if a.get("mitmproxy_version"):
        p(f"mitmproxy {a['mitmproxy_version']} ({a['mitmdump']})")
    if "tlscap_stats" in c:
        st = c["tlscap_stats"] or {}
        keys = [k for k in st if k.startswith("proxy_") and st[k]] + ["records", "bytes"]
        shown = {k: st.get(k) for k in keys if k in st}
        p(
            f"tlscap: ready after {c.get('tlscap_ready_s')} s, stopped in "
            f"{c.get('tlscap_stop_s')} s (exit {c.get('tlscap_exit')}), rules left: "
            f"{len(c.get('tlscap_rules_left', []))}; stats: {json.dumps(shown)}"
        )
        errors = sum(res["modes"].get("tlscap", {}).get("errors", 0) for res in s.values())
        if errors or any(st.get(k) for k in ("proxy_internal_errors", "proxy_relay_errors")):
            p(f"tlscap agent log (tail):\n{c.get('tlscap_log_tail', '')}")
    if c.get("leftover_netns"):
        p(f"LEFTOVER network namespaces: {c['leftover_netns']}")


def log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per sample")
    p.add_argument(
        "--concurrency", type=int, default=1, help="client processes, each one connection"
    )
    p.add_argument("--body", type=int, default=1024, help="request body bytes (echoed back)")
    p.add_argument(
        "--modes",
        type=bl.comma_list,
        default=list(ALL_MODES),
        help=f"comma-separated subset of {','.join(ALL_MODES)}",
    )
    p.add_argument(
        "--workloads",
        type=bl.comma_list,
        default=list(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    p.add_argument(
        "--client-tw-buckets",
        type=int,
        metavar="N",
        help="set net.ipv4.tcp_max_tw_buckets in the client namespace (default: the kernel's)",
    )
    p.add_argument("--quick", action="store_true", help="2 rounds of 1 s (a smoke run)")
    p.add_argument(
        "--agent-arg", action="append", default=[], help="extra argument for `tlscap run`"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 2, 1.0
    bad = [m for m in args.modes if m not in ALL_MODES]
    bad += [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown mode(s)/workload(s): {bad}")
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1 or args.body < 0:
        p.error("--rounds, --seconds and --concurrency must be positive, --body >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
