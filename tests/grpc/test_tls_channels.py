"""Real gRPC over loopback with the credentials built by agent.cli.tls_options.

A server serving only the standard health service, secured as `tlscap collector` would
be, and clients built as `tlscap run`/`tail` would build them.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.certs.authority import CertificateAuthority, write_private, write_public
from agent.cli import tls_options
from agent.cli.tls_options import TlsSettings

DEADLINE = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca/ + server + client certs, and a second, unrelated CA with its own client."""
    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create()
    ca.save(d / "ca")
    server = ca.issue("collector", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    client = ca.issue("agent", server=False, client=True)
    rogue_ca = CertificateAuthority.create("rogue CA")
    rogue_ca.save(d / "rogue")
    rogue_client = rogue_ca.issue("agent", server=False, client=True)
    for name, issued in (("server", server), ("client", client), ("rogue-client", rogue_client)):
        write_public(d / f"{name}.crt", issued.cert_pem)
        write_private(d / f"{name}.key", issued.key_pem)
    return d


def settings(argv: list[str], *, server: bool) -> TlsSettings:
    parser = argparse.ArgumentParser()
    tls_options.add_tls_arguments(parser, server=server)
    return tls_options.tls_settings_from_args(parser.parse_args(argv), server=server)


def start_health_server(tls: TlsSettings) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = tls_options.server_credentials(tls)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port != 0, "gRPC could not bind"
    server.start()
    return server, port


@pytest.fixture
def tls_server(pki: Path) -> Iterator[int]:
    """Server-authenticated TLS only: any client may connect."""
    tls = settings(
        ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")], server=True
    )
    server, port = start_health_server(tls)
    try:
        yield port
    finally:
        server.stop(grace=None)


@pytest.fixture
def mtls_server(pki: Path) -> Iterator[int]:
    """Mutual TLS: clients need a certificate signed by ca/ca.crt."""
    tls = settings(
        [
            "--tls-cert",
            str(pki / "server.crt"),
            "--tls-key",
            str(pki / "server.key"),
            "--tls-ca",
            str(pki / "ca" / "ca.crt"),
        ],
        server=True,
    )
    assert tls.mutual
    server, port = start_health_server(tls)
    try:
        yield port
    finally:
        server.stop(grace=None)


def check(target: str, tls: TlsSettings) -> int:
    with tls_options.open_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE).status


def client_flags(pki: Path, cert: str | None, ca: str = "ca") -> list[str]:
    flags = ["--tls-ca", str(pki / ca / "ca.crt")]
    if cert:
        flags += ["--tls-cert", str(pki / f"{cert}.crt"), "--tls-key", str(pki / f"{cert}.key")]
    return flags


SERVING = health_pb2.HealthCheckResponse.SERVING


def test_insecure_round_trip() -> None:
    server, port = start_health_server(settings(["--insecure"], server=True))
    try:
        assert check(f"127.0.0.1:{port}", settings(["--insecure"], server=False)) == SERVING
    finally:
        server.stop(grace=None)


def test_tls_with_the_right_ca(pki: Path, tls_server: int) -> None:
    client = settings(client_flags(pki, None), server=False)
    assert check(f"127.0.0.1:{tls_server}", client) == SERVING


def test_tls_by_name_via_server_name_override(pki: Path, tls_server: int) -> None:
    # Connect by address, check the certificate for the name instead (the mismatch test
    # below shows the override is what gets checked).
    client = settings([*client_flags(pki, None), "--tls-server-name", "localhost"], server=False)
    assert check(f"127.0.0.1:{tls_server}", client) == SERVING


def test_tls_name_mismatch_is_refused(pki: Path, tls_server: int) -> None:
    client = settings([*client_flags(pki, None), "--tls-server-name", "other"], server=False)
    with pytest.raises(grpc.RpcError) as info:
        check(f"127.0.0.1:{tls_server}", client)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_a_valid_client_certificate(pki: Path, mtls_server: int) -> None:
    client = settings(client_flags(pki, "client"), server=False)
    assert check(f"127.0.0.1:{mtls_server}", client) == SERVING


def test_mtls_without_a_client_certificate_is_refused(pki: Path, mtls_server: int) -> None:
    client = settings(client_flags(pki, None), server=False)
    with pytest.raises(grpc.RpcError) as info:
        check(f"127.0.0.1:{mtls_server}", client)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_a_client_certificate_from_another_ca_is_refused(
    pki: Path, mtls_server: int
) -> None:
    client = settings(client_flags(pki, "rogue-client"), server=False)
    with pytest.raises(grpc.RpcError) as info:
        check(f"127.0.0.1:{mtls_server}", client)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_refuses_the_server(pki: Path, tls_server: int) -> None:
    client = settings(client_flags(pki, None, ca="rogue"), server=False)
    with pytest.raises(grpc.RpcError) as info:
        check(f"127.0.0.1:{tls_server}", client)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server: int) -> None:
    with pytest.raises(grpc.RpcError) as info:
        check(f"127.0.0.1:{tls_server}", settings(["--insecure"], server=False))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
