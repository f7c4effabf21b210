"""Find functions by name in a Go binary's pclntab (the runtime's own function table).

Go keeps ``.gopclntab`` in every executable, also in those linked with ``-s -w`` that
have no ``.symtab``: the runtime needs it for stack traces and garbage collection. Its
layout changed in Go 1.2, 1.16, 1.18 and 1.20 (the magic number tells which):

* a function table (``functab``): ``nfunc`` pairs ``(entry, funcoff)`` sorted by entry,
  followed by the end address of the last function, so a function's size is the next
  entry minus its own;
* ``funcoff`` locates the function's ``_func`` record, which starts with the entry
  again and then ``nameOff``, an offset into the function name table.

Tables of 200k+ functions are common (kubelet), so no loop runs per function in Python:
the name is found in the name table with ``bytes.find``, then the ``_func`` records
holding that name offset with ``bytes.find``, then the ``functab`` pair pointing at that
record with ``bytes.find``. Each candidate is verified, so a false hit in unrelated data
only costs another search.

Go 1.18+ counts function entries from the text start, which newer Go no longer stores in
the header; like the runtime, we then take it from ``runtime.moduledata``, found by its
pointer to the table (``.text``'s start is wrong when a C linker put code first).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from agent.probes.elf_image import ElfImage
from agent.probes.elf_symbols import ElfError

__all__ = ["Pclntab", "PclntabError", "find_functions", "locate"]

MAGIC_GO12 = 0xFFFFFFFB  # Go 1.2 - 1.15
MAGIC_GO116 = 0xFFFFFFFA  # Go 1.16 - 1.17
MAGIC_GO118 = 0xFFFFFFF0  # Go 1.18 - 1.19
MAGIC_GO120 = 0xFFFFFFF1  # Go 1.20 and later
SECTION_NAMES = (".gopclntab", ".data.rel.ro.gopclntab")  # the latter: Go's own PIE link

# Real tables hold a few hits per name; corrupt ones must not make us search forever.
_MAX_HITS = 4096
_MAX_CANDIDATES = 32
# runtime.moduledata (Go 1.16+): pcHeader, six slices, findfunctab, then these words.
_MODULEDATA_FUNCNAMETAB = 1
_MODULEDATA_MINPC, _MODULEDATA_MAXPC, _MODULEDATA_TEXT = 20, 21, 22


class PclntabError(Exception):
    """The table is missing or malformed (the message names the path)."""


@dataclass(frozen=True)
class Pclntab:
    addr: int  # virtual address of the table's header
    offset: int  # file offset of the header
    size: int  # bytes available from the header on (the section's remainder)


@dataclass(frozen=True)
class _Layout:
    ptr_size: int
    nfunc: int
    field: int  # size of each functab field: 4 (Go 1.18+) or the pointer size
    functab_off: int  # table offset of the functab
    funcdata_base: int  # funcoff values are relative to this table offset
    names_off: int  # nameOff values are relative to this table offset
    names_end: int
    name_field: int  # offset of nameOff inside a _func record
    entry_base: int | None  # added to functab entries; None: find the text start


def locate(image: ElfImage) -> Pclntab | None:
    """The pclntab of a Go binary; None when there is none."""
    for name in SECTION_NAMES:
        section = image.sections.get(name)
        if section is not None:
            if section.offset + section.size > image.size:
                raise PclntabError(f"{image.path}: truncated ({name} past end of file)")
            return Pclntab(section.addr, section.offset, section.size)
    # External linkers merge the table into .data.rel.ro (Go 1.18+ PIE binaries built
    # with cgo and -s -w): find its header, and trust it only if a moduledata points at it.
    end = "<" if image.little_endian else ">"
    needles = [struct.pack(end + "I", m) + b"\0\0" for m in (MAGIC_GO120, MAGIC_GO118)]
    for section in image.data_sections(writable=True) + image.data_sections(writable=False):
        data = image.read_section(section)
        for needle in needles:
            pos = data.find(needle)
            for _ in range(_MAX_CANDIDATES):
                if pos < 0:
                    break
                if _is_header_at(image, data, pos, section.addr + pos):
                    return Pclntab(section.addr + pos, section.offset + pos, section.size - pos)
                pos = data.find(needle, pos + 1)
    return None


def _is_header_at(image: ElfImage, data: bytes, pos: int, addr: int) -> bool:
    if len(data) < pos + 8 or data[pos + 6] not in (1, 2, 4) or data[pos + 7] not in (4, 8):
        return False  # instruction quantum, pointer size
    return addr % data[pos + 7] == 0 and next(image.pointer_locations(addr), None) is not None


def find_functions(
    image: ElfImage, table: Pclntab, names: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """``{name: (virtual address, size)}`` for each of ``names`` the table holds."""
    try:
        return _find_functions(image, table, names)
    except ElfError as e:
        raise PclntabError(str(e)) from e
    except struct.error as e:
        raise PclntabError(f"{image.path}: corrupt Go pclntab: {e}") from e


def _find_functions(
    image: ElfImage, table: Pclntab, names: Iterable[str]
) -> dict[str, tuple[int, int]]:
    def read(off: int, size: int) -> bytes:
        if off < 0 or size < 0 or off + size > table.size:
            raise PclntabError(f"{image.path}: corrupt Go pclntab (read at {off:#x}+{size:#x})")
        return image.read(table.offset + off, size)

    end = "<" if image.little_endian else ">"
    layout = _layout(image.path, read, table, end)
    word = struct.Struct(end + ("I" if layout.field == 4 else "Q"))
    functab_size = (layout.nfunc * 2 + 1) * layout.field
    if layout.functab_off + functab_size > table.size:
        raise PclntabError(f"{image.path}: Go pclntab function table runs past its section")
    names_data = read(layout.names_off, layout.names_end - layout.names_off)
    # The functab and the _func records share one read: Go puts them together at the end.
    funcdata_off = min(layout.funcdata_base, layout.functab_off)
    funcdata = read(funcdata_off, table.size - funcdata_off)
    start = layout.functab_off - funcdata_off
    functab = funcdata[start : start + functab_size]
    if layout.entry_base is None:
        first = word.unpack_from(functab, 0)[0]
        last = word.unpack_from(functab, layout.nfunc * 2 * layout.field)[0]
        layout = replace(layout, entry_base=_text_start(image, table, layout, first, last))

    tables = _Tables(image.path, layout, word, end, functab, names_data, funcdata, funcdata_off)
    found = {}
    for name in names:
        hit = tables.find(name.encode())
        if hit is not None:
            found[name] = hit
    return found


def _layout(path: str, read: Callable[[int, int], bytes], table: Pclntab, end: str) -> _Layout:
    if table.size < 16:
        raise PclntabError(f"{path}: Go pclntab of {table.size} bytes is too short")
    magic, pad1, pad2, min_lc, ptr_size = struct.unpack(end + "IBBBB", read(0, 8))
    if pad1 or pad2 or min_lc not in (1, 2, 4) or ptr_size not in (4, 8):
        raise PclntabError(f"{path}: bad Go pclntab header")
    ptr = struct.Struct(end + ("I" if ptr_size == 4 else "Q"))

    def header_word(index: int) -> int:
        return ptr.unpack(read(8 + index * ptr_size, ptr_size))[0]

    nfunc = header_word(0)
    if magic == MAGIC_GO12:
        # functab follows the header; offsets are from the table start.
        return _Layout(ptr_size, nfunc, ptr_size, 8 + ptr_size, 0, 0, table.size, ptr_size, 0)
    if magic == MAGIC_GO116:
        # nfunc, nfiles, funcnameOffset, cuOffset, filetabOffset, pctabOffset, pclnOffset
        names_off, names_end, pcln_off = header_word(2), header_word(3), header_word(6)
        layout = _Layout(ptr_size, nfunc, ptr_size, pcln_off, pcln_off, names_off, names_end,
                         ptr_size, 0)  # fmt: skip
    elif magic in (MAGIC_GO118, MAGIC_GO120):
        # nfunc, nfiles, textStart, funcnameOffset, cuOffset, filetabOffset, pctabOffset,
        # pclnOffset; functab entries are 32-bit offsets from the text start.
        text_start = header_word(2) or None  # None: not stored (see _text_start)
        names_off, names_end, pcln_off = header_word(3), header_word(4), header_word(7)
        layout = _Layout(ptr_size, nfunc, 4, pcln_off, pcln_off, names_off, names_end, 4,
                         text_start)  # fmt: skip
    else:
        raise PclntabError(f"{path}: unknown Go pclntab magic {magic:#x}")
    if not 0 < layout.names_off <= layout.names_end <= table.size:
        raise PclntabError(f"{path}: Go pclntab name table lies outside its section")
    if not 0 < layout.functab_off < table.size:
        raise PclntabError(f"{path}: Go pclntab function table lies outside its section")
    return layout


def _text_start(image: ElfImage, table: Pclntab, layout: _Layout, first: int, last: int) -> int:
    """Where the functab's entry offsets count from, when the header does not say.

    Go 1.18+ stored it in the header (as a relocation in PIE binaries); newer Go stores 0
    there, and the runtime reads it from its moduledata, as we do. The .text section's
    start is not it: with external linking (cgo), C code comes first.
    """
    relocated = image.relocated(table.addr + 8 + 2 * layout.ptr_size)
    if relocated:
        return relocated
    ps = layout.ptr_size
    for md in itertools.islice(image.pointer_locations(table.addr), _MAX_CANDIDATES):
        try:
            if image.pointer_at(md + _MODULEDATA_FUNCNAMETAB * ps) != table.addr + layout.names_off:
                continue
            minpc = image.pointer_at(md + _MODULEDATA_MINPC * ps)
            maxpc = image.pointer_at(md + _MODULEDATA_MAXPC * ps)
            text = image.pointer_at(md + _MODULEDATA_TEXT * ps)
        except ElfError:
            continue
        # minpc/maxpc are the first entry and the end: both confirm the text field.
        if minpc - text == first and maxpc - text == last:
            return text
    raise PclntabError(f"{image.path}: cannot find the Go text start (no matching moduledata)")


@dataclass(frozen=True)
class _Tables:
    path: str
    layout: _Layout
    word: struct.Struct  # one functab field
    end: str
    functab: bytes
    names: bytes
    funcdata: bytes  # from funcdata_off to the end of the table
    funcdata_off: int

    def find(self, name: bytes) -> tuple[int, int] | None:
        needle = name + b"\0"
        pos = self.names.find(needle)
        for _ in range(_MAX_HITS):
            if pos < 0:
                return None
            # A hit inside a longer name (a tail) is harmless: no _func points there.
            found = self._func_named(pos)
            if found is not None:
                return found
            pos = self.names.find(needle, pos + 1)
        raise PclntabError(f"{self.path}: corrupt Go pclntab (too many name matches)")

    def _func_named(self, name_off: int) -> tuple[int, int] | None:
        """(address, size) of the function whose _func record has this nameOff."""
        layout, funcdata = self.layout, self.funcdata
        assert layout.entry_base is not None
        if name_off >= 1 << 31:
            return None
        needle = struct.pack(self.end + "i", name_off)
        pair_size = 2 * layout.field
        pos = funcdata.find(needle, layout.name_field)
        for _ in range(_MAX_HITS):
            if pos < 0:
                return None
            func_start = pos - layout.name_field  # in funcdata
            funcoff = func_start + self.funcdata_off - layout.funcdata_base
            if 0 <= funcoff < 1 << (8 * layout.field):
                # The functab pair for this record repeats its entry and points at it.
                pair = funcdata[func_start : func_start + layout.field] + self.word.pack(funcoff)
                index = self._pair_index(pair, pair_size)
                if index is not None:
                    entry = self.word.unpack_from(self.functab, index * pair_size)[0]
                    next_entry = self.word.unpack_from(self.functab, (index + 1) * pair_size)[0]
                    if next_entry <= entry:
                        raise PclntabError(f"{self.path}: Go pclntab unsorted at entry {index}")
                    return layout.entry_base + entry, next_entry - entry
            pos = funcdata.find(needle, pos + 1)
        raise PclntabError(f"{self.path}: corrupt Go pclntab (too many record matches)")

    def _pair_index(self, pair: bytes, pair_size: int) -> int | None:
        limit = self.layout.nfunc * pair_size  # the end entry is not a pair
        pos = self.functab.find(pair, 0, limit)
        for _ in range(_MAX_HITS):
            if pos < 0:
                return None
            if pos % pair_size == 0:
                return pos // pair_size
            pos = self.functab.find(pair, pos + 1, limit)
        raise PclntabError(f"{self.path}: corrupt Go pclntab (too many functab matches)")
