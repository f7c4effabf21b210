"""`tlscap targets`' verdicts on a fake /proc: traceable, attached, and every reason a
program cannot be traced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.probes.inventory import AttachedProbes, Inventory, TargetRow, format_table
from tests.unit.fakeproc import FakeProc

LIBSSL = Path("/lib/x86_64-linux-gnu/libssl.so.3")
LIBCRYPTO = Path("/lib/x86_64-linux-gnu/libcrypto.so.3")
needs_libssl = pytest.mark.skipif(
    not (LIBSSL.exists() and LIBCRYPTO.exists()), reason="Debian's libssl3 not installed"
)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def process(proc: FakeProc, pid: int, comm: str, exe: str, content: bytes) -> None:
    """A process whose executable at `exe` holds `content`."""
    proc.place(pid, exe, content)
    proc.map(pid, exe)
    proc.set(pid, "comm", comm + "\n")
    os.symlink(exe, proc.root / str(pid) / "exe")


def inventory(proc: FakeProc, attached: AttachedProbes | None = None) -> Inventory:
    return Inventory(attached or AttachedProbes({}), proc_root=str(proc.root), own_pid=1)


def only_row(proc: FakeProc, pid: int, **kw) -> TargetRow:
    [row] = inventory(proc, **kw).process(pid)
    return row


def test_java_is_not_traceable_and_says_why(proc: FakeProc) -> None:
    process(proc, 10, "java", "/usr/bin/java", b"\x7fELF launcher")
    proc.place(10, "/usr/lib/jvm/lib/server/libjvm.so", b"\x7fELF jvm")
    proc.map(10, "/usr/lib/jvm/lib/server/libjvm.so")
    row = only_row(proc, 10)
    assert (row.library, row.status) == ("java", "not traceable")
    assert row.path == "/usr/lib/jvm/lib/server/libjvm.so"
    assert "JSSE" in row.detail and "--mode proxy" in row.detail


def test_rustls_is_recognised_in_a_stripped_executable(proc: FakeProc) -> None:
    process(proc, 11, "api", "/app/api", b"\x7fELF" + b"\0" * 64 + b"rustls::conn::Connection")
    row = only_row(proc, 11)
    assert (row.library, row.status, row.path) == ("rustls", "not traceable", "/app/api")


@pytest.mark.parametrize(
    ("marker", "library", "version"),
    [
        (b"OpenSSL 3.0.13 30 Jan 2024", "openssl (static)", "3.0.13"),
        (b"OpenSSL 1.1.1w  11 Sep 2023", "openssl (static)", "1.1.1w"),
        (b"BoringSSL", "boringssl (static)", ""),
    ],
)
def test_stripped_static_tls_says_symbols_are_missing(
    proc: FakeProc, marker: bytes, library: str, version: str
) -> None:
    process(proc, 12, "envoy", "/usr/local/bin/envoy", b"\x7fELF\0\0" + marker + b"\0")
    row = only_row(proc, 12)
    assert (row.library, row.status, row.version) == (library, "not traceable", version)
    assert "stripped" in row.detail


def test_unsupported_shared_library_is_named(proc: FakeProc) -> None:
    process(proc, 13, "mqtt", "/usr/bin/mqtt", b"\x7fELF")
    proc.place(13, "/usr/lib/libmbedtls.so.14", b"\x7fELF mbed")
    proc.map(13, "/usr/lib/libmbedtls.so.14")
    row = only_row(proc, 13)
    assert (row.library, row.status) == ("mbedtls", "not traceable")


def test_process_without_tls_is_listed_only_with_all(proc: FakeProc) -> None:
    process(proc, 14, "sleep", "/bin/sleep", b"\x7fELF nothing to see")
    assert inventory(proc).rows([14]) == []
    [row] = inventory(proc).rows([14], include_all=True)
    assert (row.comm, row.status) == ("sleep", "no TLS")


def test_unreadable_maps_is_a_row_with_the_reason(proc: FakeProc) -> None:
    proc.set(15, "comm", "secret\n")
    (proc.root / "15" / "maps").mkdir()  # reading it fails like a permission error would
    row = only_row(proc, 15)
    assert row.status == "unreadable" and "cannot read /proc/15/maps" in row.detail


def test_exited_process_is_no_row(proc: FakeProc) -> None:
    assert inventory(proc).rows([424242], include_all=True) == []


@needs_libssl
def test_attached_only_when_a_tlscap_agent_holds_the_probes(proc: FakeProc) -> None:
    process(proc, 20, "nginx", "/usr/sbin/nginx", b"\x7fELF")
    lib = proc.place(20, "/usr/lib/libssl.so.3", LIBSSL)
    proc.map(20, "/usr/lib/libssl.so.3")
    proc.place(20, "/usr/lib/libcrypto.so.3", LIBCRYPTO)
    proc.map(20, "/usr/lib/libcrypto.so.3")
    proc.set(30, "cmdline", b"/usr/bin/python3\0-m\0agent\0run\0")
    proc.set(31, "cmdline", b"/usr/sbin/sslsniff-bpfcc\0")

    def probes(*pids: int) -> AttachedProbes:
        entries = [
            {"pid": pid, "fd": 5, "fd_type": kind, "filename": str(lib), "offset": 4096}
            for pid in pids
            for kind in ("uprobe", "uretprobe")
        ]
        entries.append({"pid": 30, "fd_type": "tracepoint", "tracepoint": "sys_enter_write"})
        return AttachedProbes.from_entries(entries)

    [row] = inventory(proc).process(20)
    assert (row.library, row.status) == ("openssl", "traceable")
    assert row.version and row.version[0].isdigit()  # from the libcrypto it maps
    assert "SSL_read_ex" in row.detail

    [row] = inventory(proc, probes(30)).process(20)
    assert (row.status, row.probed_by) == ("attached", [30])

    [row] = inventory(proc, probes(31)).process(20)
    assert (row.status, row.probed_by) == ("traceable", [31])
    assert "probed by another tool: pid 31" in format_table([row])


def test_probes_on_files_that_are_gone_are_ignored(tmp_path: Path) -> None:
    f = tmp_path / "lib.so"
    f.write_bytes(b"x")
    probes = AttachedProbes.from_entries([
        {"pid": 7, "fd_type": "uprobe", "filename": str(f)},
        {"pid": 8, "fd_type": "uprobe", "filename": str(tmp_path / "gone.so")},
    ])  # fmt: skip
    st = f.stat()
    assert probes.owners(st.st_dev, st.st_ino) == {7}


def test_missing_bpftool_is_an_error_not_an_exception() -> None:
    probes = AttachedProbes.from_bpftool("/nonexistent/bpftool")
    assert probes.error and "bpftool" in probes.error


def test_table_puts_the_reason_next_to_the_path() -> None:
    rows = [
        TargetRow(1, "curl", "openssl", "attached", "/usr/lib/libssl.so.3", "3.0.13"),
        TargetRow(2, "java", "java", "not traceable", "/jvm/libjvm.so", detail="JSSE"),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:5] == ["PID", "COMM", "LIBRARY", "VERSION", "STATUS"]
    assert lines[1].split() == [
        "1",
        "curl",
        "openssl",
        "3.0.13",
        "attached",
        "/usr/lib/libssl.so.3",
    ]
    assert lines[2].endswith("/jvm/libjvm.so: JSSE") and " - " in lines[2]


def test_unreadable_executable_is_a_row_with_the_reason(proc: FakeProc) -> None:
    process(proc, 16, "odd", "/app/odd", b"\x7fELF")
    exe = proc.root / "16" / "root" / "app" / "odd"
    exe.unlink()
    exe.mkdir()  # what the mapping names can no longer be read as a file
    row = only_row(proc, 16)
    assert row.status == "unreadable" and row.detail.startswith("cannot read the executable")
