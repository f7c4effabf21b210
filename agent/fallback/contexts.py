"""The TLS contexts the proxy needs, built once and cached.

Client-facing, outbound: a leaf certificate for the name the client asked for (its SNI,
or the original destination's IP when it sent none), signed by the local CA, valid for
an hour and re-issued ten minutes before it runs out (the Speedscale/mitmproxy way).
Client-facing, inbound: the local service's own certificate.  Upstream-facing: the
system trust store plus what the per-destination rules add (a client certificate, an
extra CA, or no verification at all).

Python's `ssl` offers ALPN per context, not per connection, so contexts are cached per
(what, ALPN) too; there are only a handful of ALPN values in practice.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.certs.authority import CertificateAuthority, CertificateError, IssuedCert, write_private
from agent.fallback.config import DestinationPattern, InboundService, UpstreamRule

LEAF_VALIDITY = timedelta(hours=1)
RENEW_BEFORE = timedelta(minutes=10)
MAX_CACHED_LEAVES = 4096

Alpn = tuple[str, ...]


def _private_dir() -> Path:
    # Keys exist on disk only for the instant load_cert_chain() needs a file (the ssl
    # module takes no in-memory keys), in a fresh 0700 directory removed right after;
    # a tmpfs keeps even that instant off the disk.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="tlscap-leaf-", dir=base))


def _load_pem_chain(ctx: ssl.SSLContext, cert_pem_and_key_pem: bytes) -> None:
    scratch = _private_dir()
    try:
        path = scratch / "pair.pem"
        write_private(path, cert_pem_and_key_pem)
        ctx.load_cert_chain(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def server_context(cert_pem_and_key_pem: bytes, alpn: Alpn) -> ssl.SSLContext:
    """A server-side context from PEM bytes (certificate chain followed by the key)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    _load_pem_chain(ctx, cert_pem_and_key_pem)
    return ctx


class LeafCache:
    """Per-name leaf certificates and the server contexts that present them.

    Thread-safe: certificates are minted in a worker thread so the event loop never waits
    on key generation.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        validity: timedelta = LEAF_VALIDITY,
        renew_before: timedelta = RENEW_BEFORE,
        max_entries: int = MAX_CACHED_LEAVES,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if renew_before >= validity:
            raise ValueError("renew_before must be shorter than the validity")
        self.ca = ca
        self.validity = validity
        self.renew_before = renew_before
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._leaves: OrderedDict[str, IssuedCert] = OrderedDict()
        self._contexts: dict[tuple[str, Alpn], tuple[datetime, ssl.SSLContext]] = {}
        self.issued = 0
        self.hits = 0

    def leaf(self, name: str) -> IssuedCert:
        """The cached leaf for `name` (a DNS name or an IP address), minted when needed."""
        with self._lock:
            cached = self._leaves.get(name)
            if cached is not None and self._fresh(cached):
                self._leaves.move_to_end(name)
                self.hits += 1
                return cached
        issued = self._issue(name)
        with self._lock:
            self._leaves[name] = issued
            self._leaves.move_to_end(name)
            self.issued += 1
            while len(self._leaves) > self.max_entries:
                old, _ = self._leaves.popitem(last=False)
                for key in [k for k in self._contexts if k[0] == old]:
                    del self._contexts[key]
        return issued

    def _fresh(self, leaf: IssuedCert) -> bool:
        """Still far enough from expiry to hand out (else it is re-issued)."""
        return leaf.not_after - self._clock() > self.renew_before

    def _issue(self, name: str) -> IssuedCert:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return self.ca.issue(name, dns_names=[name], valid_for=self.validity)
        return self.ca.issue(str(ip), ip_addresses=[ip], valid_for=self.validity)

    def cached_context(self, name: str, alpn: Alpn) -> ssl.SSLContext | None:
        """The context for (name, ALPN) if one is ready and fresh; never mints.

        The proxy's event loop calls this first and goes to a worker thread only on a
        miss, so the common case costs a dict lookup instead of a thread hop.
        """
        with self._lock:
            leaf = self._leaves.get(name)
            cached = self._contexts.get((name, alpn))
            if leaf is None or cached is None or cached[0] != leaf.not_after:
                return None
            if not self._fresh(leaf):
                return None
            self.hits += 1
            return cached[1]

    def context(self, name: str, alpn: Alpn) -> ssl.SSLContext:
        leaf = self.leaf(name)
        with self._lock:
            cached = self._contexts.get((name, alpn))
            if cached is not None and cached[0] == leaf.not_after:
                return cached[1]
        ctx = server_context(leaf.cert_pem + self.ca.cert_pem + leaf.key_pem, alpn)
        with self._lock:
            self._contexts[(name, alpn)] = (leaf.not_after, ctx)
        return ctx


class ServiceContexts:
    """Server contexts for inbound services, from the certificate and key the user gave."""

    def __init__(self, services: tuple[InboundService, ...]) -> None:
        self._pem: dict[int, bytes] = {}
        self._contexts: dict[tuple[int, Alpn], ssl.SSLContext] = {}
        for service in services:
            pem = _read(service.cert, "inbound certificate") + b"\n"
            pem += _read(service.key, "inbound key")
            try:
                server_context(pem, ())  # fail now, not on the first client
            except ssl.SSLError as exc:
                raise CertificateError(
                    f"inbound port {service.port}: {service.cert} and {service.key} "
                    f"are not a usable certificate and key ({exc.reason or exc})"
                ) from None
            self._pem[service.port] = pem

    @classmethod
    def from_pem(cls, pems: dict[int, bytes]) -> ServiceContexts:
        """From certificate-and-key PEM bytes per port (raises CertificateError)."""
        contexts = cls(())
        for port, pem in pems.items():
            try:
                server_context(pem, ())
            except ssl.SSLError as exc:
                raise CertificateError(
                    f"inbound port {port}: not a usable certificate and key ({exc.reason or exc})"
                ) from None
            contexts._pem[port] = pem
        return contexts

    def serves(self, port: int) -> bool:
        return port in self._pem

    def context(self, port: int, alpn: Alpn) -> ssl.SSLContext:
        ctx = self._contexts.get((port, alpn))
        if ctx is None:
            ctx = self._contexts[(port, alpn)] = server_context(self._pem[port], alpn)
        return ctx


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


class UpstreamContexts:
    """Client contexts for connections to the real destinations."""

    def __init__(self, extra_ca: Path | None = None) -> None:
        self.extra_ca = extra_ca
        self._contexts: dict[tuple[UpstreamRule | None, Alpn], ssl.SSLContext] = {}
        self.context(None, ())  # a bad --upstream-ca fails at start

    def context(self, rule: UpstreamRule | None, alpn: Alpn) -> ssl.SSLContext:
        ctx = self._contexts.get((rule, alpn))
        if ctx is None:
            ctx = self._contexts[(rule, alpn)] = self._build(rule, alpn)
        return ctx

    def _build(self, rule: UpstreamRule | None, alpn: Alpn) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        try:
            if self.extra_ca:
                ctx.load_verify_locations(cafile=str(self.extra_ca))
            if rule is not None and rule.ca:
                ctx.load_verify_locations(cafile=str(rule.ca))
            if rule is not None and rule.client_cert:
                ctx.load_cert_chain(str(rule.client_cert), str(rule.client_key))
            elif rule is not None and rule.client_pem:
                _load_pem_chain(ctx, rule.client_pem)
        except (OSError, ssl.SSLError) as exc:
            where = f" for upstream {rule.pattern.text}" if rule else ""
            raise CertificateError(f"cannot load upstream certificates{where}: {exc}") from None
        if rule is not None and rule.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def insecure(self, alpn: Alpn) -> ssl.SSLContext:
        """For inbound: the local service, whose certificate the user handed us already."""
        return self.context(_INSECURE, alpn)


_INSECURE = UpstreamRule(DestinationPattern(text="(local inbound service)"), insecure=True)
