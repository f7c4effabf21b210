"""Find NSS's SSL-layer I/O methods (ssl_Read, ssl_Write, ssl_Recv, ssl_Send) in a
libssl3 file, statically.

NSPR's ``PR_Read(fd, buf, n)`` is ``mov rax,[rdi]; jmp [rax+0x10]``: it calls the
``read`` slot of the top layer's ``PRIOMethods`` table. On a TLS socket that layer is
NSS's, whose methods are static functions of libssl3 with no symbol. Probing them
instead of NSPR's entry points means plain descriptors (stdout, files, plaintext
sockets) never hit a probe, and the methods begin with ``push`` (emulated) where
``PR_Read`` begins with a single-stepped ``mov``.

Why statically, and why not from ``.data.rel.ro``: NSS declares a ``static const
PRIOMethods ssl_methods`` table, but the compiler folds it away. ``ssl_SetupIOMethods``
copies NSPR's defaults (``PR_GetDefaultIOMethods``) into the writable
``combined_methods`` with ``rep movsq`` and then stores NSS's function addresses into
it from code (``lea``, ``movq``/``punpcklqdq``, ``movups``); no relocation names them.
Reading ``fd->methods`` at run time (after ``SSL_ImportFD``) would need a round trip
through user space before the first connection's data could be probed. So the setup
code is interpreted here, and the result is proved:

1. the only code that calls ``PR_GetDefaultIOMethods`` runs straight (no branch, no
   call, no store through a pointer) to its ``ret``; what it leaves in memory is
   computed instruction by instruction, any value it cannot follow being unknown;
2. the table is where it stores ``PR_DESC_LAYERED`` (4) as ``file_type``, and the
   ``read``/``write``/``recv``/``send`` slots (prio.h offsets, the same ones
   ``PR_Read``/``PR_Write``/``PR_Recv``/``PR_Send`` jump through) hold known addresses
   inside the file's code;
3. the table's address is handed to ``PR_CreateIOLayerStub`` (``lea rsi, [table]``
   right before the call: the SSL layer is made with it), and no other instruction of
   the file writes into it.

Never by loading the library: a container's libssl3 must not run code in the agent.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass

from agent.probes.code_index import proved_once, rip_target

log = logging.getLogger(__name__)

__all__ = ["METHOD_SLOTS", "NssSslMethods", "find_nss_ssl_methods", "methods_from_setup"]

PR_DESC_LAYERED = 4
PRIO_METHODS_SIZE = 36 * 8  # struct PRIOMethods (prio.h), x86-64
# The slots NSPR's PR_Read/PR_Write/PR_Recv/PR_Send jump through (prio.h).
METHOD_SLOTS = {"ssl_Read": 0x10, "ssl_Write": 0x18, "ssl_Recv": 0x88, "ssl_Send": 0x90}
_NSPR_CALLS = ("PR_GetDefaultIOMethods", "PR_CreateIOLayerStub")
_MAX_SETUP = 200  # instructions from the PR_GetDefaultIOMethods call to its ret


@dataclass(frozen=True)
class NssSslMethods:
    table: int  # address of the SSL layer's PRIOMethods (combined_methods)
    setup: int  # the call to PR_GetDefaultIOMethods whose code fills it
    setup_end: int  # its ret
    functions: dict[str, int]  # "ssl_Read" -> address, for every METHOD_SLOTS name

    def reason(self, name: str) -> str:
        return (f"{name}: PRIOMethods slot +{METHOD_SLOTS[name]:#x} of the SSL layer's "
                f"table {self.table:#x}, filled by the code after the PR_GetDefaultIOMethods "
                f"call at {self.setup:#x}")  # fmt: skip


_cache: dict[tuple, tuple[NssSslMethods | None, str]] = {}


def find_nss_ssl_methods(path: str) -> tuple[NssSslMethods | None, str]:
    """The SSL layer's methods in this file, or (None, why not). Cached per file
    (device, inode, size, mtime): one analysis for every container path to one file."""
    return proved_once(_cache, path, lambda: _find(path))


# -- reading the file --------------------------------------------------------------------


@dataclass(frozen=True)
class _CodeRange:
    address: int
    code: bytes


class _File:
    def __init__(self, path: str) -> None:
        from elftools.elf.elffile import ELFFile
        from elftools.elf.relocation import RelocationSection

        from agent.probes.elf_symbols import find_symbol_values

        # NSPR folded into the same file (Firefox's libnss3.so): called directly.
        self.defined = {
            name: value[0]
            for name, value in find_symbol_values(path, _NSPR_CALLS).items()
            if value and value[0]
        }
        self.code: list[_CodeRange] = []
        self.got: dict[int, str] = {}  # GOT slot -> imported name
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf["e_machine"] != "EM_X86_64":
                raise ValueError(f"not x86-64 ({elf['e_machine']})")
            for section in elf.iter_sections():
                if section["sh_flags"] & 0x4 and section["sh_type"] == "SHT_PROGBITS":
                    self.code.append(_CodeRange(section["sh_addr"], section.data()))
                if isinstance(section, RelocationSection):
                    symtab = elf.get_section(section["sh_link"])
                    for rel in section.iter_relocations():
                        if rel["r_info_sym"]:
                            name = symtab.get_symbol(rel["r_info_sym"]).name
                            self.got[rel["r_offset"]] = name

    def in_code(self, address: int) -> bool:
        return any(r.address <= address < r.address + len(r.code) for r in self.code)

    def slot_of(self, name: str) -> int | None:
        slots = [a for a, n in self.got.items() if n == name]
        return slots[0] if len(slots) == 1 else None

    def stubs_of(self, slot: int) -> set[int]:
        """PLT stubs (``[bnd] jmp [rip+X]``) that jump through the GOT slot ``slot``."""
        found = set()
        for r in self.code:
            for m in re.finditer(rb"\xff\x25", r.code):
                at = r.address + m.start()
                (disp,) = struct.unpack_from("<i", r.code, m.start() + 2)
                if at + 6 + disp == slot:
                    found.add(at - 1 if m.start() and r.code[m.start() - 1] == 0xF2 else at)
                    found.add(at)
        return found

    def targets_of(self, name: str) -> set[int]:
        """Where a call to ``name`` goes: its PLT stubs and GOT slot, or its own code."""
        slot = self.slot_of(name)
        found = self.stubs_of(slot) | {slot} if slot is not None else set()
        if name in self.defined:
            found.add(self.defined[name])
        return found

    def calls_to(self, targets: set[int]) -> list[int]:
        """Addresses of ``call target`` (rel32) and ``call [rip+target]`` instructions."""
        stubs = targets
        out = []
        for r in self.code:
            for m in re.finditer(rb"\xe8", r.code):
                i = m.start()
                if i + 5 > len(r.code):
                    continue
                (rel,) = struct.unpack_from("<i", r.code, i + 1)
                if r.address + i + 5 + rel in stubs:
                    out.append(r.address + i)
            for m in re.finditer(rb"\xff\x15", r.code):
                i = m.start()
                (disp,) = struct.unpack_from("<i", r.code, i + 2)
                if r.address + i + 6 + disp in targets:
                    out.append(r.address + i)
        return sorted(out)

    def read(self, address: int, size: int) -> bytes:
        for r in self.code:
            if r.address <= address < r.address + len(r.code):
                return r.code[address - r.address : address - r.address + size]
        return b""


def _find(path: str) -> tuple[NssSslMethods | None, str]:
    f = _File(path)
    defaults, create = (f.targets_of(name) for name in _NSPR_CALLS)
    if not defaults or not create:
        return None, "neither imports nor defines PR_GetDefaultIOMethods/PR_CreateIOLayerStub"
    calls = f.calls_to(defaults)
    if not calls:
        return None, "no call to PR_GetDefaultIOMethods"
    found: list[NssSslMethods] = []
    whys = []
    for call in calls:
        methods, why = methods_from_setup(f.read(call, 4096), call, f.got, f.in_code)
        if methods is None:
            whys.append(f"{call:#x}: {why}")
        else:
            found.append(methods)
    if len(found) != 1:
        return None, "; ".join(whys) if not found else "several method tables"
    methods = found[0]
    why = _check_table_uses(f, methods, create)
    if why:
        return None, why
    return methods, ""


# -- interpreting the setup code -----------------------------------------------------------


@dataclass(frozen=True)
class _Import:
    name: str


Value = int | _Import | None  # None: not known


def methods_from_setup(
    code: bytes,
    call: int,
    got: dict[int, str],
    in_code,  # Callable[[int], bool]
) -> tuple[NssSslMethods | None, str]:
    """Interpret the code from the ``call PR_GetDefaultIOMethods`` at ``call`` (``code``
    starts there) to its ``ret``; return the SSL layer's methods it stores, proved as
    the module docstring says (points 1 and 2), or (None, why not)."""
    import capstone
    from capstone import x86

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    insns = list(md.disasm(code, call))
    if not insns or not insns[0].group(capstone.CS_GRP_CALL):
        return None, "not a call"
    gpr: dict[str, Value] = {}
    xmm: dict[str, tuple[Value, Value]] = {}
    stack: dict[int, Value] = {}  # rsp offset (at the call's return) -> qword
    stores: list[tuple[int, int, Value]] = []  # (address, size, value) in order
    sp = 0

    def family(reg: int) -> str:
        from agent.probes.prologue import register_family

        return register_family(insn.reg_name(reg)) or ""

    def where(op) -> tuple[str, int] | None:
        m = op.mem
        if m.index or m.segment:
            return None
        if m.base == x86.X86_REG_RIP:
            return "abs", insn.address + insn.size + m.disp
        if m.base == x86.X86_REG_RSP:
            return "sp", sp + m.disp
        return None

    def load8(op) -> Value:
        w = where(op)
        if w is None:
            return None
        if w[0] == "abs":
            return _Import(got[w[1]]) if w[1] in got else None
        return stack.get(w[1])

    def store(op, values: list[Value]) -> str | None:
        """Store ``values`` (qwords; one value of the operand's size when it is
        smaller; [] for unknown contents) at the memory operand ``op``."""
        w = where(op)
        if w is None:
            return f"{insn.mnemonic} {insn.op_str}: store through a pointer"
        size = op.size
        if size < 8:
            pieces = [(0, size, values[0] if values else None)]
        else:
            if len(values) * 8 != size:
                values = [None] * (size // 8)
            pieces = [(8 * i, 8, v) for i, v in enumerate(values)]
        for off, n, v in pieces:
            if w[0] == "abs":
                stores.append((w[1] + off, n, v))
            else:
                stack[w[1] + off] = v if n == 8 else None
        return None

    def reg_value(op) -> Value:
        name = family(op.reg)
        if name.startswith("xmm"):
            return xmm.get(name, (None, None))[0]
        v = gpr.get(name)
        if isinstance(v, int) and op.size == 4:
            return v & 0xFFFFFFFF
        return v if op.size == 8 else None

    ended = None
    for insn in insns[1:_MAX_SETUP]:
        mn = insn.mnemonic
        ops = list(insn.operands)
        if insn.group(capstone.CS_GRP_RET):
            ended = insn.address
            break
        if insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_CALL) or \
                insn.group(capstone.CS_GRP_INT):  # fmt: skip
            return None, f"{insn.mnemonic} {insn.op_str} at {insn.address:#x}: control flow"
        dst = ops[0] if ops else None
        src = ops[1] if len(ops) > 1 else None
        if mn in ("push", "pop") or (
            mn in ("add", "sub") and dst is not None and dst.type == x86.X86_OP_REG
            and family(dst.reg) == "rsp"
        ):  # fmt: skip
            if mn == "push":
                sp -= 8
                stack[sp] = reg_value(dst) if dst.type == x86.X86_OP_REG else None
            elif mn == "pop":
                gpr[family(dst.reg)] = stack.get(sp)
                sp += 8
            elif src is not None and src.type == x86.X86_OP_IMM:
                sp += src.imm if mn == "add" else -src.imm
            else:
                return None, f"{mn} {insn.op_str}: unknown stack pointer"
            continue
        if mn.startswith("rep movs"):
            rdi, rcx = gpr.get("rdi"), gpr.get("rcx")
            if not isinstance(rdi, int) or not isinstance(rcx, int):
                return None, f"{mn} with unknown rdi/rcx at {insn.address:#x}"
            step = {"b": 1, "w": 2, "d": 4, "q": 8}.get(mn[-1], 0)
            if not step:
                return None, f"{mn}: unknown width"
            stores.append((rdi, step * rcx, None))
            gpr.update(rdi=rdi + step * rcx, rsi=None, rcx=0)
            continue
        handled = True
        if mn == "lea" and dst.type == x86.X86_OP_REG:
            w = where(src)
            gpr[family(dst.reg)] = w[1] if w and w[0] == "abs" else None
        elif mn in ("mov", "movabs", "movq", "movd") and dst.type == x86.X86_OP_REG:
            d = family(dst.reg)
            if src.type == x86.X86_OP_IMM:
                v: Value = src.imm & ((1 << (8 * dst.size)) - 1)
            elif src.type == x86.X86_OP_REG:
                v = reg_value(src)
            else:
                v = load8(src) if src.size == 8 else None
            if d.startswith("xmm"):
                xmm[d] = (v if mn == "movq" else None, 0)
            else:
                gpr[d] = v if dst.size in (4, 8) else None
        elif mn in ("mov", "movq") and dst.type == x86.X86_OP_MEM:
            v = src.imm if src.type == x86.X86_OP_IMM else reg_value(src)
            if isinstance(v, int) and src.type == x86.X86_OP_IMM:
                v &= (1 << (8 * dst.size)) - 1
            why = store(dst, [v])
            if why:
                return None, why
        elif mn == "punpcklqdq" and dst.type == x86.X86_OP_REG:
            lo = xmm.get(family(dst.reg), (None, None))[0]
            hi = reg_value(src) if src.type == x86.X86_OP_REG else load8(src)
            xmm[family(dst.reg)] = (lo, hi)
        elif mn == "movhps" and dst.type == x86.X86_OP_REG:
            xmm[family(dst.reg)] = (xmm.get(family(dst.reg), (None, None))[0], load8(src))
        elif mn in ("movdqa", "movdqu", "movaps", "movups", "movapd", "movupd"):
            if dst.type == x86.X86_OP_REG and src.type == x86.X86_OP_REG:
                xmm[family(dst.reg)] = xmm.get(family(src.reg), (None, None))
            elif dst.type == x86.X86_OP_REG:
                w = where(src)
                pair = (None, None)
                if w and w[0] == "sp":
                    pair = (stack.get(w[1]), stack.get(w[1] + 8))
                xmm[family(dst.reg)] = pair
            else:
                why = store(dst, list(xmm.get(family(src.reg), (None, None))))
                if why:
                    return None, why
        else:
            handled = False
        if handled:
            continue
        # Anything else: what it writes becomes unknown.
        try:
            _, written = insn.regs_access()
        except capstone.CsError:
            return None, f"{mn} {insn.op_str}: cannot tell what it writes"
        for r in written:
            name = _family_name(insn.reg_name(r))
            if name == "rsp":
                return None, f"{mn} {insn.op_str}: unknown stack pointer"
            if name.startswith("xmm"):
                xmm[name] = (None, None)
            elif name:
                gpr[name] = None
        for op in ops:
            if op.type == x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE:
                why = store(op, [])
                if why:
                    return None, why
    if ended is None:
        return None, f"no ret within {_MAX_SETUP} instructions of the call"
    return _table_from_stores(stores, call, ended, in_code)


def _family_name(name: str | None) -> str:
    from agent.probes.prologue import register_family

    return register_family(name) or ""


def _value_at(stores: list[tuple[int, int, Value]], address: int, size: int) -> Value:
    """The value the last store covering [address, address+size) left there."""
    value: Value = None
    covered = False
    for at, n, v in stores:
        if at < address + size and address < at + n:
            covered = True
            value = v if (at == address and n == size) else None
    return value if covered else None


def _table_from_stores(
    stores: list[tuple[int, int, Value]], call: int, ret: int, in_code
) -> tuple[NssSslMethods | None, str]:
    bases = sorted({at for at, n, v in stores if n == 4 and v == PR_DESC_LAYERED})
    tables = []
    for base in bases:
        functions = {}
        for name, slot in METHOD_SLOTS.items():
            v = _value_at(stores, base + slot, 8)
            if isinstance(v, int) and in_code(v):
                functions[name] = v
        if len(functions) == len(METHOD_SLOTS):
            tables.append(NssSslMethods(base, call, ret, functions))
    if len(tables) != 1:
        what = "no" if not tables else "several"
        return None, f"{what} PRIOMethods table with file_type PR_DESC_LAYERED and known " \
                     "read/write/recv/send"  # fmt: skip
    return tables[0], ""


# -- the table's other uses -----------------------------------------------------------------

_NOT_WRITES = ("cmp", "test", "ucomis", "comis", "bt", "prefetch", "push")


def _check_table_uses(f: _File, methods: NssSslMethods, create_targets: set[int]) -> str:
    """'' when the table is passed to PR_CreateIOLayerStub and written by nothing but
    its setup; else why not (point 3 of the module docstring)."""
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    lo, hi = methods.table, methods.table + PRIO_METHODS_SIZE
    layer_made = False
    for r in f.code:
        recent: list[tuple[str, str, int, int]] = []  # (mnemonic, op_str, address, size)
        for address, size, mn, op in md.disasm_lite(r.code, r.address):
            if mn.startswith("call"):
                target = _call_target(op, address, size)
                if target in create_targets and any(
                    m == "lea" and o.startswith("rsi,") and rip_target(o, a, s) == methods.table
                    for m, o, a, s in recent[-4:]
                ):  # fmt: skip
                    layer_made = True
            recent.append((mn, op, address, size))
            if len(recent) > 8:
                del recent[0]
            target = rip_target(op, address, size)
            if target is None or not lo <= target < hi:
                continue
            if methods.setup <= address <= methods.setup_end:
                continue  # the setup interpreted above
            first = op.split(",", 1)[0]
            if "[rip" in first and not mn.startswith(_NOT_WRITES):
                return f"{mn} {op} at {address:#x} writes into the method table"
    if not layer_made:
        return f"the table {methods.table:#x} is not passed to PR_CreateIOLayerStub"
    return ""


def _call_target(op: str, address: int, size: int) -> int | None:
    if op.startswith("0x"):
        return int(op, 16)
    return rip_target(op, address, size)
