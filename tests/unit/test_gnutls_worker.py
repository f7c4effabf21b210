"""GnuTLS's receive probes moved to _gnutls_recv_int (agent/probes/gnutls_worker.py):
proved from the real code of Debian 12's libgnutls, refused wherever a proof obligation
fails (then gnutls_record_recv/_seq keep their entry probes, counted as fallbacks)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.probes import gnutls_worker as gw
from agent.probes.prologue import WrapperCode, decode
from tests.unit import test_prologue_bytes as B

WORKER, KTLS = 0x3E8B0, 0x96DC0
LIBGNUTLS = Path("/usr/lib/x86_64-linux-gnu/libgnutls.so.30.34.3")


def wrapper(name: str, patch: tuple[str, str] | None = None) -> WrapperCode:
    address, hexcode = B.GNUTLS_RECV[name]
    if patch:
        assert hexcode.count(patch[0]) == 1
        hexcode = hexcode.replace(*patch)
    return WrapperCode(name, address, bytes.fromhex(hexcode))


def reader(callees: dict[int, str] | None = None):
    table = {**B.GNUTLS_RECV_CALLEES, **(callees or {})}

    def read(address: int, size: int) -> bytes:
        for start, hexcode in table.items():
            raw = bytes.fromhex(hexcode)
            if start <= address < start + len(raw):
                return raw[address - start : address - start + size]
        return b""

    return read


def no_other_callers(worker: int):
    return [gw.WorkerCallSite(0x3EB66, 21)], ""


def prove(wrappers=None, read=None, other_callers=no_other_callers):
    if wrappers is None:
        wrappers = [wrapper("gnutls_record_recv"), wrapper("gnutls_record_recv_seq")]
    return gw.prove_recv_worker(wrappers, read or reader(), B.GNUTLS_IMPORTS.get, other_callers)


def test_debian12_recv_wrappers_are_probed_at_their_worker():
    worker, why = prove()
    assert why == ""
    assert worker is not None
    assert (worker.address, worker.first, worker.no_data) == (WORKER, "push r15", (KTLS,))
    p = worker.placement()
    assert (p.symbol, p.kind, p.address, p.function, p.uretprobe) == (
        "gnutls_record_recv+gnutls_record_recv_seq", "worker", WORKER, WORKER, True,
    )  # fmt: skip
    assert "(session, type 23, data)" in p.reason
    assert "push r15 is emulated" in p.reason
    assert "0x96dc0 only returns a constant ≤ 0" in p.reason
    assert "record types 21" in p.reason


def test_gnutls_record_recv_alone_tail_jumps_to_the_worker():
    proof, why = gw.prove_wrapper(
        wrapper("gnutls_record_recv"), B.GNUTLS_IMPORTS.get,
        lambda a: gw.proves_no_data(a, reader(), B.GNUTLS_IMPORTS.get),
    )  # fmt: skip
    assert why == ""
    assert proof is not None and (proof.worker, proof.no_data) == (WORKER, frozenset({KTLS}))


def test_the_ktls_stub_moves_no_data_and_the_worker_does():
    assert gw.proves_no_data(KTLS, reader(), B.GNUTLS_IMPORTS.get) == ""
    assert "calls 0x3e500" in gw.proves_no_data(
        WORKER, reader({WORKER: "41574189f7e846fcffffc3"}), B.GNUTLS_IMPORTS.get
    )


def test_a_build_with_ktls_compiled_in_keeps_the_entries():
    # The kTLS receive copying into the caller's buffer: mov [rdx], al; mov eax, 1; ret.
    worker, why = prove(read=reader({KTLS: "8802b801000000c3"}))
    assert worker is None
    assert "2 different workers reached" in why


@pytest.mark.parametrize(
    ("name", "patch", "why"),
    [
        # mov rdx, rsi -> mov rdx, rcx: another buffer than the caller's
        ("gnutls_record_recv_seq", ("4889f2", "4889ca"), "with other arguments"),
        # mov esi, 0x17 -> mov esi, 0x16: a handshake record
        ("gnutls_record_recv_seq", ("be17000000", "be16000000"), "with other arguments"),
        # the error path's mov rax, -408 -> mov rax, 408: a positive count without data
        ("gnutls_record_recv", ("48c7c068feffff", "48c7c098010000"), "returns 0x198"),
        # the kTLS call's cltq -> inc eax: maybe a positive count without data
        ("gnutls_record_recv", ("e85a7305004898", "e85a730500ffc0"), "returns an unknown"),
    ],
)
def test_a_wrapper_that_is_not_the_proved_shape_keeps_the_entries(name, patch, why):
    wrappers = [wrapper(n, patch if n == name else None) for n in gw.RECV_WRAPPERS]
    worker, got = prove(wrappers)
    assert worker is None
    assert why in got and name in got


def test_a_worker_beginning_with_a_single_stepped_instruction_keeps_the_entries():
    worker, why = prove(read=reader({WORKER: "4883ec18" + "90" * 12}))
    assert worker is None and "single-stepped" in why


def test_another_caller_for_application_data_keeps_the_entries():
    worker, why = prove(other_callers=lambda w: (None, "0x4cb89 also calls the worker"))
    assert worker is None and why == "0x4cb89 also calls the worker"


def _bye():
    address, hexcode = B.GNUTLS_RECV["gnutls_bye"]
    insns = decode(bytes.fromhex(hexcode), address)
    targets = frozenset(i.target for i in insns if i.group == "jump" and i.target)
    index = next(k for k, i in enumerate(insns) if i.address == 0x3EB66)
    return insns, index, targets


def test_gnutls_bye_reads_alerts_through_the_worker():
    insns, index, targets = _bye()
    assert insns[index].target == WORKER
    assert gw.record_type_at(insns, index, targets) == 21


def test_record_type_unknown_when_a_branch_lands_after_the_esi_write():
    insns, index, targets = _bye()
    # 0x3eb63 (mov rdi, rbx) between mov esi, 0x15 and the call
    assert gw.record_type_at(insns, index, targets | {0x3EB63}) is None


@pytest.mark.skipif(not LIBGNUTLS.exists(), reason="Debian 12's libgnutls30 not installed")
def test_the_installed_library_whole_file():
    worker, why = gw.find_recv_worker(str(LIBGNUTLS), gw.RECV_WRAPPERS)
    assert why == "" and worker is not None
    assert worker.address == WORKER and worker.no_data == (KTLS,)
    # gnutls_bye (alert), the handshake (change cipher spec), heartbeat
    assert {(s.address, s.record_type) for s in worker.others} == {
        (0x3EB66, 21), (0x4CB89, 20), (0x11DB2C, 24),
    }  # fmt: skip


@pytest.mark.skipif(not LIBGNUTLS.exists(), reason="Debian 12's libgnutls30 not installed")
def test_unwind_table_functions_of_the_installed_library():
    from agent.probes.code_index import CodeIndex, FunctionRange

    code = CodeIndex(str(LIBGNUTLS))
    assert code.function_at(0x3FA86) == FunctionRange(0x3FA40, 0x3FADE)  # gnutls_record_recv
    assert code.function_at(0x3E8B0) == FunctionRange(0x3E8B0, 0x3EA6D)  # no symbol
    refs = code.references(WORKER)
    assert refs.why_not == ""
    assert set(refs.sites) == {0x3EB66, 0x3FA86, 0x3FAF5, 0x4CB89, 0x11DB2C}


# A library with GnuTLS's shape, built here: the worker is static (hidden, no IPA), the
# wrappers tail-jump to it with type 23, gnutls_bye calls it with type 21, and the kTLS
# branch calls KTLS_RECV.
SYNTHETIC = r"""
#include <stddef.h>
#include <string.h>
#include <sys/types.h>
#define PRIVATE __attribute__((visibility("hidden"), noipa))
struct session { int ktls; unsigned timeout; size_t have; };
extern ssize_t transport_read(void *s, void *buf, size_t n);
extern void _gnutls_log(int level, const char *fmt, ...);
extern int _gnutls_log_level;
PRIVATE ssize_t recv_int(struct session *s, int type, void *data, size_t n,
                         unsigned char *seq, unsigned ms) {
    ssize_t r = transport_read(s, data, n);
    if (r > 0 && seq) memset(seq, 0, 8);
    s->have += r + ms + type;
    return r;
}
PRIVATE int ktls_recv(struct session *s, int type, void *data, size_t n) {
#ifdef KTLS
    return (int)transport_read(s, data, n);
#else
    if (_gnutls_log_level > 2) _gnutls_log(3, "unimplemented\n");
    return -1250;
#endif
}
ssize_t gnutls_record_recv(struct session *s, void *data, size_t n) {
    if (s->ktls) return ktls_recv(s, 23, data, n);
    return recv_int(s, 23, data, n, NULL, s->timeout);
}
ssize_t gnutls_record_recv_seq(struct session *s, void *data, size_t n, unsigned char *seq) {
    return recv_int(s, 23, data, n, seq, s->timeout);
}
int gnutls_bye(struct session *s) { return (int)recv_int(s, BYE_TYPE, NULL, 0, NULL, 0); }
"""


def _plan_synthetic(tmp_path, *defines: str):
    from agent.probes.library_probes import plan_library
    from agent.probes.targets import TlsLibrary

    src = tmp_path / "fake.c"
    src.write_text(SYNTHETIC)
    lib = tmp_path / f"libfake{len(defines)}{abs(hash(defines))}.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-fcf-protection=none",
                    *(f"-D{d}" for d in defines), "-o", str(lib), str(src)],
                   check=True)  # fmt: skip
    library = TlsLibrary(str(lib), str(lib), 0, 0, "gnutls", frozenset(gw.RECV_WRAPPERS))
    return {p.name: p for p in plan_library(library)}


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@needs_gcc
def test_a_synthetic_library_of_the_proved_shape_is_probed_at_its_worker(tmp_path):
    plan = _plan_synthetic(tmp_path, "BYE_TYPE=21")
    probe = plan["gnutls_record_recv+gnutls_record_recv_seq"]
    assert probe.placement.kind == "worker" and not probe.single_stepped_uretprobe
    assert probe.where == probe.placement.address
    assert probe.point.entry_fn == "probe_gnutls_recv_worker_enter"
    assert "record types 21" in probe.placement.reason


@needs_gcc
@pytest.mark.parametrize(
    ("defines", "why"),
    [
        (("BYE_TYPE=21", "KTLS"), "2 different workers reached"),
        (("BYE_TYPE=23",), "also calls the worker for application data"),
    ],
)
def test_a_synthetic_library_whose_proof_fails_keeps_the_entries(tmp_path, defines, why):
    plan = _plan_synthetic(tmp_path, *defines)
    assert set(plan) == set(gw.RECV_WRAPPERS)
    for probe in plan.values():
        assert probe.where == probe.name  # the symbol: the function's entry
        assert probe.point.entry_fn == "probe_gnutls_recv_enter"
        assert probe.placement.kind == "entry" and probe.single_stepped_uretprobe
        assert "worker not used: " in probe.placement.reason and why in probe.placement.reason


def test_forced_entry_keeps_the_wrappers(monkeypatch):
    from agent.probes.library_probes import plan_library
    from agent.probes.prologue import FORCE_ENTRY_ENV
    from agent.probes.targets import TlsLibrary

    monkeypatch.setenv(FORCE_ENTRY_ENV, "entry")
    library = TlsLibrary("/nonexistent", "/nonexistent", 0, 0, "gnutls",
                         frozenset(gw.RECV_WRAPPERS))  # fmt: skip
    plan = {p.name: p for p in plan_library(library)}
    assert set(plan) == set(gw.RECV_WRAPPERS)
    assert all(p.placement.kind == "entry" and p.where == p.name for p in plan.values())
