"""gRPC transport security options shared by `tlscap run`, `tail` and `collector`.

Plaintext gRPC carries captured TLS plaintext across the network, so it is never the
silent default: a command must be given either `--insecure` or TLS material.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from agent.certs.authority import (
    CertificateError,
    key_matches_certificate,
    parse_certificates,
    parse_private_key,
    read_file,
)

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """The TLS command-line options are incomplete, contradictory or point at bad files."""


@dataclass(frozen=True)
class TlsSettings:
    """What a gRPC server or channel needs; PEM bytes are read once, up front."""

    insecure: bool
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    root_certificates: bytes | None = None
    server_name: str | None = None
    cert_path: Path | None = None
    key_path: Path | None = None
    ca_path: Path | None = None

    @property
    def mutual(self) -> bool:
        """Server side: clients must present a certificate signed by the CA."""
        return not self.insecure and self.root_certificates is not None


def add_tls_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, server: bool
) -> None:
    """Add the options to a parser (in a group of their own) or to a caller's group."""
    if isinstance(parser, argparse.ArgumentParser):
        group = parser.add_argument_group("transport security (choose --insecure or --tls-*)")
    else:
        group = parser  # argparse deprecates nesting groups
    group.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, no TLS: captured data crosses the network readable",
    )
    if server:
        group.add_argument(
            "--tls-cert", type=Path, metavar="FILE", help="PEM certificate (chain) of this server"
        )
        group.add_argument(
            "--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert"
        )
        group.add_argument(
            "--tls-ca",
            type=Path,
            metavar="FILE",
            help="PEM CA certificate(s); when given, clients must present a certificate "
            "signed by it (mutual TLS)",
        )
    else:
        group.add_argument(
            "--tls-ca",
            type=Path,
            metavar="FILE",
            help="PEM CA certificate(s) that signed the collector's certificate "
            "(default: the system's trusted roots)",
        )
        group.add_argument(
            "--tls-cert",
            type=Path,
            metavar="FILE",
            help="PEM client certificate, for collectors that require mutual TLS",
        )
        group.add_argument(
            "--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert"
        )
        group.add_argument(
            "--tls-server-name",
            metavar="NAME",
            help="name to check in the collector's certificate instead of the host "
            "in the address (e.g. when connecting by an IP the certificate does not list)",
        )


def tls_settings_from_args(args: argparse.Namespace, *, server: bool) -> TlsSettings:
    """Validate the options and read the files; TlsConfigError has a one-line message."""
    insecure: bool = getattr(args, "insecure", False)
    cert_path: Path | None = getattr(args, "tls_cert", None)
    key_path: Path | None = getattr(args, "tls_key", None)
    ca_path: Path | None = getattr(args, "tls_ca", None)
    server_name: str | None = None if server else getattr(args, "tls_server_name", None)
    given = [
        flag
        for flag, value in (
            ("--tls-cert", cert_path),
            ("--tls-key", key_path),
            ("--tls-ca", ca_path),
            ("--tls-server-name", server_name),
        )
        if value is not None
    ]

    if insecure:
        if given:
            raise TlsConfigError(f"--insecure cannot be combined with {', '.join(given)}")
        return TlsSettings(insecure=True)
    if not given:
        if server:
            raise TlsConfigError(
                "choose --insecure (plaintext) or --tls-cert/--tls-key [--tls-ca] for TLS"
            )
        raise TlsConfigError("choose --insecure (plaintext) or --tls-ca [--tls-cert/--tls-key]")
    if cert_path is not None and key_path is None:
        raise TlsConfigError("--tls-cert needs --tls-key")
    if key_path is not None and cert_path is None:
        raise TlsConfigError("--tls-key needs --tls-cert")
    if server and cert_path is None:
        raise TlsConfigError("a TLS server needs --tls-cert and --tls-key")
    if server_name is not None and not server_name.strip():
        raise TlsConfigError("--tls-server-name must not be empty")

    try:
        return _read_settings(cert_path, key_path, ca_path, server_name)
    except CertificateError as exc:
        raise TlsConfigError(str(exc)) from None


def _read_settings(
    cert_path: Path | None, key_path: Path | None, ca_path: Path | None, server_name: str | None
) -> TlsSettings:
    cert_chain = private_key = root_certificates = None
    if cert_path is not None and key_path is not None:
        cert_chain = read_file(cert_path, "--tls-cert file")
        leaf = parse_certificates(cert_chain, f"--tls-cert file {cert_path}")[0]
        private_key = read_file(key_path, "--tls-key file")
        key = parse_private_key(private_key, f"--tls-key file {key_path}")
        # gRPC would only fail at handshake time, with an error naming neither file.
        if not key_matches_certificate(key, leaf):
            raise CertificateError(
                f"--tls-key file {key_path} does not match the certificate in {cert_path}"
            )
        if leaf.not_valid_after_utc < datetime.now(UTC):
            log.warning("certificate %s expired on %s", cert_path, leaf.not_valid_after_utc)
    if ca_path is not None:
        root_certificates = read_file(ca_path, "--tls-ca file")
        parse_certificates(root_certificates, f"--tls-ca file {ca_path}")
    return TlsSettings(
        insecure=False,
        cert_chain=cert_chain,
        private_key=private_key,
        root_certificates=root_certificates,
        server_name=server_name,
        cert_path=cert_path,
        key_path=key_path,
        ca_path=ca_path,
    )


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials for `server.add_secure_port`; None means use `add_insecure_port`."""
    if settings.insecure:
        return None
    if settings.cert_chain is None or settings.private_key is None:
        raise TlsConfigError("a TLS server needs --tls-cert and --tls-key")
    return grpc.ssl_server_credentials(
        [(settings.private_key, settings.cert_chain)],
        root_certificates=settings.root_certificates,
        require_client_auth=settings.root_certificates is not None,
    )


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """Credentials for `grpc.secure_channel`; None means an insecure channel."""
    if settings.insecure:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.root_certificates,
        private_key=settings.private_key,
        certificate_chain=settings.cert_chain,
    )


def channel_options(settings: TlsSettings) -> list[tuple[str, Any]]:
    if settings.insecure or settings.server_name is None:
        return []
    return [("grpc.ssl_target_name_override", settings.server_name)]


def open_channel(
    target: str, settings: TlsSettings, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking-API channel to `target`, secure or not as the settings say."""
    merged = [*options, *channel_options(settings)]
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.insecure_channel(target, options=merged)
    return grpc.secure_channel(target, credentials, options=merged)
