"""A busy HTTPS server on loopback: nginx (1 worker, keep-alive, a fixed body) under wrk.

Shared by tests/ebpf/test_load_nginx.py (is every request captured?) and
bench/load_nginx.py (what does capture cost nginx?).  Plain stdlib, no pytest.

nginx runs as root in the foreground (`daemon off`) with its own config, certificate,
pid file, logs and temp paths in a scratch directory, on a free 127.0.0.1 port: the
system's nginx config and service are never touched.  Every request gets a unique
target (/load/<thread>/<n>, from a wrk Lua script), so a captured exchange can be
matched to the access log line of the very request it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BODY_SIZE = 1536
TARGET_PREFIX = "/load/"

# $request_uri last: it is the only field that could hold a space (it cannot here).
LOG_FORMAT = "$msec $pid $connection $connection_requests $status $body_bytes_sent $request_uri"

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    log_format lab '{log_format}';
    access_log {dir}/access.log lab;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_timeout 60s;
    keepalive_requests 10000000;
    default_type text/plain;
    server {{
        listen {host}:{port} ssl{http2};
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location / {{
            return 200 "{body}";
        }}
    }}
}}
"""

# Unique targets per request, and wrk's own totals as one JSON line at the end.
WRK_SCRIPT = """\
local threads = 0
function setup(thread)
    thread:set("tid", threads)
    threads = threads + 1
end
function init(args)
    n = 0
end
function delay()
    return @DELAY_MS@
end
function request()
    n = n + 1
    return wrk.format(nil, "@PREFIX@" .. tid .. "/" .. n)
end
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,' ..
        '"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
        e.status, e.timeout))
end
""".replace("@PREFIX@", TARGET_PREFIX)


def wrk_script(delay_ms: int = 0) -> str:
    """The Lua script; `delay_ms` paces each connection (wrk waits that long before
    each request), so the rate is about connections * 1000 / delay_ms per second."""
    return WRK_SCRIPT.replace("@DELAY_MS@", str(delay_ms))


class LabError(RuntimeError):
    """The lab could not run (a tool is missing, nginx did not start, wrk failed)."""


def missing_tools() -> list[str]:
    """Which of nginx, wrk and openssl are not installed (`make setup` installs them)."""
    return [t for t in ("nginx", "wrk", "openssl") if shutil.which(t) is None]


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise LabError(
            f"not installed: {', '.join(missing)} - `make setup` (scripts/bootstrap.sh) "
            "installs them from Debian"
        )


def make_body(size: int = BODY_SIZE) -> bytes:
    """The fixed response body: printable, no quotes or `$`, so it sits in nginx.conf as is."""
    unit = b"tlscap-load-body-0123456789abcdefghijklmnopqrstuvwxyz-"
    return (unit * (size // len(unit) + 1))[:size]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost/127.0.0.1 (cert.pem, key.pem)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key),
         "-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True)
class AccessEntry:
    """One line of the lab's access log: one request nginx served."""

    msec: float
    pid: int
    connection: int
    connection_requests: int
    status: int
    body_bytes_sent: int
    target: str


def parse_access_log(path: Path) -> list[AccessEntry]:
    entries = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split(" ", 6)
            if len(parts) != 7:
                continue  # a line cut by a crash; never seen with `daemon off` + SIGQUIT
            msec, pid, conn, conn_req, status, sent, target = parts
            entries.append(
                AccessEntry(float(msec), int(pid), int(conn), int(conn_req), int(status),
                            int(sent), target)
            )  # fmt: skip
    return entries


def child_pids(ppid: int) -> list[int]:
    """Processes whose parent is `ppid` (nginx's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                found.append(int(entry))
    return sorted(found)


@dataclass
class Nginx:
    """A running lab nginx (master `proc`, its workers) and what it served."""

    proc: subprocess.Popen
    workdir: Path
    host: str
    port: int
    body: bytes
    workers: list[int] = field(default_factory=list)

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/"

    @property
    def pids(self) -> set[int]:
        return {self.proc.pid, *self.workers}

    def served(self) -> list[AccessEntry]:
        return parse_access_log(self.access_log)

    def served_count(self) -> int:
        with open(self.access_log, "rb") as f:
            return sum(1 for _ in f)

    def error_log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "error.log").read_text(errors="replace")[-n:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGQUIT: workers finish and log what they served), else kill.

        Only our own pids are signalled: the master, then any worker it left behind.
        """
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(timeout=timeout)
        for pid in self.workers:
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if "(nginx)" in stat:  # still ours: pids are not reused this fast
                    os.kill(pid, signal.SIGKILL)


def start_nginx(
    workdir: Path,
    body_size: int = BODY_SIZE,
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    http2: bool = False,
) -> Nginx:
    """nginx with the lab config in `workdir` (created), accepting on a free port
    (offering HTTP/2 by ALPN when `http2`)."""
    require_tools()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    make_cert(workdir)
    body = make_body(body_size)
    port = free_port(host)
    conf = workdir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(dir=workdir, host=host, port=port, body=body.decode(),
                          log_format=LOG_FORMAT, http2=" http2" if http2 else "")
    )  # fmt: skip
    stderr = open(workdir / "nginx.stderr", "w")  # noqa: SIM115 - the child holds it
    with stderr:
        # -e: nginx opens its compiled-in error log before reading the config otherwise.
        proc = subprocess.Popen(
            ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    lab = Nginx(proc, workdir, host, port, body)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabError(
                f"nginx exited {proc.returncode}: "
                f"{(workdir / 'nginx.stderr').read_text()} {lab.error_log_tail()}"
            )
        lab.workers = child_pids(proc.pid)
        if lab.workers and _accepts(host, port):
            return lab
        if time.monotonic() > deadline:
            lab.stop()
            raise LabError(f"nginx did not accept on {host}:{port} in {timeout} s")
        time.sleep(0.05)


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


@contextlib.contextmanager
def running_nginx(workdir: Path, body_size: int = BODY_SIZE) -> Iterator[Nginx]:
    lab = start_nginx(workdir, body_size)
    try:
        yield lab
    finally:
        lab.stop()


# -- wrk -------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int  # responses wrk completed
    duration_s: float
    req_per_s: float  # wrk's own "Requests/sec" line
    errors: dict[str, int]
    output: str
    pid: int


def wrk_command(
    url: str, connections: int, seconds: float, script: Path, threads: int = 1
) -> list[str]:
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url]


class Wrk:
    """A running wrk; `pid` is known at once, so a capture can be pointed at it."""

    def __init__(
        self,
        url: str,
        connections: int,
        seconds: float,
        workdir: Path,
        threads: int = 1,
        delay_ms: int = 0,
    ) -> None:
        require_tools()
        script = workdir / "unique_targets.lua"
        script.write_text(wrk_script(delay_ms))
        self.seconds = seconds
        self.proc = subprocess.Popen(
            wrk_command(url, connections, seconds, script, threads),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.pid = self.proc.pid

    def wait(self, timeout: float | None = None) -> WrkResult:
        timeout = self.seconds + 60 if timeout is None else timeout
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LabError(f"wrk did not finish in {timeout} s") from None
        if self.proc.returncode != 0:
            raise LabError(f"wrk exited {self.proc.returncode}: {out.strip()}")
        return parse_wrk_output(out, self.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()


def parse_wrk_output(out: str, pid: int = 0) -> WrkResult:
    """wrk's text report plus the JSON line the lab's Lua `done` writes."""
    totals: dict = {}
    for line in out.splitlines():
        if line.startswith("{") and '"requests"' in line:
            totals = json.loads(line)
    rate = re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M)
    if not totals or rate is None:
        raise LabError(f"unexpected wrk output:\n{out}")
    return WrkResult(
        requests=totals["requests"],
        duration_s=totals["duration_us"] / 1e6,
        req_per_s=float(rate.group(1)),
        errors=totals["errors"],
        output=out,
        pid=pid,
    )


def run_wrk(
    url: str,
    connections: int,
    seconds: float,
    workdir: Path,
    threads: int = 1,
    delay_ms: int = 0,
) -> WrkResult:
    wrk = Wrk(url, connections, seconds, workdir, threads, delay_ms)
    try:
        return wrk.wait()
    finally:
        wrk.kill()


# -- what the agent captured ------------------------------------------------------------


@dataclass
class ExchangeCount:
    """Exchange records of the lab's traffic, per side, from a jsonl capture."""

    server: dict[str, dict] = field(default_factory=dict)  # target -> nginx-side exchange
    client: dict[str, dict] = field(default_factory=dict)  # target -> wrk-side exchange
    server_total: int = 0  # nginx-side exchange records with a lab request
    client_total: int = 0
    stats: dict = field(default_factory=dict)


def read_exchanges(path: Path, nginx_pids: set[int], wrk_pid: int) -> ExchangeCount:
    """Exchange records whose pid is nginx's (server side) or wrk's (client side), keyed by
    request target, and the agent's final stats line."""
    found = ExchangeCount()
    with open(path, "rb") as f:
        for line in f:
            if b'"type":"data"' in line[:40]:
                continue  # the bulk of the file; nothing needed from it
            rec = json.loads(line)
            kind = rec.get("type")
            if kind == "stats":
                found.stats = rec
                continue
            if kind != "exchange":
                continue
            request = (rec.get("exchange") or {}).get("request") or {}
            target = request.get("target") or ""
            if not target.startswith(TARGET_PREFIX):
                continue
            if rec.get("pid") in nginx_pids:
                found.server_total += 1
                found.server[target] = rec
            elif rec.get("pid") == wrk_pid:
                found.client_total += 1
                found.client[target] = rec
    return found
