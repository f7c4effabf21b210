"""Tests for agent.certs.authority, `tlscap certs` and the gRPC TLS option checks."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from agent.certs.authority import (
    CertificateAuthority,
    CertificateError,
    IssuedCert,
    is_issued_by,
    write_private,
    write_public,
)
from agent.cli import tls_options
from agent.cli.main import main
from agent.cli.tls_options import TlsConfigError, tls_settings_from_args


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def cert_of(issued: IssuedCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_pem)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ext(cert: x509.Certificate, cls: type) -> object:
    return cert.extensions.get_extension_for_class(cls).value


# --- the authority -----------------------------------------------------------------


def test_ca_round_trip(tmp_path: Path, ca: CertificateAuthority) -> None:
    ca.save(tmp_path)
    loaded = CertificateAuthority.load(tmp_path)
    assert loaded.cert_pem == ca.cert_pem
    assert loaded.key_pem == ca.key_pem
    assert (tmp_path / "ca.crt").read_bytes() == ca.cert_pem


def test_ca_key_is_private_and_cert_is_not(tmp_path: Path, ca: CertificateAuthority) -> None:
    old = os.umask(0)  # even a permissive umask must not widen the key's mode
    try:
        ca.save(tmp_path)
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(tmp_path / "ca.crt") == 0o644
    assert not list(tmp_path.glob(".*")), "temp files left behind"


def test_write_helpers_replace_and_set_mode(tmp_path: Path) -> None:
    target = tmp_path / "x.key"
    target.write_bytes(b"old")
    target.chmod(0o666)
    write_private(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    write_public(tmp_path / "x.crt", b"pub")
    assert mode(tmp_path / "x.crt") == 0o644


def test_ca_certificate_is_a_ca(ca: CertificateAuthority) -> None:
    constraints = ext(ca.certificate, x509.BasicConstraints)
    assert constraints.ca and constraints.path_length == 0
    usage = ext(ca.certificate, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign
    (cn,) = ca.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "tlscap CA"
    assert ca.not_after - datetime.now(UTC) > timedelta(days=3640)


def test_load_or_create_creates_then_reuses(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "new")
    second = CertificateAuthority.load_or_create(tmp_path / "new")
    assert first.cert_pem == second.cert_pem


def test_load_or_create_refuses_half_a_ca(tmp_path: Path, ca: CertificateAuthority) -> None:
    write_public(tmp_path / "ca.crt", ca.cert_pem)
    with pytest.raises(CertificateError, match=r"CA key not found: .*ca\.key"):
        CertificateAuthority.load_or_create(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == ca.cert_pem


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="CA certificate not found"):
        CertificateAuthority.load(tmp_path / "nowhere")


def test_load_detects_mismatched_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create()
    write_public(tmp_path / "ca.crt", ca.cert_pem)
    write_private(tmp_path / "ca.key", other.key_pem)
    with pytest.raises(CertificateError, match="does not match") as info:
        CertificateAuthority.load(tmp_path)
    assert "\n" not in str(info.value)


def test_load_rejects_garbage_and_leaf(tmp_path: Path, ca: CertificateAuthority) -> None:
    (tmp_path / "ca.crt").write_bytes(b"not a certificate\n")
    write_private(tmp_path / "ca.key", ca.key_pem)
    with pytest.raises(CertificateError, match="does not hold a PEM certificate"):
        CertificateAuthority.load(tmp_path)

    leaf = ca.issue("leaf.example")
    write_public(tmp_path / "ca.crt", leaf.cert_pem)
    write_private(tmp_path / "ca.key", leaf.key_pem)
    with pytest.raises(CertificateError, match="is not a CA certificate"):
        CertificateAuthority.load(tmp_path)


def test_server_leaf_verifies_against_ca(ca: CertificateAuthority) -> None:
    issued = ca.issue(
        "collector", dns_names=["collector.example", "localhost"], ip_addresses=["127.0.0.1", "::1"]
    )
    leaf = cert_of(issued)
    leaf.verify_directly_issued_by(ca.certificate)
    assert is_issued_by(leaf, ca.certificate)
    assert not is_issued_by(leaf, CertificateAuthority.create().certificate)

    store = Store([ca.certificate])
    for name in (x509.DNSName("collector.example"), x509.IPAddress(ipaddress.ip_address("::1"))):
        verifier = PolicyBuilder().store(store).build_server_verifier(name)
        chain = verifier.verify(leaf, [])
        assert chain[-1] == ca.certificate
    wrong = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("elsewhere.example"))
    with pytest.raises(VerificationError):
        wrong.verify(leaf, [])


def test_leaf_extensions(ca: CertificateAuthority) -> None:
    leaf = cert_of(ca.issue("svc", dns_names=["a.example"], ip_addresses=["10.0.0.1"]))
    sans = ext(leaf, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["a.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    assert ext(leaf, x509.BasicConstraints).ca is False
    usage = ext(leaf, x509.KeyUsage)
    assert usage.digital_signature and not usage.key_cert_sign
    assert list(ext(leaf, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = ext(leaf, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ext(ca.certificate, x509.SubjectKeyIdentifier).digest
    assert leaf.issuer == ca.certificate.subject
    # backdated for clock skew
    assert leaf.not_valid_before_utc < datetime.now(UTC) - timedelta(minutes=1)


def test_client_leaf_usage(ca: CertificateAuthority) -> None:
    client = cert_of(ca.issue("agent", server=False, client=True))
    assert list(ext(client, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # no SANs given: the common name becomes the SAN
    assert ext(client, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == ["agent"]
    store = Store([ca.certificate])
    verified = PolicyBuilder().store(store).build_client_verifier().verify(client, [])
    assert verified.chain[-1] == ca.certificate

    # A client-only certificate must not pass as a server.
    server_verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("agent"))
    with pytest.raises(VerificationError):
        server_verifier.verify(client, [])

    both = cert_of(ca.issue("both", server=True, client=True))
    assert set(ext(both, x509.ExtendedKeyUsage)) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    with pytest.raises(ValueError, match="server or client"):
        ca.issue("none", server=False, client=False)


def test_issue_short_lived_and_ip_common_name(ca: CertificateAuthority) -> None:
    issued = ca.issue("192.0.2.7", valid_for=timedelta(hours=1))
    leaf = cert_of(issued)
    assert issued.not_after == leaf.not_valid_after_utc
    assert timedelta(minutes=59) < issued.not_after - datetime.now(UTC) <= timedelta(hours=1)
    sans = ext(leaf, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]


def test_issue_long_sni_name(ca: CertificateAuthority) -> None:
    # SNI names may exceed the 64-character commonName limit; the SAN carries them whole.
    name = ("a" * 60 + ".") * 3 + "example"
    leaf = cert_of(ca.issue(name))
    assert ext(leaf, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == [name]


def test_leaf_never_outlives_ca() -> None:
    short_ca = CertificateAuthority.create(valid_days=2)
    issued = short_ca.issue("x", valid_for=timedelta(days=30))
    assert issued.not_after == short_ca.not_after


def test_issue_rejects_bad_names(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError):
        ca.issue("x", ip_addresses=["300.1.1.1"])
    with pytest.raises(ValueError):
        ca.issue("x", dns_names=["bad name"])


# --- tlscap certs --------------------------------------------------------------------


def test_cli_certs_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert main(["certs", "--dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("ca", "collector", "agent", "consumer"):
        assert mode(out / f"{name}.key") == 0o600
        assert mode(out / f"{name}.crt") == 0o644
    assert f"--tls-cert {out}/collector.crt --tls-key {out}/collector.key" in printed
    assert f"tlscap run --collector localhost:PORT --tls-cert {out}/agent.crt" in printed

    ca = CertificateAuthority.load(out)
    server = x509.load_pem_x509_certificate((out / "collector.crt").read_bytes())
    assert is_issued_by(server, ca.certificate)
    sans = ext(server, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    agent = x509.load_pem_x509_certificate((out / "agent.crt").read_bytes())
    assert list(ext(agent, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def uri_sans(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return ext(cert, x509.SubjectAlternativeName).get_values_for_type(
        x509.UniformResourceIdentifier
    )


def test_cli_certs_client_identities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Defaults: agent.crt for this host's node name, consumer.crt for "consumer".
    out = tmp_path / "default"
    assert main(["certs", "--dir", str(out)]) == 0
    assert uri_sans(out / "agent.crt") == [f"tlscap://agent/{socket.gethostname()}"]
    assert uri_sans(out / "consumer.crt") == ["tlscap://consumer/consumer"]
    assert uri_sans(out / "collector.crt") == []
    # One agent certificate per node, each naming its node; consumers by name.
    out = tmp_path / "nodes"
    args = ["certs", "--dir", str(out), "--agent-node", "n1", "--agent-node", "n2.example"]
    assert main([*args, "--consumer", "alice", "--client", "bob"]) == 0
    printed = capsys.readouterr().out
    assert uri_sans(out / "agent-n1.crt") == ["tlscap://agent/n1"]
    assert uri_sans(out / "agent-n2.example.crt") == ["tlscap://agent/n2.example"]
    assert uri_sans(out / "alice.crt") == ["tlscap://consumer/alice"]
    assert uri_sans(out / "bob.crt") == ["tlscap://consumer/bob"]
    assert not (out / "agent.crt").exists() and not (out / "consumer.crt").exists()
    assert "--node n1 --tls-cert" in printed and "tlscap tail" in printed
    n1 = x509.load_pem_x509_certificate((out / "agent-n1.crt").read_bytes())
    assert ext(n1, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == []
    assert list(ext(n1, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_cli_certs_identity_errors_and_old_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "--dir", str(tmp_path), "--agent-node", "a/b"]) == 2
    assert "--agent-node 'a/b'" in capsys.readouterr().err
    assert (
        main(["certs", "--dir", str(tmp_path), "--agent-node", "x", "--consumer", "agent-x"]) == 2
    )
    assert "must be different" in capsys.readouterr().err
    # A certificate from before identities existed is kept, with a warning.
    ca = CertificateAuthority.load_or_create(tmp_path)
    old = ca.issue("bob", server=False, client=True)
    write_private(tmp_path / "bob.key", old.key_pem)
    write_public(tmp_path / "bob.crt", old.cert_pem)
    assert main(["certs", "--dir", str(tmp_path), "--client", "bob"]) == 0
    assert "lacks the identity tlscap://consumer/bob" in capsys.readouterr().out
    assert main(["certs", "--dir", str(tmp_path), "--client", "bob", "--force"]) == 0
    assert uri_sans(tmp_path / "bob.crt") == ["tlscap://consumer/bob"]


def test_cli_certs_keeps_existing_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["certs", "--dir", str(tmp_path), "--host", "collector.example", "--client", "bob"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {
        "ca.crt",
        "ca.key",
        "collector.crt",
        "collector.key",
        "bob.crt",
        "bob.key",
    }
    capsys.readouterr()

    assert main(args) == 0
    assert "kept" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    assert main([*args, "--force"]) == 0
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after["ca.crt"] == before["ca.crt"]  # --force reissues leaves, never the CA
    assert after["collector.crt"] != before["collector.crt"]
    assert after["bob.key"] != before["bob.key"]


def test_cli_certs_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--dir", str(tmp_path), "--client", "../evil"]) == 2
    assert "tlscap: error: --client" in capsys.readouterr().err
    assert main(["certs", "--dir", str(tmp_path), "--host", "a b"]) == 2
    assert "not a host name" in capsys.readouterr().err

    (tmp_path / "ca.key").write_bytes(b"junk")
    assert main(["certs", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlscap: error: CA certificate not found")
    assert err.count("\n") == 1


def test_cli_certs_half_pair_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "--dir", str(tmp_path), "--client", "bob"]) == 0
    (tmp_path / "bob.crt").unlink()
    assert main(["certs", "--dir", str(tmp_path), "--client", "bob"]) == 2
    assert "bob.key exists but" in capsys.readouterr().err


# --- TLS options ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca.save(d)
    server = ca.issue("collector", dns_names=["localhost"])
    write_public(d / "server.crt", server.cert_pem)
    write_private(d / "server.key", server.key_pem)
    other = ca.issue("other")
    write_private(d / "other.key", other.key_pem)
    (d / "garbage.pem").write_bytes(b"hello\n")
    return d


def parse(argv: list[str], *, server: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tls_options.add_tls_arguments(parser, server=server)
    return parser.parse_args(argv)


def settings(argv: list[str], *, server: bool) -> tls_options.TlsSettings:
    return tls_settings_from_args(parse(argv, server=server), server=server)


def test_tls_settings_insecure() -> None:
    s = settings(["--insecure"], server=True)
    assert s.insecure
    assert tls_options.server_credentials(s) is None
    assert tls_options.channel_credentials(s) is None
    assert tls_options.channel_options(s) == []


def test_tls_settings_server_mtls(pki: Path) -> None:
    s = settings(
        [
            "--tls-cert",
            str(pki / "server.crt"),
            "--tls-key",
            str(pki / "server.key"),
            "--tls-ca",
            str(pki / "ca.crt"),
        ],
        server=True,
    )
    assert not s.insecure and s.mutual
    assert s.cert_chain == (pki / "server.crt").read_bytes()
    assert tls_options.server_credentials(s) is not None


def test_tls_settings_client_name_override(pki: Path) -> None:
    s = settings(["--tls-ca", str(pki / "ca.crt"), "--tls-server-name", "localhost"], server=False)
    assert s.cert_chain is None and s.private_key is None
    assert tls_options.channel_options(s) == [("grpc.ssl_target_name_override", "localhost")]
    assert tls_options.channel_credentials(s) is not None


@pytest.mark.parametrize(
    ("argv", "server", "message"),
    [
        ([], True, "choose --insecure"),
        ([], False, "choose --insecure"),
        (["--insecure", "--tls-ca", "{d}/ca.crt"], False, "cannot be combined with --tls-ca"),
        (["--insecure", "--tls-server-name", "x"], False, "cannot be combined"),
        (["--tls-cert", "{d}/server.crt"], True, "--tls-cert needs --tls-key"),
        (["--tls-key", "{d}/server.key"], False, "--tls-key needs --tls-cert"),
        (["--tls-ca", "{d}/ca.crt"], True, "server needs --tls-cert and --tls-key"),
        (["--tls-ca", "{d}/missing.crt"], False, "--tls-ca file not found: .*missing.crt"),
        (["--tls-ca", "{d}/garbage.pem"], False, "garbage.pem does not hold a PEM certificate"),
        (
            ["--tls-cert", "{d}/server.crt", "--tls-key", "{d}/garbage.pem"],
            True,
            "--tls-key file .*garbage.pem does not hold a PEM private key",
        ),
        (
            ["--tls-cert", "{d}/garbage.pem", "--tls-key", "{d}/server.key"],
            True,
            "--tls-cert file .*garbage.pem does not hold a PEM certificate",
        ),
        (
            ["--tls-cert", "{d}/server.crt", "--tls-key", "{d}/other.key"],
            True,
            "other.key does not match the certificate in .*server.crt",
        ),
    ],
)
def test_tls_settings_errors(pki: Path, argv: list[str], server: bool, message: str) -> None:
    with pytest.raises(TlsConfigError, match=message) as info:
        settings([a.replace("{d}", str(pki)) for a in argv], server=server)
    assert "\n" not in str(info.value)


def test_tls_settings_unreadable_directory(pki: Path) -> None:
    # A directory is unreadable as a file for root too.
    with pytest.raises(TlsConfigError, match=f"cannot read --tls-ca file {pki}"):
        settings(["--tls-ca", str(pki)], server=False)


def test_tls_arguments_into_a_callers_group() -> None:
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("export")
    tls_options.add_tls_arguments(group, server=False)
    args = parser.parse_args(["--insecure"])
    assert tls_settings_from_args(args, server=False).insecure
