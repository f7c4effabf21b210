"""Attach the probes of the C TLS libraries (bpf/openssl.c, gnutls.c, nss.c) to one file.

Every family has the same call shape - (connection object, buffer, length) in, a byte
count out - so one entry/return pair per data function and one shared return program
(``probe_tls_return``) serve them all; what differs per library is only which
symbols get which entry program, listed here.

uprobes live on the file's inode, so one attach covers every process - in any
container - that maps this file, now or later.  Each pair goes on return probe
first (BpfProgram.attach_uprobe), so that no call is ever opened by an entry
probe without a return probe to close it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agent.probes.openssl_bio import find_ssl_bio_methods

if TYPE_CHECKING:
    from agent.probes.targets import TlsLibrary

log = logging.getLogger(__name__)

TLS_RETURN_PROBE = "probe_tls_return"


@dataclass(frozen=True)
class ProbePoint:
    symbol: str
    entry_fn: str | None  # None: a return probe only
    return_fn: str | None = TLS_RETURN_PROBE
    # Skip this symbol when the file also defines `covered_by`, which it calls: probing
    # both would cost two more probe hits per call for the same bytes.
    covered_by: str | None = None


OPENSSL_PROBES = (
    ProbePoint("SSL_write", "probe_ssl_write_enter"),
    ProbePoint("SSL_write_ex", "probe_ssl_write_ex_enter"),
    ProbePoint("SSL_read", "probe_ssl_read_enter"),
    ProbePoint("SSL_read_ex", "probe_ssl_read_ex_enter"),
)
GNUTLS_PROBES = (
    # gnutls_record_send is `jmp gnutls_record_send2@plt` (GnuTLS >= 3.6.3).
    ProbePoint("gnutls_record_send2", "probe_gnutls_send_enter"),
    ProbePoint("gnutls_record_send", "probe_gnutls_send_enter", covered_by="gnutls_record_send2"),
    ProbePoint("gnutls_record_send_range", "probe_gnutls_send_enter"),
    ProbePoint("gnutls_record_recv", "probe_gnutls_recv_enter"),
    ProbePoint("gnutls_record_recv_seq", "probe_gnutls_recv_enter"),
    ProbePoint("gnutls_transport_set_int2", "probe_gnutls_set_int2", return_fn=None),
)
NSPR_PROBES = (
    ProbePoint("PR_Write", "probe_nss_write_enter"),
    ProbePoint("PR_Send", "probe_nss_write_enter"),
    ProbePoint("PR_Read", "probe_nss_read_enter"),
    ProbePoint("PR_Recv", "probe_nss_read_enter"),
)
# NSS's libssl3: SSL_ImportFD hands back the descriptor with the SSL layer on top, which
# tells nss.c the process's SSL layer identity.
NSS_SSL_PROBES = (ProbePoint("SSL_ImportFD", None, "probe_nss_import_fd_return"),)

PROBES_BY_KIND: dict[str, tuple[ProbePoint, ...]] = {
    "libssl": OPENSSL_PROBES,
    "static": OPENSSL_PROBES,
    "gnutls": GNUTLS_PROBES,
    # One kind for NSPR's and NSS's files: Firefox folds both into one libnss3.so.
    "nss": NSPR_PROBES + NSS_SSL_PROBES,
}
# Every symbol target discovery needs to look up in a file.
PROBED_SYMBOLS = frozenset(p.symbol for points in PROBES_BY_KIND.values() for p in points)


class Attacher(Protocol):
    def attach_uprobe(
        self, path: str, where: str | int, entry_fn: str | None, return_fn: str | None
    ) -> None: ...


def probe_points(kind: str, symbols: frozenset[str] | set[str]) -> list[ProbePoint]:
    """The probes to place in a file of this kind that defines these symbols."""
    return [
        p
        for p in PROBES_BY_KIND.get(kind, ())
        if p.symbol in symbols and not (p.covered_by and p.covered_by in symbols)
    ]


def attach_library(program: Attacher, library: TlsLibrary) -> list[str]:
    """Probe each data function the file defines; return the names attached.

    A function that cannot be attached is logged and skipped: the others still give a
    useful capture (OpenSSL 1.1.0 has no _ex functions, for one).
    """
    path = library.host_path
    targets: list[tuple[str, str | int, ProbePoint]] = [
        (p.symbol, p.symbol, p) for p in probe_points(library.kind, library.symbols)
    ]
    attached = _attach_all(program, path, targets)
    if attached and PROBES_BY_KIND.get(library.kind) is OPENSSL_PROBES:
        # The SSL BIO's methods have the SSL_*_ex shape: the _ex probes serve them.
        methods = find_ssl_bio_methods(path)
        if methods is not None:
            write_ex, read_ex = OPENSSL_PROBES[1], OPENSSL_PROBES[3]
            attached += _attach_all(program, path, [
                ("ssl-bio-write", methods.write_addr, write_ex),
                ("ssl-bio-read", methods.read_addr, read_ex),
            ])  # fmt: skip
    return attached


def _attach_all(
    program: Attacher, path: str, targets: list[tuple[str, str | int, ProbePoint]]
) -> list[str]:
    """Attach each (name, symbol or address, probe); return the names attached."""
    attached = []
    for name, where, point in targets:
        try:
            program.attach_uprobe(path, where, point.entry_fn, point.return_fn)
        except Exception as exc:  # bcc raises bare Exception
            at = f"{where:#x}" if isinstance(where, int) else where
            log.warning("cannot attach %s (%s) in %s: %s", name, at, path, exc)
            continue
        attached.append(name)
    return attached
