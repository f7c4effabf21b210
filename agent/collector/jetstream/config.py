"""How the collector reaches NATS and what stream it keeps there (docs/nats.md)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.collector.jetstream.subjects import DEFAULT_PREFIX, check_prefix

# Nats-Msg-Id de-duplication window. It must outlast the time between a first publish
# and the agent's re-send of the same batch: the agent re-sends what was not acked
# after its ack timeout (30 s) or after the stream is seen dead (gRPC keepalive,
# ~5.5 min for a gateway that vanished without a FIN), then a reconnect backoff
# (<= 10 s) and the spool ahead of it. 15 minutes covers that with room; JetStream
# keeps every id of the window in memory, so it is not made longer by default.
DEFAULT_DEDUP_WINDOW = 15 * 60.0
DEFAULT_STREAM = "TLSCAP"


class NatsConfigError(ValueError):
    """A NATS setting that cannot work (one-line message)."""


@dataclass(frozen=True)
class NatsConfig:
    servers: tuple[str, ...]
    stream: str = DEFAULT_STREAM
    subject_prefix: str = DEFAULT_PREFIX
    replicas: int = 1
    max_age: float | None = 7 * 86400.0  # seconds; None: no age limit
    max_bytes: int | None = None
    max_msgs: int | None = None
    dedup_window: float = DEFAULT_DEDUP_WINDOW
    creds_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Plaintext NATS: only when asked for (--nats-insecure).
    insecure: bool = False
    connect_timeout: float = 5.0
    publish_timeout: float = 5.0  # per Ingest batch: every publish ack within this
    # A replay "from a time" (Filter.since_ns) starts this much earlier in the stream:
    # the stream is ordered by arrival, records carry their capture time, and agents'
    # clocks drift; the collector then drops what is older than since_ns.
    replay_clock_skew: float = 60.0

    @property
    def use_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert) or any(
            s.startswith("tls://") for s in self.servers
        )

    @property
    def effective_dedup_window(self) -> float:
        # JetStream refuses a duplicate window longer than the stream's max age.
        return min(self.dedup_window, self.max_age) if self.max_age else self.dedup_window

    def check(self) -> NatsConfig:
        if not self.servers:
            raise NatsConfigError("--backend: no NATS server given")
        if not self.stream or any(c in self.stream for c in " .*>\t\r\n/\\"):
            raise NatsConfigError(f"--stream {self.stream!r}: no spaces, dots, * or > allowed")
        try:
            check_prefix(self.subject_prefix)
        except ValueError as exc:
            raise NatsConfigError(str(exc)) from None
        if self.replicas < 1 or self.replicas > 5:
            raise NatsConfigError(f"--replicas {self.replicas}: JetStream allows 1 to 5")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise NatsConfigError("--nats-tls-cert and --nats-tls-key go together")
        if not self.use_tls and not self.insecure:
            raise NatsConfigError(
                "NATS without TLS would carry captured plaintext unencrypted: give "
                "--nats-tls-ca (or tls:// servers), or --nats-insecure to accept plaintext"
            )
        for path in (self.creds_file, self.tls_ca, self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise NatsConfigError(f"{path}: no such file")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.use_tls:
            return None
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.tls_ca) if self.tls_ca else None
        )
        if self.tls_cert:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        return ctx

    def describe(self) -> str:
        how = "TLS" if self.use_tls else "plaintext"
        return f"NATS {','.join(self.servers)} ({how}), stream {self.stream} R{self.replicas}"


def parse_servers(text: str) -> tuple[str, ...]:
    """'nats://h1:4222,h2:4222,h3' -> ('nats://h1:4222', 'nats://h2:4222', 'nats://h3:4222').

    The first URL's scheme (nats or tls) carries over to entries without one.
    """
    servers = []
    scheme = "nats"
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if "://" in part:
            scheme = part.split("://", 1)[0].lower()
        else:
            part = f"{scheme}://{part}"
        url = urlsplit(part)
        if url.scheme not in ("nats", "tls") or not url.hostname:
            raise NatsConfigError(f"--backend {raw.strip()!r}: expected nats://HOST:PORT or tls://")
        if url.username or url.password:
            raise NatsConfigError(
                "--backend: put no credentials in the URL (they would show in process "
                "listings); use --nats-creds"
            )
        try:
            port = url.port or 4222
        except ValueError:
            raise NatsConfigError(f"--backend {raw.strip()!r}: bad port") from None
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        servers.append(f"{url.scheme}://{host}:{port}")
    if not servers:
        raise NatsConfigError("--backend: no NATS server given")
    return tuple(servers)
