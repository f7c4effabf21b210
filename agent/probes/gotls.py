"""Attach the Go crypto/tls probes (bpf/gotls.c) to one Go executable.

The binary is read by agent/probes/go_binary.py; this module only places the probes:
a probe at every RET of ``(*Conn).Write`` and ``(*Conn).Read`` first, then the entry
probes, so that no call can be opened that nothing would close.  No uretprobes: Go
moves goroutine stacks, and a rewritten return address on a moved stack crashes the
program.

Write, where agent/probes/go_write_completion.py proves it, is closed instead at its
completion points (emulated instructions after each writeRecordLocked(23) call) plus
the RETs still reachable without passing one; the others keep no probe.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from agent.probes.prologue import Placement, entry_placement, force_entry

if TYPE_CHECKING:
    from agent.probes.go_binary import GoFunction, GoTlsTarget
    from agent.probes.go_write_completion import CompletionPoint, WriteCompletion

log = logging.getLogger(__name__)

GO_WRITE_ENTRY = "probe_gotls_write_enter"
GO_READ_ENTRY = "probe_gotls_read_enter"
GO_RETURN = "probe_gotls_return"
GO_WRITE_DONE = "probe_gotls_write_done"
# What go_tls_enter reads: the receiver, b.ptr, b.len and g (R14).  Not the stack
# pointer; PT_REGS_IP only to find its go_tls_configs entry, set at the probe address.
GO_ENTRY_READS = frozenset({"rax", "rbx", "rcx", "r14"})


def go_entry_placement(host_path: str, fn: GoFunction) -> Placement:
    """Where the entry probe of Write or Read goes: the stack-bound check's ``jbe``
    (emulated) when the instructions before it (``lea``/``cmp``) are proved to leave
    RAX, RBX, RCX and R14 alone; else the entry.

    A call that grows its stack runs ``runtime.morestack`` and restarts at the first
    instruction, so it passes the ``jbe`` twice with the same arguments and goroutine:
    go_tls_enter's update of the goroutine's call is then repeated, not doubled (the
    same holds for the entry placement).
    """
    name = getattr(fn, "name", "?")
    if force_entry():
        return Placement(name, fn.address, fn.address, "entry",
                         "forced: TLSCAP_PROBE_PLACEMENT=entry", False)  # fmt: skip
    from agent.probes.elf_image import ElfImage

    try:
        with ElfImage(host_path) as elf:
            code = elf.read_vaddr(fn.address, fn.size)
        return entry_placement(name, code, fn.address, GO_ENTRY_READS, reads_sp=False)
    except Exception as exc:  # unreadable or odd code: the entry, as before
        return Placement(name, fn.address, fn.address, "entry", f"not analysed: {exc}",
                         False)  # fmt: skip


def go_write_completion(host_path: str, target: GoTlsTarget) -> tuple[WriteCompletion | None, str]:
    """Write's proved completion points and the RETs that keep a probe, or (None, why
    every RET keeps its probe)."""
    from agent.probes.go_write_completion import ProofFailed, prove_write_completion

    write, record = target.write, getattr(target, "write_record", None)
    if force_entry():
        return None, "forced: TLSCAP_PROBE_PLACEMENT=entry"
    if write is None or record is None:
        return None, "no crypto/tls.(*Conn).writeRecordLocked found"
    if target.pie:
        # go_write_points is keyed by the runtime address, unknown for PIE.
        return None, "position-independent binary"
    from agent.probes.elf_image import ElfImage

    try:
        with ElfImage(host_path) as elf:
            code = elf.read_vaddr(write.address, write.size)
        proved = prove_write_completion(code, write.address, record.address)
    except ProofFailed as exc:
        return None, str(exc)
    except Exception as exc:  # unreadable or odd code: every RET, as before
        return None, f"not analysed: {exc}"
    return proved, proved.reason(write.address)


class GoAttacher(Protocol):
    def attach_uprobe(
        self, path: str, where: str | int, entry_fn: str, return_fn: str | None
    ) -> None: ...

    def detach_uprobe(self, path: str, where: str | int) -> None: ...

    def set_go_tls_config(self, entry_address: int, target: GoTlsTarget) -> None: ...

    def set_go_write_point(self, point: CompletionPoint) -> None: ...

    def note_placement(self, single_stepped_uretprobe: bool) -> None: ...


def attach_gotls(program: GoAttacher, host_path: str, target: GoTlsTarget) -> list[str]:
    """Probe Write and Read of one Go binary; return the names of those attached.

    A function whose probes cannot all be placed is left without any (a logged
    warning): an entry without all of its RETs would open calls nothing closes.
    """
    attached = []
    for name, fn, returns, entry_fn in (
        ("Write", target.write, target.write_returns, GO_WRITE_ENTRY),
        ("Read", target.read, target.read_returns, GO_READ_ENTRY),
    ):
        if fn is None:
            continue
        placed: list[int] = []
        placement = go_entry_placement(host_path, fn)
        log.debug("%s: crypto/tls.(*Conn).%s entry at %#x (+%d, %s): %s", target.path,
                  name, placement.address, placement.offset, placement.kind,
                  placement.reason)  # fmt: skip
        points: tuple[CompletionPoint, ...] = ()
        if name == "Write":
            completion, why = go_write_completion(host_path, target)
            try:
                # Before any probe: a point whose config cannot be set is not used.
                for point in completion.points if completion else ():
                    program.set_go_write_point(point)
                if completion is not None:
                    points, returns = completion.points, completion.kept_returns
            except ValueError as exc:
                why = str(exc)
            log.debug("%s: crypto/tls.(*Conn).Write completion %s: %s", target.path,
                      "points" if points else "not used", why)  # fmt: skip
            program.note_placement(single_stepped_uretprobe=not points)
        try:
            for ret in returns:
                program.attach_uprobe(host_path, ret, GO_RETURN, None)
                placed.append(ret)
            for point in points:
                program.attach_uprobe(host_path, point.address, GO_WRITE_DONE, None)
                placed.append(point.address)
            if not target.pie:
                # Runtime address == file address only outside PIE binaries: the
                # only case where the entry probe can find its config by address
                # (PT_REGS_IP: the probe's own address).
                program.set_go_tls_config(placement.address, target)
            program.attach_uprobe(host_path, placement.address, entry_fn, None)
        except Exception as exc:  # bcc raises bare Exception
            where = placed[-1] if placed else fn.address
            log.warning(
                "%s: cannot probe crypto/tls.(*Conn).%s (at %#x): %s",
                target.path,
                name,
                where,
                exc,
            )
            for ret in placed:
                try:
                    program.detach_uprobe(host_path, ret)
                except Exception as detach_exc:
                    log.debug("detaching %#x in %s: %s", ret, host_path, detach_exc)
            continue
        done = f"+{len(points)} done" if points else ""
        attached.append(f"{name}+{len(returns)} RET{done}")
    return attached
