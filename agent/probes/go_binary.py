"""What the Go crypto/tls probes need to know about one Go executable, read from the file.

Go programs carry their own TLS stack, so their plaintext is captured at
``crypto/tls.(*Conn).Write`` and ``(*Conn).Read``. This module answers, without running
anything from the file: is it Go, which Go (the register ABI of Go 1.17+ is what the
probes decode), where are those functions (``.symtab``, or the runtime's pclntab in
stripped binaries), where does each of them return (probes go on every RET: uretprobes
rewrite return addresses on goroutine stacks that Go may move, crashing the program),
and at which offsets the structs the probes walk keep their fields (DWARF when present).

Every Go binary on a node is examined, some of 100+ MB: reads are small ``os.pread``
calls bounds-checked against the file size (a truncated file is a ``GoBinaryError``,
never a SIGBUS from a mapping), and tables are searched with ``bytes.find``, not walked
object by object.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agent.probes import go_dwarf, go_pclntab
from agent.probes.elf_image import ElfImage
from agent.probes.elf_symbols import ElfError, find_symbol_values

__all__ = [
    "DEFAULT_OFFSETS",
    "GoBinaryError",
    "GoBinaryUnsupported",
    "GoFunction",
    "GoStructOffsets",
    "GoTlsTarget",
    "GoVersion",
    "analyze_go_tls",
    "check_supported",
    "find_go_functions",
    "find_return_addresses",
    "is_go_binary",
    "read_go_version",
    "read_struct_offsets",
]

log = logging.getLogger(__name__)

TLS_WRITE = "crypto/tls.(*Conn).Write"
TLS_READ = "crypto/tls.(*Conn).Read"
# Write's completion points follow its calls of this (agent/probes/go_write_completion.py).
TLS_WRITE_RECORD = "crypto/tls.(*Conn).writeRecordLocked"
TCPCONN_CLOSE = "net.(*TCPConn).Close"

GO_SECTIONS = frozenset({".go.buildinfo", ".note.go.buildid", *go_pclntab.SECTION_NAMES})
BUILDINFO_MAGIC = b"\xff Go buildinf:"
_BUILDINFO_INLINE = 0x2  # flags bit: version and modinfo follow the header inline
_BUILDINFO_BIG_ENDIAN = 0x1
_MAX_VERSION_LEN = 1024

_ET_DYN = 3
_MAX_FUNCTION_SIZE = 1 << 20  # Write/Read are ~2 KB; a huge size means a bad table

# struct -> members whose offsets the probes need (see GoStructOffsets).
_DWARF_MEMBERS = {
    "crypto/tls.Conn": ["conn"],
    "runtime.iface": ["data"],
    "net.TCPConn": ["conn"],
    "net.conn": ["fd"],
    "net.netFD": ["pfd"],
    "internal/poll.FD": ["Sysfd"],
}

_VERSION_RE = re.compile(r"(?:devel )?go(\d+)(?:\.(\d+))?(?:\.(\d+))?(?![\d.])")


class GoBinaryError(Exception):
    """The file cannot be probed as a Go TLS program (the message names path and reason)."""


class GoBinaryUnsupported(GoBinaryError):
    """A Go TLS program the probes would misread (another ABI or architecture): refused."""


@dataclass(frozen=True, order=True)
class GoVersion:
    major: int
    minor: int
    patch: int
    raw: str  # as the toolchain wrote it: "go1.19.8", "devel go1.28-abcdef ..."

    @classmethod
    def parse(cls, raw: str) -> GoVersion:
        """Parse a runtime.Version()-style string; ValueError when it is not one."""
        m = _VERSION_RE.match(raw.strip())
        if m is None:
            raise ValueError(f"not a Go version: {raw!r}")
        major, minor, patch = (int(g) if g else 0 for g in m.groups())
        return cls(major, minor, patch, raw.strip())

    @property
    def register_abi(self) -> bool:
        """Arguments in registers (amd64 since Go 1.17), which the probes decode."""
        return (self.major, self.minor) >= (1, 17)


@dataclass(frozen=True)
class GoFunction:
    name: str
    address: int  # ELF virtual address, as in the symbol table
    size: int


@dataclass(frozen=True)
class GoStructOffsets:
    tls_conn_conn: int  # crypto/tls.Conn.conn (a net.Conn interface value)
    iface_data: int  # the data word of an interface value
    tcpconn_fd: int  # net.TCPConn -> embedded net.conn -> fd (*net.netFD)
    netfd_sysfd: int  # net.netFD.pfd (internal/poll.FD) -> Sysfd
    source: str  # "dwarf" or "default"


# Unchanged from Go 1.9 to 1.27; used when the binary has no DWARF (built with -w).
DEFAULT_OFFSETS = GoStructOffsets(0, 8, 0, 16, "default")


@dataclass(frozen=True)
class GoTlsTarget:
    path: str
    version: GoVersion
    pie: bool  # ET_DYN: mapped at a different address in each process
    # The linker drops a method nothing calls: a program that only writes over TLS
    # has no Read, and is probed all the same.
    write: GoFunction | None
    read: GoFunction | None
    write_returns: tuple[int, ...]
    read_returns: tuple[int, ...]
    tcpconn_close: GoFunction | None  # verifies that a net.Conn's itab is *net.TCPConn's
    offsets: GoStructOffsets
    functions_from: str  # "symtab" or "pclntab"
    write_record: GoFunction | None = None  # (*Conn).writeRecordLocked, which Write calls


# -- public API -------------------------------------------------------------------------


def is_go_binary(path: str) -> bool:
    """True for an ELF file with a Go section (reads only the section headers)."""
    try:
        with ElfImage(path) as elf:
            return _is_go(elf)
    except ElfError:
        return False


def read_go_version(path: str) -> GoVersion | None:
    """The Go version the file was built with.

    None when it is not a Go binary (as is_go_binary judges: unreadable and non-ELF
    files included); GoBinaryError when it is one whose version cannot be read.
    """
    try:
        image = ElfImage(path)
    except ElfError:
        return None
    with _open(image) as elf:
        return _read_version(elf) if _is_go(elf) else None


def find_go_functions(
    path: str, names: Iterable[str], *, use_symtab: bool = True
) -> dict[str, GoFunction]:
    """The named functions the binary defines (missing names are absent)."""
    with _open(path) as elf:
        return _find_functions(elf, list(names), use_symtab)[0]


def find_return_addresses(path: str, fn: GoFunction) -> list[int]:
    """Virtual address of every RET instruction in ``fn``."""
    with _open(path) as elf:
        return _return_addresses(elf, fn)


def read_struct_offsets(path: str) -> GoStructOffsets:
    """Field offsets from the binary's DWARF; DEFAULT_OFFSETS when it has none.

    Never raises: the defaults hold for every Go release so far, so a DWARF problem
    only costs the cross-check.
    """
    try:
        found = go_dwarf.member_offsets(path, _DWARF_MEMBERS)
    except go_dwarf.NoDwarf:
        log.debug("%s: no DWARF; default Go struct offsets", path)
        return DEFAULT_OFFSETS
    except Exception as e:  # pyelftools raises many types on malformed DWARF
        log.warning("%s: unreadable DWARF (%s); default Go struct offsets", path, e)
        return DEFAULT_OFFSETS
    try:
        return GoStructOffsets(
            tls_conn_conn=found["crypto/tls.Conn"]["conn"],
            # An interface value is {itab, data} on every Go release; DWARF just confirms it.
            iface_data=found.get("runtime.iface", {}).get("data", DEFAULT_OFFSETS.iface_data),
            tcpconn_fd=found["net.TCPConn"]["conn"] + found["net.conn"]["fd"],
            netfd_sysfd=found["net.netFD"]["pfd"] + found["internal/poll.FD"]["Sysfd"],
            source="dwarf",
        )
    except KeyError as e:
        log.debug("%s: DWARF lacks %s; default Go struct offsets", path, e)
        return DEFAULT_OFFSETS


def check_supported(version: GoVersion, machine: str, path: str) -> None:
    """Raise GoBinaryError unless the probes can decode this binary's calls."""
    if machine != "amd64":
        raise GoBinaryUnsupported(f"Go TLS capture supports amd64 only; {path} is {machine}")
    if not version.register_abi:
        raise GoBinaryUnsupported(
            f"{path}: built with {version.raw}, whose stack-based ABI (Go < 1.17) is not "
            "supported: arguments would be misread"
        )


def analyze_go_tls(path: str) -> GoTlsTarget:
    """Everything the Go TLS probes need for ``path``; GoBinaryError says why not."""
    try:
        image = ElfImage(path)
    except ElfError as e:
        raise GoBinaryError(f"{path}: not a Go binary ({_reason(e, path)})") from e
    with _open(image) as elf:
        if not _is_go(elf):
            raise GoBinaryError(f"{path}: not a Go binary")
        version = _read_version(elf)
        check_supported(version, elf.machine, path)
        functions, source = _find_functions(
            elf, [TLS_WRITE, TLS_READ, TCPCONN_CLOSE, TLS_WRITE_RECORD], True
        )
        if TLS_WRITE not in functions and TLS_READ not in functions:
            raise GoBinaryError(f"{path}: no crypto/tls.(*Conn).Write/Read: does not use TLS")
        write, read = functions.get(TLS_WRITE), functions.get(TLS_READ)
        write_returns = tuple(_return_addresses(elf, write)) if write else ()
        read_returns = tuple(_return_addresses(elf, read)) if read else ()
        pie = elf.e_type == _ET_DYN
    return GoTlsTarget(
        path=path,
        version=version,
        pie=pie,
        write=write,
        read=read,
        write_returns=write_returns,
        read_returns=read_returns,
        tcpconn_close=functions.get(TCPCONN_CLOSE),
        offsets=read_struct_offsets(path),
        functions_from=source,
        write_record=functions.get(TLS_WRITE_RECORD),
    )


# -- the pieces -------------------------------------------------------------------------


@contextmanager
def _open(source: str | ElfImage) -> Iterator[ElfImage]:
    """The file as an ElfImage; its read errors and table errors become GoBinaryError."""
    try:
        with source if isinstance(source, ElfImage) else ElfImage(source) as elf:
            yield elf
    except (ElfError, go_pclntab.PclntabError) as e:
        raise GoBinaryError(str(e)) from e


def _is_go(elf: ElfImage) -> bool:
    return not GO_SECTIONS.isdisjoint(elf.sections)


def _reason(error: Exception, path: str) -> str:
    text = str(error)
    return text[len(path) + 2 :] if text.startswith(f"{path}: ") else text


def _read_version(elf: ElfImage) -> GoVersion:
    raw = _buildinfo_version(elf)
    if raw is None and elf.has_symtab:
        raw = _symbol_version(elf)
    if raw is None:
        raise GoBinaryError(f"{elf.path}: Go binary without a readable Go version")
    try:
        return GoVersion.parse(raw)
    except ValueError as e:
        raise GoBinaryError(f"{elf.path}: unrecognised Go version {raw!r}") from e


def _buildinfo_version(elf: ElfImage) -> str | None:
    section = elf.sections.get(".go.buildinfo")
    if section is None or section.size < 32:
        return None
    # The version comes first, so a short read suffices (modinfo can be many KB).
    data = elf.read(section.offset, min(section.size, 32 + 10 + _MAX_VERSION_LEN))
    if not data.startswith(BUILDINFO_MAGIC):
        return None
    ptr_size, flags = data[14], data[15]
    if flags & _BUILDINFO_INLINE:
        length, pos = _uvarint(data, 32)
        if length > _MAX_VERSION_LEN or pos + length > len(data):
            raise GoBinaryError(f"{elf.path}: malformed .go.buildinfo version")
        return data[pos : pos + length].decode(errors="replace")
    if ptr_size not in (4, 8):
        raise GoBinaryError(f"{elf.path}: .go.buildinfo has pointer size {ptr_size}")
    # Before Go 1.18: a pointer to the version's string header {data, len}.
    end = ">" if flags & _BUILDINFO_BIG_ENDIAN else "<"
    word = struct.Struct(end + ("I" if ptr_size == 4 else "Q"))
    header = word.unpack_from(data, 16)[0] or elf.relocated(section.addr + 16)
    return _go_string(elf, header, word) if header else None


def _symbol_version(elf: ElfImage) -> str | None:
    found = find_symbol_values(elf.path, ["runtime.buildVersion"], functions_only=False)
    if "runtime.buildVersion" not in found:
        return None
    return _go_string(elf, found["runtime.buildVersion"][0], elf.word)


def _go_string(elf: ElfImage, header_addr: int, word: struct.Struct) -> str | None:
    """The text of the Go string whose {data, len} header is at header_addr."""
    header = elf.read_vaddr(header_addr, 2 * word.size)
    data_ptr, length = word.unpack_from(header, 0)[0], word.unpack_from(header, word.size)[0]
    data_ptr = data_ptr or elf.relocated(header_addr)
    if not data_ptr or length > _MAX_VERSION_LEN:
        return None
    return elf.read_vaddr(data_ptr, length).decode(errors="replace")


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        value |= (data[i] & 0x7F) << shift
        if data[i] < 0x80:
            return value, i + 1
        shift += 7
    raise GoBinaryError("malformed varint in .go.buildinfo")


def _find_functions(
    elf: ElfImage, names: list[str], use_symtab: bool
) -> tuple[dict[str, GoFunction], str]:
    if use_symtab and elf.has_symtab:
        values = find_symbol_values(elf.path, names)
        if values:  # else: a foreign .symtab (say, a C wrapper's); pclntab knows Go's
            return {n: GoFunction(n, addr, size) for n, (addr, size) in values.items()}, "symtab"
    table = go_pclntab.locate(elf)
    if table is None:
        if use_symtab and elf.has_symtab:
            return {}, "symtab"
        raise GoBinaryError(f"{elf.path}: no .symtab and no Go pclntab to find functions in")
    found = go_pclntab.find_functions(elf, table, names)
    return {n: GoFunction(n, addr, size) for n, (addr, size) in found.items()}, "pclntab"


def _return_addresses(elf: ElfImage, fn: GoFunction) -> list[int]:
    import capstone  # imported here: only Go targets need it

    if elf.machine != "amd64":
        raise GoBinaryError(f"{elf.path}: RET search supports amd64 only, not {elf.machine}")
    if not 0 < fn.size <= _MAX_FUNCTION_SIZE:
        raise GoBinaryError(f"{elf.path}: {fn.name} has implausible size {fn.size}")
    code = elf.read_vaddr(fn.address, fn.size)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    returns = []
    offset = 0
    while offset < len(code):
        decoded_to = offset
        for address, size, mnemonic, _ in md.disasm_lite(code[offset:], fn.address + offset):
            if mnemonic.rsplit(" ", 1)[-1] in ("ret", "retn"):  # also "bnd ret"
                returns.append(address)
            decoded_to = address + size - fn.address
        # Capstone stops at bytes it cannot decode; step over one and resume.
        offset = decoded_to if decoded_to >= len(code) else max(decoded_to, offset) + 1
    if not returns:
        raise GoBinaryError(f"{elf.path}: no RET instruction in {fn.name} at {fn.address:#x}")
    return returns
