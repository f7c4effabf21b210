"""find_symbols / is_elf on real system libraries and on small ELF files built with gcc."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from agent.probes.elf_symbols import ElfError, find_symbols, is_elf

TLS = ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"]
LIBSSL = Path("/lib/x86_64-linux-gnu/libssl.so.3")
LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
LIBCRYPTO = Path("/lib/x86_64-linux-gnu/libcrypto.so.3")

needs_system_libs = pytest.mark.skipif(
    not (LIBSSL.exists() and LIBC.exists()), reason="Debian x86-64 libssl3/libc not installed"
)
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")

# SSL_write/SSL_read: exported functions. SSL_write_ex: a local function, so only in
# .symtab. SSL_read_ex: data, not a function. puts: an import (undefined here).
SOURCE = r"""
#include <stdio.h>
int SSL_write(void *s, const void *b, int n) { puts("w"); return n; }
int SSL_read(void *s, void *b, int n) { return n; }
__attribute__((used)) static int SSL_write_ex(void) { return 0; }
int SSL_read_ex = 7;
"""


def build_so(directory: Path, name: str, *flags: str) -> Path:
    src = directory / "tls.c"
    src.write_text(SOURCE)
    out = directory / name
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O0", "-o", str(out), str(src), *flags],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("elf")
    return {
        "gnu": build_so(d, "gnu.so", "-Wl,--hash-style=gnu"),
        "sysv": build_so(d, "sysv.so", "-Wl,--hash-style=sysv"),
        "stripped": build_so(d, "stripped.so", "-s"),
    }


def without_section_headers(src: Path, dst: Path) -> Path:
    """Copy of an ELF64 file with e_shoff/e_shnum/e_shstrndx zeroed, like sstrip."""
    data = bytearray(src.read_bytes())
    struct.pack_into("<Q", data, 0x28, 0)  # e_shoff
    struct.pack_into("<HHH", data, 0x3A, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
    dst.write_bytes(data)
    return dst


@needs_system_libs
def test_libssl_defines_all_four() -> None:
    assert find_symbols(str(LIBSSL), TLS) == set(TLS)


@needs_system_libs
def test_libc_defines_none_but_lookup_works() -> None:
    assert find_symbols(str(LIBC), TLS) == set()
    # The same lookup path does find what libc really exports.
    assert find_symbols(str(LIBC), ["malloc", "printf", "no_such_fn"]) == {"malloc", "printf"}


@needs_system_libs
def test_libcrypto_has_no_ssl_functions() -> None:
    if not LIBCRYPTO.exists():
        pytest.skip("no libcrypto.so.3")
    assert find_symbols(str(LIBCRYPTO), TLS) == set()


@needs_system_libs
def test_imports_are_not_definitions() -> None:
    # libssl imports these from libcrypto: present in .dynsym, but SHN_UNDEF.
    assert find_symbols(str(LIBSSL), ["OPENSSL_sk_dup", "ERR_peek_last_error"]) == set()


@needs_system_libs
def test_dynamic_segment_used_without_section_headers(tmp_path: Path) -> None:
    copy = without_section_headers(LIBSSL, tmp_path / "libssl.so.3")
    assert find_symbols(str(copy), TLS) == set(TLS)


@needs_gcc
@pytest.mark.parametrize("style", ["gnu", "sysv"])
def test_hash_styles_and_symtab(built: dict[str, Path], style: str) -> None:
    path = str(built[style])
    # SSL_write_ex exists only as a local function in .symtab; SSL_read_ex is data.
    assert find_symbols(path, TLS) == {"SSL_write", "SSL_read", "SSL_write_ex"}
    assert find_symbols(path, ["puts"]) == set()


@needs_gcc
def test_stripped_file_has_only_dynsym(built: dict[str, Path]) -> None:
    assert find_symbols(str(built["stripped"]), TLS) == {"SSL_write", "SSL_read"}


@needs_gcc
def test_empty_names(built: dict[str, Path]) -> None:
    assert find_symbols(str(built["gnu"]), []) == set()


def test_not_elf(tmp_path: Path) -> None:
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(ElfError, match=re.escape(f"{text}: not an ELF file")):
        find_symbols(str(text), TLS)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ElfError, match=re.escape(f"{empty}: not an ELF file")):
        find_symbols(str(empty), TLS)


def test_missing_and_non_regular(tmp_path: Path) -> None:
    with pytest.raises(ElfError, match=re.escape(f"{tmp_path / 'nope'}: No such file")):
        find_symbols(str(tmp_path / "nope"), TLS)
    with pytest.raises(ElfError, match="not a regular file"):
        find_symbols(str(tmp_path), TLS)


def test_garbage_after_magic(tmp_path: Path) -> None:
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
    with pytest.raises(ElfError, match=re.escape(str(bad))):
        find_symbols(str(bad), TLS)


@needs_system_libs
@pytest.mark.parametrize("keep", [8, 64, 4096, 0.5])
def test_truncated(tmp_path: Path, keep: float) -> None:
    data = LIBSSL.read_bytes()
    cut = tmp_path / "cut.so"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ElfError, match=re.escape(f"{cut}: truncated")):
        find_symbols(str(cut), TLS)


@needs_system_libs
def test_truncated_without_section_headers(tmp_path: Path) -> None:
    full = without_section_headers(LIBSSL, tmp_path / "full.so")
    cut = tmp_path / "cut.so"
    cut.write_bytes(full.read_bytes()[:8192])
    with pytest.raises(ElfError, match=re.escape(f"{cut}: truncated")):
        find_symbols(str(cut), TLS)


def test_is_elf(tmp_path: Path) -> None:
    text = tmp_path / "t"
    text.write_text("hello")
    assert not is_elf(str(text))
    assert not is_elf(str(tmp_path / "missing"))
    assert not is_elf(str(tmp_path))
    assert is_elf("/bin/sh")
