"""Probe placement from real prologues (agent/probes/prologue.py): offset and reason."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from agent.probes import prologue
from agent.probes.prologue import WrapperCode, entry_placement, is_emulated, worker_placement
from tests.unit import test_prologue_bytes as B

C_READS = frozenset({"rdi", "rsi", "rdx", "rcx"})
GO_READS = frozenset({"rax", "rbx", "rcx", "r14"})


def code(table, name):
    address, hexcode = table[name]
    return address, bytes.fromhex(hexcode)


def wrapper(table, name):
    address, raw = code(table, name)
    return WrapperCode(name, address, raw)


def libssl3_reader(address, size):
    return bytes.fromhex(B.LIBSSL3_WORKERS[address])[:size]


@pytest.mark.parametrize(
    ("ex", "plain", "worker", "first"),
    [
        ("SSL_write_ex", "SSL_write", 0x355A0, "push r14"),
        ("SSL_read_ex", "SSL_read", 0x35290, "push r13"),
    ],
)
def test_libssl3_wrappers_are_probed_at_their_worker(ex, plain, worker, first):
    placement, why = worker_placement(
        wrapper(B.LIBSSL3, ex), wrapper(B.LIBSSL3, plain), libssl3_reader,
        B.LIBSSL3_IMPORTS.get,
    )  # fmt: skip
    assert why == ""
    assert placement is not None
    assert (placement.kind, placement.address, placement.uretprobe) == ("worker", worker, True)
    assert first in placement.reason


def test_libssl3_worker_refused_when_the_plain_wrapper_calls_something_unknown():
    imports = dict(B.LIBSSL3_IMPORTS)
    name = next(a for a, n in imports.items() if n == "ERR_new")
    imports[name] = "SSL_do_something_else"
    placement, why = worker_placement(
        wrapper(B.LIBSSL3, "SSL_write_ex"), wrapper(B.LIBSSL3, "SSL_write"), libssl3_reader,
        imports.get,
    )  # fmt: skip
    assert placement is None
    assert "also calls SSL_do_something_else" in why


def test_libssl3_worker_refused_when_it_begins_with_a_single_stepped_instruction():
    def reader(address, size):
        return bytes.fromhex("4883ec18") + b"\x90" * (size - 4)  # sub $0x18,%rsp

    placement, why = worker_placement(
        wrapper(B.LIBSSL3, "SSL_write_ex"), wrapper(B.LIBSSL3, "SSL_write"), reader,
        B.LIBSSL3_IMPORTS.get,
    )  # fmt: skip
    assert placement is None
    assert "single-stepped" in why


@pytest.mark.parametrize(
    ("table", "symbol", "kind", "reason"),
    [
        # A uretprobe completes these: the entry stays; cheap only when emulated.
        (B.LIBSSL3, "SSL_write", "entry", "uretprobe needs the first instruction (sub rsp, 0x18"),
        (B.LIBSSL3, "SSL_read_ex", "entry", "uretprobe needs the first instruction (sub rsp, 8"),
        (B.NODE, "SSL_write", "emulated-entry", "first instruction emulated (push rbp)"),
        (B.NODE, "SSL_read_ex", "emulated-entry", "first instruction emulated (push rbp)"),
        (B.GNUTLS, "gnutls_record_send2", "emulated-entry", "(push r15)"),
        (B.GNUTLS, "gnutls_record_send_range", "emulated-entry", "(push r15)"),
        (B.GNUTLS, "gnutls_record_recv", "entry", "(sub rsp, 8, single-stepped)"),
        (B.GNUTLS, "gnutls_record_recv_seq", "entry", "(mov r9d, dword ptr [rdi + 0x770]"),
        (B.NSPR, "PR_Write", "entry", "(mov rax, qword ptr [rdi], single-stepped)"),
        (B.NSPR, "PR_Recv", "entry", "(mov rax, qword ptr [rdi], single-stepped)"),
    ],
)
def test_functions_completed_by_a_uretprobe(table, symbol, kind, reason):
    address, raw = code(table, symbol)
    p = entry_placement(symbol, raw, address, C_READS, uretprobe=True)
    assert (p.kind, p.offset) == (kind, 0)
    assert reason in p.reason


def test_without_a_uretprobe_sp_reading_probes_do_not_skip_a_stack_adjustment():
    address, raw = code(B.LIBSSL3, "SSL_write")
    p = entry_placement("SSL_write", raw, address, C_READS, reads_sp=True)
    assert (p.kind, p.offset) == ("entry", 0)
    assert "writes rsp" in p.reason


def test_gnutls_transport_set_int2_keeps_its_entry():
    address, raw = code(B.GNUTLS, "gnutls_transport_set_int2")
    p = entry_placement("x", raw, address, {"rdi", "rsi"}, reads_sp=False)
    assert (p.kind, p.offset) == ("entry", 0)
    assert "writes rsi" in p.reason


@pytest.mark.parametrize("key", sorted(B.GO))
def test_go_entry_moves_to_the_stack_check_jbe(key):
    address, raw = code(B.GO, key)
    p = entry_placement(key[2], raw, address, GO_READS, reads_sp=False)
    want = 9 if key[2] == "Write" else 4  # lea+cmp+jbe / cmp+jbe
    assert (p.kind, p.offset, p.uretprobe) == ("moved-entry", want, False)
    assert p.reason.startswith("jbe ")
    assert "r14" in p.reason


def test_go_entry_stays_if_a_skipped_instruction_wrote_an_argument():
    address, raw = code(B.GO, sorted(B.GO)[0])
    # mov %rdx,%rax (48 89 d0) in front of the original prologue.
    patched = bytes.fromhex("4889d0") + raw
    p = entry_placement("Write", patched, address, GO_READS, reads_sp=False)
    assert (p.kind, p.offset) == ("entry", 0)
    assert "writes rax" in p.reason


def test_a_branch_into_the_skipped_prologue_keeps_the_entry():
    # xor %r12d,%r12d; cmp %rsp,0x10(%r14)... ; jbe; then a jmp back to +3
    raw = bytes.fromhex("4d31e4493b66107602ebf8c3")
    p = entry_placement("f", raw, 0x1000, GO_READS, reads_sp=False)
    assert p.kind == "entry"
    assert "a branch lands at 0x1003" in p.reason


def test_an_indirect_jump_in_the_function_keeps_the_entry():
    raw = bytes.fromhex("493b66107602ffe0c3")  # cmp; jbe; jmp *%rax; ret
    p = entry_placement("f", raw, 0x1000, GO_READS, reads_sp=False)
    assert p.kind == "entry"
    assert "indirect jump" in p.reason


@pytest.mark.parametrize(
    ("hexbytes", "emulated"),
    [
        ("55", True), ("4154", True), ("90", True), ("0f1f4000", True), ("0f1f440000", True),
        ("7602", True), ("0f8500000000", True), ("eb00", True), ("e800000000", True),
        ("f30f1efa", False),  # endbr64: measured single-stepped on 6.18
        ("c3", False), ("4889f8", False), ("4883ec18", False), ("ffe0", False),
        ("660f1f440000", False),  # prefixed nop: not measured, not trusted
    ],
)  # fmt: skip
def test_emulated_encodings(hexbytes, emulated):
    assert is_emulated(bytes.fromhex(hexbytes)) is emulated


def test_force_entry_switch(monkeypatch):
    monkeypatch.setenv(prologue.FORCE_ENTRY_ENV, "entry")
    assert prologue.force_entry()
    monkeypatch.setenv(prologue.FORCE_ENTRY_ENV, "auto")
    assert not prologue.force_entry()


SYNTHETIC = r"""
#include <stddef.h>
int worker(void *s, const void *b, size_t n, size_t *w);
extern int (*hook)(void *, const void *, size_t, size_t *);
/* SSL_write_ex's shape, but it changes the buffer register before the call. */
__attribute__((noinline)) int SSL_write_ex(void *s, const void *b, size_t n, size_t *w) {
    return worker(s, (const char *)b + 1, n, w);
}
/* SSL_write's shape, but an indirect call can move data past the worker. */
__attribute__((noinline)) int SSL_write(void *s, const void *b, int n) {
    size_t w;
    if (hook) return hook(s, b, (size_t)n, &w);
    int r = worker(s, b, (size_t)n, &w);
    return r > 0 ? (int)w : r;
}
int (*hook)(void *, const void *, size_t, size_t *);
__attribute__((noinline)) int worker(void *s, const void *b, size_t n, size_t *w) {
    *w = n; return s && b ? 1 : -1;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_synthetic_library_whose_wrappers_cannot_be_proved_keeps_entry(tmp_path):
    from agent.probes.library_probes import plan_library
    from agent.probes.targets import TlsLibrary

    src = tmp_path / "fake.c"
    src.write_text(SYNTHETIC)
    lib = tmp_path / "libfake.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-fcf-protection=none", "-o", str(lib),
                    str(src)], check=True)  # fmt: skip
    library = TlsLibrary(str(lib), str(lib), 0, 0, "libssl",
                         frozenset({"SSL_write", "SSL_write_ex"}))  # fmt: skip
    plan = plan_library(library)
    assert sorted(p.name for p in plan) == ["SSL_write", "SSL_write_ex"]
    for probe in plan:
        assert probe.where == probe.name  # the symbol: function entry
        assert probe.point.return_fn == "probe_tls_return"  # still entry + uretprobe
        assert probe.placement is not None
        assert probe.placement.address == probe.placement.function
