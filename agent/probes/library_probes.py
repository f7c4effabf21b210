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

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agent.probes.elf_symbols import find_symbols
from agent.probes.gnutls_worker import RECV_WRAPPERS, find_recv_worker
from agent.probes.nss_methods import find_nss_ssl_methods
from agent.probes.openssl_bio import find_ssl_bio_methods
from agent.probes.prologue import FunctionReader, Placement, entry_placement, force_entry
from agent.probes.prologue import worker_placement as find_worker_placement

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
# GnuTLS's internal _gnutls_recv_int, static, found and proved by
# agent/probes/gnutls_worker.py: probed in place of gnutls_record_recv and
# gnutls_record_recv_seq, which both tail-jump to it with record type 23.
GNUTLS_RECV_WORKER = ProbePoint("_gnutls_recv_int", "probe_gnutls_recv_worker_enter")
NSPR_PROBES = (
    ProbePoint("PR_Write", "probe_nss_write_enter"),
    ProbePoint("PR_Send", "probe_nss_write_enter"),
    ProbePoint("PR_Read", "probe_nss_read_enter"),
    ProbePoint("PR_Recv", "probe_nss_read_enter"),
)
# NSS's libssl3: SSL_ImportFD hands back the descriptor with the SSL layer on top, which
# tells nss.c the process's SSL layer identity.
NSS_SSL_PROBES = (ProbePoint("SSL_ImportFD", None, "probe_nss_import_fd_return"),)
# NSS's own SSL-layer methods, static in libssl3 and found by address
# (agent/probes/nss_methods.py). They are called with PR_Write's/PR_Read's arguments,
# only on descriptors that have the SSL layer, so they replace the NSPR probes above:
# plain descriptors then hit no probe at all, and each begins with an emulated push.
NSS_METHOD_PROBES = (
    ProbePoint("ssl_Write", "probe_nss_ssl_write_enter"),
    ProbePoint("ssl_Send", "probe_nss_ssl_write_enter"),
    ProbePoint("ssl_Read", "probe_nss_ssl_read_enter"),
    ProbePoint("ssl_Recv", "probe_nss_ssl_read_enter"),
)
# The file next to libnspr4.so whose SSL methods serve for the NSPR probes.
NSS_SSL_LIBRARY = "libssl3.so"
NSPR_LIBRARY = "libnspr4.so"

PROBES_BY_KIND: dict[str, tuple[ProbePoint, ...]] = {
    "libssl": OPENSSL_PROBES,
    "static": OPENSSL_PROBES,
    "gnutls": GNUTLS_PROBES,
    # One kind for NSPR's and NSS's files: Firefox folds both into one libnss3.so.
    "nss": NSPR_PROBES + NSS_SSL_PROBES,
}
# Every symbol target discovery needs to look up in a file.
PROBED_SYMBOLS = frozenset(p.symbol for points in PROBES_BY_KIND.values() for p in points)


# The registers each entry program reads (tls_call_enter: PARM1, PARM2, PARM4 for the
# _ex shape, and the stack pointer; nss_enter: PARM1 first).
_ENTRY_READS = {
    "probe_gnutls_set_int2": (frozenset({"rdi", "rsi"}), False),
    # the worker's (session, type, data): PARM1-3 and the stack pointer.
    "probe_gnutls_recv_worker_enter": (frozenset({"rdi", "rsi", "rdx"}), True),
    # tls_call_enter without the _ex count pointer: PARM1, PARM2 and the stack pointer.
    "probe_nss_ssl_write_enter": (frozenset({"rdi", "rsi"}), True),
    "probe_nss_ssl_read_enter": (frozenset({"rdi", "rsi"}), True),
}
_DEFAULT_READS = (frozenset({"rdi", "rsi", "rdx", "rcx"}), True)
# OpenSSL's wrapper pairs around one internal worker each: (_ex, plain, probe of _ex).
_OPENSSL_WORKER_PAIRS = (
    ("SSL_write_ex", "SSL_write", OPENSSL_PROBES[1]),
    ("SSL_read_ex", "SSL_read", OPENSSL_PROBES[3]),
)


class Attacher(Protocol):
    def attach_uprobe(
        self, path: str, where: str | int, entry_fn: str | None, return_fn: str | None
    ) -> None: ...


@dataclass(frozen=True)
class PlannedProbe:
    name: str  # what attach_library reports: a symbol, or "SSL_write+SSL_write_ex"
    where: str | int  # symbol or ELF virtual address
    point: ProbePoint
    placement: Placement | None  # None: not analysed (unreadable code)

    @property
    def single_stepped_uretprobe(self) -> bool:
        """Completed by a uretprobe on a single-stepped first instruction: the
        fallback the placement work exists to avoid."""
        p = self.placement
        return self.point.return_fn is not None and (p is None or p.kind == "entry")

    @property
    def attached(self) -> bool:
        """False for a function left unprobed because other probes see its calls."""
        return self.placement is None or self.placement.kind != "covered"


def plan_library(library: TlsLibrary) -> list[PlannedProbe]:
    """Where each probe of this file goes (see agent/probes/prologue.py), unless
    TLSCAP_PROBE_PLACEMENT=entry asks for every function's first instruction."""
    points = probe_points(library.kind, library.symbols)
    if force_entry():
        planned = [
            PlannedProbe(p.symbol, p.symbol, p, Placement(p.symbol, 0, 0, "entry",
                         "forced: TLSCAP_PROBE_PLACEMENT=entry", p.return_fn is not None))
            for p in points
        ]  # fmt: skip
        _log_plan(library, planned)
        return planned
    reader = FunctionReader(library.host_path)
    planned: list[PlannedProbe] = []
    served: set[str] = set()
    unproved: dict[str, str] = {}  # symbol -> why its worker is not probed instead
    if PROBES_BY_KIND.get(library.kind) is OPENSSL_PROBES:
        for ex, plain, point in _OPENSSL_WORKER_PAIRS:
            if not {ex, plain} <= set(library.symbols):
                continue
            try:
                ex_code, plain_code = reader.function(ex), reader.function(plain)
                placement, why = (None, "code not readable")
                if ex_code and plain_code:
                    placement, why = find_worker_placement(
                        ex_code, plain_code, reader.read, reader.import_name
                    )
            except Exception as exc:  # a malformed file: keep the entry placement
                placement, why = None, f"analysis failed: {exc}"
            if placement is None:
                log.debug("%s: %s/%s stay at their entries: %s", library.host_path, plain,
                          ex, why)  # fmt: skip
                unproved.update(dict.fromkeys((ex, plain), why))
                continue
            planned.append(PlannedProbe(placement.symbol, placement.address, point, placement))
            served |= {ex, plain}
    if library.kind == "gnutls":
        worker, why = _plan_gnutls_recv_worker(library, reader)
        if worker is not None:
            planned.append(worker)
            served |= set(RECV_WRAPPERS)
        else:
            unproved.update(dict.fromkeys(RECV_WRAPPERS, why))
    if library.kind == "nss":
        planned += _plan_nss_methods(reader, library)
        served |= _nspr_covered(library, planned)
    for p in points:
        if p.symbol in served:
            continue
        probe = _plan_function(reader, p)
        if p.symbol in unproved and probe.placement is not None:
            note = f"{probe.placement.reason}; worker not used: {unproved[p.symbol]}"
            probe = dataclasses.replace(
                probe, placement=dataclasses.replace(probe.placement, reason=note)
            )
        planned.append(probe)
    _log_plan(library, planned)
    return planned


def _plan_gnutls_recv_worker(
    library: TlsLibrary, reader: FunctionReader
) -> tuple[PlannedProbe | None, str]:
    """The probe on _gnutls_recv_int in place of gnutls_record_recv(_seq), when
    agent/probes/gnutls_worker.py proves it for this file; else (None, why not)."""
    if "gnutls_record_recv" not in library.symbols:
        return None, "no gnutls_record_recv"
    worker, why = find_recv_worker(library.host_path, library.symbols, reader.import_name)
    if worker is None:
        log.info("%s: gnutls_record_recv(_seq) stay at their entries: %s", library.host_path,
                 why)  # fmt: skip
        return None, why
    placement = worker.placement()
    return PlannedProbe(placement.symbol, worker.address, GNUTLS_RECV_WORKER, placement), ""


def _plan_nss_methods(reader: FunctionReader, library: TlsLibrary) -> list[PlannedProbe]:
    """Probes on the SSL layer's ssl_Write/ssl_Send/ssl_Read/ssl_Recv of a libssl3
    (agent/probes/nss_methods.py), each where entry_placement puts a probe completed
    by a uretprobe; [] when the methods are not proved (the NSPR probes stay)."""
    if "SSL_ImportFD" not in library.symbols:
        return []
    methods, why = find_nss_ssl_methods(library.host_path)
    if methods is None:
        log.info("%s: NSS's SSL methods not found (%s): PR_Write/PR_Read stay probed",
                 library.host_path, why)  # fmt: skip
        return []
    planned = []
    for point in NSS_METHOD_PROBES:
        address = methods.functions[point.symbol]
        reads, reads_sp = _ENTRY_READS[point.entry_fn or ""]
        try:
            placement = entry_placement(point.symbol, reader.read(address, 16), address,
                                        reads, reads_sp=reads_sp, uretprobe=True)  # fmt: skip
        except Exception as exc:  # capstone on odd bytes: still the function's entry
            placement = Placement(point.symbol, address, address, "entry",
                                  f"not analysed: {exc}")  # fmt: skip
        placement = dataclasses.replace(
            placement, reason=f"{methods.reason(point.symbol)}; {placement.reason}"
        )
        planned.append(PlannedProbe(point.symbol, address, point, placement))
    return planned


def _nspr_covered(library: TlsLibrary, planned: list[PlannedProbe]) -> set[str]:
    """The NSPR functions of this file left unprobed, with a "covered" placement
    appended to ``planned``: all of them when the SSL methods of this file (NSPR and
    NSS folded into one) or of the libssl3.so beside it are probed."""
    nspr = [p for p in NSPR_PROBES if p.symbol in library.symbols]
    if not nspr:
        return set()
    if any(p.point in NSS_METHOD_PROBES for p in planned):
        by = "this file's SSL-layer methods"
    else:
        sibling = nspr_covering_library(library)
        if sibling is None:
            return set()
        by = f"the SSL-layer methods of {sibling}"
    for p in nspr:
        planned.append(PlannedProbe(p.symbol, p.symbol, p, Placement(
            p.symbol, 0, 0, "covered",
            f"not probed: TLS calls reach {by} (plain descriptors then trap nothing)",
            False)))  # fmt: skip
    return {p.symbol for p in nspr}


def nspr_covering_library(library: TlsLibrary) -> str | None:
    """The libssl3.so beside this libnspr4 whose SSL-layer methods are probed in
    place of its PR_Read/PR_Write & co. (None: they are probed themselves)."""
    sibling = os.path.join(os.path.dirname(library.host_path), NSS_SSL_LIBRARY)
    if os.path.realpath(sibling) == os.path.realpath(library.host_path):
        return None
    methods, why = find_nss_ssl_methods(sibling)
    if methods is None:
        log.debug("%s: NSPR probes stay: %s: %s", library.host_path, sibling, why)
        return None
    return sibling


def _log_plan(library: TlsLibrary, planned: list[PlannedProbe]) -> None:
    for probe in planned:
        p = probe.placement
        log.debug("%s: %s at %s (%s): %s", library.host_path, probe.name,
                  f"{probe.where:#x}" if isinstance(probe.where, int) else probe.where,
                  p.kind if p else "entry", p.reason if p else "not analysed")  # fmt: skip


def _plan_function(reader: FunctionReader, p: ProbePoint) -> PlannedProbe:
    try:
        fn = reader.function(p.symbol)
    except Exception as exc:
        log.debug("%s: %s not analysed: %s", reader.path, p.symbol, exc)
        fn = None
    if fn is None:
        return PlannedProbe(p.symbol, p.symbol, p, None)
    reads, reads_sp = _ENTRY_READS.get(p.entry_fn or "", _DEFAULT_READS)
    try:
        placement = entry_placement(p.symbol, fn.code, fn.address, reads, reads_sp=reads_sp,
                                    uretprobe=p.return_fn is not None)  # fmt: skip
    except Exception as exc:  # capstone on odd bytes: keep the entry
        log.debug("%s: %s not analysed: %s", reader.path, p.symbol, exc)
        return PlannedProbe(p.symbol, p.symbol, p, None)
    where: str | int = placement.address if placement.kind == "moved-entry" else p.symbol
    return PlannedProbe(p.symbol, where, p, placement)


def probe_points(kind: str, symbols: frozenset[str] | set[str]) -> list[ProbePoint]:
    """The probes to place in a file of this kind that defines these symbols."""
    return [
        p
        for p in PROBES_BY_KIND.get(kind, ())
        if p.symbol in symbols and not (p.covered_by and p.covered_by in symbols)
    ]


def attach_library(
    program: Attacher, library: TlsLibrary, plan: list[PlannedProbe] | None = None
) -> list[str]:
    """Probe each data function the file defines; return the names attached.

    A function that cannot be attached is logged and skipped: the others still give a
    useful capture (OpenSSL 1.1.0 has no _ex functions, for one).  Each probe goes
    where plan_library places it; a program with ``note_placement`` hears of each.
    """
    path = library.host_path
    if plan is None:
        plan = plan_library(library)
    targets = [(probe.name, probe.where, probe.point) for probe in plan if probe.attached]
    attached = _attach_all(program, path, targets)
    note = getattr(program, "note_placement", None)
    if note is not None:
        for probe in plan:
            if probe.name in attached:
                note(probe.single_stepped_uretprobe)
    fallback = _nspr_fallback(program, library, plan, attached)
    attached += fallback
    # A file whose functions other probes serve (libnspr4 beside a proved libssl3) is
    # handled, not failed: its names say so.
    attached += [
        f"{probe.name}: covered"
        for probe in plan
        if not probe.attached and probe.name not in fallback
    ]
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


def _nspr_fallback(
    program: Attacher, library: TlsLibrary, plan: list[PlannedProbe], attached: list[str]
) -> list[str]:
    """NSPR's PR_Write/PR_Send/PR_Read/PR_Recv, probed after all when an SSL-layer
    method of this file did not attach: the plan left them unprobed ("covered") in this
    file (NSPR and NSS folded into one) or in the libnspr4.so beside this libssl3
    (nspr_covering_library), and without them the descriptors the method served would
    not be captured at all.  The methods that did attach stay (nothing here detaches):
    a call on them then hits PR_Write and the method it tail-jumps to, on the same frame,
    so tls_call_open takes the second entry for the call (counting the first as stale)
    and it is reported once.  Returns the names attached."""
    failed = [p.name for p in plan if p.point in NSS_METHOD_PROBES and p.name not in attached]
    if not failed:
        return []
    covered = [p for p in plan if p.point in NSPR_PROBES and not p.attached]
    if covered:
        where, targets = library.host_path, [(p.name, p.point.symbol, p.point) for p in covered]
    else:
        where = os.path.join(os.path.dirname(library.host_path), NSPR_LIBRARY)
        try:
            present = find_symbols(where, [p.symbol for p in NSPR_PROBES])
        except Exception as exc:  # no libnspr4 beside it: its NSPR probes were not skipped
            log.debug("%s: no NSPR fallback at %s: %s", library.host_path, where, exc)
            return []
        if os.path.realpath(where) == os.path.realpath(library.host_path) or not present:
            return []
        targets = [(f"{p.symbol} ({where})", p.symbol, p) for p in NSPR_PROBES
                   if p.symbol in present]  # fmt: skip
    log.warning("%s: %s not attached: probing NSPR's %s in %s instead", library.host_path,
                ", ".join(failed), ", ".join(p.symbol for _, _, p in targets), where)  # fmt: skip
    names = _attach_all(program, where, targets)
    note = getattr(program, "note_placement", None)
    if note is not None:
        for _ in names:
            note(True)  # entry + uretprobe on NSPR's first instruction: single-stepped
    return names


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
