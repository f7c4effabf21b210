"""Where to put a probe so that the kernel emulates the probed instruction.

A uprobe hit on an instruction the kernel must single-step out of line costs ~6-7 µs
on this VM; one on an instruction it emulates costs ~0.3-0.9 µs (bench/README.md,
"Which instructions this kernel emulates", measured with bench/uprobe_kinds.py on
Linux 6.18). Emulated here: relative jumps, conditional jumps and calls, ``push`` of a
register and the ``nop`` forms. Single-stepped: everything else, ``endbr64`` and
``ret`` included.

Two placements are found here, both proved from the machine code, never guessed:

- ``entry_placement``: the first emulated instruction of a function such that no
  instruction before it writes a register the probe reads (or the stack pointer, when
  the probe reads it) or memory other than its own stack frame, and no branch of the
  function lands between the entry and it. Go's stack-bound check ``jbe`` is the
  case this serves; a function completed by a uretprobe gains nothing from it (the
  uretprobe's breakpoint must stay on the first instruction).
- ``worker_placement``: OpenSSL's ``SSL_write``/``SSL_write_ex`` (and the read pair)
  are thin wrappers around one internal worker, ``ssl_write_internal(s, buf, num,
  &written)``, which begins with ``push``. Entry + uretprobe on the worker cost ~1 µs
  instead of ~7 µs, and the worker has exactly the ``_ex`` shape the probes decode.

GnuTLS's ``gnutls_record_recv``/``_seq`` tail-jump to their worker with the arguments
reordered and a record type added; that proof is ``agent/probes/gnutls_worker.py``.

Anything not proved keeps the probe on the function's first instruction, as before.
``TLSCAP_PROBE_PLACEMENT=entry`` forces that everywhere (comparison runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "FORCE_ENTRY_ENV",
    "FunctionReader",
    "Instruction",
    "Placement",
    "WrapperCode",
    "decode",
    "entry_placement",
    "force_entry",
    "is_emulated",
    "worker_placement",
]

FORCE_ENTRY_ENV = "TLSCAP_PROBE_PLACEMENT"  # "entry": every probe on the function entry

# Instructions the skipped prologue may hold before the chosen one, at most.
_MAX_SKIPPED = 16
_ERROR_PATH_IMPORTS = frozenset(
    {"ERR_new", "ERR_set_debug", "ERR_set_error", "ERR_put_error", "__stack_chk_fail"}
)


def force_entry() -> bool:
    """True when the environment asks for every probe on its function's entry."""
    return os.environ.get(FORCE_ENTRY_ENV, "").strip().lower() == "entry"


@dataclass(frozen=True)
class Placement:
    """Where a function's probe goes: ``address`` (ELF virtual address) and why."""

    symbol: str
    function: int  # the function's own address
    address: int
    kind: str  # "entry", "emulated-entry", "moved-entry", "worker", "covered" (not probed)
    reason: str
    uretprobe: bool = True  # the call is completed by a uretprobe at `address`

    @property
    def offset(self) -> int:
        return self.address - self.function

    @property
    def cheap(self) -> bool:
        return self.kind != "entry"

    def to_json(self) -> dict[str, object]:
        return {
            "symbol": self.symbol,
            "placement": self.kind,
            "function": f"{self.function:#x}",
            "address": f"{self.address:#x}",
            "offset": self.offset,
            "uretprobe": self.uretprobe,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Instruction:
    address: int
    size: int
    raw: bytes
    text: str  # "mnemonic op_str"
    regs_written: frozenset[str]  # 64-bit register families, flags left out
    writes_memory: bool
    memory_base: str | None  # base register of a memory operand written
    group: str  # "jump", "call", "ret", "int", "" (capstone groups of interest)
    target: int | None  # direct branch/call target
    # A memory operand written as a plain [rsp+disp] (no index, no segment): (disp, its
    # size, the register a two-operand 8-byte mov stores there, else None).
    stack_store: tuple[int, int, str | None] | None = None
    writes_other_memory: bool = False  # a memory operand written through anything else
    imm_to: tuple[str, int] | None = None  # `mov $imm, reg`: (its register family, imm)

    @property
    def mnemonic(self) -> str:
        return self.text.split(" ", 1)[0]


# -- decoding ----------------------------------------------------------------------------


def decode(code: bytes, address: int, limit: int | None = None) -> list[Instruction]:
    """Linear decode of ``code`` at ``address``; stops at the first undecodable byte."""
    import capstone
    from capstone import x86

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    out: list[Instruction] = []
    for insn in md.disasm(code, address):
        try:
            _, written = insn.regs_access()
        except capstone.CsError:
            written = []
        families = frozenset(
            f for f in (register_family(insn.reg_name(r)) for r in written) if f and f != "rflags"
        )
        writes_mem = False
        base = None
        target = None
        stack_store = None
        other_memory = False
        ops = insn.operands
        for op in ops:
            if op.type == x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE:
                writes_mem = True
                base = register_family(insn.reg_name(op.mem.base)) if op.mem.base else None
                if base == "rsp" and not op.mem.index and not op.mem.segment:
                    src = None
                    if insn.mnemonic == "mov" and len(ops) == 2 and ops[1].type == x86.X86_OP_REG:
                        src = register_family(insn.reg_name(ops[1].reg)) if op.size == 8 else None
                    stack_store = (op.mem.disp, op.size, src)
                else:
                    other_memory = True
            if op.type == x86.X86_OP_IMM and (
                insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_CALL)
            ):
                target = op.imm
        group = ""
        for name, grp in (
            ("jump", capstone.CS_GRP_JUMP),
            ("call", capstone.CS_GRP_CALL),
            ("ret", capstone.CS_GRP_RET),
            ("int", capstone.CS_GRP_INT),
        ):
            if insn.group(grp):
                group = name
                break
        if insn.mnemonic in ("syscall", "sysenter", "ud2", "hlt", "iretq"):
            group = "int"
        imm_to = None
        if (
            insn.mnemonic == "mov"
            and len(ops) == 2
            and ops[0].type == x86.X86_OP_REG
            and ops[1].type == x86.X86_OP_IMM
        ):
            imm_to = (register_family(insn.reg_name(ops[0].reg)) or "", ops[1].imm)
        # push/call write below the stack pointer: memory of the frame being built.
        if insn.mnemonic.startswith("push") or group == "call":
            writes_mem, base = True, "rsp"
        out.append(
            Instruction(
                address=insn.address,
                size=insn.size,
                raw=bytes(insn.bytes),
                text=f"{insn.mnemonic} {insn.op_str}".strip(),
                regs_written=families,
                writes_memory=writes_mem,
                memory_base=base,
                group=group,
                target=target,
                stack_store=stack_store,
                writes_other_memory=other_memory,
                imm_to=imm_to,
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return out


_FAMILIES = {
    **{r: "r" + r[1:] for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp")},
    "ax": "rax", "al": "rax", "ah": "rax", "bx": "rbx", "bl": "rbx", "bh": "rbx",
    "cx": "rcx", "cl": "rcx", "ch": "rcx", "dx": "rdx", "dl": "rdx", "dh": "rdx",
    "si": "rsi", "sil": "rsi", "di": "rdi", "dil": "rdi", "bp": "rbp", "bpl": "rbp",
    "sp": "rsp", "spl": "rsp", "eflags": "rflags", "rflags": "rflags", "rip": "rip",
}  # fmt: skip


def register_family(name: str | None) -> str | None:
    """The 64-bit register a register name is part of ("ebx", "bl" -> "rbx"; "r8d" ->
    "r8"; the flags -> "rflags"), None for no name; other names as they are."""
    if not name:
        return None
    if name in _FAMILIES:
        return _FAMILIES[name]
    if name.startswith("r") and name[1:].rstrip("dwb").isdigit():
        return name.rstrip("dwb") if name[-1] in "dwb" else name
    return name


# -- what the kernel emulates -----------------------------------------------------------


def is_emulated(raw: bytes) -> bool:
    """True for the encodings measured to be emulated by this kernel's uprobes.

    Only plain encodings (no prefix but a REX.B on push) are accepted: the kernel
    refuses to emulate several prefixed forms, and an unmeasured form costs nothing
    but a missed saving when it is left to the function entry.
    """
    if not raw:
        return False
    b0 = raw[0]
    if 0x70 <= b0 <= 0x7F and len(raw) == 2:  # jcc rel8
        return True
    if b0 in (0xEB,) and len(raw) == 2:  # jmp rel8
        return True
    if b0 in (0xE8, 0xE9) and len(raw) == 5:  # call rel32, jmp rel32
        return True
    if b0 == 0x0F and len(raw) == 6 and 0x80 <= raw[1] <= 0x8F:  # jcc rel32
        return True
    if 0x50 <= b0 <= 0x57 and len(raw) == 1:  # push %reg
        return True
    if b0 == 0x41 and len(raw) == 2 and 0x50 <= raw[1] <= 0x57:  # push %r8-%r15
        return True
    if raw == b"\x90":
        return True
    return b0 == 0x0F and len(raw) >= 3 and raw[1] == 0x1F  # nopl/nopw forms


# -- entry placement ---------------------------------------------------------------------


def entry_placement(
    symbol: str,
    code: bytes,
    address: int,
    reads: Iterable[str],
    *,
    reads_sp: bool = True,
    uretprobe: bool = False,
) -> Placement:
    """Where the entry probe of the function at ``address`` (its whole code) may go.

    ``reads``: the registers (64-bit names) the probe reads; ``reads_sp``: whether it
    reads the stack pointer. A function completed by a uretprobe stays at its entry
    (the uretprobe needs that breakpoint): its placement says whether it is cheap.
    """
    insns = decode(code, address)
    if not insns or insns[0].address != address:
        return Placement(symbol, address, address, "entry", "undecodable first instruction",
                         uretprobe)  # fmt: skip
    first = insns[0]
    if is_emulated(first.raw):
        return Placement(symbol, address, address, "emulated-entry",
                         f"first instruction emulated ({first.text})", uretprobe)  # fmt: skip
    if uretprobe:
        return Placement(symbol, address, address, "entry",
                         f"uretprobe needs the first instruction ({first.text}, single-stepped)",
                         uretprobe)  # fmt: skip
    regs = frozenset(reads) | ({"rsp"} if reads_sp else frozenset())

    def stay(why: str) -> Placement:
        return Placement(symbol, address, address, "entry", why, uretprobe)

    if _decoded_to(insns) < address + len(code) or any(
        i.group == "jump" and i.target is None for i in insns
    ):
        # An indirect jump (a jump table) could land anywhere; so could code we
        # could not decode.
        return stay("indirect jump or undecodable code in the function")
    targets = {i.target for i in insns if i.target is not None}
    skipped: list[Instruction] = []
    for insn in insns[:_MAX_SKIPPED]:
        if is_emulated(insn.raw) and skipped:
            landing = sorted(t for t in targets if address < t <= insn.address)
            if landing:
                why = f"a branch lands at {landing[0]:#x}, inside the prologue"
                return stay(why)
            done = "; ".join(i.text for i in skipped)
            return Placement(symbol, address, insn.address, "moved-entry",
                             f"{insn.text} emulated; skipped [{done}] leave "
                             f"{', '.join(sorted(regs))} unchanged", False)  # fmt: skip
        why = _unsafe_to_skip(insn, regs)
        if why:
            return stay(f"{insn.text}: {why}")
        skipped.append(insn)
    return stay(f"no emulated instruction in the first {_MAX_SKIPPED}")


def _decoded_to(insns: Sequence[Instruction]) -> int:
    return insns[-1].address + insns[-1].size if insns else 0


def _unsafe_to_skip(insn: Instruction, regs: frozenset[str]) -> str | None:
    if insn.group in ("jump", "call", "ret", "int"):
        return "control flow before the probe point"
    hit = insn.regs_written & (regs | {"rip"})
    if hit:
        return "writes " + ", ".join(sorted(hit))
    if insn.writes_memory and insn.memory_base != "rsp":
        return "writes memory outside the stack frame"
    if insn.mnemonic.startswith(("rep", "lock", "xchg", "cmpxchg")):
        return "not a plain register instruction"
    return None


# -- the worker behind a wrapper pair (OpenSSL) -------------------------------------------


@dataclass(frozen=True)
class WrapperCode:
    symbol: str
    address: int
    code: bytes


def worker_placement(
    ex: WrapperCode,
    plain: WrapperCode,
    read_code: Callable[[int, int], bytes],  # (address, size), ELF virtual addresses
    import_name: Callable[[int], str | None],  # PLT stub address -> imported name
) -> tuple[Placement | None, str]:
    """The worker both wrappers call, if probing it (entry + uretprobe) is proved
    equivalent to probing both and cheaper; else (None, why not).

    Proof obligations: ``ex`` (``SSL_write_ex(s, buf, num, &written)``) reaches one
    direct call without a branch, a call or a write to rdi/rsi/rdx/rcx before it, so
    the worker receives exactly the ``_ex`` arguments, and returns its result after
    (SSL_write_ex's result is the worker's, negative ones clamped to 0); ``plain``
    calls the same worker and otherwise only error-reporting imports (ERR_*,
    __stack_chk_fail), no indirect call or jump and no tail jump out, so every call
    that moves data goes through the worker; the worker's first instruction is
    emulated.
    """
    ex_insns = decode(ex.code, ex.address)
    if _decoded_to(ex_insns) < ex.address + len(ex.code):
        return None, f"{ex.symbol}: undecodable"
    worker = None
    for insn in ex_insns:
        if insn.group == "call":
            if insn.target is None:
                return None, f"{ex.symbol}: indirect call"
            worker = insn.target
            break
        if insn.group:
            return None, f"{ex.symbol}: {insn.text} before the worker call"
        hit = insn.regs_written & {"rdi", "rsi", "rdx", "rcx", "rsp"} - (
            {"rsp"} if insn.mnemonic in ("sub", "push") else set()
        )
        if hit:
            return None, f"{ex.symbol}: {insn.text} changes {', '.join(sorted(hit))}"
    if worker is None:
        return None, f"{ex.symbol}: no call"
    if ex.address <= worker < ex.address + len(ex.code):
        return None, f"{ex.symbol}: calls into itself"
    after = [i for i in ex_insns if i.address > worker_call_address(ex_insns, worker)]
    if any(i.group in ("call", "int") or (i.group == "jump" and not _inside(i, ex)) for i in after):
        return None, f"{ex.symbol}: more work after the worker returns"
    plain_insns = decode(plain.code, plain.address)
    if _decoded_to(plain_insns) < plain.address + len(plain.code):
        return None, f"{plain.symbol}: undecodable"
    calls_worker = False
    for insn in plain_insns:
        if insn.group == "call" or (insn.group == "jump" and not _inside(insn, plain)):
            if insn.target is None:
                return None, f"{plain.symbol}: indirect {insn.group} ({insn.text})"
            if insn.target == worker and insn.group == "call":
                calls_worker = True
                continue
            name = import_name(insn.target)
            if name not in _ERROR_PATH_IMPORTS:
                return None, f"{plain.symbol}: also calls {name or hex(insn.target)}"
        elif insn.group == "jump" and insn.target is None:
            return None, f"{plain.symbol}: indirect jump"
    if not calls_worker:
        return None, f"{plain.symbol} does not call {ex.symbol}'s worker {worker:#x}"
    first = decode(read_code(worker, 16), worker, limit=1)
    if not first or not is_emulated(first[0].raw):
        text = first[0].text if first else "undecodable"
        return None, f"worker {worker:#x} begins with {text} (single-stepped)"
    reason = (
        f"worker {worker:#x} that {plain.symbol} and {ex.symbol} call with the _ex "
        f"arguments; its first instruction {first[0].text} is emulated"
    )
    return Placement(f"{plain.symbol}+{ex.symbol}", worker, worker, "worker", reason), ""


def worker_call_address(insns: Sequence[Instruction], worker: int) -> int:
    for i in insns:
        if i.group == "call" and i.target == worker:
            return i.address
    return -1


def _inside(insn: Instruction, fn: WrapperCode) -> bool:
    return insn.target is not None and fn.address <= insn.target < fn.address + len(fn.code)


# -- reading a file ----------------------------------------------------------------------


class FunctionReader:
    """Code of named functions of one ELF file, and the names of the imports its PLT
    stubs jump to (for ``worker_placement``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._imports: dict[int, str] | None = None

    def function(self, symbol: str) -> WrapperCode | None:
        from agent.probes.elf_image import ElfImage
        from agent.probes.elf_symbols import find_symbol_values

        found = find_symbol_values(self.path, [symbol]).get(symbol)
        if not found or not 0 < found[1] <= 1 << 16:
            return None
        with ElfImage(self.path) as elf:
            return WrapperCode(symbol, found[0], elf.read_vaddr(found[0], found[1]))

    def read(self, address: int, size: int) -> bytes:
        from agent.probes.elf_image import ElfImage

        with ElfImage(self.path) as elf:
            return elf.read_vaddr(address, size)

    def import_name(self, stub: int) -> str | None:
        """The symbol a PLT stub at ``stub`` jumps to through the GOT, else None."""
        try:
            insns = decode(self.read(stub, 16), stub, limit=2)
        except Exception:
            return None
        for insn in insns:
            if insn.mnemonic in ("endbr64",):
                continue
            text = insn.text.replace("bnd ", "")
            if text.startswith("jmp qword ptr [rip + "):
                disp = int(text.split("+ ")[1].rstrip("]"), 0)
                return self._got_names().get(insn.address + insn.size + disp)
            return None
        return None

    def _got_names(self) -> dict[int, str]:
        if self._imports is None:
            self._imports = {}
            from elftools.elf.elffile import ELFFile
            from elftools.elf.relocation import RelocationSection

            with open(self.path, "rb") as f:
                elf = ELFFile(f)
                for section in elf.iter_sections():
                    if not isinstance(section, RelocationSection):
                        continue
                    symtab = elf.get_section(section["sh_link"])
                    for rel in section.iter_relocations():
                        if rel["r_info_sym"]:
                            sym = symtab.get_symbol(rel["r_info_sym"])
                            self._imports[rel["r_offset"]] = sym.name
        return self._imports
