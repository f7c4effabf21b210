"""agent.fallback.contexts: leaf certificates and the TLS contexts built from them.

Handshakes run in memory (ssl.MemoryBIO), so no sockets are involved."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.certs.authority import CertificateAuthority, CertificateError, IssuedCert, is_issued_by
from agent.fallback import contexts
from agent.fallback.config import DestinationPattern, InboundService, UpstreamRule
from agent.fallback.contexts import (
    LEAF_VALIDITY,
    RENEW_BEFORE,
    LeafCache,
    ServiceContexts,
    UpstreamContexts,
)

ALPN = ("h2", "http/1.1")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def ca_file(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.crt"
    path.write_bytes(ca.cert_pem)
    return path


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def leaves(ca: CertificateAuthority, clock: FakeClock) -> Iterator[LeafCache]:
    yield LeafCache(ca, clock=clock)


def cert_of(issued: IssuedCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_pem)


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def write_pair(directory: Path, name: str, issued: IssuedCert) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return cert, key


def client_context(ca: CertificateAuthority, alpn: tuple[str, ...] = ALPN) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.cert_pem.decode("ascii"))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Complete a TLS handshake between two contexts in memory; (client, server) objects."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # Both sides agree: one application byte each way proves the keys match.
            client.write(b"?")
            s_in.write(c_out.read())
            assert server.read(1) == b"?"
            server.write(b"!")
            c_in.write(s_out.read())
            assert client.read(1) == b"!"
            return client, server
    raise AssertionError("handshake did not complete")


# --- LeafCache ---------------------------------------------------------------------------


def test_leaf_for_a_dns_name(leaves: LeafCache, ca: CertificateAuthority) -> None:
    issued = leaves.leaf("api.test")
    cert = cert_of(issued)
    names = sans(cert)
    assert names.get_values_for_type(x509.DNSName) == ["api.test"]
    assert names.get_values_for_type(x509.IPAddress) == []
    assert is_issued_by(cert, ca.certificate)
    assert cert.not_valid_after_utc == issued.not_after


@pytest.mark.parametrize("ip", ["198.18.0.2", "2001:2::2"])
def test_leaf_for_an_ip(leaves: LeafCache, ip: str) -> None:
    names = sans(cert_of(leaves.leaf(ip)))
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip)]
    assert names.get_values_for_type(x509.DNSName) == []


def test_leaf_is_valid_for_about_an_hour(leaves: LeafCache) -> None:
    before = datetime.now(UTC)
    issued = leaves.leaf("api.test")
    after = datetime.now(UTC)
    assert before + LEAF_VALIDITY - timedelta(seconds=1) <= issued.not_after
    assert issued.not_after <= after + LEAF_VALIDITY
    cert = cert_of(issued)
    assert cert.not_valid_before_utc <= before


def test_leaf_is_cached(leaves: LeafCache) -> None:
    first = leaves.leaf("api.test")
    assert (leaves.issued, leaves.hits) == (1, 0)
    assert leaves.leaf("api.test") is first
    assert (leaves.issued, leaves.hits) == (1, 1)
    leaves.leaf("other.test")
    assert (leaves.issued, leaves.hits) == (2, 1)


def test_leaf_reissued_near_expiry(leaves: LeafCache, clock: FakeClock) -> None:
    first = leaves.leaf("api.test")
    clock.now = first.not_after - RENEW_BEFORE - timedelta(seconds=30)
    assert leaves.leaf("api.test") is first
    assert leaves.issued == 1
    clock.now = first.not_after - RENEW_BEFORE + timedelta(seconds=1)
    second = leaves.leaf("api.test")
    assert second is not first
    assert second.key_pem != first.key_pem
    assert leaves.issued == 2


def test_renew_before_must_be_shorter_than_validity(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="renew_before"):
        LeafCache(ca, validity=timedelta(minutes=10), renew_before=timedelta(minutes=10))


def test_context_cached_per_name_and_alpn(leaves: LeafCache) -> None:
    ctx = leaves.context("api.test", ALPN)
    assert leaves.context("api.test", ALPN) is ctx
    assert leaves.context("api.test", ("http/1.1",)) is not ctx
    assert leaves.context("other.test", ALPN) is not ctx
    assert leaves.issued == 2  # one leaf per name, whatever the ALPN


def test_cached_context(leaves: LeafCache, clock: FakeClock) -> None:
    assert leaves.cached_context("api.test", ALPN) is None
    ctx = leaves.context("api.test", ALPN)
    hits = leaves.hits
    assert leaves.cached_context("api.test", ALPN) is ctx
    assert leaves.hits == hits + 1
    assert leaves.cached_context("api.test", ("h2",)) is None  # other ALPN: not built yet
    assert leaves.cached_context("other.test", ALPN) is None
    assert leaves.issued == 1  # cached_context never mints

    not_after = leaves.leaf("api.test").not_after
    clock.now = not_after - RENEW_BEFORE - timedelta(seconds=1)
    assert leaves.cached_context("api.test", ALPN) is ctx
    clock.now = not_after - RENEW_BEFORE
    assert leaves.cached_context("api.test", ALPN) is None
    assert leaves.issued == 1


def test_eviction_drops_leaves_and_contexts(ca: CertificateAuthority) -> None:
    cache = LeafCache(ca, max_entries=2)
    ctx_a = cache.context("a.test", ALPN)
    cache.context("a.test", ("h2",))
    cache.context("b.test", ALPN)
    assert cache.cached_context("a.test", ALPN) is ctx_a
    cache.leaf("c.test")
    assert cache.issued == 3
    assert cache.cached_context("a.test", ALPN) is None
    assert cache.cached_context("a.test", ("h2",)) is None
    assert not [key for key in cache._contexts if key[0] == "a.test"]
    assert cache.cached_context("b.test", ALPN) is not None
    cache.leaf("a.test")  # minted again
    assert cache.issued == 4


def test_eviction_is_least_recently_used(ca: CertificateAuthority) -> None:
    cache = LeafCache(ca, max_entries=2)
    a = cache.leaf("a.test")
    cache.leaf("b.test")
    assert cache.leaf("a.test") is a  # a is now the most recent
    cache.leaf("c.test")  # evicts b
    assert cache.leaf("a.test") is a
    assert cache.issued == 3
    cache.leaf("b.test")
    assert cache.issued == 4


def test_server_context_handshake_with_alpn(leaves: LeafCache, ca: CertificateAuthority) -> None:
    client, server = handshake(leaves.context("api.test", ALPN), client_context(ca), "api.test")
    assert client.selected_alpn_protocol() == "h2"
    assert server.selected_alpn_protocol() == "h2"
    peer = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
    assert sans(peer).get_values_for_type(x509.DNSName) == ["api.test"]


def test_server_context_follows_the_clients_alpn(
    leaves: LeafCache, ca: CertificateAuthority
) -> None:
    client, _ = handshake(leaves.context("api.test", ("http/1.1",)), client_context(ca), "api.test")
    assert client.selected_alpn_protocol() == "http/1.1"
    client, _ = handshake(leaves.context("api.test", ()), client_context(ca, ()), "api.test")
    assert client.selected_alpn_protocol() is None


def test_ip_leaf_handshake(leaves: LeafCache, ca: CertificateAuthority) -> None:
    handshake(leaves.context("198.18.0.2", ()), client_context(ca), "198.18.0.2")


def test_leaf_for_one_name_is_refused_for_another(
    leaves: LeafCache, ca: CertificateAuthority
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(leaves.context("api.test", ()), client_context(ca), "other.test")


def test_key_files_exist_only_while_a_context_loads(
    ca: CertificateAuthority, scratch_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, list[str]]] = []
    load = ssl.SSLContext.load_cert_chain

    def spying_load(self, certfile, *args, **kwargs):
        directory = Path(certfile).parent
        seen.append((stat.S_IMODE(directory.stat().st_mode), os.listdir(directory)))
        return load(self, certfile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spying_load)
    cache = LeafCache(ca)
    cache.context("api.test", ALPN)
    cache.context("198.18.0.2", ())
    assert [mode for mode, _ in seen] == [0o700, 0o700]
    assert all(len(files) == 1 for _, files in seen)
    assert not any(d.exists() for d in scratch_dirs)  # nothing left behind


# --- ServiceContexts ------------------------------------------------------------------


def test_service_context_handshake(tmp_path: Path, ca: CertificateAuthority) -> None:
    cert, key = write_pair(tmp_path, "svc", ca.issue("svc.test", dns_names=["svc.test"]))
    services = ServiceContexts((InboundService(8443, cert, key),))
    ctx = services.context(8443, ("http/1.1",))
    assert services.context(8443, ("http/1.1",)) is ctx
    client, _ = handshake(ctx, client_context(ca), "svc.test")
    assert client.selected_alpn_protocol() == "http/1.1"


def test_service_contexts_per_port(tmp_path: Path, ca: CertificateAuthority) -> None:
    a_cert, a_key = write_pair(tmp_path, "a", ca.issue("a.test", dns_names=["a.test"]))
    b_cert, b_key = write_pair(tmp_path, "b", ca.issue("b.test", dns_names=["b.test"]))
    services = ServiceContexts(
        (InboundService(8443, a_cert, a_key), InboundService(9443, b_cert, b_key))
    )
    handshake(services.context(8443, ()), client_context(ca), "a.test")
    handshake(services.context(9443, ()), client_context(ca), "b.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(services.context(9443, ()), client_context(ca), "a.test")


@pytest.fixture
def scratch_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Scratch directories go under tmp_path (and are listed), not to /dev/shm."""
    made: list[Path] = []
    base = tmp_path / "scratch"
    base.mkdir()

    def private_dir() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="tlscap-leaf-", dir=base)))
        return made[-1]

    monkeypatch.setattr(contexts, "_private_dir", private_dir)
    return made


def test_service_missing_files(
    tmp_path: Path, ca: CertificateAuthority, scratch_dirs: list[Path]
) -> None:
    cert, key = write_pair(tmp_path, "svc", ca.issue("svc.test"))
    with pytest.raises(CertificateError, match="inbound certificate") as err:
        ServiceContexts((InboundService(8443, tmp_path / "missing.crt", key),))
    assert str(tmp_path / "missing.crt") in str(err.value)
    with pytest.raises(CertificateError, match="inbound key"):
        ServiceContexts((InboundService(8443, cert, tmp_path / "missing.key"),))


def test_service_bad_pair_fails_at_start(
    tmp_path: Path, ca: CertificateAuthority, scratch_dirs: list[Path]
) -> None:
    cert, _ = write_pair(tmp_path, "one", ca.issue("one.test"))
    _, other_key = write_pair(tmp_path, "two", ca.issue("two.test"))
    with pytest.raises((CertificateError, ssl.SSLError)):
        ServiceContexts((InboundService(8443, cert, other_key),))
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises((CertificateError, ssl.SSLError)):
        ServiceContexts((InboundService(8443, garbage, other_key),))


def test_failed_service_contexts_leave_no_scratch_dir(
    tmp_path: Path, ca: CertificateAuthority, scratch_dirs: list[Path]
) -> None:
    cert, _ = write_pair(tmp_path, "one", ca.issue("one.test"))
    _, other_key = write_pair(tmp_path, "two", ca.issue("two.test"))
    with pytest.raises(CertificateError, match="inbound port 8443"):
        ServiceContexts((InboundService(8443, cert, other_key),))
    assert scratch_dirs
    assert not any(d.exists() for d in scratch_dirs)


# --- UpstreamContexts -----------------------------------------------------------------


def test_upstream_default_verifies(ca: CertificateAuthority, tmp_path: Path) -> None:
    upstreams = UpstreamContexts()
    ctx = upstreams.context(None, ())
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    cert, key = write_pair(tmp_path, "up", ca.issue("up.test", dns_names=["up.test"]))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    with pytest.raises(ssl.SSLCertVerificationError):  # our CA is not in the system store
        handshake(server, ctx, "up.test")


def test_upstream_extra_ca_is_trusted(
    ca: CertificateAuthority, ca_file: Path, tmp_path: Path
) -> None:
    cert, key = write_pair(tmp_path, "up", ca.issue("up.test", dns_names=["up.test"]))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    handshake(server, UpstreamContexts(ca_file).context(None, ()), "up.test")


def test_upstream_bad_ca_path(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="cannot load upstream certificates"):
        UpstreamContexts(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nothing here\n")
    with pytest.raises(CertificateError, match="cannot load upstream certificates"):
        UpstreamContexts(garbage)


def test_upstream_insecure_rule() -> None:
    upstreams = UpstreamContexts()
    rule = UpstreamRule(DestinationPattern.parse("dev.test"), insecure=True)
    ctx = upstreams.context(rule, ())
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.check_hostname is False
    inbound = upstreams.insecure(("h2",))
    assert inbound.verify_mode == ssl.CERT_NONE
    assert inbound.check_hostname is False


def test_upstream_insecure_accepts_any_certificate(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert, key = write_pair(tmp_path, "up", ca.issue("self.test", dns_names=["self.test"]))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    rule = UpstreamRule(DestinationPattern.parse("dev.test"), insecure=True)
    handshake(server, UpstreamContexts().context(rule, ()), None)


def test_upstream_client_certificate(
    ca: CertificateAuthority, ca_file: Path, tmp_path: Path
) -> None:
    server_cert, server_key = write_pair(
        tmp_path, "srv", ca.issue("mtls.test", dns_names=["mtls.test"])
    )
    client_cert, client_key = write_pair(
        tmp_path, "cli", ca.issue("tlscap-client", server=False, client=True)
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert, server_key)
    server.load_verify_locations(cadata=ca.cert_pem.decode("ascii"))
    server.verify_mode = ssl.CERT_REQUIRED
    server.set_alpn_protocols(["h2"])

    rule = UpstreamRule(
        DestinationPattern.parse("mtls.test"),
        client_cert=client_cert,
        client_key=client_key,
        ca=ca_file,
    )
    ctx = UpstreamContexts().context(rule, ("h2",))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    client, srv = handshake(server, ctx, "mtls.test")
    assert client.selected_alpn_protocol() == "h2"
    peer = x509.load_der_x509_certificate(srv.getpeercert(binary_form=True))
    assert peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "tlscap-client"


def test_upstream_bad_client_certificate_names_the_rule(tmp_path: Path) -> None:
    rule = UpstreamRule(
        DestinationPattern.parse("*.corp.test"),
        client_cert=tmp_path / "missing.crt",
        client_key=tmp_path / "missing.key",
    )
    with pytest.raises(CertificateError, match=r"for upstream \*\.corp\.test"):
        UpstreamContexts().context(rule, ())


def test_upstream_contexts_cached_per_rule_and_alpn() -> None:
    upstreams = UpstreamContexts()
    rule = UpstreamRule(DestinationPattern.parse("dev.test"), insecure=True)
    ctx = upstreams.context(rule, ALPN)
    assert upstreams.context(rule, ALPN) is ctx
    same_rule = UpstreamRule(DestinationPattern.parse("dev.test"), insecure=True)
    assert upstreams.context(same_rule, ALPN) is ctx  # equal rules share a context
    assert upstreams.context(rule, ("h2",)) is not ctx
    assert upstreams.context(None, ALPN) is not ctx
    assert upstreams.context(None, ()) is upstreams.context(None, ())
