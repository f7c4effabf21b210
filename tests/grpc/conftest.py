"""Real gRPC over loopback: collectors (in-process or as `tlscap collector`
processes), exporters and subscribers talking through 127.0.0.1."""

from __future__ import annotations

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
