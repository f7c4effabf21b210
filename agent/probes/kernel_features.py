"""What this kernel's BPF can do, probed before the program is compiled.

bpf/*.c is one program: a single helper the kernel does not know makes the whole
load fail, OpenSSL capture included.  So each optional helper is probed here and
the program is compiled with a -D flag that leaves the code needing it out
(bpf_program.ProbeSettings.cflags); what is off is logged one line per feature and
counted in the stats record (`kernel_features_missing`, `kernel_feature_<name>`).

Features come in two kinds:

* required: without them eBPF capture cannot run at all (no ring buffer before
  Linux 5.8: tlscap has no perf-buffer path).  preflight.check_kernel_features
  turns a missing one into a one-line reason, and `--mode auto` then uses the proxy.
* optional: a -D flag leaves their code out and the capture degrades visibly.

Probing asks the kernel itself, the way libbpf's feature probes do: a helper
exists when the verifier does not reject a tiny program calling it as an unknown
function; a map type exists when a one-entry map of it can be created.  Where the
kernel cannot be asked (no root, bpf() denied) the first release that had the
feature decides.  The decisions (`decide`, `helper_known_from_log`) are plain
functions of their inputs, tested without a kernel.

TLSCAP_KERNEL_FEATURES_OFF=name,name forces features off on a kernel that has them
(tests run the real probes that way; an operator can use it to step around a
broken helper).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import platform
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.probes.preflight import has_tracepoint

log = logging.getLogger(__name__)

OVERRIDE_ENV = "TLSCAP_KERNEL_FEATURES_OFF"
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")


@dataclass(frozen=True)
class Feature:
    name: str
    what: str  # the kernel facility, as a user searches for it
    since: tuple[int, int]  # first mainline release that has it
    required: bool
    macro: str | None  # -D flag: 1 when present (None: no code to leave out)
    off_means: str  # what the user loses while it is off


FEATURES: tuple[Feature, ...] = (
    Feature(
        "ringbuf",
        "BPF ring buffer (BPF_MAP_TYPE_RINGBUF)",
        (5, 8),
        True,
        None,
        "no eBPF capture (tlscap has no perf-buffer path); --mode auto uses the proxy",
    ),
    Feature(
        "probe_read_user",
        "bpf_probe_read_user/_str helpers",
        (5, 5),
        True,
        None,
        "no eBPF capture; --mode auto uses the proxy",
    ),
    Feature(
        "syscall_tracepoints",
        "syscalls:* tracepoints (CONFIG_FTRACE_SYSCALLS)",
        (4, 7),
        True,
        None,
        "no eBPF capture (sockets are followed from syscall tracepoints); "
        "--mode auto uses the proxy",
    ),
    Feature(
        "sock_state_tracepoint",
        "sock:inet_sock_set_state tracepoint",
        (4, 16),
        True,
        None,
        "no eBPF capture; --mode auto uses the proxy",
    ),
    Feature(
        "task_pt_regs",
        "bpf_get_current_task_btf + bpf_task_pt_regs with kernel BTF",
        (5, 15),
        False,
        "TLSCAP_TASK_PT_REGS",
        "Go calls whose fd the *tls.Conn walk cannot give (wrapped conns, PIE binaries) "
        "learn it from the first socket syscall on the calling thread instead of the "
        "calling goroutine (a goroutine moved to another thread before its first "
        "syscall is not matched)",
    ),
    Feature(
        "cgroup_id",
        "bpf_get_current_cgroup_id helper",
        (4, 18),
        False,
        "TLSCAP_CGROUP_ID",
        "records carry no cgroup id: no container/pod attribution",
    ),
    Feature(
        "send_signal",
        "bpf_send_signal helper",
        (5, 3),
        False,
        "TLSCAP_SEND_SIGNAL",
        "--hold-new-libraries cannot stop a process at its TLS library mapping",
    ),
    Feature(
        "sock_length_tracepoints",
        "sock:sock_send_length/sock_recv_length tracepoints",
        (6, 3),
        False,
        None,  # bpf_program.ProbeSettings.sock_length_tracepoints: TLSCAP_SOCK_LENGTH_TP
        "sockets accepted by an accept() already blocked at start get their "
        "endpoints from /proc only",
    ),
)
BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}


@dataclass(frozen=True)
class KernelFeatures:
    """Which features this run uses; `forced_off` were turned off by the override."""

    present: Mapping[str, bool]
    release: str = ""
    forced_off: frozenset[str] = field(default_factory=frozenset)

    def has(self, name: str) -> bool:
        return self.present.get(name, False)

    @property
    def missing(self) -> list[Feature]:
        return [f for f in FEATURES if not self.has(f.name)]

    @property
    def missing_required(self) -> list[Feature]:
        return [f for f in self.missing if f.required]

    def cflags(self) -> list[str]:
        return [f"-D{f.macro}={1 if self.has(f.name) else 0}" for f in FEATURES if f.macro]

    def off_lines(self) -> list[str]:
        """One line per feature that is off: what, why, what it costs."""
        out = []
        for f in self.missing:
            why = (
                f"forced off by {OVERRIDE_ENV}"
                if f.name in self.forced_off
                else f"not in this kernel ({self.release or 'unknown'}; Linux "
                f"{f.since[0]}.{f.since[1]}+)"
            )
            out.append(f"kernel feature off: {f.name} ({f.what}): {why}: {f.off_means}")
        return out

    def required_problem(self) -> str | None:
        """preflight's one-line reason when eBPF capture cannot run here."""
        missing = self.missing_required
        if not missing:
            return None
        what = "; ".join(
            f"{f.what} (Linux {f.since[0]}.{f.since[1]}+"
            + (f", forced off by {OVERRIDE_ENV}" if f.name in self.forced_off else "")
            + ")"
            for f in missing
        )
        return (
            f"this kernel ({self.release or 'unknown'}) lacks what eBPF capture needs: {what}; "
            "tlscap has no perf-buffer fallback: run a 5.10+ kernel or use --mode proxy"
        )

    def stats(self) -> dict[str, int]:
        """Gauges for the stats record and /metrics: 1 = in use."""
        out = {"kernel_features_missing": len(self.missing)}
        out.update({f"kernel_feature_{f.name}": int(self.has(f.name)) for f in FEATURES})
        return out


# -- pure decisions -----------------------------------------------------------------


def parse_release(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_override(value: str | None) -> frozenset[str]:
    """TLSCAP_KERNEL_FEATURES_OFF: comma/space separated names; unknown names raise."""
    names = frozenset(n for n in re.split(r"[,\s]+", value or "") if n)
    unknown = sorted(names - BY_NAME.keys())
    if unknown:
        raise ValueError(
            f"{OVERRIDE_ENV}: unknown feature(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}"
        )
    return names


def decide(
    probed: Mapping[str, bool | None], release: str, forced_off: Iterable[str] = ()
) -> KernelFeatures:
    """Probe answers (None: could not ask) + the kernel release + the override."""
    forced = frozenset(forced_off)
    version = parse_release(release)
    present = {}
    for f in FEATURES:
        answer = probed.get(f.name)
        if answer is None:
            answer = version is not None and version >= f.since
        present[f.name] = bool(answer) and f.name not in forced
    return KernelFeatures(present=present, release=release, forced_off=forced)


_UNKNOWN_HELPER = re.compile(r"invalid func |unknown func ")


def helper_known_from_log(load_errno: int, verifier_log: str) -> bool | None:
    """libbpf's rule: the helper exists unless the verifier calls it unknown.

    A load that fails for another reason (the probe passes no arguments) still
    proves the helper is known.  EPERM/ENOSYS say nothing about the helper.
    """
    if load_errno == 0:
        return True
    if load_errno in (errno.EPERM, errno.ENOSYS):
        return None
    if _UNKNOWN_HELPER.search(verifier_log):
        return False
    if not verifier_log:
        return None  # no verifier verdict (an older kernel refusing the attr itself)
    return True  # rejected (EACCES/EINVAL) for its missing arguments: the helper is known


# -- asking the kernel ----------------------------------------------------------------

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "s390x": 351, "ppc64le": 361}
_BPF_MAP_CREATE = 0
_BPF_PROG_LOAD = 5
_MAP_TYPE_RINGBUF = 27
_PROG_TYPE_TRACEPOINT = 5
HELPERS = {
    "probe_read_user": (112,),
    "cgroup_id": (80,),
    "send_signal": (109,),
    "task_pt_regs": (158, 175),  # get_current_task_btf, task_pt_regs
}


class _Insn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint8),
        ("regs", ctypes.c_uint8),
        ("off", ctypes.c_int16),
        ("imm", ctypes.c_int32),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
    ]


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
    ]


def _bpf(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
    """(fd or -1, errno); (-1, ENOSYS) where the architecture is unknown."""
    nr = _BPF_SYSCALL.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_long(cmd),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    err = ctypes.get_errno() if fd < 0 else 0
    if fd >= 0:
        os.close(fd)
    return fd, err


def probe_helper(helper_id: int) -> bool | None:
    """Load `call helper; r0 = 0; exit` as a tracepoint program."""
    call, mov_r0_0, exit_ = 0x85, 0xB7, 0x95
    insns = (_Insn * 3)(
        _Insn(call, 0, 0, helper_id), _Insn(mov_r0_0, 0, 0, 0), _Insn(exit_, 0, 0, 0)
    )
    license_ = ctypes.create_string_buffer(b"GPL")
    log_buf = ctypes.create_string_buffer(8192)
    attr = _ProgLoadAttr(
        _PROG_TYPE_TRACEPOINT,
        3,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,
        len(log_buf),
        ctypes.addressof(log_buf),
        0,
    )
    _, err = _bpf(_BPF_PROG_LOAD, attr)
    return helper_known_from_log(err, log_buf.value.decode(errors="replace"))


def probe_ringbuf() -> bool | None:
    _, err = _bpf(_BPF_MAP_CREATE, _MapCreateAttr(_MAP_TYPE_RINGBUF, 0, 0, 4096))
    if err == 0:
        return True
    if err in (errno.EPERM, errno.ENOSYS, errno.EACCES):
        return None
    return False  # EINVAL: the map type is unknown


def probe_all(
    helper: Callable[[int], bool | None] = probe_helper,
    tracepoint: Callable[[str, str], bool] = has_tracepoint,
    btf: Path = VMLINUX_BTF,
) -> dict[str, bool | None]:
    answers: dict[str, bool | None] = {"ringbuf": probe_ringbuf()}
    for name, ids in HELPERS.items():
        each = [helper(i) for i in ids]
        answers[name] = None if None in each else all(each)
    if answers["task_pt_regs"] is not False and not btf.exists():
        answers["task_pt_regs"] = False  # bpf_get_current_task_btf needs vmlinux BTF
    tracefs_ok = tracepoint("sched", "sched_process_exec")  # tracefs readable at all
    for name, (cat, tp) in {
        "syscall_tracepoints": ("syscalls", "sys_enter_connect"),
        "sock_state_tracepoint": ("sock", "inet_sock_set_state"),
        "sock_length_tracepoints": ("sock", "sock_recv_length"),
    }.items():
        answers[name] = tracepoint(cat, tp) if tracefs_ok else None
    return answers


@functools.lru_cache(maxsize=4)
def _detect(release: str, override: str) -> KernelFeatures:
    return decide(probe_all(), release, parse_override(override))


def detect() -> KernelFeatures:
    """This kernel's features, with the TLSCAP_KERNEL_FEATURES_OFF override (cached)."""
    return _detect(platform.release(), os.environ.get(OVERRIDE_ENV, ""))
