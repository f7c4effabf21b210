"""`tlscap collector`: receive records from agents, store them, serve subscribers."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli import tls_options
from agent.cli.argtypes import parse_duration, parse_size, positive_int
from agent.cli.config_file import add_config_argument
from agent.cli.errors import fail
from agent.otlp.options import add_otlp_arguments, otlp_sink_from_args

if TYPE_CHECKING:
    from agent.collector.tokens import TokenReviewer

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "collector",
        help="receive records from agents over gRPC, store them, serve `tlscap tail`",
        description="Accepts agents' record streams (Ingest), stores them in SQLite and "
        "streams them to subscribers (Subscribe). Health checking and server reflection "
        "are served too, so grpc_health_probe and grpcurl work.",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:7300",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:7300; port 0 picks a free one)",
    )
    p.add_argument(
        "--store",
        type=Path,
        metavar="PATH",
        help="SQLite database file (the default backend; required unless --backend)",
    )
    p.add_argument(
        "--retention",
        type=parse_duration,
        default=7 * 86400.0,
        metavar="DURATION",
        help="delete records older than this (default 7d; with --backend: the stream's max age)",
    )
    p.add_argument(
        "--max-records",
        type=positive_int,
        metavar="N",
        help="also keep at most this many records (oldest go first)",
    )
    add_nats_arguments(p)
    p.add_argument(
        "--max-message",
        type=parse_size,
        default=64 << 20,
        metavar="SIZE",
        help="largest gRPC message accepted (default 64M); larger ones are refused",
    )
    p.add_argument(
        "--max-streams",
        type=positive_int,
        default=128,
        metavar="N",
        help="concurrent agent + subscriber streams (default 128)",
    )
    p.add_argument(
        "--subscriber-queue",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="records buffered per live subscriber before it is told it fell behind",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        help="once serving, write the bound HOST:PORT here (useful with port 0)",
    )
    p.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="TOML file restricting consumers (tlscap://consumer/<name>) to namespaces; "
        "see docs/kubernetes.md. Without it every consumer reads everything",
    )
    p.add_argument(
        "--allow-anonymous-subscribe",
        action="store_true",
        help="let callers without a client certificate Subscribe (read all captured "
        "plaintext); without mutual TLS, Subscribe is refused unless this is given",
    )
    tokens = p.add_argument_group(
        "agent identity from Kubernetes ServiceAccount tokens (docs/kubernetes.md)"
    )
    tokens.add_argument(
        "--token-review",
        action="store_true",
        help="identify agents by their projected ServiceAccount token, checked with the "
        "API server's TokenReview: a token bound to node N may Ingest only records of N. "
        "Agents must then send a token, unless their certificate names one node; "
        "needs TLS and Kubernetes >= 1.30",
    )
    tokens.add_argument(
        "--token-audience",
        default="tlscap-collector",
        metavar="AUDIENCE",
        help="audience the agents' tokens must be issued for (default tlscap-collector)",
    )
    tokens.add_argument(
        "--agent-service-account",
        default="tlscap:tlscap-agent",
        metavar="NAMESPACE:NAME",
        help="the agents' ServiceAccount; tokens of any other are refused "
        "(default tlscap:tlscap-agent)",
    )
    tokens.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig for the TokenReview calls when not running in a cluster "
        "(in a cluster: the pod's own ServiceAccount)",
    )
    tls_options.add_tls_arguments(p, server=True)
    add_otlp_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    add_config_argument(p)
    p.set_defaults(handler=collector_command)
    return p


def add_nats_arguments(p: argparse.ArgumentParser) -> None:
    nats = p.add_argument_group(
        "NATS JetStream backend: collectors as stateless gateways (docs/nats.md)"
    )
    nats.add_argument(
        "--backend",
        metavar="nats://H1:4222,H2:4222",
        help="keep records in a NATS JetStream stream instead of --store (tls:// or "
        "--nats-tls-ca for TLS; plaintext needs --nats-insecure)",
    )
    nats.add_argument(
        "--stream", default="TLSCAP", metavar="NAME", help="JetStream stream (default TLSCAP)"
    )
    nats.add_argument(
        "--subject-prefix",
        default="tlscap.v1",
        metavar="PREFIX",
        help="subjects are PREFIX.<node>.<namespace>.<type> (default tlscap.v1)",
    )
    nats.add_argument(
        "--replicas", type=positive_int, default=1, metavar="N", help="stream replicas (1-5)"
    )
    nats.add_argument(
        "--max-bytes", type=parse_size, metavar="SIZE", help="stream size limit (oldest go first)"
    )
    nats.add_argument(
        "--dedup-window",
        type=parse_duration,
        default=15 * 60.0,
        metavar="DURATION",
        help="JetStream de-duplication window for agents' re-sent batches (default 15m)",
    )
    nats.add_argument("--nats-creds", type=Path, metavar="FILE", help="NATS credentials file")
    nats.add_argument("--nats-tls-ca", type=Path, metavar="FILE", help="CA of the NATS servers")
    nats.add_argument(
        "--nats-tls-cert", type=Path, metavar="FILE", help="client certificate for NATS"
    )
    nats.add_argument("--nats-tls-key", type=Path, metavar="FILE", help="its private key")
    nats.add_argument(
        "--nats-insecure",
        action="store_true",
        help="allow plaintext NATS (captured plaintext crosses the network unencrypted)",
    )


def nats_config_from_args(args: argparse.Namespace):
    """The NatsConfig for --backend; NatsConfigError (one line) when it cannot be."""
    from agent.collector.jetstream.config import NatsConfig, parse_servers

    return NatsConfig(
        servers=parse_servers(args.backend),
        stream=args.stream,
        subject_prefix=args.subject_prefix,
        replicas=args.replicas,
        max_age=args.retention,
        max_bytes=args.max_bytes,
        max_msgs=args.max_records,
        dedup_window=args.dedup_window,
        creds_file=args.nats_creds,
        tls_ca=args.nats_tls_ca,
        tls_cert=args.nats_tls_cert,
        tls_key=args.nats_tls_key,
        insecure=args.nats_insecure,
    ).check()


def collector_command(args: argparse.Namespace) -> int:
    # Agents connect and disconnect all day: say so at the default level.
    if not args.verbose:
        logging.getLogger("agent").setLevel(logging.INFO)
    from agent.collector.jetstream.backend import BackendError
    from agent.collector.jetstream.config import NatsConfigError
    from agent.collector.policy import PolicyError, load_policy
    from agent.collector.server import CollectorConfig, CollectorServer
    from agent.collector.store import StoreError

    nats = None
    if args.backend:
        if args.store is not None:
            return fail("give --store (SQLite) or --backend (NATS), not both")
        try:
            nats = nats_config_from_args(args)
        except NatsConfigError as exc:
            return fail(str(exc))
    elif args.store is None:
        return fail("--store PATH is required (or --backend nats://... for NATS JetStream)")
    try:
        settings = tls_options.tls_settings_from_args(args, server=True)
    except tls_options.TlsConfigError as exc:
        return fail(str(exc))
    try:
        policy = load_policy(args.policy) if args.policy is not None else None
    except PolicyError as exc:
        return fail(str(exc))
    token_reviewer = None
    if args.token_review:
        if settings.insecure:
            # The tokens would cross the network readable, and anyone who saw one could
            # send records as that node until it expires.
            return fail("--token-review needs TLS (agents' tokens must not travel in plaintext)")
        try:
            token_reviewer = token_reviewer_from_args(args)
        except (ValueError, OSError) as exc:
            return fail(str(exc))
    config = CollectorConfig(
        listen=args.listen,
        store_path=args.store,
        retention_seconds=args.retention,
        max_records=args.max_records,
        max_message_bytes=args.max_message,
        max_streams=args.max_streams,
        subscriber_queue=args.subscriber_queue,
        policy=policy,
        allow_anonymous_subscribe=args.allow_anonymous_subscribe,
        token_reviewer=token_reviewer,
        nats=nats,
    )
    try:
        server = CollectorServer(config, tls_options.server_credentials(settings))
    except (StoreError, BackendError, OSError, RuntimeError) as exc:
        return fail(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        otlp_sink = otlp_sink_from_args(args)
    except (ValueError, OSError) as exc:
        server.backend.close()
        return fail(str(exc))
    server.start()
    otlp_feed = None
    if otlp_sink is not None:
        from agent.otlp.collector_feed import HubFeed

        otlp_feed = HubFeed(server.hub, otlp_sink)
        log.info("exporting exchanges as OTLP spans to %s", otlp_sink.endpoint)
    mode = "insecure" if settings.insecure else ("mTLS" if settings.mutual else "TLS")
    log.info("serving %s (%s)", server.address, mode)
    if token_reviewer is not None:
        log.info(
            "agents identified by ServiceAccount tokens of %s (audience %s), reviewed by %s",
            token_reviewer.agent_user,
            token_reviewer.audience,
            token_reviewer.api.config.server,
        )
    if not settings.mutual and token_reviewer is None:
        log.warning(
            "no client CA (--tls-ca): callers are not identified, so anyone reaching %s may "
            "Ingest records claiming any node%s",
            server.address,
            "; and Subscribe (--allow-anonymous-subscribe)"
            if args.allow_anonymous_subscribe
            else "; Subscribe is refused",
        )
    if args.ready_file:
        args.ready_file.write_text(server.address + "\n")
    # With a timeout: the kernel may hand SIGTERM to any thread (gRPC's have it
    # unblocked), and Python then only runs the handler once the main thread next
    # wakes; a wait without one never did (a collector hung after SIGTERM in CI).
    while not stop.wait(0.5):
        pass
    server.stop()
    stats = server.stats()
    if otlp_feed is not None:
        otlp_feed.close()
        stats.update(otlp_feed.stats())
    log.info("stopped; %s", " ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def token_reviewer_from_args(args: argparse.Namespace) -> TokenReviewer:
    """The TokenReviewer for --token-review; ValueError (one line) when it cannot be."""
    from agent.collector.tokens import TokenReviewer, parse_service_account
    from agent.k8s.api import ApiConfig, KubeApi

    try:
        agent_user = parse_service_account(args.agent_service_account)
    except ValueError as exc:
        raise ValueError(f"--agent-service-account {exc}") from None
    config = ApiConfig.discover(args.kubeconfig)
    if config is None:
        raise ValueError(
            "--token-review needs the Kubernetes API: run in a cluster (the collector's "
            "ServiceAccount, allowed to create TokenReviews) or give --kubeconfig"
        )
    if not args.token_audience.strip():
        raise ValueError("--token-audience must not be empty")
    return TokenReviewer(
        KubeApi(config, connect_timeout=3.0, read_timeout=10.0),
        audience=args.token_audience,
        agent_service_account=agent_user,
    )
