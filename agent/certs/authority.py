"""A small certificate authority: one CA key pair on disk, leaf certificates minted from it.

Used by `tlscap certs` for the agent/collector/consumer gRPC links, and meant to be reused
for short-lived per-SNI leaves by a TLS-terminating proxy, so `issue` stays general and
does no caching of its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

# Clocks on agents and collectors drift; a leaf that is "not yet valid" for a few seconds
# after issue is a confusing failure, so every certificate starts a little in the past.
CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_LEAF_VALIDITY = timedelta(days=397)
# X.509 upper bound for a commonName; SNI names can be longer, and the SAN carries them.
_MAX_COMMON_NAME = 64

IPLike = str | ipaddress.IPv4Address | ipaddress.IPv6Address
PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class CertificateError(ValueError):
    """A certificate or key file is missing, unreadable, malformed or does not fit."""


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime


# ---------------------------------------------------------------------------------------
# File helpers


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the temp file with O_EXCL and mode 0600, so a key is never readable
    # by others, not even for a moment; fchmod then sets the exact mode whatever the umask.
    # The rename means readers never see a half-written file.
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a secret (private key) atomically with mode 0600."""
    _write_atomic(Path(path), data, 0o600)


def write_public(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a public file (certificate) atomically with mode 0644."""
    _write_atomic(Path(path), data, 0o644)


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    """Read a whole file, turning OS errors into a one-line CertificateError."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------
# PEM parsing helpers (shared with the gRPC TLS option checks)


def parse_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """All certificates in a PEM blob; CertificateError if there are none."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{source} does not hold a PEM certificate") from None
    if not certs:
        raise CertificateError(f"{source} does not hold a PEM certificate")
    return certs


def parse_private_key(data: bytes, source: str) -> PrivateKey:
    """An unencrypted PEM private key of a type we can sign with."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(f"{source} is encrypted; tlscap needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{source} does not hold a PEM private key") from None
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise CertificateError(f"{source} holds an unsupported key type ({type(key).__name__})")
    return key


def key_matches_certificate(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if `issuer` signed `cert` (name and signature; no policy checks)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# ---------------------------------------------------------------------------------------
# The authority


def _signing_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    # EdDSA signs the message itself; everything else signs a digest.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise ValueError("common name must not be empty")
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlscap"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:_MAX_COMMON_NAME]),
        ]
    )


def _general_names(
    common_name: str,
    dns_names: Iterable[str],
    ip_addresses: Iterable[IPLike],
    uris: Iterable[str] = (),
) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for uri in uris:
        if not uri or any(c.isspace() for c in uri) or "://" not in uri:
            raise ValueError(f"not a URI: {uri!r}")
        names.append(x509.UniformResourceIdentifier(uri))
    for dns in dns_names:
        if not dns or any(c.isspace() for c in dns):
            raise ValueError(f"not a DNS name: {dns!r}")
        names.append(x509.DNSName(dns))
    for ip in ip_addresses:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    if not names:
        # Verifiers ignore the commonName nowadays: a leaf without SANs matches nothing.
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(common_name)))
        except ValueError:
            names.append(x509.DNSName(common_name))
    return names


class CertificateAuthority:
    """A CA certificate with its private key."""

    def __init__(self, certificate: x509.Certificate, private_key: PrivateKey) -> None:
        if not key_matches_certificate(private_key, certificate):
            raise CertificateError("CA key does not match the CA certificate")
        self.certificate = certificate
        self.private_key = private_key

    @classmethod
    def create(cls, common_name: str = "tlscap CA", valid_days: int = 3650) -> CertificateAuthority:
        if valid_days <= 0:
            raise ValueError("valid_days must be positive")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC).replace(microsecond=0)
        name = _name(common_name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=valid_days))
            # pathlen 0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        directory = Path(directory)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        cert = parse_certificates(read_file(cert_path, "CA certificate"), str(cert_path))[0]
        key = parse_private_key(read_file(key_path, "CA key"), str(key_path))
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CertificateError(f"{cert_path} is not a CA certificate")
        if not key_matches_certificate(key, cert):
            raise CertificateError(f"{key_path} does not match the certificate in {cert_path}")
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Load the CA in `directory`, or create and save one if neither file exists."""
        directory = Path(directory)
        have_cert = (directory / CA_CERT_FILE).exists()
        have_key = (directory / CA_KEY_FILE).exists()
        if have_cert or have_key:
            # A lone half is someone's CA gone wrong: refuse rather than overwrite it.
            return cls.load(directory)
        ca = cls.create()
        ca.save(directory)
        return ca

    def save(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Key first: a crash in between leaves a key with no cert, which load() reports,
        # rather than a cert whose key is gone.
        write_private(directory / CA_KEY_FILE, self.key_pem)
        write_public(directory / CA_CERT_FILE, self.cert_pem)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def _subject_key_identifier(self) -> x509.SubjectKeyIdentifier:
        # A CA brought from elsewhere may compute its SKI differently; the AKI of our
        # leaves must repeat whatever it says, or chain building by key id fails.
        try:
            return self.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.private_key.public_key())

    def issue(
        self,
        common_name: str,
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[IPLike] = (),
        uris: Iterable[str] = (),
        server: bool = True,
        client: bool = False,
        valid_for: timedelta = DEFAULT_LEAF_VALIDITY,
    ) -> IssuedCert:
        """Mint a fresh key pair and a leaf certificate for it, signed by this CA.

        With no dns_names/ip_addresses/uris the common name becomes the only SAN. `uris` are URI
        SANs: a client certificate's role identity, `tlscap://agent/<node>` or
        `tlscap://consumer/<name>` (agent/certs/identity.py). The validity
        is clipped to the CA's own, so a leaf never outlives the certificate that vouches
        for it.
        """
        if not (server or client):
            raise ValueError("a certificate must be for server or client use (or both)")
        if valid_for <= timedelta(0):
            raise ValueError("valid_for must be positive")
        sans = _general_names(common_name, dns_names, ip_addresses, uris)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)

        key = ec.generate_private_key(ec.SECP256R1())
        # X.509 times have whole seconds; round here so not_after matches the certificate.
        now = datetime.now(UTC).replace(microsecond=0)
        not_before = max(now - CLOCK_SKEW, self.certificate.not_valid_before_utc)
        not_after = min(now + valid_for, self.certificate.not_valid_after_utc)
        ca_ski = self._subject_key_identifier()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                # ECDSA leaves only sign (ECDHE does the key exchange): no keyEncipherment.
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self.private_key, _signing_hash(self.private_key))
        )
        return IssuedCert(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            not_after=not_after,
        )
