"""Find kernel headers bcc can compile against, preparing a merged Debian tree if needed.

bcc compiles every BPF program with clang against kernel headers. When the running
kernel has its own headers (``/lib/modules/$(uname -r)/build``) bcc finds them itself
and we stay out of the way. Kernels without a headers package (custom VM kernels,
cloud images) are common, though, and uprobe/tracepoint programs read no kernel
structs, so any reasonably recent headers do. Debian ships them split in two trees:
``linux-headers-<ver>-common`` (arch-independent sources) and
``linux-headers-<ver>-<flavour>`` (generated headers, .config). Neither works alone,
so we build a symlink tree of *common* overlaid with *flavour* (the flavour's file
wins where both have one) and point bcc at it with ``BCC_KERNEL_SOURCE``.

Usage (the loader does this before the first ``BPF(...)``)::

    from agent.probes.kernel_headers import prepare_bcc_environment
    prepare_bcc_environment()  # sets os.environ["BCC_KERNEL_SOURCE"] when needed

or, without touching ``os.environ``::

    env = bcc_environment(find_kernel_source())  # {} or {"BCC_KERNEL_SOURCE": ...}
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from agent.probes.targets import pid_alive

__all__ = [
    "BCC_KERNEL_SOURCE",
    "MARKER_NAME",
    "HeaderSources",
    "KernelHeadersMissing",
    "bcc_environment",
    "default_cache_dir",
    "find_kernel_source",
    "has_real_headers",
    "locate_header_sources",
    "prepare_bcc_environment",
]

BCC_KERNEL_SOURCE = "BCC_KERNEL_SOURCE"
# Written last into a finished tree: its presence is what makes a cached tree reusable.
MARKER_NAME = ".tlscap-headers-complete"
_MARKER_FORMAT = 1

DEFAULT_USR_SRC = Path("/usr/src")
DEFAULT_MODULES_ROOT = Path("/lib/modules")
DEFAULT_CACHE_ROOT = Path("/var/cache/tlscap")

# uname -m -> Debian architecture name, which is what Debian's header flavours end in.
_DEBIAN_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "i686": "686",
    "i386": "686",
    "ppc64le": "powerpc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "armv7l": "armmp",
    "mips64": "mips64r2el",
}

# Files whose absence means a tree cannot be what it claims to be.
_COMMON_REQUIRED = Path("include/linux/kconfig.h")
_FLAVOUR_REQUIRED = Path("include/generated/autoconf.h")

_COMMON_RE = re.compile(r"^linux-headers-(?P<version>\d.*)-common$")


class KernelHeadersMissing(RuntimeError):
    """No headers bcc could use; the message is one actionable line."""


@dataclass(frozen=True)
class HeaderSources:
    """A Debian split header pair: the arch-independent tree and one flavour tree."""

    common: Path
    flavour: Path

    @property
    def name(self) -> str:
        """Cache directory name, e.g. ``6.1.0-56-amd64``."""
        return self.flavour.name.removeprefix("linux-headers-")


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where merged trees live: ``$TLSCAP_CACHE_DIR/kernel-headers`` (default /var/cache/tlscap)."""
    env = os.environ if environ is None else environ
    root = env.get("TLSCAP_CACHE_DIR") or str(DEFAULT_CACHE_ROOT)
    return Path(root) / "kernel-headers"


def has_real_headers(release: str | None = None, modules_root: Path = DEFAULT_MODULES_ROOT) -> bool:
    """True when the running kernel's own headers are installed (bcc then finds them itself)."""
    release = release or os.uname().release
    return (modules_root / release / "build" / "include").is_dir()


def _version_key(version: str) -> tuple[int, ...]:
    # "6.1.0-56" -> (6, 1, 0, 56): numeric order, so 6.1.0-100 beats 6.1.0-99.
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _flavour_rank(flavour: str, arch: str) -> int | None:
    """Lower is better; None means the flavour does not belong with a plain -common tree."""
    if flavour == arch:
        return 0
    if flavour.startswith("rt-"):
        return None  # realtime flavours pair with -common-rt, not -common
    if flavour.endswith("-" + arch):
        return 1  # e.g. cloud-amd64
    return None


def locate_header_sources(
    usr_src: Path = DEFAULT_USR_SRC, machine: str | None = None
) -> HeaderSources:
    """Pick the newest usable ``-common`` + arch-flavour pair under *usr_src*.

    Raises KernelHeadersMissing when there is none.
    """
    machine = machine or platform.machine()
    arch = _DEBIAN_ARCH.get(machine, machine)
    hint = f"install them: apt-get install linux-headers-{arch} (or run `make setup`)"
    try:
        entries = sorted(p for p in usr_src.iterdir() if p.is_dir())
    except FileNotFoundError:
        entries = []

    commons: list[tuple[tuple[int, ...], str, Path]] = []
    for path in entries:
        match = _COMMON_RE.match(path.name)
        if match:
            commons.append((_version_key(match["version"]), match["version"], path))
    if not commons:
        raise KernelHeadersMissing(
            f"no headers for the running kernel and no Debian linux-headers-*-common "
            f"tree in {usr_src}; {hint}"
        )

    problems: list[str] = []
    for _, version, common in sorted(commons, reverse=True):
        if not (common / _COMMON_REQUIRED).is_file():
            problems.append(f"{common.name} lacks {_COMMON_REQUIRED}")
            continue
        prefix = f"linux-headers-{version}-"
        flavours = []
        for path in entries:
            if not path.name.startswith(prefix) or path == common:
                continue
            rank = _flavour_rank(path.name.removeprefix(prefix), arch)
            if rank is None:
                continue
            if not (path / _FLAVOUR_REQUIRED).is_file():
                problems.append(f"{path.name} lacks {_FLAVOUR_REQUIRED}")
                continue
            flavours.append((rank, path))
        if flavours:
            flavour = min(flavours)[1]
            return HeaderSources(
                common=Path(os.path.abspath(common)), flavour=Path(os.path.abspath(flavour))
            )
        problems.append(f"{common.name} has no matching linux-headers-{version}-{arch} tree")
    raise KernelHeadersMissing(
        f"no usable kernel headers in {usr_src} ({'; '.join(problems)}); {hint}"
    )


def _marker_payload(sources: HeaderSources) -> dict[str, object]:
    return {
        "format": _MARKER_FORMAT,
        "common": str(sources.common),
        "flavour": str(sources.flavour),
    }


def _is_complete(tree: Path, sources: HeaderSources) -> bool:
    try:
        recorded = json.loads((tree / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _marker_payload(sources)


def _link(source: str, target: Path) -> None:
    """Make *target* a symlink to *source*, replacing whatever the earlier layer put there."""
    try:
        os.symlink(source, target)
    except FileExistsError:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        os.symlink(source, target)


def _overlay(src: Path, dst: Path) -> None:
    """Mirror *src* into *dst* as a tree of real directories and symlinked leaves.

    Leaves (files, and symlinks including symlinked directories such as Debian's
    ``scripts -> ../../lib/linux-kbuild-*``) become absolute symlinks to the source
    entry, so relative links still resolve from their original location. Directories
    are real, so a later layer can replace single files inside them.
    """
    with os.scandir(src) as it:
        for entry in it:
            target = dst / entry.name
            if entry.is_dir(follow_symlinks=False):
                if target.is_symlink():
                    # An earlier layer linked this whole directory; expand it so the two
                    # layers merge instead of this one hiding the other.
                    linked = Path(os.path.realpath(target))
                    target.unlink()
                    target.mkdir()
                    if linked.is_dir():
                        _overlay(linked, target)
                elif target.exists() and not target.is_dir():
                    target.unlink()
                    target.mkdir()
                else:
                    target.mkdir(exist_ok=True)
                _overlay(Path(entry.path), target)
            else:
                _link(entry.path, target)


def _remove_stale_partials(cache_dir: Path, name: str) -> None:
    """Delete half-built trees left by builders that died mid-way."""
    for partial in cache_dir.glob(f".{name}.partial-*"):
        pid_text = partial.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and (int(pid_text) == os.getpid() or not pid_alive(int(pid_text))):
            shutil.rmtree(partial, ignore_errors=True)


def _build_tree(sources: HeaderSources, cache_dir: Path) -> Path:
    final = cache_dir / sources.name
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(cache_dir, sources.name)
    # Build beside the final location and rename into place: readers only ever see
    # either no tree or a complete one, even if we are killed half-way.
    partial = cache_dir / f".{sources.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        _overlay(sources.common, partial)
        _overlay(sources.flavour, partial)
        (partial / MARKER_NAME).write_text(json.dumps(_marker_payload(sources)) + "\n")
        if final.exists() or final.is_symlink():
            if _is_complete(final, sources):  # another process won the race
                shutil.rmtree(partial)
                return final
            # A stale or foreign tree; ours replaces it.
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            else:
                final.unlink()
        try:
            os.rename(partial, final)
        except OSError:
            if _is_complete(final, sources):  # lost a race between our check and rename
                shutil.rmtree(partial, ignore_errors=True)
                return final
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def find_kernel_source(
    cache_dir: Path | None = None,
    release: str | None = None,
    *,
    usr_src: Path = DEFAULT_USR_SRC,
    modules_root: Path = DEFAULT_MODULES_ROOT,
    machine: str | None = None,
) -> Path | None:
    """Return the directory to pass as ``BCC_KERNEL_SOURCE``, or None if bcc needs no help.

    None means the running kernel's own headers are installed under
    ``<modules_root>/<release>/build``. Otherwise the merged Debian tree is built once at
    ``<cache_dir>/<version>-<flavour>`` (cache_dir defaults to :func:`default_cache_dir`)
    and reused on later calls. Raises KernelHeadersMissing with an actionable message
    when no usable headers exist, and OSError if the cache directory is not writable.
    """
    if has_real_headers(release, modules_root):
        return None
    sources = locate_header_sources(usr_src, machine)
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    final = cache_dir / sources.name
    if _is_complete(final, sources):
        return final
    return _build_tree(sources, cache_dir)


def bcc_environment(kernel_source: Path | None) -> dict[str, str]:
    """Environment additions bcc needs for *kernel_source* (empty when it needs none)."""
    return {} if kernel_source is None else {BCC_KERNEL_SOURCE: str(kernel_source)}


def prepare_bcc_environment(
    cache_dir: Path | None = None, environ: MutableMapping[str, str] | None = None
) -> Path | None:
    """Make the next ``BPF(...)`` in this process find headers; return the tree used.

    bcc reads ``BCC_KERNEL_SOURCE`` with getenv() at compile time, so setting it in
    ``os.environ`` (which calls putenv) is enough. A value the user already exported is
    respected and returned unchanged.
    """
    env = os.environ if environ is None else environ
    if env.get(BCC_KERNEL_SOURCE):
        return Path(env[BCC_KERNEL_SOURCE])
    kernel_source = find_kernel_source(cache_dir)
    env.update(bcc_environment(kernel_source))
    return kernel_source
