"""Per-node agent identity from projected ServiceAccount tokens, over real loopback gRPC.

A collector with --token-review (mutual TLS, as in the Kubernetes manifests) asks the
fake API server (tests/k8s/fake_apiserver.py, real HTTPS on loopback) about each
agent's token; agents present the shared `tlscap://agent/*` certificate for TLS and
the token for their node.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.certs.authority import CertificateAuthority
from agent.certs.identity import identity_uri
from agent.cli import tls_options
from agent.cli.main import build_parser
from agent.cli.run import open_sinks
from agent.collector.tokens import TokenReviewer
from agent.export.backoff import Backoff
from agent.export.exporter import GrpcExporter
from agent.export.token import TokenFile, TokenFileError
from agent.k8s.api import ApiConfig, KubeApi
from agent.records.filter import RecordFilter
from agent.schema import pb, pb_grpc
from agent.schema.convert import filter_to_pb, to_pb
from tests.grpc.conftest import REPO, issue_pki, make_records, tls_settings, wait_for
from tests.k8s.fake_apiserver import FakeApiServer

COLLECTOR_SA_TOKEN = "collector-own-sa-token"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = CertificateAuthority.create("test CA")
    return issue_pki(tmp_path, [
        ("collector", ca, None),
        ("agent-any", ca, [identity_uri("agent", "*")]),  # the manifests' shared certificate
        ("agent-a", ca, [identity_uri("agent", "node-a")]),
        ("consumer", ca, [identity_uri("consumer", "alice")]),
    ])  # fmt: skip


@pytest.fixture
def api_server():
    with FakeApiServer(token=COLLECTOR_SA_TOKEN, tls=True) as server:
        yield server


def client(pki: dict[str, Path], name: str) -> tls_options.TlsSettings:
    return tls_settings(False, cert=pki[name], key=pki[f"{name}-key"], ca=pki["ca"])


def reviewer_for(api: FakeApiServer | str, ca_pem: bytes | None = None) -> TokenReviewer:
    url = api if isinstance(api, str) else api.url
    ca = ca_pem if isinstance(api, str) else api.ca_pem
    config = ApiConfig(server=url, token=COLLECTOR_SA_TOKEN, ca_data=ca)
    return TokenReviewer(KubeApi(config, connect_timeout=1, read_timeout=5))


def token_collector(collector, pki, api, **config):
    server_side = tls_settings(True, cert=pki["collector"], key=pki["collector-key"], ca=pki["ca"])
    return collector(
        credentials=tls_options.server_credentials(server_side),
        token_reviewer=reviewer_for(api),
        **config,
    )


def metadata(token: str | None):
    return None if token is None else (("authorization", f"Bearer {token}"),)


def ingest(address: str, who: tls_options.TlsSettings, records, token: str | None = None):
    channel = tls_options.open_channel(address, who)
    try:
        batch = pb.IngestBatch(batch_id=7, records=[to_pb(r) for r in records])
        stub = pb_grpc.CollectorStub(channel)
        return list(stub.Ingest(iter([batch]), metadata=metadata(token), timeout=10))
    finally:
        channel.close()


def subscribe(address: str, who: tls_options.TlsSettings, token: str | None = None) -> int:
    channel = tls_options.open_channel(address, who)
    try:
        request = pb.SubscribeRequest(filter=filter_to_pb(RecordFilter()), replay=True)
        stub = pb_grpc.CollectorStub(channel)
        return sum(
            len(r.records.records)
            for r in stub.Subscribe(request, metadata=metadata(token), timeout=10)
            if r.HasField("records")
        )
    finally:
        channel.close()


def refused(code: grpc.StatusCode, call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def serving(address: str, who: tls_options.TlsSettings) -> bool:
    channel = tls_options.open_channel(address, who)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tlscap.v1.Collector"), timeout=5
        )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


def write_token(path: Path, token: str) -> None:
    """As the kubelet does: the new file appears atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(token)
    os.replace(tmp, path)


def test_a_node_token_ingests_that_nodes_records_only(collector, pki, api_server, caplog):
    caplog.set_level(logging.DEBUG)
    server = token_collector(collector, pki, api_server)
    shared = client(pki, "agent-any")
    token_a = api_server.add_token("tlscap", "tlscap-agent", node="node-a")

    (ack,) = ingest(server.address, shared, make_records(3, node="node-a"), token_a)
    assert ack.stored == 3
    # The same token, records claiming node B (even one among node A's): refused.
    mixed = make_records(2, agent_id="b", node="node-a") + make_records(
        1, agent_id="c", node="node-b"
    )
    details = refused(PERMISSION_DENIED, lambda: ingest(server.address, shared, mixed, token_a))
    assert "'node-b' is not this agent's node 'node-a'" in details
    assert server.store.stats()["records"] == 3
    stats = server.stats()
    assert stats["refused_foreign_node"] == 1
    # Two streams, one review: the second came from the cache.
    assert len(api_server.token_reviews()) == 1
    assert stats["token_review_cache_hits"] == 1
    assert "tlscap://agent/node-a (ServiceAccount token)" in caplog.text
    assert token_a not in caplog.text


def test_bad_tokens_and_wrong_identities_are_refused(collector, pki, api_server, caplog):
    caplog.set_level(logging.DEBUG)
    server = token_collector(collector, pki, api_server)
    shared = client(pki, "agent-any")
    records = make_records(1, node="node-a")

    def refused_ingest(code, token, who=shared):
        return refused(code, lambda: ingest(server.address, who, records, token))

    # Unknown, expired, or for another audience: UNAUTHENTICATED.
    assert "invalid bearer token" in refused_ingest(UNAUTHENTICATED, "forged.token.value")
    expired = api_server.add_token("tlscap", "tlscap-agent", node="node-a", ttl=-60)
    assert "expired" in refused_ingest(UNAUTHENTICATED, expired)
    kube_audience = api_server.add_token(
        "tlscap", "tlscap-agent", node="node-a", audiences=["https://kubernetes.default.svc"]
    )
    assert "audiences" in refused_ingest(UNAUTHENTICATED, kube_audience)
    # The shared certificate alone, or a malformed header: UNAUTHENTICATED.
    assert "names no node" in refused_ingest(UNAUTHENTICATED, None)
    assert "Bearer" in refused(
        UNAUTHENTICATED,
        lambda: list(
            pb_grpc.CollectorStub(tls_options.open_channel(server.address, shared)).Ingest(
                iter([]), metadata=(("authorization", "Basic Zm9vOmJhcg=="),), timeout=10
            )
        ),
    )
    # A valid token of another ServiceAccount, or one without a node (Kubernetes
    # < 1.30): PERMISSION_DENIED, fail-closed.
    other_sa = api_server.add_token("shop", "default", node="node-a")
    assert "system:serviceaccount:shop:default" in refused_ingest(PERMISSION_DENIED, other_sa)
    no_node = api_server.add_token("tlscap", "tlscap-agent", node=None)
    assert "names no node" in refused_ingest(PERMISSION_DENIED, no_node)
    # Certificate and token must agree; a consumer certificate never ingests.
    token_b = api_server.add_token("tlscap", "tlscap-agent", node="node-b")
    assert "must agree" in refused_ingest(PERMISSION_DENIED, token_b, client(pki, "agent-a"))
    token_a = api_server.add_token("tlscap", "tlscap-agent", node="node-a")
    refused_ingest(PERMISSION_DENIED, token_a, client(pki, "consumer"))
    assert server.store.stats()["records"] == 0

    # A per-node certificate is an identity of its own: no token needed; with its token.
    assert ingest(server.address, client(pki, "agent-a"), records)[0].stored == 1
    assert ingest(server.address, client(pki, "agent-a"), records, token_a)[0].duplicates == 1

    stats = server.stats()
    assert stats["refused_token"] == 5
    assert stats["refused_token_identity"] == 3
    assert stats["refused_role"] == 1
    for token in (expired, kube_audience, other_sa, no_node, token_b, token_a):
        assert token not in caplog.text


def test_a_token_never_grants_subscribe(collector, pki, api_server):
    server = token_collector(collector, pki, api_server)
    token_a = api_server.add_token("tlscap", "tlscap-agent", node="node-a")
    ingest(server.address, client(pki, "agent-any"), make_records(2, node="node-a"), token_a)
    for who in ("agent-any", "agent-a", "consumer"):
        details = refused(
            PERMISSION_DENIED, lambda w=who: subscribe(server.address, client(pki, w), token_a)
        )
        assert "may only Ingest" in details or "may not Subscribe" in details
    # A consumer certificate without a token reads as before.
    assert subscribe(server.address, client(pki, "consumer")) == 2
    assert server.stats()["refused_role"] == 3


def test_api_server_down_is_unavailable_counted_and_survived(collector, pki, caplog):
    caplog.set_level(logging.DEBUG)
    api = FakeApiServer(token=COLLECTOR_SA_TOKEN, tls=True).start()
    token_a = api.add_token("tlscap", "tlscap-agent", node="node-a")
    server = token_collector(collector, pki, api)
    shared = client(pki, "agent-any")
    api.stop()  # the API server goes away

    for _ in range(2):
        details = refused(
            grpc.StatusCode.UNAVAILABLE,
            lambda: ingest(server.address, shared, make_records(1, node="node-a"), token_a),
        )
        assert "cannot check agent tokens" in details
    assert server.stats()["token_review_unavailable"] == 2
    assert server.stats()["refused_token"] == 0
    unavailable = [r for r in caplog.records if "cannot review the token" in r.getMessage()]
    assert unavailable and unavailable[0].levelno == logging.ERROR  # logged, once at ERROR
    assert sum(r.levelno == logging.ERROR for r in unavailable) == 1
    assert token_a not in caplog.text
    # The collector keeps serving: health, and an agent with a per-node certificate.
    assert serving(server.address, shared)
    assert ingest(server.address, client(pki, "agent-a"), make_records(1, node="node-a"))


def test_a_collector_without_the_auth_delegator_binding_says_so(collector, pki, api_server):
    api_server.deny_token_reviews = True
    server = token_collector(collector, pki, api_server)
    token_a = api_server.add_token("tlscap", "tlscap-agent", node="node-a")
    details = refused(
        grpc.StatusCode.UNAVAILABLE,
        lambda: ingest(server.address, client(pki, "agent-any"), make_records(1), token_a),
    )
    assert "refused the collector's TokenReview" in details and "forbidden" in details


# --- the agent side: the exporter sends the token file -------------------------------


def exporter(server, pki, token_path: Path, tmp_path: Path, **kwargs) -> GrpcExporter:
    shared = client(pki, "agent-any")
    kwargs.setdefault("backoff", Backoff(initial=0.05, maximum=0.3))
    return GrpcExporter(
        server.address,
        channel_factory=lambda: tls_options.open_channel(server.address, shared),
        spool_dir=tmp_path / "spool",
        spool_max_bytes=16 << 20,
        token_file=TokenFile(token_path),
        **kwargs,
    )


def test_exporter_sends_the_token_and_rereads_it_after_rotation(
    collector, pki, api_server, tmp_path, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    server = token_collector(collector, pki, api_server)
    # Long enough for the first batch to be delivered before it expires on a busy machine.
    first = api_server.add_token("tlscap", "tlscap-agent", node="node-a", ttl=8)
    token_path = tmp_path / "token"
    write_token(token_path, first)
    exp = exporter(server, pki, token_path, tmp_path)
    try:
        for r in make_records(5, node="node-a"):
            exp.write(r)
        wait_for(lambda: server.store.stats()["records"] == 5, 15, "records with the first token")

        # The kubelet rotates the token; the old one then expires. The collector ends
        # the stream at the next batch, and the exporter reconnects with the new token.
        second = api_server.add_token("tlscap", "tlscap-agent", node="node-a")
        write_token(token_path, second)
        time.sleep(max(0.0, first_expiry(first) - time.time()) + 0.2)
        for r in make_records(5, node="node-a", start_seq=6):
            exp.write(r)
        wait_for(lambda: server.store.stats()["records"] == 10, 20, "records with the new token")
        reviewed = [r.body["spec"]["token"] for r in api_server.token_reviews()]
        assert reviewed[0] == first and second in reviewed
        assert exp.stats()["export_refused"] == 0  # a rotation is not a refusal
        assert exp.stats()["export_lost_records"] == 0
    finally:
        exp.close(timeout=5)
    logged = caplog.text + "".join(capfd.readouterr())
    assert first not in logged and second not in logged
    assert "token was rotated" in caplog.text


def first_expiry(token: str) -> float:
    from agent.collector.tokens import token_expiry

    exp = token_expiry(token)
    assert exp is not None
    return exp


def test_exporter_refused_logs_once_counts_backs_off_and_spools(
    collector, pki, api_server, tmp_path, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    server = token_collector(collector, pki, api_server)
    wrong = api_server.add_token("shop", "default", node="node-a")  # not the agents' SA
    token_path = tmp_path / "token"
    write_token(token_path, wrong)
    exp = exporter(server, pki, token_path, tmp_path, refused_retry=0.3)
    try:
        for r in make_records(20, node="node-a"):
            exp.write(r)
        wait_for(lambda: exp.stats()["export_refused"] >= 3, 15, "a few refused attempts")
        started = time.monotonic()
        before = exp.stats()["export_refused"]
        time.sleep(1.0)
        # Backing off: at most about one attempt per refused_retry, not a hot loop.
        assert exp.stats()["export_refused"] - before <= int((time.monotonic() - started) / 0.3) + 1
        stats = exp.stats()
        assert stats["export_spooled_records"] == 20 and stats["export_lost_records"] == 0
        assert stats["export_connected"] == 0
        errors = [r for r in caplog.records if "refused this agent" in r.getMessage()]
        assert len(errors) == 1 and errors[0].levelno == logging.ERROR  # once per change
        assert "system:serviceaccount:shop:default" in errors[0].getMessage()

        # The right token arrives in the file: the next attempt reads it and delivers.
        good = api_server.add_token("tlscap", "tlscap-agent", node="node-a")
        write_token(token_path, good)
        wait_for(lambda: server.store.stats()["records"] == 20, 20, "spooled records delivered")
        # Logged once the exporter handles the ack, which may come just after the insert.
        wait_for(lambda: "accepts this agent again" in caplog.text, 10, "the all-clear log line")
    finally:
        exp.close(timeout=5)
    assert server.stats()["refused_token_identity"] == exp.stats()["export_refused"]
    logged = caplog.text + "".join(capfd.readouterr())
    assert wrong not in logged and good not in logged


def test_token_file_is_read_strictly_at_start_and_leniently_after(tmp_path, caplog):
    path = tmp_path / "token"
    with pytest.raises(TokenFileError, match="No such file"):
        TokenFile(path)
    path.write_text("\n")
    with pytest.raises(TokenFileError, match="empty"):
        TokenFile(path)
    path.write_text("secret-one\n")
    token = TokenFile(path)
    assert token.read() == "secret-one" and "secret-one" not in repr(token)
    path.unlink()  # mid-rotation
    assert token.read() == "secret-one"
    assert "using the last token" in caplog.text and "secret-one" not in caplog.text


# --- command lines -------------------------------------------------------------------


def run_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["run", "--collector", "127.0.0.1:1", "--spool-dir", str(tmp_path / "spool"), *extra]
    )


def test_run_refuses_a_token_without_tls(tmp_path, pki):
    token_path = tmp_path / "token"
    token_path.write_text("a-token")
    args = run_args(tmp_path, "--insecure", "--collector-token-file", str(token_path))
    with pytest.raises(tls_options.TlsConfigError, match="needs TLS"):
        open_sinks(args)
    missing = run_args(
        tmp_path, "--tls-ca", str(pki["ca"]), "--collector-token-file", str(tmp_path / "none")
    )
    with pytest.raises(OSError, match="cannot use token file"):
        open_sinks(missing)
    good = run_args(tmp_path, "--tls-ca", str(pki["ca"]), "--collector-token-file", str(token_path))
    (sink,) = open_sinks(good)
    assert isinstance(sink, GrpcExporter) and sink._token_file is not None
    sink.close(timeout=0.5)


def tlscap(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = "/nonexistent"
    env["HOME"] = "/nonexistent"
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )  # fmt: skip


def test_collector_command_line_for_token_review(tmp_path, pki, api_server):
    store = str(tmp_path / "s.db")
    out = tlscap("collector", "--insecure", "--token-review", "--store", store)
    assert out.returncode != 0 and "needs TLS" in out.stderr
    tls = ["--tls-cert", str(pki["collector"]), "--tls-key", str(pki["collector-key"]),
           "--tls-ca", str(pki["ca"])]  # fmt: skip
    out = tlscap("collector", "--token-review", "--store", store, *tls)
    assert out.returncode != 0 and "--kubeconfig" in out.stderr and "Traceback" not in out.stderr
    out = tlscap("collector", "--token-review", "--agent-service-account", "x", "--store", store,
                 *tls)  # fmt: skip
    assert out.returncode != 0 and "NAMESPACE:NAME" in out.stderr

    # A real collector process, reviewing through a kubeconfig: the agent's token works.
    kubeconfig = tmp_path / "kubeconfig"
    (tmp_path / "api-ca.crt").write_bytes(api_server.ca_pem)
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [
                    {
                        "name": "k",
                        "cluster": {
                            "server": api_server.url,
                            "certificate-authority": "api-ca.crt",
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": COLLECTOR_SA_TOKEN}}],
            }
        )
    )
    ready = tmp_path / "ready"
    log = tmp_path / "collector.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "collector", "--listen", "127.0.0.1:0", "--store", store,
         "--ready-file", str(ready), "--token-review", "--kubeconfig", str(kubeconfig), *tls],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
    )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 30, "collector ready")
        assert proc.poll() is None, log.read_text()
        address = ready.read_text().strip()
        token_a = api_server.add_token("tlscap", "tlscap-agent", node="node-a")
        shared = client(pki, "agent-any")
        assert ingest(address, shared, make_records(2, node="node-a"), token_a)[0].stored == 2
        refused(UNAUTHENTICATED, lambda: ingest(address, shared, make_records(1, node="node-a")))
    finally:
        proc.terminate()
        proc.wait(20)
    text = log.read_text()
    assert "agents identified by ServiceAccount tokens of system:serviceaccount:tlscap:" in text
    assert token_a not in text and COLLECTOR_SA_TOKEN not in text
    assert "refused_token=1" in text
