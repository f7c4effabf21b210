"""Harness for the real-probe tests: run `tlscap run` as a subprocess against
real TLS programs and read back what it wrote.

These tests need root and bcc.  Where either is truly absent they skip with the
reason printed; on the project's machines both are present and CI runs them.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TLSCAP = [sys.executable, "-m", "agent"]
PROGRAMS = Path(__file__).parent / "programs"
# Compiling and attaching the probes takes seconds here, minutes in an emulated
# (TCG) guest of `make test-kernels`, which raises this.
AGENT_START_TIMEOUT = float(os.environ.get("TLSCAP_TEST_AGENT_START_TIMEOUT", "60"))


def _missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "eBPF tests need root (run `sudo make test`)"
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        return f"bcc is not importable ({exc}); `make setup` installs python3-bpfcc"
    if shutil.which("openssl") is None or shutil.which("curl") is None:
        return "openssl and curl are needed (`make setup` installs them)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing_capability()
    for item in items:
        if "tests/ebpf" in str(item.fspath):
            item.add_marker(pytest.mark.ebpf)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    def is_open() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        return False

    wait_for(is_open, timeout, f"{host}:{port} to accept connections")


@dataclass
class Capture:
    """What one agent run wrote, parsed."""

    records: list[dict]
    stderr: str
    returncode: int

    def data(self, **match) -> list[dict]:
        return [
            r
            for r in self.records
            if r["type"] == "data" and all(r.get(k) == v for k, v in match.items())
        ]

    def of_type(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["type"] == kind]

    @property
    def stats(self) -> dict:
        (stats,) = self.of_type("stats")
        return stats

    def stream(self, conn_id: str, direction: str) -> bytes:
        """Reassemble one direction of a connection by offset; gaps or
        overlaps fail the test, since the capture must have neither."""
        chunks = sorted(
            (r["offset"], base64.b64decode(r["data_b64"]), r)
            for r in self.data(conn_id=conn_id, direction=direction)
        )
        out = bytearray()
        for offset, payload, record in chunks:
            assert offset == len(out), f"gap/overlap at offset {offset} (have {len(out)})"
            assert not record["truncated"], f"truncated record at offset {offset}"
            assert record["captured_len"] == record["len"] == len(payload)
            out += payload
        return bytes(out)

    def conns(self, **match) -> list[str]:
        seen = collections.OrderedDict()
        for r in self.data(**match):
            seen[r["conn_id"]] = True
        return list(seen)


@dataclass
class Agent:
    workdir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def output(self) -> Path:
        return self.workdir / "capture.jsonl"

    @property
    def ready(self) -> Path:
        return self.workdir / "ready"

    def start(self, timeout: float = AGENT_START_TIMEOUT) -> Agent:
        self.ready.unlink(missing_ok=True)
        cmd = [*TLSCAP, "run", "--output", "jsonl", "--output-file", str(self.output)]
        cmd += ["--ready-file", str(self.ready), "--log-level", "info", *self.args]
        self._stderr = open(self.workdir / "agent.stderr", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=self._stderr, stdout=subprocess.DEVNULL)

        def ready_or_dead() -> bool:
            return self.ready.exists() or self.proc.poll() is not None

        wait_for(ready_or_dead, timeout, "the agent to attach its probes")
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited early:\n{self.stderr_text()}")
        return self

    def stderr_text(self) -> str:
        self._stderr.flush()
        return (self.workdir / "agent.stderr").read_text()

    def stop(self, settle: float = 0.3) -> Capture:
        """SIGINT the agent (after letting in-flight events arrive) and parse its output."""
        assert self.proc is not None
        time.sleep(settle)
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        records = [json.loads(line) for line in self.output.read_text().splitlines()]
        return Capture(records, self.stderr_text(), rc)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator:
    """agent(*args) -> a started Agent; killed at teardown if still running."""
    started: list[Agent] = []

    def start(*args: str) -> Agent:
        a = Agent(tmp_path / f"agent{len(started)}", list(args))
        a.workdir.mkdir()
        started.append(a)
        return a.start()

    yield start
    for a in started:
        a.kill()


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cert")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def start_http_server(tls_cert: tuple[Path, Path]) -> tuple[subprocess.Popen, int]:
    """programs/http_server.py (HTTP/1.1, HTTP/2, gRPC echo; Python ssl) and its port."""
    cert, key = tls_cert
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "http_server.py"), str(cert), str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("ready "), f"http_server did not start: {line!r} {proc.stderr.read()}"
    return proc, int(line.split()[1])


@pytest.fixture
def http_server(tls_cert: tuple[Path, Path]) -> Iterator[int]:
    """The port of a programs/http_server.py, killed at teardown."""
    proc, port = start_http_server(tls_cert)
    yield port
    proc.kill()
    proc.wait()


@pytest.fixture
def s_server(tls_cert: tuple[Path, Path]) -> Iterator:
    """s_server(host) -> port of an `openssl s_server -www` on that address."""
    procs: list[subprocess.Popen] = []

    def start(host: str = "127.0.0.1") -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        port = free_port(family)
        cert, key = tls_cert
        accept = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", accept, "-cert", str(cert), "-key", str(key),
             "-www", "-quiet", "-naccept", "50"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        wait_for_port(host, port)
        return port

    yield start
    for p in procs:
        p.kill()
        p.wait()


def run_program(name: str, *args: str, env: dict | None = None, timeout: float = 60) -> dict:
    """Run a helper program from tests/ebpf/programs; it prints one JSON line."""
    out = subprocess.run(
        [sys.executable, str(PROGRAMS / name), *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class TruthServer:
    """A running programs/https_truth_server.py: what it received and sent is the truth."""

    proc: subprocess.Popen
    port: int

    def wait_received(self) -> None:
        """--hold: block until the server has a request."""
        assert self.proc.stdout.readline() == "received\n"

    def release(self) -> None:
        """--hold: let the server answer."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 30) -> list[dict]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"truth server failed:\n{err}"
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def truth_server(tls_cert: tuple[Path, Path]) -> Iterator:
    """truth_server(count=1, body_size=3000, host=..., hold=False) -> a started TruthServer."""
    procs: list[subprocess.Popen] = []

    def start(
        count: int = 1, body_size: int = 3000, host: str = "127.0.0.1", hold: bool = False
    ) -> TruthServer:
        cert, key = tls_cert
        proc = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "https_truth_server.py"), str(cert), str(key),
             "--count", str(count), "--body-size", str(body_size), "--host", host,
             *(["--hold"] if hold else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.PIPE if hold else subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("ready "), f"truth server did not start: {line!r}"
        return TruthServer(proc, int(line.split()[1]))

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def assert_client_capture(cap: Capture, comm: str, source: str, truth: dict, port: int) -> str:
    """The one connection `comm` made carries exactly the bytes the truth server got and
    sent, with the right tuple and source; returns its conn_id."""
    (conn,) = cap.conns(comm=comm)
    assert cap.stream(conn, "egress") == base64.b64decode(truth["received_b64"])
    assert cap.stream(conn, "ingress") == base64.b64decode(truth["sent_b64"])
    first = cap.data(conn_id=conn)[0]
    assert first["source"] == source
    assert first["role"] == "client"
    assert first["remote"]["port"] == port
    assert [first["local"]["ip"], first["local"]["port"]] == truth["peer"]
    return conn
