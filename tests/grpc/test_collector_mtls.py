"""Mutual TLS between agents / consumers and the collector, over real loopback gRPC:
the handshake, then the roles the certificates' tlscap:// identities grant."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.certs.authority import CertificateAuthority
from agent.certs.identity import identity_uri
from agent.cli import tls_options
from agent.collector.policy import parse_policy
from agent.export.exporter import GrpcExporter
from agent.records.filter import RecordFilter
from agent.records.record import PodRef, Record
from agent.schema import pb, pb_grpc
from agent.schema.convert import filter_to_pb, from_pb, to_pb
from tests.grpc.conftest import issue_pki, make_records, tls_settings, wait_for


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA with a collector cert, client certs with and without identities, and a rogue
    CA's client cert (with an identity)."""
    ca = CertificateAuthority.create("test CA")
    rogue = CertificateAuthority.create("rogue CA")
    return issue_pki(tmp_path, [
        ("collector", ca, None),
        ("agent", ca, [identity_uri("agent", "n1")]),  # node of make_records()
        ("agent-n2", ca, [identity_uri("agent", "n2")]),
        ("agent-any", ca, [identity_uri("agent", "*")]),
        ("consumer", ca, [identity_uri("consumer", "alice")]),
        ("shop", ca, [identity_uri("consumer", "shop-team")]),
        ("plain", ca, []),  # signed by the CA, but says nothing about its role
        ("rogue", rogue, [identity_uri("consumer", "alice")]),
    ])  # fmt: skip


def test_agent_needs_a_client_certificate_from_the_collectors_ca(collector, pki, tmp_path):
    server_side = tls_settings(True, cert=pki["collector"], key=pki["collector-key"], ca=pki["ca"])
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
        tls_settings(False, ca=pki["ca"]),
        tls_settings(False, cert=pki["rogue"], key=pki["rogue-key"], ca=pki["ca"]),
    ):
        with pytest.raises(grpc.RpcError) as err:
            ingest(refused)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.store.stats()["records"] == 0

    # With the right one: accepted and stored.
    good = tls_settings(False, cert=pki["agent"], key=pki["agent-key"], ca=pki["ca"])
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


# --- roles ---------------------------------------------------------------------------


def client(pki: dict[str, Path], name: str) -> tls_options.TlsSettings:
    return tls_settings(False, cert=pki[name], key=pki[f"{name}-key"], ca=pki["ca"])


def mtls_collector(collector, pki: dict[str, Path], **config):
    server_side = tls_settings(True, cert=pki["collector"], key=pki["collector-key"], ca=pki["ca"])
    return collector(credentials=tls_options.server_credentials(server_side), **config)


def ingest(address: str, who: tls_options.TlsSettings | None, records: list[Record]) -> list:
    channel = (
        grpc.insecure_channel(address) if who is None else tls_options.open_channel(address, who)
    )
    try:
        batch = pb.IngestBatch(batch_id=7, records=[to_pb(r) for r in records])
        return list(pb_grpc.CollectorStub(channel).Ingest(iter([batch]), timeout=10))
    finally:
        channel.close()


def subscribe(
    address: str, who: tls_options.TlsSettings | None, flt: RecordFilter | None = None
) -> list[Record]:
    """Replay everything stored (no live part), as `who`."""
    channel = (
        grpc.insecure_channel(address) if who is None else tls_options.open_channel(address, who)
    )
    try:
        request = pb.SubscribeRequest(
            filter=filter_to_pb(flt or RecordFilter()), replay=True, live=False
        )
        out = []
        for response in pb_grpc.CollectorStub(channel).Subscribe(request, timeout=10):
            if response.HasField("records"):
                out.extend(from_pb(r) for r in response.records.records)
        return out
    finally:
        channel.close()


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    return err.value


def serving(address: str, who: tls_options.TlsSettings | None) -> bool:
    channel = (
        grpc.insecure_channel(address) if who is None else tls_options.open_channel(address, who)
    )
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tlscap.v1.Collector"), timeout=5
        )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


def test_roles_agents_ingest_their_own_node_consumers_read(collector, pki):
    server = mtls_collector(collector, pki)
    agent, agent_n2, consumer = (
        client(pki, "agent"),
        client(pki, "agent-n2"),
        client(pki, "consumer"),
    )

    # An agent ingests its own node's records...
    (ack,) = ingest(server.address, agent, make_records(3, node="n1"))
    assert ack.stored == 3
    (ack,) = ingest(server.address, agent_n2, make_records(2, agent_id="b", node="n2"))
    assert ack.stored == 2
    # ...but not a record claiming another node, even one among its own.
    mixed = make_records(2, agent_id="c", node="n1") + make_records(1, agent_id="d", node="n2")
    err = refused(lambda: ingest(server.address, agent, mixed))
    assert "batch 7, record 2" in err.details() and "'n2'" in err.details()
    assert server.store.stats()["records"] == 5

    # A consumer reads everything; it cannot ingest.
    assert len(subscribe(server.address, consumer)) == 5
    refused(lambda: ingest(server.address, consumer, make_records(1, agent_id="e")))
    # An agent cannot read, not even its own node's records.
    err = refused(lambda: subscribe(server.address, agent))
    assert "tlscap://agent/n1 may not Subscribe" in err.details()

    # A certificate from the CA without an identity: refused for both, logged once.
    plain = client(pki, "plain")
    refused(lambda: subscribe(server.address, plain))
    refused(lambda: ingest(server.address, plain, make_records(1, agent_id="f")))

    stats = server.stats()
    assert stats["records"] == 5
    assert stats["refused_foreign_node"] == 1
    assert stats["refused_role"] == 2
    assert stats["refused_no_identity"] == 2
    assert stats["refused_anonymous"] == 0
    # Health stays open to every client of the CA, and SERVING after all of that.
    assert serving(server.address, agent) and serving(server.address, plain)


def test_an_agent_of_any_node_ingests_every_node_and_reads_nothing(collector, pki):
    server = mtls_collector(collector, pki)
    shared = client(pki, "agent-any")
    records = make_records(2, node="n1") + make_records(2, agent_id="b", node="n2")
    (ack,) = ingest(server.address, shared, records)
    assert ack.stored == 4
    refused(lambda: subscribe(server.address, shared))
    assert serving(server.address, shared)


def test_live_subscription_of_a_consumer_and_refused_agent(collector, pki, subscriber):
    server = mtls_collector(collector, pki)
    consumer, agent = client(pki, "consumer"), client(pki, "agent")
    sub = subscriber(lambda: tls_options.open_channel(server.address, consumer))
    wait_for(lambda: server.service.counters["subscribers"] == 1, 10, "consumer subscribed")
    denied = subscriber(lambda: tls_options.open_channel(server.address, agent))
    ingest(server.address, agent, make_records(4, node="n1"))
    wait_for(lambda: len(sub.records()) == 4, 10, "live records for the consumer")
    wait_for(lambda: denied.error is not None, 10, "the agent's subscription refused")
    assert denied.records() == []
    assert isinstance(denied.error, grpc.RpcError) or "PERMISSION_DENIED" in str(denied.error)
    assert serving(server.address, consumer)


def in_namespace(records: list[Record], namespace: str | None) -> list[Record]:
    pod = None if namespace is None else PodRef(namespace=namespace, name=f"{namespace}-pod")
    return [r.replace(pod=pod) for r in records]


def test_namespace_policy_limits_what_a_consumer_sees(collector, pki):
    policy = parse_policy(
        """
        [consumers.alice]
        [consumers.shop-team]
        namespaces = ["shop", "payments"]
        """
    )
    server = mtls_collector(collector, pki, policy=policy)
    agent = client(pki, "agent")
    records = (
        in_namespace(make_records(2, agent_id="s"), "shop")
        + in_namespace(make_records(2, agent_id="p"), "payments")
        + in_namespace(make_records(2, agent_id="k"), "kube-system")
        + in_namespace(make_records(2, agent_id="h"), None)  # a host process
    )
    ingest(server.address, agent, records)

    alice, shop = client(pki, "consumer"), client(pki, "shop")
    assert len(subscribe(server.address, alice)) == 8
    seen = subscribe(server.address, shop)
    assert sorted({r.pod.namespace for r in seen}) == ["payments", "shop"]
    assert len(seen) == 4
    # Narrowing further within the policy is fine; reaching outside it is refused.
    only_shop = subscribe(server.address, shop, RecordFilter(namespaces=frozenset({"shop"})))
    assert {r.agent_id for r in only_shop} == {"s"}
    err = refused(
        lambda: subscribe(server.address, shop, RecordFilter(namespaces=frozenset({"kube-system"})))
    )
    assert "kube-system" in err.details()
    assert server.stats()["refused_policy"] == 1
    assert serving(server.address, shop)


def test_live_fanout_respects_the_namespace_policy(collector, pki, subscriber):
    policy = parse_policy('[consumers.shop-team]\nnamespaces = ["shop"]\n')
    server = mtls_collector(collector, pki, policy=policy)
    shop = client(pki, "shop")
    sub = subscriber(lambda: tls_options.open_channel(server.address, shop))
    wait_for(lambda: server.service.counters["subscribers"] == 1, 10, "subscribed")
    ingest(server.address, client(pki, "agent"),
           in_namespace(make_records(3, agent_id="k"), "kube-system")
           + in_namespace(make_records(2, agent_id="s"), "shop"))  # fmt: skip
    wait_for(lambda: len(sub.records()) == 2, 10, "the shop records, live")
    assert {r.agent_id for r in sub.records()} == {"s"}
    # A consumer the policy does not list (and no "*" rule): refused.
    refused(lambda: subscribe(server.address, client(pki, "consumer")))


def test_anonymous_subscribe_is_refused_unless_allowed(collector):
    strict = collector(allow_anonymous_subscribe=False)
    # Ingest without mutual TLS stays possible (plaintext --insecure, no identities).
    (ack,) = ingest(strict.address, None, make_records(2))
    assert ack.stored == 2
    err = refused(lambda: subscribe(strict.address, None))
    assert "anonymous" in err.details()
    assert strict.stats()["refused_anonymous"] == 1
    assert serving(strict.address, None)

    open_ = collector(allow_anonymous_subscribe=True)
    ingest(open_.address, None, make_records(2))
    assert len(subscribe(open_.address, None)) == 2


def test_tls_without_client_ca_treats_callers_as_anonymous(collector, pki):
    server_side = tls_settings(True, cert=pki["collector"], key=pki["collector-key"])
    server = collector(credentials=tls_options.server_credentials(server_side))
    # The fixture allows anonymous subscribers only on plaintext collectors.
    assert server.config.allow_anonymous_subscribe is False
    # A client certificate is neither requested nor believed: the caller is anonymous.
    consumer = client(pki, "consumer")
    refused(lambda: subscribe(server.address, consumer))
    (ack,) = ingest(server.address, tls_settings(False, ca=pki["ca"]), make_records(1))
    assert ack.stored == 1
    assert serving(server.address, tls_settings(False, ca=pki["ca"]))


def test_plain_client_cannot_talk_to_a_tls_collector(collector, pki):
    server_side = tls_settings(True, cert=pki["collector"], key=pki["collector-key"])
    server = collector(credentials=tls_options.server_credentials(server_side))
    channel = grpc.insecure_channel(server.address)
    with pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.CollectorStub(channel).Ingest(iter([pb.IngestBatch()]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
