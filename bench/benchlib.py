"""Shared pieces of the tlscap benchmarks: build the load generator, run it, run the agent.

Everything here is bounded in time and cleans up after itself: every process a
benchmark starts is killed in a ``finally`` (by its own pid, never by name).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / ".build"
LOADGEN_SRC = BENCH_DIR / "ssl_write_loop.c"
GO_LOADGEN_SRC = BENCH_DIR / "go_tls_write_loop.go"
LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"
VENV_BIN = REPO / ".venv" / "bin"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `agent` (kernel headers) when run as bench/x.py
# PYTHONPATH entries (another checkout, for a before/after run) go back in front of
# this checkout: a bench then measures that checkout's `agent`.
sys.path.sort(key=lambda p: p not in os.environ.get("PYTHONPATH", "\0").split(os.pathsep))


class BenchError(RuntimeError):
    pass


def comma_list(text: str) -> list[str]:
    """An argparse type: "a,b,,c" -> ["a", "b", "c"] (--modes, --workloads, ...)."""
    return [item for item in text.split(",") if item]


def tlscap_command() -> list[str]:
    exe = VENV_BIN / "tlscap"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "agent"]


def compile_c(source: Path, libs: list[str], force: bool = False) -> tuple[Path, bool]:
    """`source` compiled (gcc -O2 -Wall, linked with `libs`) into BUILD_DIR unless the
    binary is newer than the source: (the binary, whether it was built now)."""
    out = BUILD_DIR / source.stem
    if not force and out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out, False
    BUILD_DIR.mkdir(exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-o", str(out), str(source), *libs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BenchError(f"building {source.name} failed:\n{proc.stderr}")
    return out, True


def build_loadgen(force: bool = False) -> Path:
    """Compile ssl_write_loop.c (gcc -O2) unless the binary is newer than the source."""
    out, built = compile_c(LOADGEN_SRC, ["-lssl", "-lcrypto"], force)
    if not built:
        return out
    ldd = subprocess.run(["ldd", str(out)], capture_output=True, text=True, timeout=30).stdout
    real_libssl = os.path.realpath(LIBSSL)
    linked = [
        os.path.realpath(line.split("=>")[1].split("(")[0].strip())
        for line in ldd.splitlines()
        if "libssl.so" in line and "=>" in line
    ]
    if not any(os.path.samefile(p, real_libssl) for p in linked if os.path.exists(p)):
        raise BenchError(f"{out} does not link {LIBSSL} (ldd: {linked})")
    return out


def build_go_loadgen(toolchain: str = "pypi") -> Path:
    """Build go_tls_write_loop.go with one of the test suite's Go toolchains (cached).

    toolchain: "pypi" (the venv's current Go) or "debian" (golang-go, 1.19).
    """
    from tests import golang

    found = golang.toolchains().get(toolchain)
    if found is None:
        reason = golang.MISSING_REASON.get(toolchain, f"unknown Go toolchain {toolchain!r}")
        raise BenchError(reason)
    try:
        return golang.build(found, GO_LOADGEN_SRC)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


# Instructions x86 uprobes emulate in the kernel instead of single-stepping a copy of
# them out of line (arch/x86/kernel/uprobes.c: branches, calls, nops, push).
EMULATED_MNEMONICS = ("call", "jmp", "nop", "push")  # and every conditional jump (j*)


def symbol_offset(lib: str, symbol: str) -> int | None:
    """Address of a dynamic symbol in `lib` (via nm -D)."""
    out = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].split("@")[0] == symbol:
            return int(parts[0], 16)
    return None


def first_emulated_instruction(lib: str, symbol: str, window: int = 64) -> tuple[int, str] | None:
    """(offset, instruction) of the first instruction in `symbol` that uprobes emulate.

    Informational only: a probe there shows what a hit costs without the out-of-line
    single step that a probe on the function's first instruction usually needs.
    """
    start = symbol_offset(lib, symbol)
    if start is None:
        return None
    return first_emulated_instruction_at(lib, start, window)


def disassemble(path: str, start: int, length: int) -> list[tuple[int, str]]:
    """(address, instruction) pairs objdump prints for [start, start + length) of `path`."""
    out = subprocess.run(
        [
            "objdump",
            "-d",
            "--no-show-raw-insn",
            f"--start-address={start:#x}",
            f"--stop-address={start + length:#x}",
            path,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    found = []
    for line in out.splitlines():
        addr, sep, insn = line.partition(":\t")
        if sep:
            found.append((int(addr.strip(), 16), insn.strip()))
    return found


def first_emulated_instruction_at(
    path: str, start: int, window: int = 64
) -> tuple[int, str] | None:
    """(offset from start, instruction) of the first emulated instruction at or after
    the file address `start` (a symbol's value: what objdump's addresses are)."""
    for addr, insn in disassemble(path, start, window):
        mnemonic = insn.split()[0] if insn.split() else ""
        mnemonic = mnemonic.removesuffix("q").removesuffix("w")
        if mnemonic in EMULATED_MNEMONICS or mnemonic.startswith("j"):
            return addr - start, insn
    return None


def prepare_bcc_env() -> None:
    """Point bcc at kernel headers the way the agent does (None: real headers exist)."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    from agent.probes.kernel_headers import find_kernel_source

    source = find_kernel_source()
    if source is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(source)


def kill_tree(
    proc: subprocess.Popen | None, sig: int = signal.SIGKILL, timeout: float = 10.0
) -> None:
    """Kill a process we started (its own pid only) and reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


# -- other tracers on the machine ---------------------------------------------------


def foreign_bpf_attachments(own_pids: set[int]) -> list[str]:
    """BPF programs attached to uprobes/tracepoints by processes other than ours.

    uprobes live on the file's inode: another tool probing libssl.so.3 (say, a
    test suite running the agent) slows *every* process's SSL_write, baseline
    included.  Samples taken while such probes exist are flagged and retaken.
    """
    try:
        out = subprocess.run(
            ["bpftool", "-j", "perf", "list"], capture_output=True, text=True, timeout=20
        ).stdout
        entries = json.loads(out or "[]")
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return []
    found = []
    for e in entries:
        if e.get("pid") in own_pids:
            continue
        what = e.get("filename") or e.get("tracepoint") or e.get("func") or "?"
        found.append(f"pid {e.get('pid')}: {e.get('fd_type')} {what}")
    return found


class ForeignProbeMonitor:
    """Polls for foreign BPF attachments in a thread while a sample runs.

    A test suite attaching and detaching within one sample would slip between a
    check before and a check after; bpftool answers in about a millisecond, so
    polling every 50 ms costs the measurement nothing noticeable.
    """

    def __init__(self, own_pids: set[int], interval: float = 0.05) -> None:
        self.own_pids = own_pids
        self.interval = interval
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.seen.update(foreign_bpf_attachments(self.own_pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> ForeignProbeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.seen.update(foreign_bpf_attachments(self.own_pids))


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[bool]:
    """Kernel BPF run-time accounting (run_time_ns/run_cnt per program) while in the block.

    Uses BPF_ENABLE_STATS, which stays on only while its fd is open, so nothing is left
    switched on if we die.  Yields False if the kernel refuses.  Costs two clock reads
    per program run, for every BPF program on the machine: use it for attribution runs,
    not for the overhead numbers themselves.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    nr_bpf, bpf_enable_stats, bpf_stats_run_time = 321, 32, 0  # x86_64
    attr = (ctypes.c_uint32 * 4)(bpf_stats_run_time, 0, 0, 0)
    fd = libc.syscall(nr_bpf, bpf_enable_stats, ctypes.byref(attr), ctypes.sizeof(attr))
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)


def bpf_prog_stats(pid: int) -> dict[str, dict[str, int]]:
    """run_cnt and run_time_ns of each BPF program process `pid` has attached."""
    try:
        perf = json.loads(
            subprocess.run(
                ["bpftool", "-j", "perf", "list"], capture_output=True, text=True, timeout=20
            ).stdout
            or "[]"
        )
        ids = {e["prog_id"] for e in perf if e.get("pid") == pid}
        progs = json.loads(
            subprocess.run(
                ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=20
            ).stdout
            or "[]"
        )
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError):
        return {}
    out: dict[str, dict[str, int]] = {}
    for prog in progs:
        if prog.get("id") in ids:
            st = out.setdefault(prog["name"], {"run_cnt": 0, "run_time_ns": 0})
            st["run_cnt"] += prog.get("run_cnt", 0)
            st["run_time_ns"] += prog.get("run_time_ns", 0)
    return out


def wait_for_quiet_machine(own_pids: set[int], max_wait: float) -> list[str]:
    """Wait (at most max_wait s) until no foreign probes are attached; return what remains."""
    deadline = time.monotonic() + max_wait
    while True:
        foreign = foreign_bpf_attachments(own_pids)
        if not foreign or time.monotonic() >= deadline:
            return foreign
        time.sleep(1.0)


# -- the load generator --------------------------------------------------------------


@dataclass
class LoadgenRun:
    """One ssl_write_loop process that has done its handshake and waits for "go"."""

    proc: subprocess.Popen
    pid: int

    def send_go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait_result(self, timeout: float) -> dict:
        """Wait for the run to end; its JSON result line."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc)
            raise BenchError(f"load generator {self.pid} did not finish in {timeout} s") from None
        if self.proc.returncode != 0:
            raise BenchError(f"load generator failed ({self.proc.returncode}): {err.strip()}")
        return json.loads(out.strip().splitlines()[-1])

    def go(self, timeout: float) -> dict:
        self.send_go()
        return self.wait_result(timeout)


def start_loadgen(binary: Path, args: list[str], timeout: float = 20.0) -> LoadgenRun:
    """Start ssl_write_loop --wait-stdin and wait for its READY line (handshake done)."""
    proc = subprocess.Popen(
        [str(binary), "--wait-stdin", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = wait_for_line(proc, lambda text: text.startswith("READY"), timeout)
    if line is None:
        err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        kill_tree(proc)
        raise BenchError(f"load generator did not get ready: {err.strip()}")
    return LoadgenRun(proc, int(line.split()[1]))


def wait_for_line(
    proc: subprocess.Popen, wanted: Callable[[str], bool], timeout: float
) -> str | None:
    """The first stdout line `wanted` accepts, or None if the process ends or times out."""
    import selectors

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
                if wanted(line):
                    return line
                if not line:
                    return None
            if proc.poll() is not None:
                return None
    return None


# -- the agent -----------------------------------------------------------------------


@dataclass
class AgentRun:
    proc: subprocess.Popen
    output: Path
    ready: Path
    log: Path
    started: float
    ready_after_s: float = 0.0
    cpu_at_ready_s: float = 0.0
    total_cpu_s: float = float("nan")

    def cpu_seconds(self) -> float:
        """user + system CPU the agent and its workers have used so far (nan once it
        has exited)."""
        return process_tree_cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = 60.0) -> float:
        """SIGINT (the agent drains its ring, writes stats, exits 0); seconds it took.

        Sets total_cpu_s from the rusage of the reaped agent.
        """
        t0 = time.monotonic()
        if self.proc.poll() is None:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc)
                raise BenchError(f"agent did not stop within {timeout} s") from None
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.total_cpu_s = (after.ru_utime + after.ru_stime) - (
                before.ru_utime + before.ru_stime
            )
        if self.proc.returncode != 0:
            raise BenchError(f"agent exited {self.proc.returncode}: {self.log_tail()}")
        return time.monotonic() - t0

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextlib.contextmanager
def _launched_agent(
    cmd: list[str], workdir: Path, cwd: Path, env: dict[str, str], ready_timeout: float
) -> Iterator[AgentRun]:
    """Start `cmd` (a `tlscap run` with --ready-file workdir/ready), wait for its
    ready file, and kill it when the with-block ends."""
    output, ready, log = workdir / "capture.jsonl", workdir / "ready", workdir / "agent.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    run = AgentRun(proc, output, ready, log, time.monotonic())
    try:
        deadline = time.monotonic() + ready_timeout
        while not (ready.exists() and ready.read_text().endswith("\n")):
            if proc.poll() is not None:
                raise BenchError(f"agent exited {proc.returncode} early: {run.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"agent not ready after {ready_timeout} s: {run.log_tail()}")
            time.sleep(0.05)
        run.ready_after_s = time.monotonic() - run.started
        run.cpu_at_ready_s = run.cpu_seconds()
        yield run
    finally:
        kill_tree(proc)


@contextlib.contextmanager
def running_agent(
    workdir: Path,
    pids: list[int] | None = None,
    extra: list[str] | None = None,
    ready_timeout: float = 90.0,
    bpf_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[AgentRun]:
    """`tlscap run --output jsonl` until the with-block ends (killed if still running).

    bpf_dir: run the agent on a modified copy of bpf/ (TLSCAP_BPF_DIR), for experiments.
    env: more environment for the agent (TLSCAP_PROBE_PLACEMENT=entry).
    """
    output = workdir / "capture.jsonl"
    ready = workdir / "ready"
    for p in (output, ready):
        p.unlink(missing_ok=True)
    cmd = [
        *tlscap_command(),
        "run",
        "--output",
        "jsonl",
        "--output-file",
        str(output),
        "--ready-file",
        str(ready),
        *(f"--pid={p}" for p in pids or []),
        *(extra or []),
    ]
    env = {**os.environ, **(env or {})}
    if bpf_dir is not None:
        env["TLSCAP_BPF_DIR"] = str(bpf_dir)
    with _launched_agent(cmd, workdir, REPO, env, ready_timeout) as run:
        yield run


@dataclass(frozen=True)
class AgentCommand:
    """Which tlscap to run: this tree's, or another checkout's (to compare old and new code).

    cwd: run `python -m agent` there (its `agent/` package wins over the installed one);
    pythonpath: put that directory first on PYTHONPATH instead (the agent then runs in its
    scratch directory, so that no `agent/` in the working directory shadows it).
    """

    cwd: Path | None = None
    pythonpath: Path | None = None

    @property
    def is_default(self) -> bool:
        return self.cwd is None and self.pythonpath is None

    def argv(self) -> list[str]:
        return tlscap_command() if self.is_default else [sys.executable, "-m", "agent"]

    def describe(self) -> str:
        if self.pythonpath is not None:
            return f"PYTHONPATH={self.pythonpath} python -m agent"
        if self.cwd is not None:
            return f"python -m agent (cwd {self.cwd})"
        return " ".join(self.argv())


@contextlib.contextmanager
def running_agent_command(
    workdir: Path,
    run_args: list[str],
    command: AgentCommand | None = None,
    ready_timeout: float = 90.0,
    bpf_dir: Path | None = None,
) -> Iterator[AgentRun]:
    """`tlscap run --ready-file … RUN_ARGS` (any output) until the with-block ends.

    Like running_agent, for callers that choose the output and the tlscap to run.
    `AgentRun.output` is workdir/capture.jsonl: pass it in run_args if it is wanted.
    bpf_dir: a modified copy of bpf/ (TLSCAP_BPF_DIR), as running_agent's.
    """
    command = command or AgentCommand()
    output = workdir / "capture.jsonl"
    ready = workdir / "ready"
    for p in (output, ready):
        p.unlink(missing_ok=True)
    cmd = [*command.argv(), "run", "--ready-file", str(ready), *run_args]
    env = dict(os.environ)
    if bpf_dir is not None:
        env["TLSCAP_BPF_DIR"] = str(bpf_dir)
    cwd = REPO
    if command.pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (str(command.pythonpath), env.get("PYTHONPATH", "")) if x
        )
        cwd = workdir
    elif command.cwd is not None:
        cwd = command.cwd
    with _launched_agent(cmd, workdir, cwd, env, ready_timeout) as run:
        yield run


def scrape_metrics(host: str, port: int, timeout: float = 5.0) -> dict[str, float]:
    """An agent's Prometheus /metrics (--health-listen) as {name: value}, unlabelled
    samples only (the agent's counters have no labels)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value.split()[0])
    return out


def wait_for_records(path: Path, want: int, idle: float = 0.5, limit: float = 30.0) -> float:
    """Seconds until the agent's output holds `want` data records (or stopped growing).

    The agent keeps draining while it runs; this is how far behind the writers it was.
    The sink flushes every 0.1 s, so the answer has that resolution.  Stops when the
    count has not grown for `idle` s (the rest was lost) or after `limit` s.
    """
    t0 = time.monotonic()
    seen = 0
    last_growth = t0
    tail = b""
    marker = b'{"type":"data"'
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if chunk:
                buf = tail + chunk
                seen += buf.count(marker)
                tail = buf[-(len(marker) - 1) :]
                last_growth = time.monotonic()
                if seen >= want:
                    return time.monotonic() - t0
                continue
            now = time.monotonic()
            if now - last_growth > idle or now - t0 > limit:
                return last_growth - t0
            time.sleep(0.02)


@dataclass
class Capture:
    """What the agent wrote: stats line and per-pid egress totals of data records."""

    stats: dict = field(default_factory=dict)
    data_records: int = 0
    egress_len: dict[int, int] = field(default_factory=dict)
    egress_captured: dict[int, int] = field(default_factory=dict)
    egress_calls: dict[int, int] = field(default_factory=dict)
    payload_mismatches: int = 0


PATTERN = b"tlscap-bench-payload "


def read_capture(path: Path, check_payload_pids: set[int] | None = None) -> Capture:
    """Sum `len` of egress data records per pid; optionally check the payload bytes."""
    import base64

    cap = Capture()
    with open(path, "rb") as f:
        for line in f:
            rec = json.loads(line)
            kind = rec.get("type")
            if kind == "stats":
                cap.stats = rec
            if kind != "data":
                continue
            cap.data_records += 1
            if rec.get("direction") != "egress":
                continue
            pid = rec["pid"]
            cap.egress_len[pid] = cap.egress_len.get(pid, 0) + rec["len"]
            cap.egress_captured[pid] = cap.egress_captured.get(pid, 0) + rec["captured_len"]
            cap.egress_calls[pid] = cap.egress_calls.get(pid, 0) + 1
            if check_payload_pids and pid in check_payload_pids:
                data = base64.b64decode(rec["data_b64"])
                want = (PATTERN * (len(data) // len(PATTERN) + 1))[: len(data)]
                if data != want:
                    cap.payload_mismatches += 1
    return cap


# -- misc ----------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine_info() -> dict:
    info: dict = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["openssl"] = subprocess.run(
            ["openssl", "version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return info


def process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def self_signed_cert(work: Path) -> tuple[Path, Path]:
    """A fresh self-signed P-256 certificate and its key (work/cert.pem, work/key.pem)."""
    if shutil.which("openssl") is None:
        raise BenchError("openssl is not installed (`make setup` adds it)")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key),
         "-out", str(cert)], check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def big_file_server(work: Path, size: int) -> Iterator[int]:
    """`openssl s_server -WWW` on a free loopback port serving `work`/big (`size`
    random bytes, written here), with a fresh P-256 certificate: yields the port."""
    (work / "big").write_bytes(os.urandom(size))
    cert, key = self_signed_cert(work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert),
         "-key", str(key), "-WWW", "-quiet"],
        cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        yield port
    finally:
        kill_tree(server)


def process_tree_cpu_seconds(pid: int) -> float:
    """process_cpu_seconds of `pid` and of its live descendants (the agent's capture
    workers are child processes): nan once `pid` itself has exited."""
    total = process_cpu_seconds(pid)
    for child in child_pids(pid):
        cpu = process_tree_cpu_seconds(child)
        if cpu == cpu:  # a child that exited meanwhile counts nothing (its stat is gone)
            total += cpu
    return total


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat: busy is all but
    idle and iowait (steal, time the hypervisor gave another guest, counts as busy: the
    CPU was not ours to use)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    total = sum(fields)
    return total - fields[3] - fields[4], total


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")


@contextlib.contextmanager
def scratch_dir(keep: bool = False) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tlscap-bench-"))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the benchmarks attach eBPF probes: run them as root")


def run_cli(
    argv: list[str] | None,
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], dict],
    print_table: Callable[[dict], None],
) -> int:
    """The shared `main` of the bench scripts: run, then a table or `--json`."""
    args = parse_args(argv)
    result = run(args)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print_table(result)
    return 0
