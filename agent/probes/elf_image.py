"""An ELF file's headers, and reads by file offset or virtual address, all with ``pread``.

For code that must look at arbitrary executables on a node (Go binaries of 100+ MB
among them): only the headers are parsed up front; everything else is read on demand,
each read checked against the file size, so a truncated or shrinking file raises
``ElfError`` instead of killing the agent with SIGBUS as a mapping would.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from agent.probes.elf_symbols import ELF_MAGIC, ElfError, open_regular

__all__ = ["ElfImage", "Section"]

SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_RELA = 4
SHT_NOBITS = 8
SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
_PT_LOAD = 1
_EM_X86_64 = 62
_R_X86_64_RELATIVE = 8
_RELA64 = struct.Struct("<QQq")  # r_offset, r_info, r_addend
# GOARCH-style names: the Go code that refuses other machines speaks the user's language.
_MACHINES = {3: "386", 8: "mips", 21: "ppc64", 22: "s390x", 40: "arm", 62: "amd64",
             183: "arm64", 243: "riscv64", 258: "loong64"}  # fmt: skip


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    entsize: int


class ElfImage:
    """One open ELF file. Use as a context manager; raises ElfError (naming the path)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._rela_tables: list[bytes] | None = None
        try:
            self._file = open_regular(path)
        except OSError as e:
            raise ElfError(f"{path}: {e.strerror or e}") from e
        self._fd = self._file.fileno()
        try:
            self.size = os.fstat(self._fd).st_size
            self._parse_headers()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> ElfImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    # -- headers ----------------------------------------------------------------------

    def _parse_headers(self) -> None:
        ident = self.read(0, 16) if self.size >= 16 else b""
        if ident[:4] != ELF_MAGIC or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise ElfError(f"{self.path}: not an ELF file")
        self.is64, self.little_endian = ident[4] == 2, ident[5] == 1
        end = "<" if self.little_endian else ">"
        self.word = struct.Struct(end + ("Q" if self.is64 else "I"))
        if self.is64:
            ehdr, shdr, phdr = "HHIQQQIHHHHHH", "IIQQQQIIQQ", "IIQQQQQQ"
        else:
            ehdr, shdr, phdr = "HHIIIIIHHHHHH", "IIIIIIIIII", "IIIIIIII"
        ehdr_s = struct.Struct(end + ehdr)
        if self.size < 16 + ehdr_s.size:
            raise ElfError(f"{self.path}: truncated (shorter than an ELF header)")
        (self.e_type, self.e_machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize,
         shnum, shstrndx) = ehdr_s.unpack(self.read(16, ehdr_s.size))  # fmt: skip
        self.machine = _MACHINES.get(self.e_machine, f"ELF machine {self.e_machine}")
        if self.e_machine == _EM_X86_64 and not self.is64:
            self.machine = "x32"
        elif self.e_machine == 21 and self.little_endian:
            self.machine = "ppc64le"

        self.loads: list[tuple[int, int, int]] = []  # PT_LOAD (vaddr, offset, filesz)
        phdr_s = struct.Struct(end + phdr)
        if phnum and phentsize >= phdr_s.size:
            table = self.read(phoff, phnum * phentsize)
            for i in range(phnum):
                f = phdr_s.unpack_from(table, i * phentsize)
                if f[0] != _PT_LOAD:
                    continue
                if self.is64:  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz
                    self.loads.append((f[3], f[2], f[5]))
                else:  # p_type, p_offset, p_vaddr, p_paddr, p_filesz
                    self.loads.append((f[2], f[1], f[4]))

        self.sections: dict[str, Section] = {}  # the first section of each name
        self.has_symtab = False
        shdr_s = struct.Struct(end + shdr)
        if not shnum or shentsize < shdr_s.size:
            return  # section headers are optional at run time
        table = self.read(shoff, shnum * shentsize)
        headers = [shdr_s.unpack_from(table, i * shentsize) for i in range(shnum)]
        if shstrndx >= shnum:
            raise ElfError(f"{self.path}: section name table index {shstrndx} out of range")
        names = self.read(headers[shstrndx][4], min(headers[shstrndx][5], 1 << 20))
        for h in headers:
            name_end = names.find(b"\0", h[0])
            name = names[h[0] : name_end].decode(errors="replace") if name_end >= 0 else ""
            self.sections.setdefault(name, Section(name, h[1], h[2], h[3], h[4], h[5], h[9]))
            self.has_symtab |= h[1] == SHT_SYMTAB

    def data_sections(self, *, writable: bool) -> list[Section]:
        """Allocated, file-backed, non-code sections (writable or read-only ones)."""
        return [
            s
            for s in self.sections.values()
            if s.type == SHT_PROGBITS
            and s.flags & SHF_ALLOC
            and not s.flags & SHF_EXECINSTR
            and bool(s.flags & SHF_WRITE) == writable
        ]

    # -- reads ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ElfError(f"{self.path}: truncated (read at {offset:#x}+{size:#x})")
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as e:  # EIO from a failing disk or a vanished network mount
            raise ElfError(f"{self.path}: {e.strerror or e}") from e
        if len(data) != size:  # the file shrank under us
            raise ElfError(f"{self.path}: truncated (short read at {offset:#x})")
        return data

    def read_section(self, section: Section) -> bytes:
        return self.read(section.offset, section.size)

    def read_vaddr(self, vaddr: int, size: int) -> bytes:
        for start, offset, filesz in self.loads:
            if start <= vaddr and vaddr + size <= start + filesz:
                return self.read(offset + vaddr - start, size)
        for s in self.sections.values():  # files without program headers
            in_section = s.addr <= vaddr and vaddr + size <= s.addr + s.size
            if in_section and s.flags & SHF_ALLOC and s.type != SHT_NOBITS:
                return self.read(s.offset + vaddr - s.addr, size)
        raise ElfError(f"{self.path}: address {vaddr:#x}+{size:#x} is not in the file")

    def pointer_at(self, vaddr: int) -> int:
        """The pointer stored at vaddr, with its relocation applied when the file holds 0."""
        value = self.word.unpack(self.read_vaddr(vaddr, self.word.size))[0]
        return value or self.relocated(vaddr)

    # -- relative relocations (position-independent executables) ----------------------

    def relocated(self, vaddr: int) -> int:
        """What an R_X86_64_RELATIVE relocation stores at vaddr; 0 when there is none."""
        needle = struct.pack("<QQ", vaddr, _R_X86_64_RELATIVE)
        for table in self._relas():
            pos = _aligned_find(table, needle, 0, _RELA64.size)
            if pos is not None:
                return _RELA64.unpack_from(table, pos)[2]
        return 0

    def pointer_locations(self, value: int) -> Iterator[int]:
        """Addresses of the aligned pointers to ``value`` in writable data, stored in the
        file or by a relative relocation."""
        needle = self.word.pack(value)
        for s in self.data_sections(writable=True):
            data = self.read_section(s)
            pos = data.find(needle)
            while pos >= 0:
                if (s.addr + pos) % self.word.size == 0:
                    yield s.addr + pos
                pos = data.find(needle, pos + 1)
        reloc = struct.pack("<Qq", _R_X86_64_RELATIVE, value)
        for table in self._relas():
            pos = table.find(reloc)
            while pos >= 0:
                if pos % _RELA64.size == 8:  # r_info, r_addend follow r_offset
                    yield _RELA64.unpack_from(table, pos - 8)[0]
                pos = table.find(reloc, pos + 1)

    def _relas(self) -> list[bytes]:
        if self._rela_tables is None:
            self._rela_tables = []
            if self.e_machine == _EM_X86_64 and self.is64 and self.little_endian:
                self._rela_tables = [
                    self.read_section(s)
                    for s in self.sections.values()
                    if s.type == SHT_RELA and s.flags & SHF_ALLOC and s.entsize == _RELA64.size
                ]
        return self._rela_tables


def _aligned_find(data: bytes, needle: bytes, at: int, align: int) -> int | None:
    """Offset of the first occurrence of needle at ``at`` modulo ``align``."""
    pos = data.find(needle)
    while pos >= 0:
        if pos % align == at:
            return pos
        pos = data.find(needle, pos + 1)
    return None
