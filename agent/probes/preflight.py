"""Check, before loading any probe, that this host can run tlscap's eBPF capture.

Every check is a small function returning ``None`` when fine or one line saying what is
missing and how to fix it. :func:`check_environment` runs them all and raises one
:class:`EnvironmentProblem` listing every problem, so a user fixes everything in one
round instead of discovering issues one failed run at a time.

Order matters in one place: the tracefs check runs before bcc is imported, because
bcc picks its tracefs path once, at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.probes import kernel_headers
from agent.probes.kernel_headers import KernelHeadersMissing

__all__ = [
    "EnvironmentProblem",
    "Preflight",
    "check_bcc",
    "check_bpf_syscall",
    "check_environment",
    "check_kernel_features",
    "check_kernel_headers",
    "check_root",
    "check_tracefs",
    "check_uprobes",
    "collect_problems",
]

Check = Callable[[], str | None]

TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")
UPROBE_PMU = Path("/sys/bus/event_source/devices/uprobe")

# bpf(2) syscall numbers; ctypes has no wrapper for it.
_BPF_SYSCALL = {
    "x86_64": 321,
    "aarch64": 280,
    "riscv64": 280,
    "i686": 357,
    "i386": 357,
    "armv7l": 386,
    "ppc64le": 361,
    "s390x": 351,
}
_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_ARRAY = 2


class EnvironmentProblem(RuntimeError):
    """The host cannot run the eBPF capture; ``str()`` is one line per problem."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        # A plain message is accepted too (and split into its lines).
        self.problems = problems.splitlines() if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Preflight:
    """What the loader needs to know from a successful preflight."""

    # Value for BCC_KERNEL_SOURCE, or None when bcc finds the kernel's own headers.
    kernel_source: Path | None


def _is_root() -> bool:
    return os.geteuid() == 0


def check_root(euid: int | None = None) -> str | None:
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return (
            f"not running as root (euid {euid}): loading eBPF probes needs root; re-run with sudo"
        )
    return None


def check_bcc() -> str | None:
    # Importing (not just finding) the module also loads libbcc.so, which is the
    # half that is most often missing.
    try:
        importlib.import_module("bcc")
    except Exception as exc:  # bcc raises plain Exception/OSError when libbcc is absent
        return (
            f"bcc is not importable ({type(exc).__name__}: {exc}); "
            "install it with `apt-get install python3-bpfcc` (or run `make setup`) and use "
            "a Python that sees Debian's dist-packages (e.g. the --system-site-packages .venv)"
        )
    return None


def check_uprobes(uprobe_pmu: Path = UPROBE_PMU) -> str | None:
    if not uprobe_pmu.exists():
        return (
            f"this kernel has no uprobe support ({uprobe_pmu} is absent); "
            "tlscap needs a kernel built with CONFIG_UPROBE_EVENTS=y"
        )
    return None


def _mount_tracefs(target: Path) -> None:
    """mount -t tracefs nodev <target>, via libc so no mount(8) binary is needed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(b"nodev", os.fsencode(target), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _tracefs_in_use(tracefs: Path, debugfs_tracing: Path) -> Path:
    # Same rule bcc applies at import time: debugfs's tracing dir wins if it exists.
    return debugfs_tracing if debugfs_tracing.exists() else tracefs


def has_tracepoint(
    category: str,
    name: str,
    tracefs: Path = TRACEFS,
    debugfs_tracing: Path = DEBUGFS_TRACING,
) -> bool:
    """Whether this kernel has the tracepoint (feature probing for the -D flags)."""
    return (_tracefs_in_use(tracefs, debugfs_tracing) / "events" / category / name).is_dir()


def check_tracefs(
    tracefs: Path = TRACEFS,
    debugfs_tracing: Path = DEBUGFS_TRACING,
    *,
    is_root: bool | None = None,
    mount: Callable[[Path], None] = _mount_tracefs,
) -> str | None:
    """Tracepoints and uprobes are created through tracefs; mount it if it is not.

    A fresh boot of some minimal VMs leaves tracefs unmounted.
    """
    is_root = _is_root() if is_root is None else is_root
    try:
        if (_tracefs_in_use(tracefs, debugfs_tracing) / "events").is_dir():
            return None
    except PermissionError:
        return None if not is_root else f"cannot read {tracefs}: permission denied"
    if not is_root:
        return None  # nothing to try without root; check_root already says so
    how = f"mount -t tracefs nodev {tracefs}"
    try:
        mount(tracefs)
    except OSError as exc:
        return f"tracefs is not mounted and mounting it failed ({exc}); try `{how}`"
    if not (tracefs / "events").is_dir():
        return f"tracefs mounted at {tracefs} but has no events/ directory; try `{how}`"
    return None


def check_bpf_syscall(machine: str | None = None, *, is_root: bool | None = None) -> str | None:
    """Create and close a one-slot BPF array map: the cheapest proof that bpf() works."""
    is_root = _is_root() if is_root is None else is_root
    if not is_root:
        return None  # without CAP_BPF the answer is always EPERM; check_root covers it
    machine = machine or platform.machine()
    nr = _BPF_SYSCALL.get(machine)
    if nr is None:
        return None  # unknown architecture: let the real load report any problem

    class MapCreateAttr(ctypes.Structure):
        _fields_ = [
            ("map_type", ctypes.c_uint32),
            ("key_size", ctypes.c_uint32),
            ("value_size", ctypes.c_uint32),
            ("max_entries", ctypes.c_uint32),
            ("map_flags", ctypes.c_uint32),
        ]

    # The kernel accepts a prefix of union bpf_attr and treats the rest as zero.
    attr = MapCreateAttr(_BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_long(_BPF_MAP_CREATE),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    if fd >= 0:
        os.close(fd)
        return None
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return "the bpf() syscall is not available (kernel built without CONFIG_BPF_SYSCALL)"
    if err == errno.EPERM:
        return (
            "the bpf() syscall is denied (EPERM) even as root: check kernel lockdown, "
            "seccomp, or container capabilities (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)"
        )
    return f"the bpf() syscall failed creating a test map: {os.strerror(err)}"


def check_kernel_features() -> str | None:
    """The BPF facilities eBPF capture cannot do without (ring buffer: 5.8+, ...).

    Optional ones only degrade the capture; BpfProgram logs those, one line each
    (agent/probes/kernel_features.py).
    """
    from agent.probes import kernel_features  # it imports has_tracepoint from here

    try:
        return kernel_features.detect().required_problem()
    except ValueError as exc:  # a bad TLSCAP_KERNEL_FEATURES_OFF
        return str(exc)


def check_kernel_headers(
    cache_dir: Path | None = None, *, is_root: bool | None = None
) -> tuple[Path | None, str | None]:
    """Return (BCC_KERNEL_SOURCE value or None, problem or None).

    A BCC_KERNEL_SOURCE already in the environment wins. Otherwise, as root, this
    prepares the merged header tree (see kernel_headers); without root it only checks
    that one could be prepared, since the cache is not writable anyway.
    """
    is_root = _is_root() if is_root is None else is_root
    override = os.environ.get(kernel_headers.BCC_KERNEL_SOURCE)
    if override:  # the user chose a tree; respect it, but catch an obvious typo
        if not (Path(override) / "include").is_dir():
            return None, f"{kernel_headers.BCC_KERNEL_SOURCE}={override} has no include/ dir"
        return Path(override), None
    try:
        if is_root:
            return kernel_headers.find_kernel_source(cache_dir), None
        if not kernel_headers.has_real_headers():
            kernel_headers.locate_header_sources()
        return None, None
    except KernelHeadersMissing as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot prepare kernel headers for bcc: {exc}"


def collect_problems(checks: Iterable[Check]) -> list[str]:
    """Run every check (even after a failure) and return the problems in order."""
    return [problem for check in checks if (problem := check()) is not None]


def check_environment(
    cache_dir: Path | None = None,
    *,
    checks: Iterable[Check] | None = None,
    headers_check: Callable[[], tuple[Path | None, str | None]] | None = None,
) -> Preflight:
    """Run all checks; raise EnvironmentProblem listing every problem, else return Preflight.

    *checks* and *headers_check* replace the real checks (for tests).
    """
    if checks is None:
        checks = [
            check_root,
            check_uprobes,
            check_tracefs,
            check_bcc,
            check_bpf_syscall,
            check_kernel_features,
        ]
    if headers_check is None:

        def headers_check() -> tuple[Path | None, str | None]:
            return check_kernel_headers(cache_dir)

    problems = collect_problems(checks)
    kernel_source, headers_problem = headers_check()
    if headers_problem is not None:
        problems.append(headers_problem)
    if problems:
        raise EnvironmentProblem(problems)
    return Preflight(kernel_source=kernel_source)
