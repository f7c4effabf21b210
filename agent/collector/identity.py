"""Who is calling the collector: the role identity in a verified client certificate.

With mutual TLS (`--tls-ca`) grpc verifies the client's chain before any call runs and
puts the certificate in the call's auth context; here its URI SAN
`tlscap://agent/<node>` or `tlscap://consumer/<name>` (agent/certs/identity.py) becomes
a `Caller`. The collector's server credentials request a client certificate only when
they also verify it (agent/cli/tls_options.py: require_client_auth whenever a CA is
given), so a certificate in the auth context is always a verified one.

Without a client certificate (plaintext, or TLS without `--tls-ca`) the caller is
anonymous. A certificate that carries no tlscap identity is *not* anonymous: it is
refused (`Caller.error`), whatever it asks for.

With `--token-review` an agent's identity may come from its ServiceAccount token
instead (agent/collector/tokens.py); the service then makes a Caller with
`via_token` set and the token's expiry.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.certs.identity import Identity, IdentityError, identity_from_uris

log = logging.getLogger(__name__)

PEM_CERT_KEY = "x509_pem_cert"
SAN_KEY = "x509_subject_alternative_name"


@dataclass(frozen=True)
class Caller:
    """One call's peer: an identity, anonymous (no certificate), or refused (`error`)."""

    identity: Identity | None
    certificate: bool  # a client certificate was presented (and verified)
    subject: str = ""  # the certificate's subject, for logs
    fingerprint: str = ""  # SHA-256 of the certificate (DER), to log a bad one once
    error: str = ""  # why a presented certificate gives no identity
    via_token: bool = False  # the identity comes from a reviewed ServiceAccount token
    expires_at: float | None = None  # wall clock: the token's expiry, when via_token

    @property
    def anonymous(self) -> bool:
        return not self.certificate and not self.via_token

    def describe(self) -> str:
        if self.identity is not None:
            return (
                f"{self.identity} (ServiceAccount token)" if self.via_token else str(self.identity)
            )
        if self.certificate:
            return f"certificate {self.subject!r} (no tlscap identity)"
        return "anonymous"


ANONYMOUS = Caller(identity=None, certificate=False)


@functools.lru_cache(maxsize=1024)
def caller_from_pem(pem: bytes) -> Caller:
    """The Caller a (verified) PEM client certificate stands for."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return Caller(None, True, error="unreadable client certificate")
    subject = cert.subject.rfc4514_string()
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    try:
        identity = identity_from_uris(uris)
    except IdentityError as exc:
        return Caller(None, True, subject, fingerprint, error=str(exc))
    return Caller(identity, True, subject, fingerprint)


def caller_from_auth_context(auth: Mapping[str, Sequence[bytes]]) -> Caller:
    """The Caller for `grpc.ServicerContext.auth_context()`."""
    pems = auth.get(PEM_CERT_KEY) or []
    if not pems:
        return ANONYMOUS
    return caller_from_pem(bytes(pems[0]))


class RefusalCounters:
    """Refused calls by reason; thread-safe. Exposed in the collector's stats()."""

    KEYS = (
        "refused_no_identity",  # a client certificate without a tlscap identity
        "refused_role",  # an agent subscribing, a consumer ingesting
        "refused_foreign_node",  # an agent sending a record of another node
        "refused_anonymous",  # Subscribe without a client certificate
        "refused_policy",  # a consumer outside the policy, or asking beyond it
        # --token-review:
        "refused_token",  # no agent token where one is needed, or one the API rejects
        "refused_token_identity",  # a valid token that names no agent of a node
        "token_review_unavailable",  # the API server could not review a token
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.KEYS, 0)
        self._logged: set[str] = set()

    def count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def first_time(self, token: str) -> bool:
        """True the first time `token` is seen (to log something once), then False."""
        with self._lock:
            if token in self._logged or len(self._logged) >= 10_000:
                return False
            self._logged.add(token)
            return True

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
