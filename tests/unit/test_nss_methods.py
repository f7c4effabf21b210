"""NSS's SSL-layer methods found statically (agent/probes/nss_methods.py) and placed
(agent/probes/library_probes.py): real code of this machine's libssl3 (Debian NSS
3.87), pure; then the same against the installed files, and against what the library
itself puts in a descriptor's method table at run time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.probes.nss_methods import METHOD_SLOTS, find_nss_ssl_methods, methods_from_setup
from agent.probes.prologue import decode, entry_placement
from tests.unit.test_prologue_bytes import NSPR

# libssl3.so (Debian NSS 3.87.1): ssl_SetupIOMethods from its call to
# PR_GetDefaultIOMethods@plt (0x3363d) to its ret (0x3380d). The only store of
# PR_DESC_LAYERED is `mov dword [rip+...], 4` at combined_methods (0x65e60); `rep movsq`
# copies NSPR's 36 default slots there first.
SETUP_CALL = 0x3363D
SETUP = bytes.fromhex(
    "e84e9bfdffb924000000660f6f0424488d150d0a00004889c6488d05730a000066480f6eca66480f6e"
    "d0488d15020b0000488d058bfdffff660f6cca66480f6ed8488d3ddb270300f348a50f110dd9270300"
    "66480f6eca488d0525fdffff660f6ccb488d0d3afdffff66480f6ee00f1105562803000f110dbf2703"
    "0066480f6ec9488d05bbfcffff488d35d4fcffff660f6ccc66480f6ee8488d1584fcffffc7057a2703"
    "00040000000f110d9b27030066480f6ece488d05a7080000488d0dd0400000660f6ccd66480f6ef048"
    "8d05a00d00000f110d8127030066480f6eca66480f6ef8488d35b8630000660f6cce488d053d0c0000"
    "488d3dd60c00000f110d6727030066480f6ec966480f6ed0488d05fe0d0000660f6ccf66480f6ed848"
    "8d055e0b00000f110d4f27030066480f6ece66480f6ee0488d15960a0000660f6cca488d058b070000"
    "488d0db4fbffff0f110d3527030066480f6ecf66480f6ee8488d056c080000660f6ccb66480f6ef048"
    "8d353cfaffff0f110d1d27030066480f6eca66480f6ec6488d05f4070000660f6ccc48890551270300"
    "660f6cc6488b05a61703000f110dff26030066480f6ec9660f6ccd4889055727030031c00f110df626"
    "03000f11050f2703004883c418c3"
)
SETUP_GOT = {0x64F80: "PR_EmulateAcceptRead", 0x64F88: "PR_EmulateSendFile"}
TEXT = range(0xE150, 0xE150 + 0x3CF4F)
TABLE = 0x65E60
FUNCTIONS = {"ssl_Read": 0x340D0, "ssl_Write": 0x34170, "ssl_Recv": 0x34210, "ssl_Send": 0x342C0}
# First 16 bytes of each method: push r12 / push r14 first (emulated).
PROLOGUES = {
    "ssl_Read": "41545553488b0783380475748b05ea1e",
    "ssl_Write": "41545553488b0783380475748b054a1e",
    "ssl_Recv": "4156415541545553488b078338040f85",
    "ssl_Send": "4156415541545553488b078338040f85",
}
LIBSSL3 = "/usr/lib/x86_64-linux-gnu/libssl3.so"
LIBNSPR4 = "/usr/lib/x86_64-linux-gnu/libnspr4.so"


def interpret(code: bytes = SETUP):
    return methods_from_setup(code, SETUP_CALL, SETUP_GOT, lambda a: a in TEXT)


def test_setup_code_gives_the_ssl_methods():
    methods, why = interpret()
    assert why == ""
    assert methods.table == TABLE
    assert methods.functions == FUNCTIONS
    assert methods.setup_end == 0x3380D
    assert "slot +0x88" in methods.reason("ssl_Recv")


def test_slots_are_the_ones_nsprs_functions_jump_through():
    # PR_Read is `mov rax, [rdi]; jmp [rax + slot]`: the same prio.h offsets.
    for pr, method in (("PR_Read", "ssl_Read"), ("PR_Write", "ssl_Write"),
                       ("PR_Recv", "ssl_Recv"), ("PR_Send", "ssl_Send")):  # fmt: skip
        address, code = NSPR[pr]
        jump = decode(bytes.fromhex(code), address)[1]
        assert jump.text == f"jmp qword ptr [rax + {METHOD_SLOTS[method]:#x}]", pr


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_methods_begin_with_an_emulated_push(name):
    address = FUNCTIONS[name]
    placement = entry_placement(name, bytes.fromhex(PROLOGUES[name]), address,
                                {"rdi", "rsi"}, uretprobe=True)  # fmt: skip
    assert (placement.kind, placement.address, placement.uretprobe) == (
        "emulated-entry", address, True)  # fmt: skip
    assert placement.reason.startswith("first instruction emulated (push r1")


def _patched(at: int, new: bytes) -> bytes:
    """SETUP with the instruction bytes at address ``at`` replaced (same length)."""
    i = at - SETUP_CALL
    return SETUP[:i] + new + SETUP[i + len(new) :]


def test_a_branch_in_the_setup_is_refused():
    # `mov ecx, 0x24` (5 bytes at +5) -> `jmp +0; nop x3`
    methods, why = interpret(_patched(SETUP_CALL + 5, bytes.fromhex("eb00909090")))
    assert methods is None and "control flow" in why


def test_a_store_through_a_pointer_is_refused():
    # `lea rdx, [rip+...]` (7 bytes at +0xf) -> `mov [rax], rdx; nop x4`: might alias.
    methods, why = interpret(_patched(SETUP_CALL + 0xF, bytes.fromhex("48891090909090")))
    assert methods is None and "store through a pointer" in why


def test_an_unknown_value_in_a_slot_gives_no_table():
    # The `movq xmm2, rax` that puts ssl_Read into the read slot (its high lane) ->
    # `pxor xmm2, xmm2; nop`: an instruction not modelled, so its result is unknown.
    at = SETUP.index(bytes.fromhex("66480f6ed0"))
    methods, why = interpret(_patched(SETUP_CALL + at, bytes.fromhex("660fefd290")))
    assert methods is None and "no PRIOMethods table" in why


def test_no_ret_means_no_proof():
    methods, why = interpret(SETUP[:-1])
    assert methods is None and "no ret" in why


# -- the installed files ---------------------------------------------------------------

needs_nss = pytest.mark.skipif(
    not (os.path.exists(LIBSSL3) and os.path.exists(LIBNSPR4)),
    reason="NSS (libnss3, libnspr4) is not installed: `make setup` adds libnss3-tools",
)


@needs_nss
def test_installed_libssl3_matches_the_recorded_code():
    methods, why = find_nss_ssl_methods(LIBSSL3)
    assert methods is not None, why
    # Other NSS builds may put them elsewhere; this machine's is the recorded one.
    if methods.table == TABLE:
        assert methods.functions == FUNCTIONS


@needs_nss
def test_other_files_have_no_methods():
    for path in (LIBNSPR4, "/usr/lib/x86_64-linux-gnu/libnss3.so"):
        if os.path.exists(path):
            methods, _ = find_nss_ssl_methods(path)
            assert methods is None, path


RUNTIME = r"""
import ctypes, json, sys
nspr = ctypes.CDLL("libnspr4.so", mode=ctypes.RTLD_GLOBAL)
nss = ctypes.CDLL("libnss3.so", mode=ctypes.RTLD_GLOBAL)
ssl = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
assert nss.NSS_NoDB_Init(None) == 0
nspr.PR_NewTCPSocket.restype = ctypes.c_void_p
ssl.SSL_ImportFD.restype = ctypes.c_void_p
ssl.SSL_ImportFD.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
fd = ssl.SSL_ImportFD(None, nspr.PR_NewTCPSocket())
assert fd
methods = ctypes.cast(fd, ctypes.POINTER(ctypes.c_void_p))[0]  # PRFileDesc.methods
slots = ctypes.cast(methods, ctypes.POINTER(ctypes.c_void_p))
base = min(int(l.split("-")[0], 16) for l in open("/proc/self/maps")
           if l.rstrip().endswith(sys.argv[1].rsplit("/", 1)[1]))
print(json.dumps({"table": methods - base, "file_type": ctypes.cast(
    methods, ctypes.POINTER(ctypes.c_int))[0],
    "slots": {str(o): slots[o // 8] - base for o in map(int, sys.argv[2:])}}))
"""


@needs_nss
def test_static_methods_are_what_the_library_installs_at_run_time(tmp_path):
    """In a child process (never in the agent): NSS's own SSL_ImportFD hands back a
    descriptor whose methods table is the one found statically, slot for slot."""
    methods, why = find_nss_ssl_methods(LIBSSL3)
    assert methods is not None, why
    script = tmp_path / "runtime.py"
    script.write_text(RUNTIME)
    out = subprocess.run(
        [sys.executable, str(script), LIBSSL3, *map(str, METHOD_SLOTS.values())],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["file_type"] == 4  # PR_DESC_LAYERED
    assert got["table"] == methods.table
    for name, slot in METHOD_SLOTS.items():
        assert got["slots"][str(slot)] == methods.functions[name], name


# -- the plan ---------------------------------------------------------------------------


def _library(path: str):
    from agent.probes.elf_symbols import find_symbols
    from agent.probes.library_probes import PROBED_SYMBOLS
    from agent.probes.targets import TlsLibrary

    return TlsLibrary(path, path, 0, 0, "nss", frozenset(find_symbols(path, PROBED_SYMBOLS)))


@needs_nss
def test_plan_probes_the_methods_and_leaves_nspr_unprobed(monkeypatch):
    from agent.probes.library_probes import plan_library

    monkeypatch.delenv("TLSCAP_PROBE_PLACEMENT", raising=False)
    ssl3 = {p.name: p for p in plan_library(_library(LIBSSL3))}
    assert set(ssl3) == {"ssl_Read", "ssl_Write", "ssl_Recv", "ssl_Send", "SSL_ImportFD"}
    for name in METHOD_SLOTS:
        probe = ssl3[name]
        assert isinstance(probe.where, int) and probe.placement.kind == "emulated-entry"
        assert probe.point.return_fn == "probe_tls_return" and probe.attached
        assert not probe.single_stepped_uretprobe
    nspr = plan_library(_library(LIBNSPR4))
    assert {p.name: p.placement.kind for p in nspr} == dict.fromkeys(
        ("PR_Write", "PR_Send", "PR_Read", "PR_Recv"), "covered"
    )
    assert not any(p.attached for p in nspr)


@needs_nss
def test_nspr_stays_probed_without_a_proved_libssl3_beside_it(tmp_path, monkeypatch):
    from agent.probes.library_probes import plan_library

    monkeypatch.delenv("TLSCAP_PROBE_PLACEMENT", raising=False)
    alone = tmp_path / "libnspr4.so"
    alone.symlink_to(LIBNSPR4)
    plan = plan_library(_library(str(alone)))
    assert {p.name for p in plan if p.attached} == {"PR_Write", "PR_Send", "PR_Read", "PR_Recv"}
    # A libssl3.so beside it that is not NSS's (no method table): still probed.
    (tmp_path / "libssl3.so").symlink_to(Path(LIBNSPR4))
    plan = plan_library(_library(str(alone)))
    assert {p.name for p in plan if p.attached} == {"PR_Write", "PR_Send", "PR_Read", "PR_Recv"}


@needs_nss
def test_forced_entry_keeps_the_old_probes(monkeypatch):
    from agent.probes.library_probes import plan_library

    monkeypatch.setenv("TLSCAP_PROBE_PLACEMENT", "entry")
    assert {p.name for p in plan_library(_library(LIBSSL3))} == {"SSL_ImportFD"}
    nspr = plan_library(_library(LIBNSPR4))
    assert {p.name: p.placement.kind for p in nspr} == dict.fromkeys(
        ("PR_Write", "PR_Send", "PR_Read", "PR_Recv"), "entry"
    )
    assert all(p.attached for p in nspr)
