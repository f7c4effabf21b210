"""Real gRPC over loopback: collectors (in-process or as `tlscap collector`
processes), exporters and subscribers talking through 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from agent.certs.authority import CertificateAuthority, write_private, write_public
from agent.cli import tls_options
from agent.records.record import Endpoint, Record

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def make_records(
    n: int, agent_id: str = "agent-a", payload: int = 64, start_seq: int = 1, node: str = "n1"
) -> list[Record]:
    """Data records with distinct, checkable payloads (seq is in the bytes)."""
    out = []
    for i in range(n):
        seq = start_seq + i
        body = f"{agent_id}:{seq}:".encode()
        data = (body * (payload // len(body) + 1))[:payload]
        out.append(
            Record(
                type="data",
                ts_ns=1_800_000_000_000_000_000 + seq,
                agent_id=agent_id,
                node=node,
                seq=seq,
                pid=4242,
                tid=4243,
                comm="curl",
                source="openssl",
                conn_id="4242-5-1",
                fd=5,
                local=Endpoint("127.0.0.1", 50000),
                remote=Endpoint("127.0.0.1", 443),
                role="client",
                direction="egress" if seq % 2 else "ingress",
                offset=seq * payload,
                len=payload,
                captured_len=payload,
                data=data,
            )
        )
    return out


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Start in-process collectors on 127.0.0.1:0; all are stopped afterwards."""
    from agent.collector.server import CollectorConfig, CollectorServer

    started: list[CollectorServer] = []

    def start(credentials: grpc.ServerCredentials | None = None, **config) -> CollectorServer:
        config.setdefault("listen", "127.0.0.1:0")
        config.setdefault("store_path", tmp_path / f"collector{len(started)}.db")
        # Plaintext test collectors serve anonymous subscribers (tests/grpc/test_roles.py
        # checks that a real collector refuses them by default).
        config.setdefault("allow_anonymous_subscribe", credentials is None)
        server = CollectorServer(CollectorConfig(**config), credentials)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0.5)


@dataclass
class CollectorProcess:
    """`tlscap collector` as a real process, to be killed and restarted."""

    store: Path
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> CollectorProcess:
        ready = self.log.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "collector", "--insecure",
             "--allow-anonymous-subscribe", "--listen", f"127.0.0.1:{self.port}",
             "--store", str(self.store), "--ready-file", str(ready)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),  # noqa: SIM115
        )  # fmt: skip
        wait_for(lambda: ready.exists() or self.proc.poll() is not None, timeout, "collector")
        if self.proc.poll() is not None:
            raise RuntimeError(f"collector exited {self.proc.returncode}: {self.log.read_text()}")
        self.port = int(ready.read_text().strip().rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(20)
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def collector_process(tmp_path: Path) -> Iterator[Callable[[], CollectorProcess]]:
    made: list[CollectorProcess] = []

    def make() -> CollectorProcess:
        cp = CollectorProcess(tmp_path / f"c{len(made)}.db", 0, tmp_path / f"c{len(made)}.log")
        made.append(cp)
        return cp.start()

    yield make
    for cp in made:
        cp.kill()


@dataclass
class Subscriber:
    """Collects what a subscription delivers, on a thread of its own."""

    events: list = field(default_factory=list)
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def records(self) -> list[Record]:
        return [e for e in list(self.events) if isinstance(e, Record)]

    def close(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(10)


@pytest.fixture
def subscriber() -> Iterator[Callable[..., Subscriber]]:
    from agent.consumer.subscriber import subscribe

    subs: list[Subscriber] = []

    def start(channel_factory, flt=None, *, replay=False, live=True) -> Subscriber:
        from agent.records.filter import RecordFilter

        sub = Subscriber()

        def run() -> None:
            try:
                for event in subscribe(
                    channel_factory, flt or RecordFilter(), replay=replay, live=live,
                    stop=sub.stop,
                ):  # fmt: skip
                    sub.events.append(event)
            except BaseException as exc:
                sub.error = exc

        sub.thread = threading.Thread(target=run, daemon=True)
        sub.thread.start()
        subs.append(sub)
        return sub

    yield start
    for sub in subs:
        sub.close()


def insecure(address: str) -> Callable[[], grpc.Channel]:
    return lambda: grpc.insecure_channel(address)


def env_with_repo() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def issue_pki(
    tmp_path: Path, certs: list[tuple[str, CertificateAuthority, list[str] | None]]
) -> dict[str, Path]:
    """Write each (name, issuer, uris) certificate and key as <name>.crt/.key; uris None:
    a server certificate for localhost/127.0.0.1, else a client one with those URIs (a
    client without URIs gets the localhost names too).  "ca" is the first issuer's CA."""
    files = {"ca": tmp_path / "ca.crt"}
    write_public(files["ca"], certs[0][1].cert_pem)
    local = {"dns_names": ["localhost"], "ip_addresses": ["127.0.0.1"]}
    for name, issuer, uris in certs:
        if uris is None:
            issued = issuer.issue(name, server=True, client=False, **local)
        else:
            names = {} if uris else local
            issued = issuer.issue(name, uris=uris, server=False, client=True, **names)
        files[name] = tmp_path / f"{name}.crt"
        files[f"{name}-key"] = tmp_path / f"{name}.key"
        write_public(files[name], issued.cert_pem)
        write_private(files[f"{name}-key"], issued.key_pem)
    return files


def tls_settings(server: bool, **paths: Path | None) -> tls_options.TlsSettings:
    """TLS settings as the CLI would make them from --tls-cert/--tls-key/--tls-ca."""
    args = argparse.Namespace(
        insecure=False,
        tls_cert=paths.get("cert"),
        tls_key=paths.get("key"),
        tls_ca=paths.get("ca"),
        tls_server_name=None,
    )
    return tls_options.tls_settings_from_args(args, server=server)
