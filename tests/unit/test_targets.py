"""Target discovery against parsed maps text and a fake /proc tree holding real ELF files."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.probes.targets import (
    TLS_FUNCTIONS,
    Mapping,
    TargetScanner,
    TlsLibrary,
    _parse_ldconfig,
    is_libssl_name,
    parse_maps,
)
from tests.unit.fakeproc import FakeProc

LIBSSL = Path("/lib/x86_64-linux-gnu/libssl.so.3")
LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
LIBCRYPTO = Path("/lib/x86_64-linux-gnu/libcrypto.so.3")

needs_system_libs = pytest.mark.skipif(
    not (LIBSSL.exists() and LIBC.exists() and LIBCRYPTO.exists()),
    reason="Debian x86-64 libssl3/libc not installed",
)

# Columns as the kernel pads them; anonymous lines end in a space.
MAPS = (
    "\n".join(
        [
            "55f1c0a00000-55f1c0a28000 r--p 00000000 fd:01 1311297     /usr/bin/python3.11",
            "55f1c0a28000-55f1c0c10000 r-xp 00028000 fd:01 1311297     /usr/bin/python3.11",
            "55f1c1e4e000-55f1c1f6f000 rw-p 00000000 00:00 0           [heap]",
            "7f3a1c000000-7f3a1c021000 rw-p 00000000 00:00 0 ",
            "7f3a20e00000-7f3a20e28000 r-xp 00028000 103:02 5595146    /opt/my app/lib/libssl.so.3",
            "7f3a21000000-7f3a21001000 r-xp 00000000 fd:01 42          /tmp/old lib.so (deleted)",
            "7f3a21200000-7f3a21201000 r-xp 00000000 00:01 1025        /memfd:jit (deleted)",
            "7ffd4a3f0000-7ffd4a411000 rw-p 00000000 00:00 0           [stack]",
            "7ffd4a5f2000-7ffd4a5f6000 r--p 00000000 00:00 0           [vvar]",
            "7ffd4a5f6000-7ffd4a5f8000 r-xp 00000000 00:00 0           [vdso]",
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0   [vsyscall]",
        ]
    )
    + "\n"
)


# -- parse_maps ---------------------------------------------------------------------------


def test_parse_maps_fields() -> None:
    maps = parse_maps(MAPS)
    assert len(maps) == 11
    assert maps[1] == Mapping(
        start=0x55F1C0A28000,
        end=0x55F1C0C10000,
        perms="r-xp",
        offset=0x28000,
        dev=os.makedev(0xFD, 0x01),
        inode=1311297,
        path="/usr/bin/python3.11",
    )
    assert maps[3].path is None and maps[3].inode == 0
    assert maps[2].path == "[heap]"


def test_parse_maps_spaces_and_deleted() -> None:
    ssl, old, memfd = parse_maps(MAPS)[4:7]
    assert ssl.path == "/opt/my app/lib/libssl.so.3"
    assert ssl.dev == os.makedev(0x103, 0x02) and not ssl.deleted
    assert (old.path, old.deleted) == ("/tmp/old lib.so", True)
    assert (memfd.path, memfd.deleted) == ("/memfd:jit", True)


def test_executable_file_selection() -> None:
    chosen = [m.path for m in parse_maps(MAPS) if m.is_executable_file]
    # Not [vdso]/[vsyscall] (no file), not the r--p segment of the same executable.
    assert chosen == [
        "/usr/bin/python3.11",
        "/opt/my app/lib/libssl.so.3",
        "/tmp/old lib.so",
        "/memfd:jit",
    ]


def test_parse_maps_skips_malformed_lines() -> None:
    text = "garbage\nzz-yy r-xp 0 fd:01 1 /x\n\n" + MAPS.splitlines()[1] + "\n"
    assert [m.path for m in parse_maps(text)] == ["/usr/bin/python3.11"]


def test_parse_maps_keeps_odd_whitespace_in_names() -> None:
    line = "7f0000000000-7f0000001000 r-xp 00000000 fd:01 7   /opt/a\x0cb\rc  d.so\n"
    assert parse_maps(line)[0].path == "/opt/a\x0cb\rc  d.so"


def test_parse_maps_on_own_process() -> None:
    text = Path("/proc/self/maps").read_text()
    maps = parse_maps(text)
    assert len(maps) == len(text.splitlines())
    exe_ino = os.stat("/proc/self/exe").st_ino
    assert any(m.inode == exe_ino and m.is_executable_file for m in maps)


def test_libssl_names() -> None:
    for yes in ["libssl.so", "libssl.so.3", "libssl.so.1.1", "/x/libssl-8ab2c3d4.so.1.1"]:
        assert is_libssl_name(yes), yes
    for no in ["libssl3.so", "libcrypto.so.3", "libssl.so.3.bak", "libssl.a", "mylibssl.so"]:
        assert not is_libssl_name(no), no


def test_parse_ldconfig() -> None:
    text = (
        "542 libs found in cache `/etc/ld.so.cache'\n"
        "\tlibssl3.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl3.so\n"
        "\tlibssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3\n"
        "\tlibssl.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so\n"
        "\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6\n"
        "\tlibgnutls.so.30 (libc6,x86-64) => /lib/x86_64-linux-gnu/libgnutls.so.30\n"
        "\tlibgnutls-dane.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libgnutls-dane.so.0\n"
        "\tlibnspr4.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libnspr4.so\n"
        "\tlibplc4.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libplc4.so\n"
    )
    # NSS's libssl3 is listed: its SSL_ImportFD is probed (for the NSPR probes' sake).
    assert _parse_ldconfig(text) == [
        "/lib/x86_64-linux-gnu/libssl3.so",
        "/lib/x86_64-linux-gnu/libssl.so.3",
        "/lib/x86_64-linux-gnu/libssl.so",
        "/lib/x86_64-linux-gnu/libgnutls.so.30",
        "/lib/x86_64-linux-gnu/libnspr4.so",
    ]


# -- a fake /proc -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ELF carrying its own SSL_write/SSL_read, like a statically linked server."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("static")
    src = d / "server.c"
    src.write_text(
        "int SSL_write(void *s, const void *b, int n) { return n; }\n"
        "int SSL_read(void *s, void *b, int n) { return n; }\n"
    )
    out = d / "server"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def scanner(proc: FakeProc, **kwargs: object) -> TargetScanner:
    return TargetScanner(proc_root=str(proc.root), **kwargs)  # type: ignore[arg-type]


@needs_system_libs
def test_private_libssl_reported_once_across_pids(proc: FakeProc) -> None:
    # Two processes (think: two containers) map one private libssl under different paths.
    first = proc.place(100, "/opt/app/lib/libssl.so.3", LIBSSL)
    proc.place(200, "/srv/other/libssl.so.3", LIBSSL, link_from=first)
    for pid, path in [(100, "/opt/app/lib/libssl.so.3"), (200, "/srv/other/libssl.so.3")]:
        proc.place(pid, "/lib/libc.so.6", LIBC)
        proc.map(pid, "/lib/libc.so.6")
        proc.map(pid, path)
        proc.map_anonymous(pid)

    s = scanner(proc)
    found = s.scan_all()
    st = os.stat(first)
    assert found == [
        TlsLibrary(
            host_path=f"{proc.root}/100/root/opt/app/lib/libssl.so.3",
            path="/opt/app/lib/libssl.so.3",
            dev=st.st_dev,
            ino=st.st_ino,
            kind="libssl",
            symbols=TLS_FUNCTIONS,
        )
    ]
    assert s.scan_all() == []
    assert s.scan_pid(200) == []


@needs_system_libs
def test_static_tls_in_executable(proc: FakeProc, static_elf: Path) -> None:
    proc.place(300, "/usr/local/bin/server", static_elf)
    proc.place(300, "/lib/libcrypto.so.3", LIBCRYPTO)
    proc.place(300, "/lib/libc.so.6", LIBC)
    for path in ["/usr/local/bin/server", "/lib/libcrypto.so.3", "/lib/libc.so.6"]:
        proc.map(300, path)

    [found] = scanner(proc).scan_pid(300)
    assert (found.kind, found.path) == ("static", "/usr/local/bin/server")
    assert found.symbols == {"SSL_write", "SSL_read"}


@needs_system_libs
def test_vanished_pid_is_logged_and_skipped(
    proc: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    proc.place(100, "/usr/lib/libssl.so.3", LIBSSL)
    proc.map(100, "/usr/lib/libssl.so.3")
    caplog.set_level(logging.DEBUG, logger="agent.probes.targets")

    found = scanner(proc).scan_all([4242, 100])

    assert [lib.path for lib in found] == ["/usr/lib/libssl.so.3"]
    assert any("pid 4242" in r.getMessage() and "exited" in r.getMessage() for r in caplog.records)


@needs_system_libs
def test_process_exiting_between_maps_and_files(
    proc: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    proc.place(100, "/usr/lib/libssl.so.3", LIBSSL)
    proc.map(100, "/usr/lib/libssl.so.3")
    shutil.rmtree(proc.root / "100" / "root")  # maps still readable, root already gone
    caplog.set_level(logging.DEBUG, logger="agent.probes.targets")

    assert scanner(proc).scan_pid(100) == []
    assert any("pid 100: /usr/lib/libssl.so.3" in r.getMessage() for r in caplog.records)


def test_garbage_mapping_is_logged_once_and_skipped(
    proc: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = proc.place(100, "/opt/blob.bin", b"\x7fELF" + os.urandom(4096))
    proc.place(200, "/opt/blob.bin", b"", link_from=garbage)
    proc.place(100, "/opt/script", b"#!/bin/sh\n")
    for pid in (100, 200):
        proc.map(pid, "/opt/blob.bin")
    proc.map(100, "/opt/script")
    caplog.set_level(logging.WARNING, logger="agent.probes.targets")

    assert scanner(proc).scan_all() == []

    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("pid 100: /opt/script: not probed") for m in messages)
    # One file, one verdict: the second process mapping it doesn't log again.
    assert len([m for m in messages if "/opt/blob.bin" in m]) == 1
    assert messages[0].startswith("pid 100: /opt/blob.bin: not probed")


@needs_system_libs
def test_replaced_and_deleted_files_are_skipped(
    proc: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    proc.place(100, "/usr/lib/libssl.so.3", LIBSSL)
    proc.map(100, "/usr/lib/libssl.so.3", inode=1)  # maps names an inode that's gone now
    proc.place(100, "/opt/libssl.so.3", LIBSSL)
    proc.map(100, "/opt/libssl.so.3", suffix=" (deleted)")
    caplog.set_level(logging.DEBUG, logger="agent.probes.targets")

    assert scanner(proc).scan_pid(100) == []

    messages = [r.getMessage() for r in caplog.records]
    assert any("pid 100: /usr/lib/libssl.so.3: skipped: replaced" in m for m in messages)
    assert any("pid 100: /opt/libssl.so.3: skipped: deleted" in m for m in messages)


@needs_system_libs
def test_excluded_pid_is_not_scanned(proc: FakeProc) -> None:
    proc.place(100, "/usr/lib/libssl.so.3", LIBSSL)
    proc.map(100, "/usr/lib/libssl.so.3")
    assert scanner(proc, exclude_pids={100}).scan_all() == []


@needs_system_libs
def test_forget_reports_again(proc: FakeProc) -> None:
    proc.place(100, "/usr/lib/libssl.so.3", LIBSSL)
    proc.map(100, "/usr/lib/libssl.so.3")
    s = scanner(proc)
    [lib] = s.scan_pid(100)
    s.forget(lib.dev, lib.ino)
    assert s.scan_pid(100) == [lib]


@needs_system_libs
def test_file_rewritten_in_place_is_judged_again(proc: FakeProc) -> None:
    # Same (dev, ino), new content: the cached "not TLS" must not hide the new libssl.
    path = proc.place(100, "/opt/libssl.so.3", b"not yet")
    proc.map(100, "/opt/libssl.so.3")
    s = scanner(proc)
    assert s.scan_pid(100) == []
    path.write_bytes(LIBSSL.read_bytes())
    assert [lib.kind for lib in s.scan_pid(100)] == ["libssl"]


@needs_system_libs
def test_system_libraries_on_this_host(proc: FakeProc) -> None:
    s = scanner(proc)  # the fake proc has no 1/root, so the host root is "/"
    found = s.system_libraries()
    st = os.stat(LIBSSL)
    [lib] = [lib for lib in found if (lib.dev, lib.ino) == (st.st_dev, st.st_ino)]
    assert lib.kind == "libssl" and lib.symbols == TLS_FUNCTIONS
    assert lib.host_path == lib.path and os.path.basename(lib.path) == "libssl.so.3"
    kinds = {os.path.basename(x.path): x.kind for x in found}
    # NSS's libssl3 is not OpenSSL: it is probed for SSL_ImportFD only, as an NSS file.
    if Path("/lib/x86_64-linux-gnu/libssl3.so").exists():
        assert kinds["libssl3.so"] == "nss"
        [nss_ssl] = [x for x in found if os.path.basename(x.path) == "libssl3.so"]
        assert nss_ssl.symbols == {"SSL_ImportFD"}
    if Path("/lib/x86_64-linux-gnu/libnspr4.so").exists():
        assert kinds["libnspr4.so"] == "nss"
    if Path("/lib/x86_64-linux-gnu/libgnutls.so.30").exists():
        # Named by the real file, not the soname symlink: libgnutls.so.30.34.3
        assert [k for name, k in kinds.items() if name.startswith("libgnutls.so.30")] == ["gnutls"]
    assert "libnss3.so" not in kinds  # Debian's does not fold NSPR and libssl3 in
    assert s.system_libraries() == []

    # A process that maps the system libssl later brings nothing new to attach.
    (proc.root / "500").mkdir(parents=True)
    (proc.root / "500" / "root").symlink_to("/")
    proc.map(500, str(LIBSSL))
    assert s.scan_pid(500) == []


@needs_system_libs
def test_system_libraries_under_host_root(tmp_path: Path, proc: FakeProc) -> None:
    host = tmp_path / "host"
    (host / "usr/lib").mkdir(parents=True)
    shutil.copyfile(LIBSSL, host / "usr/lib/libssl.so.3")
    (host / "usr/lib/libssl.so").symlink_to("libssl.so.3")
    shutil.copyfile(LIBC, host / "usr/lib/libc.so.6")

    s = scanner(proc, host_root=str(host), library_dirs=["/usr/lib"], use_ldconfig=False)
    [lib] = s.system_libraries()
    assert lib.path == "/usr/lib/libssl.so.3"  # the real file, not the dev symlink
    assert lib.host_path == f"{host}/usr/lib/libssl.so.3"
