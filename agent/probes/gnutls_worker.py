"""GnuTLS's receive functions and the internal worker they tail-jump to (issue 23).

``gnutls_record_recv`` begins with ``sub rsp`` and ``gnutls_record_recv_seq`` with a
``mov``: entry + uretprobe on them single-step (~7 µs a call). Both reach one internal
function, ``_gnutls_recv_int(session, type, data, size, seq, timeout)`` (static, no
symbol), with ``type`` 23 (application data), and return what it returns; it begins
with ``push r15`` (emulated). Probing it (entry + uretprobe, ~1 µs) instead of the two
wrappers is proved per file, from the machine code, never assumed:

1. **The wrappers.** Every path of each wrapper, followed instruction by instruction
   with the argument registers tracked, ends in one of: a jump or call to one function
   W with ``rdi`` = the session, ``esi`` = 23 and ``rdx`` = the wrapper's data pointer,
   the wrapper then returning W's result unchanged; a ``ret`` of a constant ≤ 0; a call
   of a function proved to move no data (point 2) whose result (≤ 0) is returned. Calls
   to GnuTLS's logging are allowed on the way; anything else (another call, an indirect
   jump, a positive return not from W) fails the proof. Both wrappers must reach the
   same W.
2. **The other callee** (Debian 12's ``gnutls_record_recv`` calls ``_gnutls_ktls_recv_int``
   when the session has kTLS receive on): proved to return a constant ≤ 0 on every path
   and to write no memory but its own stack frame, calling nothing but logging. That is
   the kTLS code of a build without kTLS (``return GNUTLS_E_UNIMPLEMENTED_FEATURE``).
   A build with kTLS compiled in has a real receive function there, which fails this and
   keeps both wrappers on their entries: kTLS receive is off by default and rare, and a
   second worker could not be tested here.
3. **W's other callers** (``gnutls_bye``: alerts, the handshake: change cipher spec,
   heartbeat) pass other record types: every direct call or jump to W in the file's
   code (each function its unwind table lists, decoded whole) is found, and ``esi`` at
   each is a constant other than 23, set in the same straight-line code (no branch,
   from anywhere in the file, lands between). No instruction takes W's address and no
   data holds it. The entry program reads ``esi`` and opens a call only for type 23;
   the other calls' returns find no open call (bpf/gnutls.c).
4. **W's first instruction is emulated** (``is_emulated``).

W's result is the byte count copied into ``data`` (> 0), 0 at the end of the stream,
or a negative GnuTLS error (``GNUTLS_E_AGAIN``...): what ``probe_tls_return`` already
reads for the wrappers (``(int)rax > 0``). Anything not proved keeps today's entry
placement, counted as a fallback.

Never by loading the library: a container's libgnutls must not run code in the agent.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from agent.probes.code_index import CodeIndex, proved_once
from agent.probes.prologue import (
    Instruction,
    Placement,
    WrapperCode,
    decode,
    is_emulated,
    register_family,
)

log = logging.getLogger(__name__)

__all__ = [
    "APPLICATION_DATA",
    "RECV_WRAPPERS",
    "RecvWorker",
    "WorkerCallSite",
    "find_recv_worker",
    "prove_recv_worker",
    "prove_wrapper",
    "proves_no_data",
    "record_type_at",
]

APPLICATION_DATA = 23  # GnuTLS content_type_t GNUTLS_APPLICATION_DATA
RECV_WRAPPERS = ("gnutls_record_recv", "gnutls_record_recv_seq")
# Imports a wrapper or a no-data callee may call on its way: GnuTLS's logging.
_LOGGING = frozenset({"_gnutls_log", "_gnutls_audit_log"})
_NORETURN = frozenset({"__stack_chk_fail", "abort"})
_CALLER_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
_MAX_STEPS = 4096  # instructions followed over all paths of one function
_MAX_NO_DATA_STEPS = 256
_MAX_LOOKBACK = 48  # instructions back from a call of W to the write of esi

ReadCode = Callable[[int, int], bytes]  # (address, size) -> bytes, ELF virtual addresses
ImportName = Callable[[int], "str | None"]  # PLT stub address -> imported name


@dataclass(frozen=True)
class WorkerCallSite:
    address: int
    record_type: int


@dataclass(frozen=True)
class RecvWorker:
    """W, proved (module docstring): probe it instead of ``wrappers``."""

    address: int
    first: str  # its first instruction
    wrappers: tuple[str, ...]
    no_data: tuple[int, ...]  # callees of the wrappers proved to move no data
    others: tuple[WorkerCallSite, ...]  # W's other callers, none with type 23

    def placement(self) -> Placement:
        names = " and ".join(self.wrappers)
        parts = [
            f"worker {self.address:#x} (_gnutls_recv_int) that {names} reach with "
            f"(session, type {APPLICATION_DATA}, data) and whose result they return; its "
            f"first instruction {self.first} is emulated"
        ]
        if self.no_data:
            where = ", ".join(f"{a:#x}" for a in self.no_data)
            parts.append(f"their other paths return ≤ 0 without moving data ({where} only "
                         "returns a constant ≤ 0: the kTLS receive of a build without "
                         "kTLS)")  # fmt: skip
        if self.others:
            types = ", ".join(str(t) for t in sorted({s.record_type for s in self.others}))
            parts.append(f"its {len(self.others)} other callers pass record types {types} "
                         f"(the entry program keeps type {APPLICATION_DATA} only)")  # fmt: skip
        return Placement("+".join(self.wrappers), self.address, self.address, "worker",
                         "; ".join(parts))  # fmt: skip


# -- 1. the wrappers ---------------------------------------------------------------------

Value = tuple  # ("arg", reg) | ("const", int) | ("result", W) | ("nonpos",)


@dataclass(frozen=True)
class WrapperProof:
    worker: int
    no_data: frozenset[int]


def prove_wrapper(
    fn: WrapperCode,
    import_name: ImportName,
    no_data: Callable[[int], str | None],
    data_reg: str = "rsi",
) -> tuple[WrapperProof | None, str]:
    """Point 1 of the module docstring for one wrapper: the worker it reaches with
    (rdi, esi = 23, rdx = its ``data_reg``), or (None, why not). ``no_data(address)``
    is '' (or None) for a callee proved to move no data, else why not."""
    import capstone

    md = _capstone()
    end = fn.address + len(fn.code)
    entry: dict[str, Value] = {r: ("arg", r) for r in ("rdi", "rsi", "rdx", "rcx", "r8", "r9")}
    workers: set[int] = set()
    quiet: set[int] = set()
    stack: list[tuple[int, dict[str, Value], int, int | None]] = [(fn.address, entry, 0, None)]
    seen: set[tuple] = set()
    steps = 0

    def fail(at: int, why: str) -> tuple[None, str]:
        return None, f"{fn.symbol}: {why} at {at:#x}"

    def reaches_worker(regs: dict[str, Value]) -> bool:
        esi = regs.get("rsi")
        return (regs.get("rdi") == ("arg", "rdi") and regs.get("rdx") == ("arg", data_reg)
                and esi is not None and esi[0] == "const"
                and esi[1] & 0xFFFFFFFF == APPLICATION_DATA)  # fmt: skip

    while stack:
        pc, regs, sp, called = stack.pop()
        key = (pc, frozenset(regs.items()), sp, called)
        if key in seen:
            continue
        seen.add(key)
        steps += 1
        if steps > _MAX_STEPS:
            return None, f"{fn.symbol}: too many paths to follow"
        if not fn.address <= pc < end:
            return fail(pc, "runs past its end")
        insn = _decode_one(md, fn.code[pc - fn.address : pc - fn.address + 16], pc)
        if insn is None:
            return fail(pc, "undecodable instruction")
        regs = dict(regs)
        mn = insn.mnemonic
        target = _branch_target(insn)
        is_jump = insn.group(capstone.CS_GRP_JUMP)
        is_call = insn.group(capstone.CS_GRP_CALL)
        if insn.group(capstone.CS_GRP_RET):
            if sp != 0:
                return fail(pc, "returns with the stack pointer moved")
            rax = regs.get("rax")
            if called is not None:
                if rax != ("result", called):
                    return fail(pc, "changes the worker's result")
            elif not _nonpositive(rax):
                return fail(pc, f"returns {_describe(rax)} without the worker")
            continue
        if mn in ("syscall", "sysenter", "int", "into"):
            return fail(pc, mn)
        if mn in ("ud2", "hlt", "int3"):
            continue  # the process stops here: no data
        if (is_jump or is_call) and target is None:
            return fail(pc, f"indirect {mn}")
        if is_jump and fn.address <= target < end:
            stack.append((target, regs, sp, called))
            if mn != "jmp":
                stack.append((pc + insn.size, regs, sp, called))
            continue
        if is_jump or is_call:
            if called is not None:
                return fail(pc, f"{mn} {target:#x} after the worker returned")
            name = import_name(target)
            if name in _NORETURN and is_call:
                continue
            if name is not None and not (is_call and name in _LOGGING):
                return fail(pc, f"{mn} to {name}")
            if name is None:
                why = no_data(target)
                if not why:
                    quiet.add(target)
                    result: Value = ("nonpos",)
                elif reaches_worker(regs) and (is_call or sp == 0):
                    workers.add(target)
                    result = ("result", target)
                else:
                    return fail(pc, f"{mn} {target:#x} with other arguments ({why})")
            else:
                result = None  # logging: rax unknown after
            if is_jump:  # a tail call: its result is the wrapper's
                if sp != 0:
                    return fail(pc, "tail jump with the stack pointer moved")
                if result is None:
                    return fail(pc, f"tail jump to {name}")
                if mn != "jmp":
                    stack.append((pc + insn.size, regs, sp, called))
                continue
            for r in _CALLER_SAVED:
                regs.pop(r, None)
            if result is not None:
                regs["rax"] = result
                if result[0] == "result":
                    called = target
            stack.append((pc + insn.size, regs, sp, called))
            continue
        sp_change = _step(insn, regs)
        if sp_change is None:
            return fail(pc, f"{mn} {insn.op_str} moves the stack pointer in a way not followed")
        stack.append((pc + insn.size, regs, sp + sp_change, called))
    if len(workers) != 1:
        what = "no" if not workers else f"{len(workers)} different"
        return None, f"{fn.symbol}: {what} worker{'s' if workers else ''} reached"
    return WrapperProof(workers.pop(), frozenset(quiet)), ""


def _step(insn, regs: dict[str, Value]) -> int | None:
    """Apply one straight-line instruction to the tracked registers; the change of the
    stack pointer, or None when it changes in a way this does not follow."""
    import capstone
    from capstone import x86

    mn = insn.mnemonic
    ops = insn.operands
    reg = [(register_family(insn.reg_name(o.reg)), o.size) if o.type == x86.X86_OP_REG else None
           for o in ops]  # fmt: skip
    if mn == "push":
        return -8
    if mn == "pop":
        if reg and reg[0]:
            regs.pop(reg[0][0], None)
        return 8
    if mn in ("sub", "add") and reg and reg[0] and reg[0][0] == "rsp":
        if len(ops) == 2 and ops[1].type == x86.X86_OP_IMM and reg[0][1] == 8:
            return -ops[1].imm if mn == "sub" else ops[1].imm
        return None
    if mn in ("cdqe", "movsxd") and (mn == "cdqe" or (reg[0] and reg[0][0] == "rax")):
        src = regs.get("rax") if mn == "cdqe" else (regs.get(reg[1][0]) if reg[1] else None)
        regs.pop("rax", None)
        if mn == "movsxd" and reg[1] and reg[1][1] != 4:
            src = None
        value = _sign_extended(src)
        if value is not None:
            regs["rax"] = value
        return 0
    try:
        _, written = insn.regs_access()
    except capstone.CsError:
        written = []
    families = {register_family(insn.reg_name(r)) for r in written} - {"rflags", "rip", None}
    if "rsp" in families:
        return None
    value: Value | None = None
    dst = reg[0] if reg else None
    if mn == "mov" and dst and dst[1] in (4, 8) and len(ops) == 2:
        if ops[1].type == x86.X86_OP_IMM:
            value = ("const", ops[1].imm & (0xFFFFFFFF if dst[1] == 4 else (1 << 64) - 1))
        elif reg[1] and reg[1][1] == dst[1]:
            src = regs.get(reg[1][0])
            if dst[1] == 8:
                value = src
            elif src is not None and src[0] == "const":
                value = ("const", src[1] & 0xFFFFFFFF)
            elif src is not None and src[0] in ("result", "nonpos"):
                value = src  # probe_tls_return reads (int)rax: the low half is the value
    elif mn == "xor" and dst and reg[1] and reg[1][0] == dst[0] and dst[1] in (4, 8):
        value = ("const", 0)
    for f in families:
        regs.pop(f, None)
    if value is not None and dst:
        regs[dst[0]] = value
    return 0


def _sign_extended(v: Value | None) -> Value | None:
    if v is None:
        return None
    if v[0] == "const":
        low = v[1] & 0xFFFFFFFF
        return ("const", low | (0xFFFFFFFF00000000 if low & 0x80000000 else 0))
    return v if v[0] in ("result", "nonpos") else None


def _nonpositive(v: Value | None) -> bool:
    """True for a value that ``(int)rax > 0`` (probe_tls_return) takes for no data."""
    if v is None:
        return False
    if v[0] == "nonpos":
        return True
    return v[0] == "const" and struct.unpack("<i", struct.pack("<I", v[1] & 0xFFFFFFFF))[0] <= 0


def _describe(v: Value | None) -> str:
    if v is None:
        return "an unknown value"
    if v[0] == "const":
        return f"{v[1]:#x}"
    return "its argument " + v[1] if v[0] == "arg" else str(v)


# -- 2. a callee that moves no data ------------------------------------------------------


def proves_no_data(address: int, read_code: ReadCode, import_name: ImportName) -> str:
    """'' when every path of the function at ``address`` returns a constant ≤ 0 (as an
    int), writes no memory but its own stack frame and calls nothing but logging;
    else why not."""
    import capstone
    from capstone import x86

    md = _capstone()
    stack: list[tuple[int, Value | None, int]] = [(address, None, 0)]
    seen: set[tuple] = set()
    while stack:
        pc, rax, sp = stack.pop()
        if (pc, rax, sp) in seen:
            continue
        seen.add((pc, rax, sp))
        if len(seen) > _MAX_NO_DATA_STEPS:
            return f"more than {_MAX_NO_DATA_STEPS} instructions"
        insn = _decode_one(md, read_code(pc, 16), pc)
        if insn is None:
            return f"undecodable at {pc:#x}"
        mn = insn.mnemonic
        target = _branch_target(insn)
        if insn.group(capstone.CS_GRP_RET):
            if sp != 0 or not _nonpositive(rax):
                return f"returns {_describe(rax)} at {pc:#x}"
            continue
        if mn in ("ud2", "hlt", "int3"):
            continue
        if mn in ("syscall", "sysenter", "int", "into"):
            return f"{mn} at {pc:#x}"
        if insn.group(capstone.CS_GRP_JUMP):
            if target is None:
                return f"indirect jump at {pc:#x}"
            stack.append((target, rax, sp))
            if mn != "jmp":
                stack.append((pc + insn.size, rax, sp))
            continue
        if insn.group(capstone.CS_GRP_CALL):
            name = import_name(target) if target is not None else None
            if name in _NORETURN:
                continue
            if name not in _LOGGING:
                return f"calls {name or (f'{target:#x}' if target else 'indirectly')} at {pc:#x}"
            stack.append((pc + insn.size, None, sp))
            continue
        for op in insn.operands:
            if op.type == x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE:
                base = register_family(insn.reg_name(op.mem.base)) if op.mem.base else None
                if base != "rsp" or op.mem.index:
                    return f"writes memory at {pc:#x} ({mn} {insn.op_str})"
        if mn.startswith(("rep", "movs", "stos")):
            return f"string instruction at {pc:#x}"
        regs: dict[str, Value] = {} if rax is None else {"rax": rax}
        change = _step(insn, regs)
        if change is None:
            return f"moves the stack pointer at {pc:#x}"
        stack.append((pc + insn.size, regs.get("rax"), sp + change))
    return ""


# -- 3. the worker's other callers -------------------------------------------------------


def record_type_at(insns: list[Instruction], index: int, targets: AbstractSet[int]) -> int | None:
    """The constant ``esi`` holds at ``insns[index]`` (a call or jump to the worker),
    set in straight-line code no branch enters (``targets``: every direct branch target
    of the file); None when not proved."""
    cur = index
    for _ in range(_MAX_LOOKBACK):
        if insns[cur].address in targets or cur == 0:
            return None
        prev = insns[cur - 1]
        if "rsi" in prev.regs_written:
            m = re.fullmatch(r"mov (?:esi|rsi), (0x[0-9a-f]+|\d+)", prev.text)
            if m:
                return int(m.group(1), 0) & 0xFFFFFFFF
            return 0 if prev.text in ("xor esi, esi", "xor rsi, rsi") else None
        if prev.group in ("call", "ret", "int") or prev.mnemonic == "jmp":
            return None
        cur -= 1
    return None


def _other_callers(
    code: CodeIndex, worker: int, wrappers: list[WrapperCode]
) -> tuple[list[WorkerCallSite] | None, str]:
    """Point 3 of the module docstring: W's callers other than the wrappers, each with
    the record type it passes, or (None, why not)."""
    if code.pointers_to(worker):
        return None, f"the worker's address {worker:#x} is stored in data"
    refs = code.references(worker)
    if refs.why_not:
        return None, refs.why_not
    out = []
    for site in refs.sites:
        if any(w.address <= site < w.address + len(w.code) for w in wrappers):
            continue
        fn = code.function_at(site)
        assert fn is not None  # found by decoding the unwind table's functions
        insns = decode(code.read(fn.start, fn.end - fn.start), fn.start)
        if any(i.group == "jump" and i.target is None for i in insns):
            return None, f"the caller at {site:#x} has an indirect jump"
        index = next((k for k, i in enumerate(insns) if i.address == site), None)
        rtype = record_type_at(insns, index, refs.branch_targets) if index is not None else None
        if rtype is None:
            return None, f"record type not proved at the call of the worker at {site:#x}"
        if rtype == APPLICATION_DATA:
            return None, f"{site:#x} also calls the worker for application data"
        out.append(WorkerCallSite(site, rtype))
    return out, ""


# -- all together, per file --------------------------------------------------------------


def prove_recv_worker(
    wrappers: list[WrapperCode],
    read_code: ReadCode,
    import_name: ImportName,
    other_callers: Callable[[int], tuple[list[WorkerCallSite] | None, str]],
) -> tuple[RecvWorker | None, str]:
    """Points 1-4 of the module docstring over the wrappers a file defines."""
    if not wrappers:
        return None, "no gnutls_record_recv"
    no_data_cache: dict[int, str] = {}

    def no_data(address: int) -> str:
        if address not in no_data_cache:
            no_data_cache[address] = proves_no_data(address, read_code, import_name)
        return no_data_cache[address]

    workers: set[int] = set()
    quiet: set[int] = set()
    for fn in wrappers:
        proof, why = prove_wrapper(fn, import_name, no_data)
        if proof is None:
            return None, why
        workers.add(proof.worker)
        quiet |= proof.no_data
    if len(workers) != 1:
        return None, "the wrappers reach different workers: " + ", ".join(
            f"{w:#x}" for w in sorted(workers)
        )
    worker = workers.pop()
    first = decode(read_code(worker, 16), worker, limit=1)
    if not first or not is_emulated(first[0].raw):
        text = first[0].text if first else "undecodable"
        return None, f"worker {worker:#x} begins with {text} (single-stepped)"
    others, why = other_callers(worker)
    if others is None:
        return None, why
    return RecvWorker(worker, first[0].text, tuple(w.symbol for w in wrappers),
                      tuple(sorted(quiet)), tuple(others)), ""  # fmt: skip


_cache: dict[tuple, tuple[RecvWorker | None, str]] = {}


def find_recv_worker(
    path: str, symbols: Iterable[str], import_name: ImportName | None = None
) -> tuple[RecvWorker | None, str]:
    """The proved worker of this libgnutls, or (None, why not). Cached per file
    (device, inode, size, mtime): one analysis for every path to one file."""
    names = tuple(n for n in RECV_WRAPPERS if n in set(symbols))
    return proved_once(_cache, path, lambda: _find(path, names, import_name), extra=names)


def _find(
    path: str, names: tuple[str, ...], import_name: ImportName | None
) -> tuple[RecvWorker | None, str]:
    from agent.probes.prologue import FunctionReader

    reader = FunctionReader(path)
    wrappers = []
    for name in names:
        fn = reader.function(name)
        if fn is None:
            return None, f"{name}: code not readable"
        wrappers.append(fn)
    if not any(w.symbol == RECV_WRAPPERS[0] for w in wrappers):
        return None, "no gnutls_record_recv"
    code = CodeIndex(path)
    return prove_recv_worker(
        wrappers, code.read, import_name or reader.import_name,
        lambda worker: _other_callers(code, worker, wrappers),
    )  # fmt: skip


# -- capstone helpers --------------------------------------------------------------------


def _capstone(detail: bool = True):
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = detail
    return md


def _decode_one(md, raw: bytes, address: int):
    return next(iter(md.disasm(raw, address, 1)), None)


def _branch_target(insn) -> int | None:
    from capstone import x86

    ops = insn.operands
    if len(ops) == 1 and ops[0].type == x86.X86_OP_IMM:
        return ops[0].imm
    return None
