"""Member offsets of named structs, read from a Go binary's DWARF.

Go's linker puts every type DIE in one compile unit (named "runtime"), whose size grows
with the whole program: walking it DIE by DIE with pyelftools takes seconds on a large
binary. Go writes type names inline (``DW_FORM_string``) as the first attribute of a
struct DIE, so the struct is found by searching ``.debug_info`` for its name with
``bytes.find``; the abbreviation code just before the name gives the DIE's offset, and
pyelftools parses that DIE (and its members) only. A hit that is not such a DIE fails to
parse or has the wrong tag, and is skipped.

pyelftools decompresses both kinds of compressed DWARF Go has written: ``.zdebug_*``
sections (Go 1.11-1.18) and ``SHF_COMPRESSED`` sections (Go 1.19+).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from elftools.elf.elffile import ELFFile

__all__ = ["NoDwarf", "member_offsets"]

_DW_OP_PLUS_UCONST = 0x23
# Sections type lookups never read; skipping them spares decompressing most of the DWARF.
_UNUSED_NAMES = [
    "line",
    "frame",
    "loc",
    "ranges",
    "loclists",
    "rnglists",
    "aranges",
    "pubnames",
    "pubtypes",
]
_UNUSED_SECTIONS = frozenset(
    prefix + name for prefix in (".debug_", ".zdebug_") for name in _UNUSED_NAMES
) | {".eh_frame"}
# Bounds against corrupt DWARF; real Go structs have at most a few hundred members.
_MAX_NAME_HITS = 256
_MAX_MEMBERS = 1 << 16


class NoDwarf(Exception):
    """The file has no DWARF (built with -ldflags=-w, or stripped)."""


class _TypesOnlyELFFile(ELFFile):
    """An ELFFile whose get_dwarf_info() loads only what DIE parsing reads."""

    def get_section_by_name(self, name: str):  # -> Section | None
        return None if name in _UNUSED_SECTIONS else super().get_section_by_name(name)


def member_offsets(path: str, structs: Mapping[str, Iterable[str]]) -> dict[str, dict[str, int]]:
    """``{struct: {member: offset}}`` for the named structs and members that exist.

    Raises NoDwarf when the file has no DWARF; malformed DWARF raises whatever
    pyelftools raises.
    """
    with open(path, "rb") as f:
        elf = _TypesOnlyELFFile(f)
        if not elf.has_dwarf_info(strict=True):
            raise NoDwarf(f"{path}: no DWARF")
        # No relocations: executables' DWARF has none, and looking costs a section scan.
        dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False, follow_links=False)
        if dwarf.debug_info_sec is None:
            raise NoDwarf(f"{path}: no .debug_info")
        info = dwarf.debug_info_sec.stream.getvalue()
        found = {}
        for name, members in structs.items():
            die = _struct_die(dwarf, info, name.encode())
            if die is not None:
                found[name] = _members(die, {m.encode() for m in members})
        return found


def _struct_die(dwarf, info: bytes, name: bytes):  # pyelftools' DWARFInfo -> DIE | None
    needle = name + b"\0"
    pos = info.find(needle)
    for _ in range(_MAX_NAME_HITS):
        if pos < 0:
            return None
        for start in _abbrev_code_starts(info, pos):
            try:
                die = dwarf.get_DIE_from_refaddr(start)
            except Exception:  # not a DIE boundary: any parse error is possible
                continue
            die_name = die.attributes.get("DW_AT_name")
            if (
                die.tag == "DW_TAG_structure_type"
                and die.has_children
                and die_name is not None
                and die_name.value == name
            ):
                return die
        pos = info.find(needle, pos + 1)
    return None


def _abbrev_code_starts(info: bytes, name_pos: int) -> list[int]:
    """Where a DIE whose first attribute is the name at name_pos would start.

    The abbreviation code is a ULEB128 ending right before the name: its last byte has
    the high bit clear, the bytes before it have it set. Go uses fewer than 128 codes
    (one byte); two bytes are tried too.
    """
    starts = []
    if name_pos >= 1 and 0 < info[name_pos - 1] < 0x80:
        starts.append(name_pos - 1)
        if name_pos >= 2 and info[name_pos - 2] >= 0x80:
            starts.append(name_pos - 2)
    return starts


def _members(die, wanted: set[bytes]) -> dict[str, int]:
    offsets = {}
    for count, child in enumerate(die.iter_children()):
        if count >= _MAX_MEMBERS or len(offsets) == len(wanted):
            break
        if child.tag != "DW_TAG_member":
            continue
        name = child.attributes.get("DW_AT_name")
        location = child.attributes.get("DW_AT_data_member_location")
        if name is None or location is None or name.value not in wanted:
            continue
        offset = _location_offset(location.value)
        if offset is not None:
            offsets[name.value.decode()] = offset
    return offsets


def _location_offset(value: object) -> int | None:
    """A member's offset: a constant (what Go writes) or ``DW_OP_plus_uconst N``."""
    if isinstance(value, int):
        return value
    if isinstance(value, list) and len(value) >= 2 and value[0] == _DW_OP_PLUS_UCONST:
        result = shift = 0
        for byte in value[1:]:
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7
    return None
