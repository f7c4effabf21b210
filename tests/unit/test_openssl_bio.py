"""Finding the SSL BIO methods statically in real and malformed files."""

from __future__ import annotations

import subprocess

from agent.probes.openssl_bio import find_ssl_bio_methods

LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"


def test_real_libssl_methods_are_distinct_functions_inside_text():
    m = find_ssl_bio_methods(LIBSSL)
    assert m is not None
    assert m.write_addr != m.read_addr
    # Both are referenced from the BIO method table only; a function entry is
    # 16-byte aligned by GCC's default -falign-functions on x86-64.
    assert m.write_addr % 16 == 0 and m.read_addr % 16 == 0
    text = subprocess.run(
        ["objdump", "-h", LIBSSL], capture_output=True, text=True, check=True
    ).stdout
    (line,) = [ln for ln in text.splitlines() if " .text " in ln]
    fields = line.split()
    start, size = int(fields[3], 16), int(fields[2], 16)
    assert start <= m.write_addr < start + size
    assert start <= m.read_addr < start + size


def test_file_without_bio_f_ssl_gives_none(tmp_path):
    assert find_ssl_bio_methods("/lib/x86_64-linux-gnu/libc.so.6") is None


def test_garbage_file_gives_none_not_an_exception(tmp_path, caplog):
    junk = tmp_path / "libssl.so.3"
    junk.write_bytes(b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 200)
    assert find_ssl_bio_methods(str(junk)) is None
    assert find_ssl_bio_methods(str(tmp_path / "missing.so")) is None
