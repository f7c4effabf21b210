"""Attach the OpenSSL-family probes (bpf/openssl.c) to one library file.

uprobes live on the file's inode, so one attach covers every process - in any
container - that maps this file, now or later.
"""

from __future__ import annotations

import logging
from typing import Protocol

from agent.probes.openssl_bio import find_ssl_bio_methods

log = logging.getLogger(__name__)

# symbol -> entry program; every one shares the return program.
OPENSSL_ENTRY_PROBES = {
    "SSL_write": "probe_ssl_write_enter",
    "SSL_write_ex": "probe_ssl_write_ex_enter",
    "SSL_read": "probe_ssl_read_enter",
    "SSL_read_ex": "probe_ssl_read_ex_enter",
}
OPENSSL_RETURN_PROBE = "probe_ssl_return"


class Attacher(Protocol):
    def attach_uprobe(
        self, path: str, where: str | int, entry_fn: str, return_fn: str | None
    ) -> None: ...


def attach_openssl(program: Attacher, path: str, symbols: frozenset[str] | set[str]) -> list[str]:
    """Probe each OpenSSL data function the file defines; return those attached.

    A function that cannot be attached is logged and skipped: the others still
    give a useful capture (OpenSSL 1.1.0 has no _ex functions, for one).
    """
    targets: list[tuple[str, str | int, str]] = [
        (symbol, symbol, entry_fn)
        for symbol, entry_fn in OPENSSL_ENTRY_PROBES.items()
        if symbol in symbols
    ]
    attached = _attach_all(program, path, targets)
    if attached:
        # The SSL BIO's methods have the SSL_*_ex shape: the _ex probes serve them.
        methods = find_ssl_bio_methods(path)
        if methods is not None:
            attached += _attach_all(program, path, [
                ("ssl-bio-write", methods.write_addr, OPENSSL_ENTRY_PROBES["SSL_write_ex"]),
                ("ssl-bio-read", methods.read_addr, OPENSSL_ENTRY_PROBES["SSL_read_ex"]),
            ])  # fmt: skip
    return attached


def _attach_all(
    program: Attacher, path: str, targets: list[tuple[str, str | int, str]]
) -> list[str]:
    """Attach each (name, symbol or address, entry program); return the names attached."""
    attached = []
    for name, where, entry_fn in targets:
        try:
            program.attach_uprobe(path, where, entry_fn, OPENSSL_RETURN_PROBE)
        except Exception as exc:  # bcc raises bare Exception
            at = f"{where:#x}" if isinstance(where, int) else where
            log.warning("cannot attach %s (%s) in %s: %s", name, at, path, exc)
            continue
        attached.append(name)
    return attached
