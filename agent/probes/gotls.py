"""Attach the Go crypto/tls probes (bpf/gotls.c) to one Go executable.

The binary is read by agent/probes/go_binary.py; this module only places the probes:
a probe at every RET of ``(*Conn).Write`` and ``(*Conn).Read`` first, then the entry
probes, so that no call can be opened that nothing would close.  No uretprobes: Go
moves goroutine stacks, and a rewritten return address on a moved stack crashes the
program.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.probes.go_binary import GoTlsTarget

log = logging.getLogger(__name__)

GO_WRITE_ENTRY = "probe_gotls_write_enter"
GO_READ_ENTRY = "probe_gotls_read_enter"
GO_RETURN = "probe_gotls_return"


class GoAttacher(Protocol):
    def attach_uprobe(
        self, path: str, where: str | int, entry_fn: str, return_fn: str | None
    ) -> None: ...

    def detach_uprobe(self, path: str, where: str | int) -> None: ...

    def set_go_tls_config(self, entry_address: int, target: GoTlsTarget) -> None: ...


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
        try:
            for ret in returns:
                program.attach_uprobe(host_path, ret, GO_RETURN, None)
                placed.append(ret)
            if not target.pie:
                # Runtime address == file address only outside PIE binaries: the
                # only case where the entry probe can find its config by address.
                program.set_go_tls_config(fn.address, target)
            program.attach_uprobe(host_path, fn.address, entry_fn, None)
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
        attached.append(f"{name}+{len(returns)} RET")
    return attached
