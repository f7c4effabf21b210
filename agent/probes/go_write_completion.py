"""Where a Go ``crypto/tls.(*Conn).Write`` is complete, proved from its machine code.

Write's RETs are single-stepped (~5 µs a hit here), and Write has no uretprobe (Go
moves goroutine stacks). But its result is known earlier: Write's Go source, stable
from Go 1.17 to now, ends in

    n, err := c.writeRecordLocked(recordTypeApplicationData, b)
    return n + m, c.out.setErrorLocked(err)

(TLS 1.0 with a CBC cipher first writes ``b[:1]`` the same way, then ``m, b = 1,
b[1:]``). So after each call of writeRecordLocked with ``typ`` 23 the probe needs only
``n`` (RAX at its return) and whether ``err`` is nil (its itab word, RBX). This module
finds, after every such call site, the first instruction the kernel emulates
(``prologue.is_emulated``: relative jumps and calls, ``push``, plain ``nop``) and where
n and err's itab word live when it runs: still in RAX/RBX, or in a stack slot
``[rsp+disp]`` they were stored to. That instruction is a *completion point*.

Proof obligations (any failure: ``ProofFailed`` with the reason; the caller keeps a
probe on every RET, as before):

- the whole function decodes and has no indirect jump (code we cannot follow);
- there is at least one direct call of writeRecordLocked, and before each one, in the
  same straight-line block, the last write to RBX is ``mov $23`` (application data);
- from the call's return address to the point: no branch of the function lands there
  (the point is reached only by returning from that call), only plain data moves and
  compares (``mov``/``lea``/``test``/``cmp``/``nop``/``movups``), no write to RSP or
  R14 (the goroutine, the probe's key), memory written only through RSP, and n and err
  each still somewhere readable (a register or slot not overwritten since).

Which RETs keep their probe: Write's control flow is followed conservatively (both
ways of every conditional jump, every call assumed to return) from the entry and from
every instruction nothing jumps or falls into (a recovered panic resumes at the
deferreturn call that way), with the completion points removed. A RET still reachable
keeps its probe (the early returns: closed connection, handshake error); one reached
only through a point has no probe: the point has closed the call already.

Sans-I/O: bytes in, addresses out. agent/probes/gotls.py reads the file and attaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.probes.prologue import Instruction, decode, is_emulated

__all__ = [
    "CompletionPoint",
    "Location",
    "ProofFailed",
    "WriteCompletion",
    "prove_write_completion",
]

RECORD_TYPE_APPLICATION_DATA = 23
# Between a call and its point: data moves and compares only (flags are not tracked).
_PLAIN = frozenset({"mov", "lea", "test", "cmp", "nop", "movups"})
_MAX_WALK = 32  # instructions from a call's return to its point, at most
_NO_FALL_THROUGH = frozenset({"jmp", "int3", "ud2", "hlt"})


class ProofFailed(Exception):
    """The completion points cannot be proved for this Write (the message says why)."""


@dataclass(frozen=True)
class Location:
    """Where a value lives at a completion point: a register, or ``[rsp + sp_offset]``."""

    register: str | None
    sp_offset: int | None = None

    def __str__(self) -> str:
        return self.register if self.register else f"[rsp+{self.sp_offset:#x}]"


@dataclass(frozen=True)
class CompletionPoint:
    call: int  # address of the call of writeRecordLocked
    address: int  # the emulated instruction probed after it
    instruction: str
    n: Location  # writeRecordLocked's n (RAX at its return)
    err: Location  # the itab word of its error (RBX at its return): 0 = nil


@dataclass(frozen=True)
class WriteCompletion:
    points: tuple[CompletionPoint, ...]
    kept_returns: tuple[int, ...]  # RETs reachable without passing a point: probed
    dropped_returns: tuple[int, ...]  # RETs only reached through a point: not probed

    def reason(self, function: int) -> str:
        def at(p: CompletionPoint) -> str:
            return f"+{p.address - function} {p.instruction} (n {p.n}, err {p.err})"

        return (
            f"writeRecordLocked(23) completion at {', '.join(at(p) for p in self.points)}; "
            f"{len(self.kept_returns)} RET probes kept (paths that pass no point), "
            f"{len(self.dropped_returns)} dropped"
        )


def prove_write_completion(code: bytes, address: int, write_record: int) -> WriteCompletion:
    """The completion points of Write (``code`` at ``address``), whose calls of
    ``write_record`` (writeRecordLocked's address) they follow; ProofFailed if not proved."""
    insns = decode(code, address)
    end = address + len(code)
    if not insns or insns[-1].address + insns[-1].size < end:
        raise ProofFailed("undecodable code in Write")
    if any(i.group == "jump" and i.target is None for i in insns):
        raise ProofFailed("indirect jump in Write")
    # Call targets too: a call into Write itself would be a way in as well.
    targets = {i.target for i in insns if i.target is not None}
    calls = [k for k, i in enumerate(insns) if i.group == "call" and i.target == write_record]
    if not calls:
        raise ProofFailed(f"no direct call of writeRecordLocked ({write_record:#x}) in Write")
    points = []
    for k in calls:
        _check_record_type(insns, k, targets)
        points.append(_completion_after(insns, k, targets))
    kept, dropped = _returns(insns, targets, {p.address for p in points}, address, end)
    return WriteCompletion(tuple(points), kept, dropped)


# -- the proof's steps ----------------------------------------------------------------


def _check_record_type(insns: Sequence[Instruction], k: int, targets: set[int]) -> None:
    """The call at ``insns[k]`` passes typ 23: the last RBX write before it, in its own
    straight-line block, is ``mov $23``."""
    call = insns[k]
    for j in range(k - 1, -1, -1):
        if insns[j + 1].address in targets:
            raise ProofFailed(
                f"call at {call.address:#x}: a branch lands at {insns[j + 1].address:#x} "
                "before typ is set"
            )
        insn = insns[j]
        if insn.group:
            break
        if "rbx" in insn.regs_written:
            if insn.imm_to == ("rbx", RECORD_TYPE_APPLICATION_DATA):
                return
            raise ProofFailed(f"call at {call.address:#x}: typ comes from {insn.text}, not 23")
    raise ProofFailed(f"call at {call.address:#x}: typ not set to 23 in its block")


def _completion_after(insns: Sequence[Instruction], k: int, targets: set[int]) -> CompletionPoint:
    call = insns[k]
    n: set[Location] = {Location("rax")}
    err: set[Location] = {Location("rbx")}
    for insn in insns[k + 1 : k + 1 + _MAX_WALK]:
        where = f"after the call at {call.address:#x}: {insn.text} at {insn.address:#x}"
        if insn.address in targets:
            raise ProofFailed(f"{where} is a branch target")
        if is_emulated(insn.raw):
            return CompletionPoint(call.address, insn.address, insn.text, _best(n), _best(err))
        if insn.group or insn.mnemonic not in _PLAIN:
            raise ProofFailed(f"{where}: not a plain data move before an emulated instruction")
        kept_regs = insn.regs_written & {"rsp", "r14"}  # the stack slots' base; g, the key
        if kept_regs:
            raise ProofFailed(f"{where} writes {', '.join(sorted(kept_regs))}")
        if insn.writes_other_memory:
            raise ProofFailed(f"{where} writes memory outside the stack frame")
        if insn.stack_store is not None:
            disp, size, src = insn.stack_store
            for locs in (n, err):
                for loc in [x for x in locs if x.sp_offset is not None]:
                    if loc.sp_offset < disp + size and disp < loc.sp_offset + 8:
                        locs.discard(loc)  # overwritten
                if src is not None and Location(src) in locs:
                    locs.add(Location(None, disp))
        for locs in (n, err):
            for reg in insn.regs_written:
                locs.discard(Location(reg))
        if not n or not err:
            lost = "n (RAX)" if not n else "err (RBX)"
            raise ProofFailed(f"{where} overwrites {lost} before an emulated instruction")
    raise ProofFailed(f"no emulated instruction within {_MAX_WALK} after {call.address:#x}")


def _best(locs: set[Location]) -> Location:
    """A register if the value is still in one (no read of the stack), else the lowest slot."""
    return min(locs, key=lambda x: (x.register is None, x.register or "", x.sp_offset or 0))


def _returns(
    insns: Sequence[Instruction], targets: set[int], points: set[int], start: int, end: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(RETs reachable without passing a point, the other RETs)."""
    index = {i.address: k for k, i in enumerate(insns)}
    succs: list[list[int]] = []
    has_pred = [False] * len(insns)
    for k, insn in enumerate(insns):
        nxt = []
        if insn.group != "ret" and insn.mnemonic not in _NO_FALL_THROUGH and k + 1 < len(insns):
            nxt.append(k + 1)
        if insn.group == "jump" and insn.target is not None and start <= insn.target < end:
            if insn.target not in index:
                raise ProofFailed(f"{insn.text} at {insn.address:#x} jumps into an instruction")
            nxt.append(index[insn.target])
        for s in nxt:
            has_pred[s] = True
        succs.append(nxt)
    # The entry, and code entered other than by a jump or fall-through (the
    # deferreturn call a recovered panic resumes at); padding (nop, int3) is not code.
    roots = [0] + [
        k
        for k in range(1, len(insns))
        if not has_pred[k] and insns[k].mnemonic not in ("nop", "int3")
    ]
    seen: set[int] = set()
    todo = [k for k in roots if insns[k].address not in points]
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        todo.extend(s for s in succs[k] if s not in seen and insns[s].address not in points)
    rets = [k for k, i in enumerate(insns) if i.group == "ret"]
    kept = tuple(insns[k].address for k in rets if k in seen)
    dropped = tuple(insns[k].address for k in rets if k not in seen)
    return kept, dropped
