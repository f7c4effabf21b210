"""Run a collector: gRPC server, backend, health, reflection, retention.

`CollectorServer` is what `tlscap collector` runs and what tests start on
127.0.0.1:0; everything it serves is in agent/collector/service.py. The backend is
the SQLite store and fan-out hub by default, or NATS JetStream when `nats` is set
(agent/collector/backend.py, docs/nats.md).
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.collector.backend import Backend, LocalBackend
from agent.collector.fanout import Hub
from agent.collector.policy import Policy
from agent.collector.service import CollectorService
from agent.collector.store import RecordStore
from agent.collector.tokens import TokenReviewer
from agent.schema import pb, pb_grpc

if TYPE_CHECKING:
    from agent.collector.jetstream.config import NatsConfig

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Collector"].full_name  # "tlscap.v1.Collector"


@dataclass
class CollectorConfig:
    listen: str = "127.0.0.1:7300"
    store_path: Path = Path("tlscap.db")
    retention_seconds: float | None = 7 * 24 * 3600.0
    max_records: int | None = None
    max_message_bytes: int = 64 << 20
    # Every stream holds a worker thread for its whole life (agents and
    # subscribers alike), so this bounds concurrent agents + subscribers.
    max_streams: int = 128
    subscriber_queue: int = 10_000
    prune_interval: float = 30.0
    # Which namespaces each consumer identity may read (None: everything).
    policy: Policy | None = None
    # Subscribe without a client certificate (no mutual TLS): refused unless this is set.
    allow_anonymous_subscribe: bool = False
    # --token-review: agents identified by their ServiceAccount token (service.py).
    token_reviewer: TokenReviewer | None = None
    # NATS JetStream instead of the SQLite store (store_path, retention_seconds and
    # max_records are then unused: the stream's limits are in NatsConfig).
    nats: NatsConfig | None = None


class CollectorServer:
    def __init__(
        self, config: CollectorConfig, credentials: grpc.ServerCredentials | None = None
    ) -> None:
        self.config = config
        self.store: RecordStore | None = None
        self.backend: Backend
        if config.nats is not None:
            # Connects and checks the stream now: BackendError when it cannot.
            from agent.collector.jetstream.backend import JetStreamBackend

            self.backend = JetStreamBackend(config.nats, config.subscriber_queue)
        else:
            self.store = RecordStore(
                config.store_path,
                retention_seconds=config.retention_seconds,
                max_records=config.max_records,
            )
            self.backend = LocalBackend(self.store, Hub(), config.subscriber_queue)
        self.hub = self.backend.hub
        self.service = CollectorService(
            self.backend,
            policy=config.policy,
            allow_anonymous_subscribe=config.allow_anonymous_subscribe,
            token_reviewer=config.token_reviewer,
        )
        self.health = health.HealthServicer()
        limit = config.max_message_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.max_streams + 4, thread_name_prefix="collector"
            ),
            # Beyond this a new stream gets RESOURCE_EXHAUSTED instead of queueing forever.
            maximum_concurrent_rpcs=config.max_streams,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Agents behind NAT/conntrack: accept their keepalive pings.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        pb_grpc.add_CollectorServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        if credentials is None:
            self.port = self._server.add_insecure_port(config.listen)
        else:
            self.port = self._server.add_secure_port(config.listen, credentials)
        if self.port == 0:
            self.backend.close()
            raise OSError(f"cannot listen on {config.listen}")
        self._stop_pruning = threading.Event()
        self._pruner = threading.Thread(target=self._prune_loop, name="prune", daemon=True)

    @property
    def address(self) -> str:
        """host:port actually bound (the port resolved when 0 was asked for)."""
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> None:
        self._server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._pruner.start()
        log.info("collector listening on %s, %s", self.address, self.backend.describe())

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving (streams get `grace` seconds), then close the backend."""
        self.health.enter_graceful_shutdown()
        self.service.stopping.set()
        self.hub.close()
        if self.config.token_reviewer is not None:
            self.config.token_reviewer.api.close()  # a review in flight returns at once
        # grpcio's shutdown event has been seen never to fire (a test hung here in CI
        # after a garbage Ingest stream); a collector must still exit on SIGTERM.
        if not self._server.stop(grace).wait(grace + 5):
            log.warning("gRPC server did not finish stopping in %.1f s; closing anyway", grace + 5)
        self._stop_pruning.set()
        if self._pruner.is_alive():
            self._pruner.join()
        self.backend.close()

    def stats(self) -> dict[str, int]:
        reviews = self.config.token_reviewer.stats() if self.config.token_reviewer else {}
        return {
            **self.backend.stats(),
            **self.service.counters,
            **self.service.refusals.snapshot(),
            **reviews,
        }

    def _prune_loop(self) -> None:
        refused: dict[str, int] = {}
        while not self._stop_pruning.wait(self.config.prune_interval):
            # The collector has no metrics endpoint: refusal counts go to the log when
            # they change (and into stats(), logged at exit).
            now = self.service.refusals.snapshot()
            if now != refused and any(now.values()):
                log.warning(
                    "refused calls so far: %s", " ".join(f"{k}={v}" for k, v in now.items())
                )
            refused = now
            try:
                line = self.backend.maintain()
            except Exception:  # a failed prune must not stop the collector
                log.exception("pruning the store failed")
                continue
            if line:
                log.info("%s", line)
