"""The machine code of one x86-64 ELF file, function by function, for whole-file proofs
("who else calls this static function?", agent/probes/gnutls_worker.py).

A linear sweep of ``.text`` is not enough: hand-written assembly (nettle's, in
libgnutls) keeps tables in ``.text``, and capstone stops at their first undecodable
byte, losing sync. The unwind table (``.eh_frame_hdr``, ``.eh_frame``) gives every
compiled function's exact range, static ones and GCC's ``.cold`` parts included, so
each is decoded on its own. Code no unwind entry covers is checked by a byte search
instead, so that a reference hiding there fails the proof rather than passing unseen.

Read with ``pread`` (ElfImage), never by loading the file.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["CodeIndex", "FunctionRange", "References", "proved_once", "rip_target"]

T = TypeVar("T")


@dataclass(frozen=True)
class FunctionRange:
    start: int
    end: int


@dataclass(frozen=True)
class References:
    """Direct references to one address in a file's functions."""

    sites: tuple[int, ...]  # calls and jumps (jcc included) to it
    branch_targets: frozenset[int]  # every direct jump target in the file (not calls)
    why_not: str  # not "": the search cannot be trusted (and why)


class CodeIndex:
    """The executable sections of one file and the functions its unwind table lists."""

    def __init__(self, path: str) -> None:
        from agent.probes.elf_image import SHF_EXECINSTR, SHT_PROGBITS, ElfImage

        self.path = path
        with ElfImage(path) as elf:
            if elf.machine != "amd64":
                raise ValueError(f"not x86-64 ({elf.machine})")
            self.ranges = sorted(
                (s.addr, elf.read_section(s))
                for s in elf.sections.values()
                if s.flags & SHF_EXECINSTR and s.type == SHT_PROGBITS and s.size
            )
            self.functions = unwind_functions(elf)
        self._starts = [f.start for f in self.functions]

    def read(self, address: int, size: int) -> bytes:
        for start, code in self.ranges:
            if start <= address < start + len(code):
                return code[address - start : address - start + size]
        return b""

    def function_at(self, address: int) -> FunctionRange | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and self.functions[i].start <= address < self.functions[i].end:
            return self.functions[i]
        return None

    def pointers_to(self, address: int) -> list[int]:
        """Where data holds ``address`` (in the file or by a relative relocation)."""
        from agent.probes.elf_image import ElfImage

        with ElfImage(self.path) as elf:
            return list(elf.pointer_locations(address))

    def references(self, target: int) -> References:
        """Every direct call/jump to ``target`` in the unwind table's functions, every
        direct jump target, or why that cannot be trusted: an instruction that takes
        ``target``'s address (``lea [rip+...]``), or a call/jump-shaped byte pattern to
        it in code that was not decoded."""
        import capstone

        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        sites: list[int] = []
        targets: set[int] = set()
        decoded_to: dict[int, int] = {}
        for fn in self.functions:
            at = fn.start
            code = self.read(fn.start, fn.end - fn.start)
            for address, size, mn, op in md.disasm_lite(code, fn.start):
                at = address + size
                mn = mn.removeprefix("bnd ").removeprefix("notrack ")
                if mn[0] == "j" or mn == "call":
                    if op.startswith("0x"):
                        t = int(op, 16)
                        if t == target:
                            sites.append(address)
                        if mn != "call":
                            targets.add(t)
                    continue
                if "rip" in op and rip_target(op, address, size) == target:
                    why = f"{mn} {op} at {address:#x} takes the address {target:#x}"
                    return References((), frozenset(), why)
            decoded_to[fn.start] = at
        # call/jmp/jcc rel32 byte patterns to the target that the decoding did not see:
        # inside another instruction (harmless) or in code it did not decode (not).
        for start, raw in self.ranges:
            for m in re.finditer(rb"[\xe8\xe9]|\x0f[\x80-\x8f]", raw):
                i, n = m.start(), m.end() - m.start()
                if i + n + 4 > len(raw):
                    continue
                (rel,) = struct.unpack_from("<i", raw, i + n)
                if start + i + n + 4 + rel != target:
                    continue
                fn = self.function_at(start + i)
                if fn is None or start + i >= decoded_to.get(fn.start, fn.start):
                    why = f"a branch to {target:#x} at {start + i:#x} in code not decoded"
                    return References((), frozenset(), why)
        return References(tuple(sites), frozenset(targets), "")


def proved_once(
    cache: dict[tuple, tuple[T | None, str]],
    path: str,
    prove: Callable[[], tuple[T | None, str]],
    extra: tuple = (),
) -> tuple[T | None, str]:
    """`prove()` for the file at `path`, once per file (device, inode, size, mtime, and
    `extra`): one analysis for every path, container paths included, to one file.  A
    file that cannot be stat'ed, or whose analysis raises (a malformed file), gives
    (None, why): the caller keeps the probes it would use without the proof."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return None, f"cannot stat: {exc.strerror or exc}"
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, *extra)
    if key not in cache:
        try:
            cache[key] = prove()
        except Exception as exc:
            cache[key] = (None, f"analysis failed: {exc}")
    return cache[key]


_RIP = re.compile(r"\[rip ([+-]) (0x[0-9a-f]+|\d+)\]")


def rip_target(op: str, address: int, size: int) -> int | None:
    """The address a ``[rip +/- disp]`` operand of the instruction at ``address`` names."""
    m = _RIP.search(op)
    if not m:
        return None
    disp = int(m.group(2), 0)
    return address + size + (disp if m.group(1) == "+" else -disp)


# -- the unwind table ----------------------------------------------------------------------

_POINTER_FORMATS = {0x03: "<I", 0x0B: "<i", 0x04: "<Q", 0x0C: "<q", 0x00: "<Q"}


def unwind_functions(elf) -> list[FunctionRange]:
    """Functions from ``.eh_frame_hdr``'s sorted table and each FDE's pc_range. Only
    the encodings GNU ld and lld write are read; anything else raises ValueError."""
    hdr_s = elf.sections.get(".eh_frame_hdr")
    if hdr_s is None:
        raise ValueError("no .eh_frame_hdr")
    hdr = elf.read_section(hdr_s)
    version, _ptr_enc, count_enc, table_enc = hdr[:4]
    if version != 1 or count_enc != 0x03 or table_enc != 0x3B:  # udata4; datarel sdata4
        raise ValueError(f"unsupported .eh_frame_hdr encodings {hdr[:4].hex()}")
    (count,) = struct.unpack_from("<I", hdr, 8)
    table = struct.unpack_from(f"<{2 * count}i", hdr, 12)
    encodings: dict[int, int] = {}
    out = []
    for k in range(count):
        start = hdr_s.addr + table[2 * k]
        fde = hdr_s.addr + table[2 * k + 1]
        length, cie_ptr = struct.unpack("<Ii", elf.read_vaddr(fde, 8))
        if length == 0xFFFFFFFF:
            raise ValueError("64-bit .eh_frame")
        cie = fde + 4 - cie_ptr
        if cie not in encodings:
            encodings[cie] = _fde_encoding(elf, cie)
        enc = encodings[cie]
        fmt = _POINTER_FORMATS.get(enc & 0x0F)
        if fmt is None or enc & 0x70 not in (0x00, 0x10):  # absolute or pcrel
            raise ValueError(f"unsupported FDE pointer encoding {enc:#x}")
        n = struct.calcsize(fmt)
        raw = elf.read_vaddr(fde + 8, 2 * n)
        (begin,) = struct.unpack_from(fmt, raw)
        (size,) = struct.unpack_from(fmt, raw, n)
        if enc & 0x70 == 0x10:
            begin += fde + 8
        if begin != start or size <= 0:
            raise ValueError(f"FDE at {fde:#x} disagrees with .eh_frame_hdr")
        out.append(FunctionRange(start, start + size))
    out.sort(key=lambda f: f.start)
    return out


def _fde_encoding(elf, cie: int) -> int:
    """The pointer encoding (augmentation ``R``) of the CIE at ``cie``."""
    raw = elf.read_vaddr(cie, 64)
    length, cie_id, version = struct.unpack_from("<IIB", raw)
    if cie_id != 0 or length == 0xFFFFFFFF:
        raise ValueError(f"not a CIE at {cie:#x}")
    end = raw.index(b"\0", 9)
    aug = raw[9:end].decode()
    if "eh" in aug or not aug.startswith("z"):
        raise ValueError(f"unsupported CIE augmentation {aug!r}")
    pos = end + 1
    _, pos = _uleb(raw, pos)  # code alignment
    _, pos = _uleb(raw, pos)  # data alignment (an sleb: only skipped)
    if version == 1:
        pos += 1  # return address register
    else:
        _, pos = _uleb(raw, pos)
    _, pos = _uleb(raw, pos)  # augmentation data length
    for ch in aug[1:]:
        if ch == "R":
            return raw[pos]
        if ch == "P":
            fmt = _POINTER_FORMATS.get(raw[pos] & 0x0F)
            if fmt is None:
                raise ValueError(f"unsupported personality encoding {raw[pos]:#x}")
            pos += 1 + struct.calcsize(fmt)
        elif ch == "L":
            pos += 1
        elif ch not in "SB":
            raise ValueError(f"unsupported CIE augmentation {aug!r}")
    return 0x00  # no R: absolute pointers


def _uleb(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = raw[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
