"""Target discovery: which files on this node get TLS uprobes (OpenSSL-family
libraries, executables with OpenSSL linked in, GnuTLS, NSS/NSPR, Go executables).

A uprobe is attached to an inode, and fires in every process that maps that file, so
the unit of work here is a distinct file — ``(st_dev, st_ino)`` — never a process. A
node has hundreds of processes mapping the same few libraries; the scanner remembers
its verdict per file and reports each TLS library once, the first time it sees it.

Files are opened as ``/proc/<pid>/root/<path>`` so libraries inside containers (other
mount namespaces) are reached through the process that maps them.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.probes.elf_symbols import ElfError, find_symbols
from agent.probes.go_binary import is_go_binary
from agent.probes.library_probes import OPENSSL_PROBES, PROBED_SYMBOLS

__all__ = [
    "TLS_FUNCTIONS",
    "Mapping",
    "TargetScanner",
    "TlsLibrary",
    "is_libssl_name",
    "parse_maps",
]

log = logging.getLogger(__name__)

TLS_FUNCTIONS = frozenset(p.symbol for p in OPENSSL_PROBES)  # OpenSSL's data functions
# The _ex variants alone don't make a static TLS stack: BoringSSL has neither, and
# OpenSSL builds always define the plain pair too.
_STATIC_MARKERS = frozenset({"SSL_write", "SSL_read"})
# A file defining any of these is a GnuTLS, or an NSS/NSPR, library. NSS's pieces are
# found by symbol rather than name: Firefox folds NSPR and libssl3 into its libnss3.so.
_GNUTLS_MARKERS = frozenset({"gnutls_record_recv", "gnutls_record_send"})
_NSS_MARKERS = frozenset({"PR_Read", "PR_Write", "SSL_ImportFD"})

# libssl.so, libssl.so.3, libssl.so.1.1, and auditwheel-vendored copies such as
# libssl-8ab2c3d4.so.1.1 — but not NSS's libssl3.so, which has no SSL_write.
_LIBSSL_NAME = re.compile(r"libssl(?:-[0-9a-f]+)?\.so(?:\.[0-9.]+)?")
# Shared TLS libraries probed up front (system_libraries), before anything maps them.
_SYSTEM_TLS_NAME = re.compile(
    r"libssl(?:-[0-9a-f]+)?\.so(?:\.[0-9.]+)?|libgnutls\.so(?:\.[0-9.]+)?"
    r"|libnspr4\.so|libssl3\.so|libnss3\.so"
)

_DELETED = " (deleted)"

LibraryKind = Literal["libssl", "static", "gnutls", "nss", "go"]


def is_libssl_name(path: str) -> bool:
    """True when the file name of ``path`` is an OpenSSL/BoringSSL ``libssl`` shared object."""
    return _LIBSSL_NAME.fullmatch(os.path.basename(path)) is not None


@dataclass(frozen=True)
class TlsLibrary:
    """One file to attach TLS uprobes to (attach once: the probe covers every process)."""

    host_path: str  # openable by the agent, e.g. /proc/<pid>/root/usr/lib/libssl.so.3
    path: str  # the path as the mapping process sees it
    dev: int  # st_dev of host_path: together with ino, the file's identity
    ino: int
    kind: LibraryKind
    symbols: frozenset[str]  # which of the probed functions (PROBED_SYMBOLS) the file defines


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/<pid>/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: int  # os.makedev(major, minor) as the kernel printed it
    inode: int
    path: str | None  # None for anonymous memory; "[vdso]", "[heap]", ... as printed
    deleted: bool = False  # the kernel marked the path " (deleted)"

    @property
    def is_executable_file(self) -> bool:
        return "x" in self.perms and self.inode != 0 and (self.path or "").startswith("/")


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of /proc/<pid>/maps; malformed lines are skipped."""
    mappings = []
    # split("\n"), not splitlines(): file names may contain \r, \f, \x1c, ... and the
    # kernel escapes only "\n" itself (as "\012").
    for line in text.split("\n"):
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        addresses, perms, offset, dev, inode = parts[:5]
        path = parts[5] if len(parts) == 6 else None
        deleted = False
        if path is not None and path.endswith(_DELETED):
            path, deleted = path[: -len(_DELETED)], True
        try:
            start, end = (int(a, 16) for a in addresses.split("-", 1))
            major, minor = (int(d, 16) for d in dev.split(":", 1))
            mapping = Mapping(
                start=start,
                end=end,
                perms=perms,
                offset=int(offset, 16),
                dev=os.makedev(major, minor),
                inode=int(inode),
                path=path,
                deleted=deleted,
            )
        except ValueError:
            continue
        mappings.append(mapping)
    return mappings


@dataclass(frozen=True)
class _Verdict:
    # Size and mtime guard against a (dev, ino) pair being reused by a new file after
    # the old one was deleted: the cached "not TLS" would otherwise hide a new libssl.
    fingerprint: tuple[int, int]
    library: TlsLibrary | None


def pid_alive(pid: int) -> bool:
    """Whether a process exists (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_pids(proc_root: str = "/proc") -> list[int]:
    """Every process under proc_root (an unreadable /proc is logged: no pids)."""
    try:
        names = os.listdir(proc_root)
    except OSError as e:
        log.warning("cannot list %s: %s", proc_root, e.strerror or e)
        return []
    return sorted(int(n) for n in names if n.isdigit())


class TargetScanner:
    """Finds files defining TLS functions, reporting each distinct file once.

    Not thread-safe: one scanner belongs to one discovery loop.
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        exclude_pids: Iterable[int] = (),
        host_root: str | None = None,
        library_dirs: Sequence[str] | None = None,
        use_ldconfig: bool = True,
    ) -> None:
        """
        ``exclude_pids``: processes never scanned (the agent itself). Their libraries
        still get probes if another process maps them — a uprobe is per file, so
        filtering an excluded process's events belongs in the BPF program.
        ``host_root``: where the host's file system is visible for
        ``system_libraries()``; default ``<proc_root>/1/root`` when readable (the agent
        in a hostPID container), else ``/``.
        """
        self.proc_root = proc_root.rstrip("/") or "/"
        self.exclude_pids = frozenset(exclude_pids)
        self._host_root = host_root
        self._library_dirs = library_dirs
        self._use_ldconfig = use_ldconfig
        self._verdicts: dict[tuple[int, int], _Verdict] = {}

    # -- public ---------------------------------------------------------------------------

    def scan_pid(self, pid: int) -> list[TlsLibrary]:
        """TLS libraries mapped by ``pid`` that this scanner has not reported before."""
        if pid in self.exclude_pids:
            return []
        return self._libraries_in(pid, self._read_maps(pid) or [], only_new=True)

    def libraries_of(self, pid: int, mappings: list[Mapping]) -> list[TlsLibrary]:
        """Every TLS library among ``pid``'s (already read) mappings, reported before or
        not (for inventories)."""
        if pid in self.exclude_pids:
            return []
        return self._libraries_in(pid, mappings, only_new=False)

    def _libraries_in(self, pid: int, mappings: list[Mapping], only_new: bool) -> list[TlsLibrary]:
        found = []
        considered: set[tuple[int, int]] = set()
        for mapping in mappings:
            if not mapping.is_executable_file or (mapping.dev, mapping.inode) in considered:
                continue
            considered.add((mapping.dev, mapping.inode))
            library = self._consider_mapping(pid, mapping, only_new)
            if library is not None:
                found.append(library)
        return found

    def _read_maps(self, pid: int) -> list[Mapping] | None:
        """The parsed /proc/<pid>/maps, or None (logged) when it cannot be read."""
        maps_path = f"{self.proc_root}/{pid}/maps"
        try:
            with open(maps_path, encoding="utf-8", errors="surrogateescape") as f:
                return parse_maps(f.read())
        except (FileNotFoundError, ProcessLookupError):
            log.debug("pid %d: skipped: exited before %s could be read", pid, maps_path)
        except OSError as e:
            log.warning("pid %d: skipped: cannot read %s: %s", pid, maps_path, e.strerror or e)
        return None

    def scan_all(self, pids: Iterable[int] | None = None) -> list[TlsLibrary]:
        """New TLS libraries of ``pids``, or of every process under ``proc_root``."""
        if pids is None:
            pids = list_pids(self.proc_root)
        found = []
        for pid in pids:
            found.extend(self.scan_pid(pid))
        return found

    def system_libraries(self) -> list[TlsLibrary]:
        """New TLS libraries (libssl, libgnutls, NSS's libnspr4/libssl3/libnss3) installed
        on the host, whether or not anything maps them.

        Probing them up front covers processes started later without waiting for a scan
        to notice them: the uprobe is already on the file they load.
        """
        root = self._resolve_host_root()
        by_key: dict[tuple[int, int], tuple[str, str, os.stat_result]] = {}
        for path in self._system_library_paths(root):
            host_path = _join_root(root, path)
            try:
                st = os.stat(host_path)
            except OSError as e:
                log.debug("system library %s: skipped: %s", host_path, e.strerror or e)
                continue
            key = (st.st_dev, st.st_ino)
            current = by_key.get(key)
            # Several names reach one file (libssl.so -> libssl.so.3, /lib -> /usr/lib);
            # prefer one that is not a symlink, so logs and probes name the real file.
            if current is None or (os.path.islink(current[1]) and not os.path.islink(host_path)):
                by_key[key] = (path, host_path, st)
        found = []
        for path, host_path, st in by_key.values():
            library = self._consider_file(f"system library {path}", path, host_path, st)
            if library is not None:
                found.append(library)
        return found

    def forget(self, dev: int, ino: int) -> None:
        """Drop the verdict on a file, so the next scan that meets it reports it again
        (after its probes were detached, or their attach failed)."""
        self._verdicts.pop((dev, ino), None)

    # -- one file ---------------------------------------------------------------------

    def _consider_mapping(self, pid: int, mapping: Mapping, only_new: bool) -> TlsLibrary | None:
        assert mapping.path is not None
        where = f"pid {pid}: {mapping.path}"
        if mapping.deleted:
            # The path now names another file or nothing; probing it would miss this one.
            log.debug("%s: skipped: deleted since it was mapped", where)
            return None
        host_path = f"{self.proc_root}/{pid}/root{mapping.path}"
        try:
            st = os.stat(host_path)
        except (FileNotFoundError, ProcessLookupError):
            log.debug("%s: skipped: process exited or file removed", where)
            return None
        except OSError as e:
            log.warning("%s: skipped: cannot stat %s: %s", where, host_path, e.strerror or e)
            return None
        # Only the inode number is compared: on overlayfs (container roots) st_dev is the
        # overlay's own while maps may show the layer's device (older kernels); overlayfs
        # keeps the layer's inode number for files in the usual (same-fs / xino) setups.
        if st.st_ino != mapping.inode:
            log.info(
                "%s: skipped: replaced on disk since it was mapped (mapped inode %d, now %d)",
                where,
                mapping.inode,
                st.st_ino,
            )
            return None
        return self._consider_file(where, mapping.path, host_path, st, only_new)

    def _consider_file(
        self, where: str, path: str, host_path: str, st: os.stat_result, only_new: bool = True
    ) -> TlsLibrary | None:
        key = (st.st_dev, st.st_ino)
        fingerprint = (st.st_size, st.st_mtime_ns)
        known = self._verdicts.get(key)
        if known is not None and known.fingerprint == fingerprint:
            # Judged before, and reported then if it is a TLS library.
            return None if only_new else known.library
        try:
            symbols = frozenset(find_symbols(host_path, PROBED_SYMBOLS))
        except ElfError as e:
            if isinstance(e.__cause__, OSError):
                # About this attempt (permissions, a process that just exited), not about
                # the file: left out of the cache so a later scan tries again.
                gone = isinstance(e.__cause__, FileNotFoundError | ProcessLookupError)
                log.log(logging.DEBUG if gone else logging.WARNING, "%s: skipped: %s", where, e)
                return None
            log.warning("%s: not probed: %s", where, e)
            symbols = frozenset()
        library = self._classify(where, path, host_path, key, symbols)
        self._verdicts[key] = _Verdict(fingerprint, library)
        return library

    @staticmethod
    def _classify(
        where: str, path: str, host_path: str, key: tuple[int, int], symbols: frozenset[str]
    ) -> TlsLibrary | None:
        if is_libssl_name(path):
            if not symbols & TLS_FUNCTIONS:
                log.info("%s: not probed: named like libssl but defines no SSL_read/write", where)
                return None
            kind: LibraryKind = "libssl"
        elif symbols & _STATIC_MARKERS:
            kind = "static"
        elif symbols & _GNUTLS_MARKERS:
            kind = "gnutls"
        elif symbols & _NSS_MARKERS:
            kind = "nss"
        elif is_go_binary(host_path):
            # Go's TLS lives in the executable, under Go's own names: whether it
            # is used, and where, is for the Go attach step to find out.
            kind = "go"
        else:
            return None
        return TlsLibrary(host_path, path, key[0], key[1], kind, symbols)

    # -- enumeration ------------------------------------------------------------------

    def _resolve_host_root(self) -> str:
        if self._host_root is not None:
            return self._host_root
        init_root = f"{self.proc_root}/1/root"
        # A hostPID container sees the host through init's root; elsewhere (or when
        # init's root is not ours to read) the agent's own root is the best guess.
        return init_root if os.path.isdir(init_root) else "/"

    def _system_library_paths(self, root: str) -> list[str]:
        paths = self._ldconfig_paths(root) if self._use_ldconfig else []
        for directory in self._library_dirs or _default_library_dirs():
            try:
                names = sorted(os.listdir(_join_root(root, directory)))
            except OSError:
                continue
            paths.extend(os.path.join(directory, n) for n in names if _SYSTEM_TLS_NAME.fullmatch(n))
        return paths

    def _ldconfig_paths(self, root: str) -> list[str]:
        ldconfig = shutil.which("ldconfig") or shutil.which("ldconfig", path="/sbin:/usr/sbin")
        if ldconfig is None:
            return []
        cache = _join_root(root, "/etc/ld.so.cache")
        try:
            out = subprocess.run(
                [ldconfig, "-p", "-C", cache],
                capture_output=True,
                text=True,
                errors="surrogateescape",
                timeout=10,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("ldconfig -p -C %s failed, scanning library dirs only: %s", cache, e)
            return []
        return _parse_ldconfig(out)


def _parse_ldconfig(text: str) -> list[str]:
    """TLS library paths from ``ldconfig -p`` lines like
    ``libssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3``."""
    paths = []
    for line in text.split("\n"):
        name, sep, path = line.strip().partition(" => ")
        if sep and _SYSTEM_TLS_NAME.fullmatch(name.split(" ", 1)[0]) and path.startswith("/"):
            paths.append(path)
    return paths


def _default_library_dirs() -> list[str]:
    multiarch = f"{platform.machine()}-linux-gnu"
    return [
        f"/lib/{multiarch}",
        f"/usr/lib/{multiarch}",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/lib",
        "/usr/local/lib64",
    ]


def _join_root(root: str, path: str) -> str:
    return path if root == "/" else root.rstrip("/") + path
