"""Compile and drive the eBPF program (bpf/*.c) through bcc.

This is the thin shell around the kernel: it builds the program with the run's
settings, attaches library probes, and gives the rest of the agent a few plain
operations (drain the ring, read counters, tell the kernel about sockets and
allowed processes).  Everything it hands out is plain bytes or ints.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.events import layout
from agent.flows.connection import KernelRegistration
from agent.probes import kernel_features
from agent.probes.kernel_features import KernelFeatures
from agent.probes.ring_reader import PAGE_SIZE, BatchHandler, RingReader

if TYPE_CHECKING:
    from agent.probes.go_binary import GoTlsTarget
    from agent.probes.go_write_completion import CompletionPoint

log = logging.getLogger(__name__)

# Concatenated in this order: the header first (maps and helpers every probe
# family uses) and the call completion they share, then one file per probe
# family; sockets.c's fd learning reaches into gotls.c's per-goroutine calls, so
# it comes after.  bcc only rewrites map operations in the main source text, so
# the files are joined rather than #included.
BPF_SOURCES = (
    "tlscap.h",
    "calls.c",
    "openssl.c",
    "gnutls.c",
    "nss.c",
    "gotls.c",
    "sockets.c",
    "process.c",
)


# The least room kept above the cut mark (bpf/tlscap.h TLSCAP_CUT_BYTES): chunks of
# 16 KiB in flight on every connection writing when the mark is passed.
CUT_HEADROOM_MIN = 256 << 10


def bpf_source_dir() -> Path:
    env = os.environ.get("TLSCAP_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


@dataclass(frozen=True)
class ProbeSettings:
    self_tgid: int
    filtered: bool = False  # --pid/--comm given: trace only allowed processes
    max_capture: int = 1 << 20  # per-call payload cap, bytes
    ringbuf_bytes: int = 64 << 20
    # Wake the consumer when this much is pending (else it drains on its timer).
    wake_bytes: int = 8 << 20
    # Shed whole connections that start while more than this fraction of the
    # ring is pending (user space is behind); 0 or 1.0: never shed.
    shed_fraction: float = 0.5
    # --hold-new-libraries: stop processes that map a TLS library until probed.
    hold_new_libraries: bool = False
    # sock:sock_{send,recv}_length exist (Linux 6.3+): sockets accepted by an
    # accept() that was already blocked when we attached get their endpoints
    # in the kernel (bpf/sockets.c).
    sock_length_tracepoints: bool = field(
        default_factory=lambda: kernel_features.detect().has("sock_length_tracepoints")
    )
    # What this kernel's BPF can do (agent/probes/kernel_features.py): code that
    # needs a missing helper is compiled out (-D flags below).
    kernel: KernelFeatures = field(default_factory=kernel_features.detect)

    def __post_init__(self) -> None:
        if not 0.0 <= self.shed_fraction <= 1.0:
            raise ValueError(f"shed_fraction must be within [0, 1], not {self.shed_fraction}")

    @property
    def shed_bytes(self) -> int:
        """The ring's high-water mark for shedding (TLSCAP_SHED_BYTES); 0: off."""
        if self.shed_fraction <= 0.0 or self.shed_fraction >= 1.0:
            return 0
        return max(1, int(self.ring_pages * PAGE_SIZE * self.shed_fraction))

    @property
    def cut_bytes(self) -> int:
        """The ring's cut mark (TLSCAP_CUT_BYTES): a followed connection whose call
        leaves more than this pending (or whose call of several chunks would) stops
        sending until the ring is back under `shed_bytes`.  The room above it takes
        what is in flight when the mark is passed (a chunk per connection writing at
        that moment) and every other event, so the ring itself need not refuse one;
        0 with shedding off."""
        shed = self.shed_bytes
        if not shed:
            return 0
        ring = self.ring_pages * PAGE_SIZE
        return max(shed, ring - max(ring // 8, CUT_HEADROOM_MIN))

    @property
    def ring_pages(self) -> int:
        """The ring's real size in pages: the kernel wants a power of two."""
        return _power_of_two_at_least(max(self.ringbuf_bytes // PAGE_SIZE, 16))

    def cflags(self) -> list[str]:
        pages = self.ring_pages
        wake = min(self.wake_bytes, pages * PAGE_SIZE // 4)
        return [
            f"-DTLSCAP_SELF_TGID={self.self_tgid}",
            f"-DTLSCAP_FILTER={1 if self.filtered else 0}",
            f"-DTLSCAP_MAX_CAPTURE={self.max_capture}",
            f"-DTLSCAP_RINGBUF_PAGES={pages}",
            f"-DTLSCAP_WAKE_BYTES={wake}",
            f"-DTLSCAP_SHED_BYTES={self.shed_bytes}",
            f"-DTLSCAP_CUT_BYTES={self.cut_bytes}",
            f"-DTLSCAP_SOCK_LENGTH_TP={1 if self.sock_length_tracepoints else 0}",
            f"-DTLSCAP_HOLD={1 if self.hold_new_libraries else 0}",
            *self.kernel.cflags(),
        ]


def _power_of_two_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def _uprobe_location(where: str | int) -> dict[str, str | int]:
    """bcc's keyword for a probe point given by symbol name or by virtual address."""
    return {"sym": where} if isinstance(where, str) else {"addr": where}


def program_text(source_dir: Path | None = None) -> str:
    src = source_dir or bpf_source_dir()
    return "\n".join((src / name).read_text() for name in BPF_SOURCES)


class BpfProgram:
    """The loaded program: one per agent run."""

    def __init__(self, settings: ProbeSettings, source_dir: Path | None = None) -> None:
        from bcc import BPF  # imported here: preflight reports a missing bcc first

        src = source_dir or bpf_source_dir()
        self.settings = settings
        for line in settings.kernel.off_lines():
            log.warning("%s", line)
        self._bpf = BPF(text=program_text(src), cflags=[f"-I{src}", *settings.cflags()])
        self._ring: RingReader | None = None
        # agent/probes/prologue.py: probes placed on emulated instructions, and calls
        # left to entry + uretprobe on a single-stepped first instruction.
        self._placements = {"probe_placements_emulated": 0, "probe_placements_entry_fallback": 0}

    @property
    def bcc(self) -> Any:
        return self._bpf

    # -- probes -------------------------------------------------------------

    def attach_uprobe(
        self, path: str, where: str | int, entry_fn: str | None, return_fn: str | None
    ) -> None:
        """Attach an entry probe, a return probe, or both to a function in a file,
        named by symbol or by virtual address.

        Raises whatever bcc raises (the caller logs and skips that target).
        """
        at = _uprobe_location(where)
        # The return probe first: a call that starts after the entry probe is
        # in place must find its return probe there too, or the state its entry
        # opens is never closed (and, before calls.c learnt to spot stale
        # entries, every later call on that thread and object was taken for a
        # nested one and dropped).  A call already running when the return
        # probe arrives has no uretprobe and no entry: nothing is opened.
        if return_fn:
            self._bpf.attach_uretprobe(name=path, fn_name=return_fn, **at)
        if entry_fn is None:
            return
        try:
            self._bpf.attach_uprobe(name=path, fn_name=entry_fn, **at)
        except Exception:
            if return_fn:
                self._bpf.detach_uretprobe(name=path, **at)
            raise

    def detach_uprobe(self, path: str, where: str | int) -> None:
        self._bpf.detach_uprobe(name=path, **_uprobe_location(where))

    def set_go_tls_config(self, entry_address: int, target: GoTlsTarget) -> None:
        """Tell gotls.c how to walk a *tls.Conn to its fd in the function at this address."""
        table = self._bpf["go_tls_configs"]
        config = table.Leaf()
        offsets = target.offsets
        # 0 never matches a real itab entry: without net.(*TCPConn).Close the
        # walk is never trusted and the nested-syscall fallback finds the fd.
        config.tcpconn_close = target.tcpconn_close.address if target.tcpconn_close else 0
        config.conn_off = offsets.tls_conn_conn
        config.iface_data_off = offsets.iface_data
        config.fd_off = offsets.tcpconn_fd
        config.sysfd_off = offsets.netfd_sysfd
        table[table.Key(entry_address)] = config

    def set_go_write_point(self, point: CompletionPoint) -> None:
        """Tell gotls.c where n and err are at this completion point of Write (its
        address is the runtime one: non-PIE binaries only).

        ValueError when another binary already has a point at this address with other
        locations: the key cannot tell them apart (non-PIE Go binaries all load at the
        same base), so that binary's Write keeps its RET probes instead.
        """
        # The proof tracks n only in RAX and err only in RBX (or stack slots).
        assert point.n.register in (None, "rax") and point.err.register in (None, "rbx")
        table = self._bpf["go_write_points"]
        key = table.Key(point.address)
        leaf = table.Leaf()
        leaf.n_sp_off = -1 if point.n.register else point.n.sp_offset
        leaf.err_sp_off = -1 if point.err.register else point.err.sp_offset
        old = table.get(key)
        if old is not None and (old.n_sp_off, old.err_sp_off) != (leaf.n_sp_off, leaf.err_sp_off):
            raise ValueError(f"{point.address:#x} is another binary's completion point")
        table[key] = leaf

    def kernel_feature_stats(self) -> dict[str, int]:
        """kernel_features_missing and kernel_feature_<name> (1 = in use) gauges."""
        return {**self.settings.kernel.stats(), **self._placements}

    def note_placement(self, single_stepped_uretprobe: bool) -> None:
        """Count one attached library probe (library_probes.attach_library)."""
        key = "entry_fallback" if single_stepped_uretprobe else "emulated"
        self._placements[f"probe_placements_{key}"] += 1

    def open_uprobes(self) -> int:
        return self._bpf.num_open_uprobes()

    def close(self) -> None:
        """Detach every probe and free the maps (also done by bcc at exit)."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._bpf.cleanup()

    # -- ring buffer --------------------------------------------------------

    def open_ring(self) -> None:
        """Map the ring for draining (agent/probes/ring_reader.py)."""
        self._ring = RingReader(self._bpf["events"].map_fd, self.settings.ring_pages * PAGE_SIZE)

    def drain(self, timeout_ms: int, handle: BatchHandler) -> int:
        """Wait up to timeout_ms for a forced wake-up, then hand every record
        written so far to `handle`, a batch at a time; returns how many.

        Events are submitted without waking us (a wake-up per event costs more
        than the probe), so the timeout is what normally ends the wait.
        """
        assert self._ring is not None, "open_ring() first"
        if timeout_ms > 0:
            self._ring.wait(timeout_ms)
        return self._ring.drain(handle)

    def ring_fill(self) -> tuple[int, int]:
        """(the most bytes ever found pending at a drain, the ring's size)."""
        if self._ring is None:
            return 0, self.settings.ring_pages * PAGE_SIZE
        return self._ring.peak_pending, self._ring.size

    # -- state shared with the kernel ---------------------------------------

    def counters(self) -> dict[str, int]:
        table = self._bpf["counters"]
        out = {}
        for idx, name in enumerate(layout.COUNTERS):
            out[name] = sum(table[ct.c_int(idx)])
        return out

    def register_socket(self, reg: KernelRegistration) -> None:
        """Tell the kernel about a socket it did not see created, or (reg.forget)
        that a TLS socket's process is gone.

        A socket known to carry TLS goes to `tls_sockets`, which connect/accept
        churn cannot evict (tlscap.h); the others to the `sockets` LRU, where
        the kernel moves them on their first TLS call.
        """
        sockets, tls_sockets = self._bpf["sockets"], self._bpf["tls_sockets"]
        key = sockets.Key((reg.tgid << 32) | (reg.fd & 0xFFFFFFFF))
        if reg.forget:
            # Its process exited without closing it: no close() will remove it.
            for table in (tls_sockets, sockets):
                with contextlib.suppress(KeyError):
                    del table[key]
            return
        info = sockets.Leaf()
        info.gen = reg.gen
        info.role = {"client": 1, "server": 2}.get(reg.role, 0)
        info.flags = 1 if reg.tls_seen else 0  # CONN_TLS_SEEN: report its close
        family = 0
        for ep, addr_field, port_field in (
            (reg.remote, "raddr", "rport"),
            (reg.local, "laddr", "lport"),
        ):
            if ep is None:
                continue
            addr = ipaddress.ip_address(ep.ip)
            if family and family != addr.version:
                # One end v4, one v6: a dual-stack socket; store both as v6.
                addr = ipaddress.IPv6Address(f"::ffff:{addr}") if addr.version == 4 else addr
            family = family or addr.version
            ct.memmove(getattr(info, addr_field), addr.packed, len(addr.packed))
            setattr(info, port_field, ep.port)
        info.family = {4: layout.AF_INET, 6: layout.AF_INET6}.get(family, 0)
        if reg.tls_seen:
            try:
                tls_sockets[key] = info
            except Exception as exc:  # bcc raises bare Exception: the map is full
                log.debug("tls_sockets full, %d/%d stays in the LRU: %s", reg.tgid, reg.fd, exc)
            else:
                with contextlib.suppress(KeyError):
                    del sockets[key]
                return
        sockets[key] = info

    def allow_tgids(self, tgids: Iterable[int]) -> None:
        table = self._bpf["allowed_tgids"]
        for tgid in tgids:
            table[table.Key(tgid)] = table.Leaf(1)

    def allow_comms(self, comms: Iterable[str]) -> None:
        table = self._bpf["allowed_comms"]
        for comm in comms:
            key = table.Key()
            # A char-array field reads back as a bytes copy: assign, don't memmove.
            key.comm = comm.encode()[:15]
            table[key] = table.Leaf(1)

    # -- load shedding (calls.c) ----------------------------------------------

    def shed_processes(self) -> dict[int, tuple[str, int]]:
        """pid -> (comm, connections shed) for each process the kernel shed
        connections of; those it had no room for are in the
        shed_connections_unattributed counter."""
        out = {}
        for key, value in self._bpf["shed_procs"].items():
            comm = bytes(value.comm).split(b"\0", 1)[0].decode(errors="replace")
            out[key.value] = (comm, value.connections)
        return out
