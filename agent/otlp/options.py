"""`--otlp-*` options, shared by `tlscap run` and `tlscap collector`, and the sink they build.

Spans carry (redacted) URLs, hosts and process names across the network, so
plaintext is asked for explicitly (`--otlp-insecure`); without it the exporter
uses TLS, with the system's roots or `--otlp-ca`, and `--otlp-cert`/`--otlp-key`
for mutual TLS.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.argtypes import positive_int

if TYPE_CHECKING:
    from agent.otlp.sink import OtlpSink

log = logging.getLogger(__name__)

EXPORT_TIMEOUT = 5.0  # seconds one export call may take, the exporter's retries included


def add_otlp_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenTelemetry: each HTTP/gRPC exchange as a span over OTLP/gRPC")
    g.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        help="export every exchange as one span to this OTLP/gRPC receiver "
        "(OpenTelemetry Collector, Jaeger, Tempo, ...)",
    )
    g.add_argument(
        "--otlp-insecure",
        action="store_true",
        help="plaintext OTLP (no TLS); default is TLS with the system's CA roots",
    )
    g.add_argument("--otlp-ca", type=Path, metavar="FILE", help="PEM CA of the OTLP receiver")
    g.add_argument(
        "--otlp-cert", type=Path, metavar="FILE", help="PEM client certificate (mutual TLS)"
    )
    g.add_argument("--otlp-key", type=Path, metavar="FILE", help="PEM key of --otlp-cert")
    g.add_argument(
        "--otlp-header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gRPC metadata sent with every export, e.g. an API key (repeatable)",
    )
    g.add_argument(
        "--otlp-queue",
        type=positive_int,
        default=8192,
        metavar="N",
        help="exchanges waiting for export; beyond it new ones are dropped, counted (default 8192)",
    )


def parse_headers(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()  # gRPC metadata keys are lower-case
        if not sep or not key:
            raise ValueError(f"--otlp-header {item!r}: expected KEY=VALUE")
        out.append((key, value.strip()))
    return tuple(out)


def check_endpoint(endpoint: str) -> str:
    host, sep, port = endpoint.rpartition(":")
    if "://" in endpoint or not sep or not host or not port.isdigit():
        raise ValueError(f"--otlp-endpoint {endpoint!r}: expected HOST:PORT")
    return endpoint


@dataclass(frozen=True)
class OtlpSettings:
    """--otlp-* checked, with the PEM files read; no gRPC object yet (capture workers
    check these before they fork, and each opens its own exporter after)."""

    endpoint: str
    insecure: bool
    headers: tuple[tuple[str, str], ...]
    root_certificates: bytes | None
    private_key: bytes | None
    certificate_chain: bytes | None
    max_queue: int


def otlp_settings_from_args(args: argparse.Namespace) -> OtlpSettings | None:
    """The settings of --otlp-endpoint, or None; ValueError/OSError (one line) on bad options."""
    tls_given = any((args.otlp_ca, args.otlp_cert, args.otlp_key))
    if not args.otlp_endpoint:
        if tls_given or args.otlp_insecure or args.otlp_header:
            raise ValueError("--otlp-insecure/--otlp-ca/--otlp-cert/--otlp-key/--otlp-header "
                             "need --otlp-endpoint")  # fmt: skip
        return None
    endpoint = check_endpoint(args.otlp_endpoint)
    headers = parse_headers(args.otlp_header)
    if args.otlp_insecure and tls_given:
        raise ValueError("--otlp-insecure contradicts --otlp-ca/--otlp-cert/--otlp-key")
    if bool(args.otlp_cert) != bool(args.otlp_key):
        raise ValueError("--otlp-cert and --otlp-key go together")

    def read(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise OSError(f"cannot read {path}: {exc.strerror or exc}") from None

    return OtlpSettings(
        endpoint=endpoint,
        insecure=bool(args.otlp_insecure),
        headers=headers,
        root_certificates=read(args.otlp_ca),
        private_key=read(args.otlp_key),
        certificate_chain=read(args.otlp_cert),
        max_queue=args.otlp_queue,
    )


def open_otlp_sink(settings: OtlpSettings) -> OtlpSink:
    """The sink and its exporter (a gRPC channel: not to be made before a fork)."""
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    from agent.otlp.sink import OtlpSink

    # The exporter logs every retry and failure; the sink logs an outage once and counts.
    logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(
        logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL
    )
    credentials = None
    if not settings.insecure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=settings.root_certificates,
            private_key=settings.private_key,
            certificate_chain=settings.certificate_chain,
        )
    exporter = OTLPSpanExporter(
        endpoint=settings.endpoint,
        insecure=settings.insecure,
        credentials=credentials,
        headers=settings.headers,
        timeout=EXPORT_TIMEOUT,
    )
    return OtlpSink(exporter, endpoint=settings.endpoint, max_queue=settings.max_queue)


def otlp_sink_from_args(args: argparse.Namespace) -> OtlpSink | None:
    """The OtlpSink for --otlp-endpoint, or None; ValueError/OSError (one line) on bad options."""
    settings = otlp_settings_from_args(args)
    return None if settings is None else open_otlp_sink(settings)
