"""Write's completion points (agent/probes/go_write_completion.py): the real Write of
the four Go builds (test_prologue_bytes.GO, and the builds themselves when their
toolchain is installed), and hand-assembled functions the proof must refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.probes.go_write_completion import Location, ProofFailed, prove_write_completion
from tests import golang
from tests.unit import test_prologue_bytes as B

RAX, RBX = Location("rax"), Location("rbx")
# Per Go version, offsets from Write: (call, point, n, err) per writeRecordLocked(23)
# call, the RETs that keep a probe and those that do not (the success return, and the
# TLS 1.0 first-byte call's error return).
EXPECTED = {
    "go1.19.8": (
        [(555, 563, RAX, RBX), (1027, 1057, Location(None, 0x38), RBX)],
        [1514, 1626, 1724, 1804, 1864, 1906],
        [978, 1402],
    ),
    "go1.27.3": (
        [(886, 904, RAX, RBX), (1386, 1394, RAX, RBX)],
        [582, 675, 761, 822, 869, 1985],
        [1229, 1786],
    ),
}
WRITES = sorted(k for k in B.GO if k[2] == "Write")


def summary(code: bytes, address: int, write_record: int) -> tuple:
    got = prove_write_completion(code, address, write_record)
    points = [(p.call - address, p.address - address, p.n, p.err) for p in got.points]
    return (
        points,
        [r - address for r in got.kept_returns],
        [r - address for r in got.dropped_returns],
    )


@pytest.mark.parametrize("key", WRITES, ids=[k[0] for k in WRITES])
def test_real_write_completion_points(key):
    address, raw = B.GO[key]
    version = key[1]
    assert summary(bytes.fromhex(raw), address, B.GO_WRITE_RECORD[version]) == EXPECTED[version]


BUILDS = [("debian", False), ("debian", True), ("pypi", False), ("pypi", True)]


@pytest.mark.parametrize("build", BUILDS, ids=[f"{n}{'-stripped' if s else ''}" for n, s in BUILDS])
def test_the_builds_on_this_machine(build):
    """The same, read from the binaries tests/golang.py builds (pclntab when stripped)."""
    from agent.probes.go_binary import analyze_go_tls
    from agent.probes.gotls import go_write_completion

    name, stripped = build
    toolchain = golang.toolchains()[name]
    if toolchain is None:
        pytest.skip(golang.MISSING_REASON[name])
    source = Path(__file__).parents[1] / "ebpf" / "programs" / "go_https.go"
    binary = golang.build(toolchain, source, stripped=stripped)
    target = analyze_go_tls(str(binary))
    assert target.write_record is not None
    got, why = go_write_completion(str(binary), target)
    assert got is not None, why
    write = target.write.address
    expected = EXPECTED["go1.19.8" if name == "debian" else "go1.27.3"]
    assert [(p.call - write, p.address - write, p.n, p.err) for p in got.points] == expected[0]
    assert [r - write for r in got.kept_returns] == expected[1]
    assert set(got.kept_returns) | set(got.dropped_returns) == set(target.write_returns)
    assert why.startswith("writeRecordLocked(23) completion at +")


# A hand-assembled Write at 0x1000 calling "writeRecordLocked" at 0x2000:
#   1000 test rcx,rcx; 1003 je 101b (early return); 1005 mov ebx,23; 100a call 2000
#   100f mov [rsp+0x38],rax; 1014 test rbx,rbx; 1017 je 101a; 1019 ret; 101a ret; 101b ret
SYNTHETIC = "4885c97416bb17000000e8f10f000048894424384885db7401c3c3c3"


def synthetic(**patch: str) -> bytes:
    """SYNTHETIC with the hex at some offsets replaced: {"o5": "bb16000000"}."""
    code = bytearray.fromhex(SYNTHETIC)
    for where, new in patch.items():
        at = int(where[1:])
        code[at : at + len(bytes.fromhex(new))] = bytes.fromhex(new)
    return bytes(code)


def test_synthetic_write_is_proved():
    assert summary(synthetic(), 0x1000, 0x2000) == ([(10, 23, RAX, RBX)], [27], [25, 26])


def test_a_stored_n_survives_rax_being_overwritten():
    # 100f: mov [rsp+0x38],rax; then 1014: mov eax,1 overwrites RAX (no test rbx)
    code = synthetic(o20="b801000000")[:25] + bytes.fromhex("7401c3c3c3")
    assert summary(code, 0x1000, 0x2000)[0] == [(10, 25, Location(None, 0x38), RBX)]


REFUSALS = {
    "branch-into-window": (synthetic(o4="0f"), "0x1014 is a branch target"),  # je 0x1014
    "rax-overwritten": (synthetic(o15="b801000000"), "overwrites n (RAX)"),  # mov eax,1
    "rbx-overwritten": (synthetic(o20="4889c3"), "overwrites err (RBX)"),  # mov rbx,rax
    "indirect-jump": (synthetic() + bytes.fromhex("ffe0"), "indirect jump"),  # jmp rax
    "typ-22": (synthetic(o5="bb16000000"), "not 23"),  # mov ebx,22
    "typ-from-register": (synthetic(o5="89cb909090"), "typ comes from mov ebx, ecx"),
    "rsp-written": (synthetic(o20="4c89f4"), "writes rsp"),  # mov rsp,r14
    "store-via-rbp": (synthetic(o15="4889453890"), "writes memory outside the stack frame"),
    "indirect-call": (synthetic(o20="ffd0c3"), "not a plain data move"),  # call rax
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_synthetic_refusals(case):
    code, reason = REFUSALS[case]
    with pytest.raises(ProofFailed, match=reason.replace("(", r"\(").replace(")", r"\)")):
        prove_write_completion(code, 0x1000, 0x2000)


def test_no_call_of_write_record_is_refused():
    with pytest.raises(ProofFailed, match="no direct call of writeRecordLocked"):
        prove_write_completion(synthetic(), 0x1000, 0x3000)
