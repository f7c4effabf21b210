"""NSS's SSL-layer methods that fail to attach hand their descriptors back to NSPR's
probes (agent/probes/library_probes.py, _nspr_fallback): the plan leaves PR_Write & co.
unprobed ("covered") when the methods are proved, so without the fallback a refused
method attach would capture nothing of NSS at all."""

from __future__ import annotations

import pytest

from tests.unit.test_nss_methods import LIBNSPR4, LIBSSL3, needs_nss

NSPR = ("PR_Write", "PR_Send", "PR_Read", "PR_Recv")


class RefusingAttacher:
    """Records each attach; raises (as bcc does) for the addresses in `refuse`."""

    def __init__(self, refuse: set[int] | None = None, refuse_all_addresses: bool = False):
        self.refuse = refuse or set()
        self.refuse_all_addresses = refuse_all_addresses
        self.attached: list[tuple[str, str | int, str | None, str | None]] = []
        self.placements: list[bool] = []

    def attach_uprobe(self, path, where, entry_fn, return_fn) -> None:
        if isinstance(where, int) and (self.refuse_all_addresses or where in self.refuse):
            raise Exception(f"Failed to attach BPF to uprobe at {where:#x}")
        self.attached.append((path, where, entry_fn, return_fn))

    def note_placement(self, single_stepped_uretprobe: bool) -> None:
        self.placements.append(single_stepped_uretprobe)


def _library(path: str, extra: frozenset[str] = frozenset()):
    from agent.probes.elf_symbols import find_symbols
    from agent.probes.library_probes import PROBED_SYMBOLS
    from agent.probes.targets import TlsLibrary

    symbols = frozenset(find_symbols(path, PROBED_SYMBOLS)) | extra
    return TlsLibrary(path, path, 0, 0, "nss", symbols)


@pytest.fixture(autouse=True)
def _placed(monkeypatch):
    monkeypatch.delenv("TLSCAP_PROBE_PLACEMENT", raising=False)


@needs_nss
def test_methods_attached_leave_nspr_unprobed():
    from agent.probes.library_probes import attach_library

    program = RefusingAttacher()
    names = attach_library(program, _library(LIBSSL3))
    assert set(names) == {"ssl_Read", "ssl_Write", "ssl_Recv", "ssl_Send", "SSL_ImportFD"}
    assert not any(path == LIBNSPR4 for path, *_ in program.attached)
    assert program.placements.count(False) == 4  # the methods' emulated entries


@needs_nss
def test_a_refused_method_probes_nspr_beside_libssl3():
    from agent.probes.library_probes import attach_library, plan_library

    plan = {p.name: p for p in plan_library(_library(LIBSSL3))}
    program = RefusingAttacher(refuse={plan["ssl_Write"].where})
    names = attach_library(program, _library(LIBSSL3))
    assert "ssl_Write" not in names and {"ssl_Read", "ssl_Send", "ssl_Recv"} <= set(names)
    assert {f"{s} ({LIBNSPR4})" for s in NSPR} <= set(names)
    nspr = {where: (entry, ret) for path, where, entry, ret in program.attached
            if path == LIBNSPR4}  # fmt: skip
    assert nspr == {
        "PR_Write": ("probe_nss_write_enter", "probe_tls_return"),
        "PR_Send": ("probe_nss_write_enter", "probe_tls_return"),
        "PR_Read": ("probe_nss_read_enter", "probe_tls_return"),
        "PR_Recv": ("probe_nss_read_enter", "probe_tls_return"),
    }
    # The NSPR probes sit on single-stepped first instructions: counted as such, next
    # to SSL_ImportFD's and the three methods' emulated ones.
    assert sorted(program.placements) == [False] * 3 + [True] * 5


@needs_nss
def test_every_method_refused_still_captures_through_nspr():
    from agent.probes.library_probes import attach_library

    program = RefusingAttacher(refuse_all_addresses=True)
    names = attach_library(program, _library(LIBSSL3))
    assert "SSL_ImportFD" in names  # the layer identity nss.c's NSPR probes need
    assert {w for p, w, *_ in program.attached if p == LIBNSPR4} == set(NSPR)


@needs_nss
def test_a_folded_file_probes_its_own_nspr_functions():
    """NSPR and NSS in one file (Firefox's libnss3.so): the fallback probes that file's
    PR_Write & co., which its plan had left covered."""
    from agent.probes.library_probes import attach_library, plan_library

    folded = _library(LIBSSL3, frozenset(NSPR))
    plan = {p.name: p for p in plan_library(folded)}
    assert all(plan[s].placement.kind == "covered" and not plan[s].attached for s in NSPR)
    program = RefusingAttacher(refuse={plan["ssl_Read"].where})
    names = attach_library(program, folded)
    assert set(NSPR) <= set(names) and not any(n.endswith(": covered") for n in names)
    assert {w for p, w, *_ in program.attached if p == LIBSSL3 and w in NSPR} == set(NSPR)
    assert not any(p == LIBNSPR4 for p, *_ in program.attached)


@needs_nss
def test_libnspr4_alone_is_not_touched():
    from agent.probes.library_probes import attach_library

    program = RefusingAttacher(refuse_all_addresses=True)
    names = attach_library(program, _library(LIBNSPR4))
    assert names == [f"{s}: covered" for s in NSPR]
    assert program.attached == []
