"""Which functions an ELF file defines, answered fast enough to ask of every mapped file.

Target discovery asks "does this file define SSL_write?" of every distinct executable
mapping on a node, including binaries of 100+ MB with 150k+ symbols. pyelftools builds a
Python object per symbol (seconds on such files), so it is used only for the file and
section headers; the symbol lookups read the raw tables with ``os.pread`` and ``struct``:

* ``.dynsym`` through its GNU or SysV hash table: a handful of small reads per name.
* ``.symtab`` (and a ``.dynsym`` without a hash table) by a bulk byte search: find the
  name's offsets in the string table, then the symbol entries whose ``st_name`` is one
  of those offsets — both searches run in C (``bytes.find``), not per symbol in Python.

``pread`` rather than ``mmap``: a file truncated while mapped would kill the agent with
SIGBUS; a short ``pread`` is just an ``ElfError``.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from elftools.common.utils import struct_parse
from elftools.elf.elffile import ELFFile

__all__ = ["ElfError", "find_symbol_values", "find_symbols", "is_elf", "open_regular"]

ELF_MAGIC = b"\x7fELF"

_STT_FUNC = 2
_SHN_UNDEF = 0
# A corrupt chain must not spin forever; real chains are a few entries long.
_MAX_CHAIN_STEPS = 1 << 20


class ElfError(Exception):
    """The file is not a readable, well-formed ELF file (message names the path)."""


def is_elf(path: str) -> bool:
    """True when ``path`` is a regular file starting with the ELF magic bytes."""
    try:
        with open_regular(path) as f:
            return f.read(4) == ELF_MAGIC
    except (OSError, ElfError):
        return False


def find_symbols(path: str, names: Iterable[str]) -> set[str]:
    """Return the subset of ``names`` that ``path`` defines as functions.

    A name counts when a ``.dynsym`` or ``.symtab`` entry has that exact name, type
    ``STT_FUNC`` and a section index other than ``SHN_UNDEF`` (so imports don't count).
    Raises ``ElfError`` for unreadable, non-ELF or truncated files.
    """
    wanted = {name.encode(): name for name in names}
    if not wanted:
        return set()
    try:
        with open_regular(path) as f:
            if f.read(4) != ELF_MAGIC:
                raise ElfError(f"{path}: not an ELF file")
            found = _Reader(path, f).find(set(wanted))
    except OSError as e:
        raise ElfError(f"{path}: {e.strerror or e}") from e
    return {wanted[name] for name in found}


def find_symbol_values(
    path: str, names: Iterable[str], *, functions_only: bool = True
) -> dict[str, tuple[int, int]]:
    """``{name: (st_value, st_size)}`` for each of ``names`` that ``path`` defines.

    Searches ``.symtab`` first, then a ``.dynsym`` whose size the section headers give.
    With ``functions_only`` a symbol must be ``STT_FUNC`` (as in ``find_symbols``);
    without, any defined symbol counts (data such as Go's ``runtime.buildVersion``).
    Raises ``ElfError`` for unreadable, non-ELF or truncated files.
    """
    wanted = {name.encode(): name for name in names}
    if not wanted:
        return {}
    try:
        with open_regular(path) as f:
            if f.read(4) != ELF_MAGIC:
                raise ElfError(f"{path}: not an ELF file")
            found = _Reader(path, f).values(set(wanted), functions_only)
    except OSError as e:
        raise ElfError(f"{path}: {e.strerror or e}") from e
    return {wanted[name]: value for name, value in found.items()}


def open_regular(path: str) -> BinaryIO:
    """Open a regular file for reading (ElfError for anything else: FIFOs, devices)."""
    # O_NONBLOCK so a FIFO at the path can't hang the scanner on open().
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ElfError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class _SymbolTable:
    sym_off: int
    sym_count: int | None  # None when only the dynamic segment locates the table
    str_off: int
    str_size: int | None
    gnu_hash_off: int | None = None
    sysv_hash_off: int | None = None


class _Reader:
    def __init__(self, path: str, f: BinaryIO) -> None:
        self.path = path
        self._fd = f.fileno()
        self._size = os.fstat(self._fd).st_size
        if self._size < 52:  # the smallest (ELF32) file header
            raise ElfError(f"{path}: truncated ({self._size} bytes, shorter than an ELF header)")
        try:
            self._elf = ELFFile(f)
            self._is64 = self._elf.elfclass == 64
            little = self._elf.little_endian
        except Exception as e:  # pyelftools/construct raise many types on bad input
            raise ElfError(f"{path}: bad ELF header: {e}") from e
        end = "<" if little else ">"
        self._hash_header = struct.Struct(end + "4I")  # GNU: nbuckets, symoffset, bloom
        self._sysv_header = struct.Struct(end + "2I")  # SysV: nbucket, nchain
        self._u32 = struct.Struct(end + "I")
        self._word = struct.Struct(end + ("Q" if self._is64 else "I"))  # GNU bloom word
        if self._is64:  # st_name, st_info, st_other, st_shndx, st_value, st_size
            self._sym = struct.Struct(end + "IBBHQQ")
        else:  # st_name, st_value, st_size, st_info, st_other, st_shndx
            self._sym = struct.Struct(end + "IIIBBH")

    # -- lookup ---------------------------------------------------------------------------

    def find(self, names: set[bytes]) -> set[bytes]:
        dynsym, symtab = self._tables()
        found: set[bytes] = set()
        if dynsym is not None:
            found |= self._lookup_dynsym(dynsym, names)
        if symtab is not None and found != names:
            found |= set(self._scan(symtab, names - found))
        return found

    def values(self, names: set[bytes], functions_only: bool) -> dict[bytes, tuple[int, int]]:
        dynsym, symtab = self._tables()
        found: dict[bytes, tuple[int, int]] = {}
        for table in (symtab, dynsym):
            if table is None or table.sym_count is None or table.str_size is None:
                continue
            entries = self._scan(table, names - found.keys(), functions_only)
            for name, raw in entries.items():
                found[name] = self._value_size(raw)
        return found

    def _lookup_dynsym(self, table: _SymbolTable, names: set[bytes]) -> set[bytes]:
        if table.gnu_hash_off is not None:
            return {n for n in names if self._gnu_lookup(table, n)}
        if table.sysv_hash_off is not None:
            return {n for n in names if self._sysv_lookup(table, n)}
        if table.sym_count is not None and table.str_size is not None:
            return set(self._scan(table, names))
        return set()  # no hash and no section headers: the table's length is unknowable

    def _gnu_lookup(self, table: _SymbolTable, name: bytes) -> bool:
        off = table.gnu_hash_off
        assert off is not None
        nbuckets, symoffset, bloom_size, bloom_shift = self._hash_header.unpack(self._read(off, 16))
        if nbuckets == 0 or bloom_size == 0:
            return False
        h = _gnu_hash(name)
        bits = self._word.size * 8
        bloom_off = off + 16
        word_off = bloom_off + ((h // bits) % bloom_size) * self._word.size
        (word,) = self._word.unpack(self._read(word_off, self._word.size))
        mask = (1 << (h % bits)) | (1 << ((h >> bloom_shift) % bits))
        if word & mask != mask:
            return False
        buckets_off = bloom_off + bloom_size * self._word.size
        chain_off = buckets_off + nbuckets * 4
        idx = self._read_u32(buckets_off + (h % nbuckets) * 4)
        if idx < symoffset:
            return False
        for _ in range(_MAX_CHAIN_STEPS):
            chain_hash = self._read_u32(chain_off + (idx - symoffset) * 4)
            if (chain_hash | 1) == (h | 1) and self._is_defined_func(table, idx, name):
                return True
            if chain_hash & 1:  # low bit marks the end of this bucket's chain
                return False
            idx += 1
        raise ElfError(f"{self.path}: GNU hash chain does not terminate")

    def _sysv_lookup(self, table: _SymbolTable, name: bytes) -> bool:
        off = table.sysv_hash_off
        assert off is not None
        nbucket, nchain = self._sysv_header.unpack(self._read(off, 8))
        if nbucket == 0:
            return False
        chain_off = off + 8 + nbucket * 4
        idx = self._read_u32(off + 8 + (_sysv_hash(name) % nbucket) * 4)
        for _ in range(min(nchain, _MAX_CHAIN_STEPS) + 1):
            if idx == 0:  # STN_UNDEF ends the chain
                return False
            if self._is_defined_func(table, idx, name):
                return True
            idx = self._read_u32(chain_off + idx * 4)
        raise ElfError(f"{self.path}: SysV hash chain does not terminate")

    def _is_defined_func(self, table: _SymbolTable, idx: int, name: bytes) -> bool:
        raw = self._read(table.sym_off + idx * self._sym.size, self._sym.size)
        st_name, st_info, st_shndx = self._symbol(raw)
        if st_info & 0xF != _STT_FUNC or st_shndx == _SHN_UNDEF:
            return False
        # Reading len+1 bytes is enough to tell "exactly this name" from a longer one.
        return self._read_upto(table.str_off + st_name, len(name) + 1) == name + b"\0"

    def _scan(
        self, table: _SymbolTable, names: set[bytes], functions_only: bool = True
    ) -> dict[bytes, bytes]:
        """name -> the raw entry of the first symbol defining it."""
        assert table.sym_count is not None and table.str_size is not None
        strings = self._read(table.str_off, table.str_size)
        # Every string-table offset at which a wanted name starts; linkers merge string
        # tails, so a name can also start inside a longer string.
        offsets: dict[int, bytes] = {}
        for name in names:
            needle = name + b"\0"
            pos = strings.find(needle)
            while pos >= 0:
                offsets[pos] = name
                pos = strings.find(needle, pos + 1)
        if not offsets:
            return {}
        entsize = self._sym.size
        symbols = self._read(table.sym_off, table.sym_count * entsize)
        found: dict[bytes, bytes] = {}
        for str_off, name in offsets.items():
            if name in found:
                continue
            needle = self._u32.pack(str_off)
            pos = symbols.find(needle)
            while pos >= 0:
                rem = pos % entsize
                if rem:  # a match inside another field; st_name starts every entry
                    pos = symbols.find(needle, pos + entsize - rem)
                    continue
                raw = symbols[pos : pos + entsize]
                _, st_info, st_shndx = self._symbol(raw)
                is_func = st_info & 0xF == _STT_FUNC
                if st_shndx != _SHN_UNDEF and (is_func or not functions_only):
                    found[name] = raw
                    break
                pos = symbols.find(needle, pos + entsize)
        return found

    # -- locating the tables --------------------------------------------------------------

    def _tables(self) -> tuple[_SymbolTable | None, _SymbolTable | None]:
        try:
            headers = self._section_headers()
            if not headers:
                return self._dynamic_segment_table(), None
            return self._section_tables(headers)
        except ElfError:
            raise
        except Exception as e:  # pyelftools/construct raise many types on bad input
            raise ElfError(f"{self.path}: malformed ELF headers: {e}") from e

    def _section_headers(self) -> list:
        elf = self._elf
        count = elf.num_sections()
        shoff, shentsize = elf.header["e_shoff"], elf.header["e_shentsize"]
        if count and shoff + count * shentsize > self._size:
            raise ElfError(f"{self.path}: truncated (section headers past end of file)")
        # struct_parse per header, not elf.iter_sections(): building Section objects
        # parses whole hash tables with construct (tens of ms on big libraries).
        shdr = elf.structs.Elf_Shdr
        return [struct_parse(shdr, elf.stream, shoff + i * shentsize) for i in range(count)]

    def _section_tables(self, headers: list) -> tuple[_SymbolTable | None, _SymbolTable | None]:
        hashes: dict[int, dict[str, int]] = {}
        for h in headers:
            if h["sh_type"] in ("SHT_GNU_HASH", "SHT_HASH") and h["sh_link"] < len(headers):
                hashes.setdefault(h["sh_link"], {})[h["sh_type"]] = h["sh_offset"]
        dynsym = symtab = None
        for idx, h in enumerate(headers):
            if h["sh_type"] not in ("SHT_DYNSYM", "SHT_SYMTAB"):
                continue
            if h["sh_entsize"] != self._sym.size or h["sh_link"] >= len(headers):
                raise ElfError(f"{self.path}: malformed symbol table section {idx}")
            strtab = headers[h["sh_link"]]
            self._check_range(h["sh_offset"], h["sh_size"])
            self._check_range(strtab["sh_offset"], strtab["sh_size"])
            table = _SymbolTable(
                sym_off=h["sh_offset"],
                sym_count=h["sh_size"] // self._sym.size,
                str_off=strtab["sh_offset"],
                str_size=strtab["sh_size"],
                gnu_hash_off=hashes.get(idx, {}).get("SHT_GNU_HASH"),
                sysv_hash_off=hashes.get(idx, {}).get("SHT_HASH"),
            )
            if h["sh_type"] == "SHT_DYNSYM":
                dynsym = table
            else:
                symtab = table
        return dynsym, symtab

    def _dynamic_segment_table(self) -> _SymbolTable | None:
        # Section headers are optional at run time (sstrip'ed binaries drop them); the
        # dynamic segment still locates .dynsym and its hash tables for the loader.
        header = self._elf.header
        self._check_range(header["e_phoff"], header["e_phnum"] * header["e_phentsize"])
        for seg in self._elf.iter_segments():
            if seg["p_type"] != "PT_DYNAMIC":
                continue
            self._check_range(seg["p_offset"], seg["p_filesz"])
            _, sym_off = seg.get_table_offset("DT_SYMTAB")
            _, str_off = seg.get_table_offset("DT_STRTAB")
            _, gnu_off = seg.get_table_offset("DT_GNU_HASH")
            _, sysv_off = seg.get_table_offset("DT_HASH")
            if sym_off is None or str_off is None:
                return None
            str_size = next((t["d_val"] for t in seg.iter_tags("DT_STRSZ")), None)
            return _SymbolTable(sym_off, None, str_off, str_size, gnu_off, sysv_off)
        return None

    # -- raw reads ------------------------------------------------------------------------

    def _symbol(self, raw: bytes) -> tuple[int, int, int]:
        """(st_name, st_info, st_shndx) of one raw symbol entry."""
        fields = self._sym.unpack(raw)
        if self._is64:
            return fields[0], fields[1], fields[3]
        return fields[0], fields[3], fields[5]

    def _value_size(self, raw: bytes) -> tuple[int, int]:
        """(st_value, st_size) of one raw symbol entry."""
        fields = self._sym.unpack(raw)
        if self._is64:
            return fields[4], fields[5]
        return fields[1], fields[2]

    def _check_range(self, off: int, size: int) -> None:
        if off + size > self._size:
            raise ElfError(f"{self.path}: truncated (table at {off:#x}+{size:#x} past end)")

    def _read(self, off: int, size: int) -> bytes:
        data = self._read_upto(off, size)
        if len(data) != size:
            raise ElfError(f"{self.path}: truncated (read at {off:#x} past end of file)")
        return data

    def _read_upto(self, off: int, size: int) -> bytes:
        if off < 0 or off > self._size:
            raise ElfError(f"{self.path}: truncated (offset {off:#x} past end of file)")
        return os.pread(self._fd, size, off)

    def _read_u32(self, off: int) -> int:
        return self._u32.unpack(self._read(off, 4))[0]


def _gnu_hash(name: bytes) -> int:
    h = 5381
    for c in name:
        h = (h * 33 + c) & 0xFFFFFFFF
    return h


def _sysv_hash(name: bytes) -> int:
    h = 0
    for c in name:
        h = (h << 4) + c
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h
