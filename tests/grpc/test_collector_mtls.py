"""Mutual TLS between agents / consumers and the collector, over real loopback gRPC."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import pytest

from agent.certs.authority import CertificateAuthority, write_private, write_public
from agent.cli import tls_options
from agent.export.exporter import GrpcExporter
from agent.schema import pb, pb_grpc
from agent.schema.convert import to_pb
from tests.grpc.conftest import make_records, wait_for


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA with a collector cert, an agent client cert, and a rogue CA's client cert."""
    ca = CertificateAuthority.create("test CA")
    rogue = CertificateAuthority.create("rogue CA")
    files = {"ca": tmp_path / "ca.crt"}
    write_public(files["ca"], ca.cert_pem)
    for name, issuer, server in (
        ("collector", ca, True),
        ("agent", ca, False),
        ("rogue", rogue, False),
    ):
        issued = issuer.issue(name, dns_names=["localhost"], ip_addresses=["127.0.0.1"],
                              server=server, client=not server)  # fmt: skip
        files[name] = tmp_path / f"{name}.crt"
        files[f"{name}-key"] = tmp_path / f"{name}.key"
        write_public(files[name], issued.cert_pem)
        write_private(files[f"{name}-key"], issued.key_pem)
    return files


def settings(server: bool, **paths: Path | None) -> tls_options.TlsSettings:
    args = argparse.Namespace(
        insecure=False,
        tls_cert=paths.get("cert"),
        tls_key=paths.get("key"),
        tls_ca=paths.get("ca"),
        tls_server_name=None,
    )
    return tls_options.tls_settings_from_args(args, server=server)


def test_agent_needs_a_client_certificate_from_the_collectors_ca(collector, pki, tmp_path):
    server_side = settings(True, cert=pki["collector"], key=pki["collector-key"], ca=pki["ca"])
    server = collector(credentials=tls_options.server_credentials(server_side))
    batch = pb.IngestBatch(batch_id=1, records=[to_pb(r) for r in make_records(2)])

    def ingest(client: tls_options.TlsSettings) -> list:
        channel = tls_options.open_channel(server.address, client)
        try:
            stub = pb_grpc.CollectorStub(channel)
            return list(stub.Ingest(iter([batch]), timeout=10))
        finally:
            channel.close()

    # No client certificate, or one signed by another CA: refused.
    for refused in (
        settings(False, ca=pki["ca"]),
        settings(False, cert=pki["rogue"], key=pki["rogue-key"], ca=pki["ca"]),
    ):
        with pytest.raises(grpc.RpcError) as err:
            ingest(refused)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.store.stats()["records"] == 0

    # With the right one: accepted and stored.
    good = settings(False, cert=pki["agent"], key=pki["agent-key"], ca=pki["ca"])
    (ack,) = ingest(good)
    assert (ack.batch_id, ack.stored) == (1, 2)

    # The exporter, over the same mTLS channel, delivers everything.
    exp = GrpcExporter(
        server.address,
        channel_factory=lambda: tls_options.open_channel(server.address, good),
        spool_dir=tmp_path / "spool",
        spool_max_bytes=16 << 20,
    )
    for r in make_records(100, agent_id="b"):
        exp.write(r)
    exp.close(timeout=20)
    wait_for(lambda: server.store.stats()["records"] == 102, 10, "records over mTLS")


def test_plain_client_cannot_talk_to_a_tls_collector(collector, pki):
    server_side = settings(True, cert=pki["collector"], key=pki["collector-key"])
    server = collector(credentials=tls_options.server_credentials(server_side))
    channel = grpc.insecure_channel(server.address)
    with pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.CollectorStub(channel).Ingest(iter([pb.IngestBatch()]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
