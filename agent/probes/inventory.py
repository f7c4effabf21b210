"""What `tlscap targets` reports: per process, the TLS library it uses, whether tlscap
has probes on it, and - for programs tlscap cannot trace - why.

The verdicts reuse target discovery (agent/probes/targets.py) and the Go analysis the
agent itself runs, so "traceable" here means exactly "the agent would attach".  What
is probed right now is the kernel's answer (``bpftool perf list``), not a guess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

from agent.probes.go_binary import GoBinaryError, GoBinaryUnsupported, analyze_go_tls
from agent.probes.library_probes import nspr_covering_library, probe_points
from agent.probes.targets import Mapping, TargetScanner, TlsLibrary, list_pids, parse_maps

log = logging.getLogger(__name__)

Status = Literal["attached", "traceable", "not traceable", "unreadable", "no TLS"]

LIBRARY_NAMES = {"libssl": "openssl", "static": "openssl (static)", "gnutls": "gnutls",
                 "nss": "nss", "go": "go"}  # fmt: skip

# Version strings compiled into each library (in .rodata; no symbol needed).
_OPENSSL_VERSION = re.compile(rb"OpenSSL (\d+\.\d+\.\d+[a-z]?)")
_GNUTLS_VERSION = re.compile(rb"GnuTLS (\d+\.\d+\.\d+)")
_NSS_VERSION = re.compile(rb"NSS (\d+\.\d+(?:\.\d+)?)")
# Libraries we have no probes for, recognised by file name.
_UNSUPPORTED_LIBRARIES = re.compile(rb"lib(mbedtls|wolfssl|s2n|botan-[0-9]+|rustls[^/]*)\.so")
# Markers of TLS code linked into an executable whose symbols are gone.
_STATIC_TLS_MARKERS = (
    ("rustls", re.compile(rb"rustls[-_/:]")),
    ("boringssl", re.compile(rb"BoringSSL")),
    ("openssl", _OPENSSL_VERSION),
)
_MAX_MARKER_SCAN = 512 << 20  # larger executables are not searched for markers


@dataclass(frozen=True)
class TargetRow:
    """One line of the report: a process and one TLS library (or why there is none)."""

    pid: int
    comm: str
    library: str  # "openssl", "openssl (static)", "gnutls", "nss", "go", "java", ...
    status: Status
    path: str = ""
    version: str = ""
    detail: str = ""  # the probed functions, or why it cannot be traced
    probed_by: list[int] = field(default_factory=list)  # pids holding probes on the file

    def to_json(self) -> dict:
        return asdict(self)


class AttachedProbes:
    """Which files have uprobes now, and whose they are (the kernel's answer)."""

    def __init__(self, owners: dict[tuple[int, int], set[int]], error: str | None = None):
        self._owners = owners  # (st_dev, st_ino) -> pids holding a uprobe perf fd on it
        self.error = error

    @classmethod
    def from_bpftool(cls, bpftool: str = "bpftool") -> AttachedProbes:
        try:
            out = subprocess.run(
                [bpftool, "-j", "perf", "list"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
            entries = json.loads(out or "[]")
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            return cls({}, f"cannot list attached probes with {bpftool}: {detail}".strip())
        return cls.from_entries(entries)

    @classmethod
    def from_entries(cls, entries: Iterable[dict]) -> AttachedProbes:
        owners: dict[tuple[int, int], set[int]] = {}
        stats: dict[str, tuple[int, int] | None] = {}
        for entry in entries:
            if entry.get("fd_type") not in ("uprobe", "uretprobe"):
                continue
            name = entry.get("filename", "")
            if name not in stats:
                try:
                    st = os.stat(name)
                    stats[name] = (st.st_dev, st.st_ino)
                except OSError:
                    stats[name] = None  # a container's file seen through a gone /proc path
            key = stats[name]
            if key is not None:
                owners.setdefault(key, set()).add(int(entry.get("pid", 0)))
        return cls(owners)

    def owners(self, dev: int, ino: int) -> set[int]:
        return self._owners.get((dev, ino), set())


def is_tlscap_process(pid: int, proc_root: str = "/proc") -> bool:
    """Whether pid is a tlscap agent (`tlscap run`, or `python -m agent run`)."""
    try:
        with open(f"{proc_root}/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    names = [os.path.basename(a) for a in argv]
    return "tlscap" in names or any(
        argv[i : i + 2] == ["-m", "agent"] for i in range(len(argv) - 1)
    )


class Inventory:
    """Builds TargetRows; caches what it learned per file, so shared libraries are read
    once however many processes map them."""

    def __init__(
        self, attached: AttachedProbes, proc_root: str = "/proc", own_pid: int | None = None
    ) -> None:
        self.proc_root = proc_root
        self.attached = attached
        self._scanner = TargetScanner(proc_root, exclude_pids=[own_pid or os.getpid()])
        self._versions: dict[tuple[str, tuple[int, int]], str] = {}
        self._markers: dict[tuple[int, int], str | None] = {}
        self._go: dict[tuple[int, int], tuple[Status, str, str]] = {}
        self._agents: dict[int, bool] = {}

    def rows(self, pids: Iterable[int] | None = None, include_all: bool = False) -> list[TargetRow]:
        out = []
        for pid in list_pids(self.proc_root) if pids is None else pids:
            if pid in self._scanner.exclude_pids:
                continue
            rows = self.process(pid)
            out += [r for r in rows if include_all or r.status != "no TLS"]
        return out

    def process(self, pid: int) -> list[TargetRow]:
        comm = _read_text(f"{self.proc_root}/{pid}/comm")
        if comm is None:
            return []  # exited
        try:
            with open(
                f"{self.proc_root}/{pid}/maps", encoding="utf-8", errors="surrogateescape"
            ) as f:
                mappings = parse_maps(f.read())
        except (FileNotFoundError, ProcessLookupError):
            return []
        except OSError as exc:
            reason = f"cannot read /proc/{pid}/maps: {exc.strerror or exc}"
            return [TargetRow(pid, comm, "?", "unreadable", detail=reason)]
        libraries = self._scanner.libraries_of(pid, mappings)
        rows = [self._library_row(pid, comm, lib, mappings) for lib in libraries]
        rows = [r for r in rows if r is not None]
        if not rows:
            rows = [self._why_not(pid, comm, mappings)]
        return rows

    # -- traceable libraries --------------------------------------------------------------

    def _library_row(
        self, pid: int, comm: str, lib: TlsLibrary, mappings: list[Mapping]
    ) -> TargetRow | None:
        if lib.kind == "go":
            status, version, detail = self._go_verdict(lib)
            if not status:
                return None  # a Go program without crypto/tls
        else:
            status = "traceable"
            version = self._library_version(pid, lib, mappings)
            detail = ", ".join(p.symbol for p in probe_points(lib.kind, lib.symbols))
        owners = sorted(self.attached.owners(lib.dev, lib.ino))
        if lib.kind == "nss" and not owners and "SSL_ImportFD" not in lib.symbols:
            # A libnspr4 whose calls the probes of the libssl3 beside it see: it is
            # covered when that file is attached (library_probes._nspr_covered).
            covering = nspr_covering_library(lib)
            if covering is not None:
                detail = f"{detail} (served by the SSL-layer probes of {covering})"
                with contextlib.suppress(OSError):
                    st = os.stat(covering)
                    owners = sorted(self.attached.owners(st.st_dev, st.st_ino))
        if status == "traceable" and any(self._is_agent(o) for o in owners):
            status = "attached"
        return TargetRow(pid, comm, LIBRARY_NAMES[lib.kind], status, lib.path, version, detail,
                         owners)  # fmt: skip

    def _go_verdict(self, lib: TlsLibrary) -> tuple[Status | str, str, str]:
        key = (lib.dev, lib.ino)
        if key not in self._go:
            try:
                target = analyze_go_tls(lib.host_path)
            except GoBinaryUnsupported as exc:
                self._go[key] = ("not traceable", "", str(exc))
            except GoBinaryError:
                self._go[key] = ("", "", "")
            else:
                names = ", ".join(fn.name for fn in (target.write, target.read) if fn)
                self._go[key] = ("traceable", target.version.raw, names)
        return self._go[key]

    def _library_version(self, pid: int, lib: TlsLibrary, mappings: list[Mapping]) -> str:
        # OpenSSL keeps its version string in libcrypto, NSS in libnss3; a static build
        # or a folded library has it in the file itself.
        if lib.kind in ("libssl", "static"):
            pattern, companion = _OPENSSL_VERSION, "libcrypto"
        elif lib.kind == "gnutls":
            pattern, companion = _GNUTLS_VERSION, None
        else:
            pattern, companion = _NSS_VERSION, "libnss3"
        candidates = [lib.host_path]
        if companion and lib.kind != "static":
            candidates = [
                f"{self.proc_root}/{pid}/root{m.path}"
                for m in mappings
                if m.path and os.path.basename(m.path).startswith(companion)
            ] + candidates
        for host_path in candidates:
            version = self._search_version(host_path, pattern)
            if version:
                return version
        return ""

    def _search_version(self, host_path: str, pattern: re.Pattern[bytes]) -> str:
        try:
            st = os.stat(host_path)
        except OSError:
            return ""
        key = (pattern.pattern.decode(), (st.st_dev, st.st_ino))
        if key not in self._versions:
            found = _search_file(host_path, pattern)
            self._versions[key] = found.group(1).decode() if found else ""
        return self._versions[key]

    def _is_agent(self, pid: int) -> bool:
        if pid not in self._agents:
            self._agents[pid] = is_tlscap_process(pid, self.proc_root)
        return self._agents[pid]

    # -- why not ------------------------------------------------------------------------

    def _why_not(self, pid: int, comm: str, mappings: list[Mapping]) -> TargetRow:
        paths = [m.path for m in mappings if m.path and m.path.startswith("/")]
        jvm = next((p for p in paths if os.path.basename(p) == "libjvm.so"), None)
        if jvm:
            return TargetRow(pid, comm, "java", "not traceable", jvm, detail=(
                "Java's TLS (JSSE) is Java code run by the JVM: there is no native function "
                "to probe; use --mode proxy for it"))  # fmt: skip
        for path in paths:
            found = _UNSUPPORTED_LIBRARIES.search(path.encode(errors="replace"))
            if found:
                name = found.group(1).decode().split("-")[0]
                return TargetRow(pid, comm, name, "not traceable", path, detail=(
                    f"{name} is not a library tlscap has probes for (OpenSSL/BoringSSL/"
                    "LibreSSL, GnuTLS, NSS and Go crypto/tls are)"))  # fmt: skip
        exe = _exe_mapping(pid, self.proc_root, mappings)
        if exe is not None:
            host_exe = f"{self.proc_root}/{pid}/root{exe.path}"
            problem = _unreadable(host_exe)
            if problem:
                return TargetRow(pid, comm, "?", "unreadable", exe.path or "",
                                 detail=f"cannot read the executable: {problem}")  # fmt: skip
            marker = self._static_marker(host_exe, exe)
            if marker == "rustls":
                return TargetRow(pid, comm, "rustls", "not traceable", exe.path or "", detail=(
                    "rustls is Rust compiled into the program, with no stable exported "
                    "functions to probe; use --mode proxy for it"))  # fmt: skip
            if marker in ("openssl", "boringssl"):
                version = self._search_version(host_exe, _OPENSSL_VERSION)
                return TargetRow(pid, comm, f"{marker} (static)", "not traceable",
                                 exe.path or "", version, detail=(
                    "statically linked and stripped: SSL_read/SSL_write have no symbols to "
                    "attach to (build with symbols, or link libssl dynamically)"))  # fmt: skip
        return TargetRow(pid, comm, "-", "no TLS")

    def _static_marker(self, host_path: str, exe: Mapping) -> str | None:
        key = (exe.dev, exe.inode)
        if key not in self._markers:
            self._markers[key] = None
            for name, pattern in _STATIC_TLS_MARKERS:
                if _search_file(host_path, pattern):
                    self._markers[key] = name
                    break
        return self._markers[key]


def _exe_mapping(pid: int, proc_root: str, mappings: list[Mapping]) -> Mapping | None:
    try:
        exe = os.readlink(f"{proc_root}/{pid}/exe")
    except OSError:
        return None
    exe = exe.removesuffix(" (deleted)")
    return next((m for m in mappings if m.path == exe and m.is_executable_file), None)


def _unreadable(path: str) -> str | None:
    """Why a file cannot be opened for reading, or None when it can (or is gone)."""
    try:
        with open(path, "rb"):
            return None
    except (FileNotFoundError, ProcessLookupError):
        return None  # the process exited: not a property of the program
    except OSError as exc:
        return exc.strerror or str(exc)


def _search_file(path: str, pattern: re.Pattern[bytes]) -> re.Match[bytes] | None:
    """Search a file's bytes without reading it into memory (mmap)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0 or size > _MAX_MARKER_SCAN:
                return None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                found = pattern.search(data)
                # Copy what we keep: the match must not outlive the mapping.
                return pattern.fullmatch(found.group(0)) if found else None
    except (OSError, ValueError) as exc:
        log.debug("cannot search %s: %s", path, exc)
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def format_table(rows: list[TargetRow]) -> str:
    """The human form: one line per row, the reason on the same line."""
    header = ("PID", "COMM", "LIBRARY", "VERSION", "STATUS", "PATH / DETAIL")
    lines = [header]
    for r in rows:
        where = r.path
        if r.status in ("not traceable", "unreadable"):
            where = f"{r.path}: {r.detail}" if r.path else r.detail
        elif r.probed_by and r.status == "traceable":
            pids = ", ".join(map(str, r.probed_by))
            where = f"{r.path} (probed by another tool: pid {pids})"
        lines.append((str(r.pid), r.comm, r.library, r.version or "-", r.status, where))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(col.ljust(w) for col, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )
