"""Tests for agent.probes.kernel_headers: fake /usr/src trees, plus one real-machine check."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from agent.probes import kernel_headers
from agent.probes.kernel_headers import (
    BCC_KERNEL_SOURCE,
    MARKER_NAME,
    KernelHeadersMissing,
    bcc_environment,
    find_kernel_source,
    locate_header_sources,
    prepare_bcc_environment,
)

RELEASE = "6.18.0-test"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_debian_headers(usr_src: Path, version: str = "6.1.0-56", flavour: str = "amd64") -> None:
    """A miniature Debian split header pair, shaped like the real packages."""
    common = usr_src / f"linux-headers-{version}-common"
    arch = usr_src / f"linux-headers-{version}-{flavour}"
    write(common / "include/linux/kconfig.h", "common kconfig\n")
    write(common / "include/linux/types.h", "common types\n")
    write(common / "Makefile", "common makefile\n")
    write(common / "arch/x86/include/asm/ptrace.h", "common ptrace\n")
    write(arch / "include/generated/autoconf.h", f"autoconf {version}\n")
    write(arch / "arch/x86/include/generated/uapi/asm/unistd_64.h", "generated unistd\n")
    write(arch / "Makefile", "flavour makefile\n")
    write(arch / ".config", "CONFIG_BPF=y\n")
    # Debian links scripts/ to linux-kbuild with a *relative* symlink in both trees.
    kbuild = usr_src.parent / "lib" / "linux-kbuild" / "scripts"
    write(kbuild / "basic/fixdep", "kbuild tool\n")
    for tree in (common, arch):
        if not (tree / "scripts").is_symlink():  # several flavours may share one common
            rel = os.path.relpath(kbuild, tree)
            (tree / "scripts").symlink_to(rel, target_is_directory=True)


@pytest.fixture
def usr_src(tmp_path: Path) -> Path:
    root = tmp_path / "usr" / "src"
    root.mkdir(parents=True)
    make_debian_headers(root)
    return root


@pytest.fixture
def modules_root(tmp_path: Path) -> Path:
    root = tmp_path / "lib" / "modules"
    root.mkdir(parents=True)
    return root


def find(usr_src: Path, modules_root: Path, cache: Path) -> Path | None:
    return find_kernel_source(
        cache, RELEASE, usr_src=usr_src, modules_root=modules_root, machine="x86_64"
    )


def test_merged_tree_overlays_flavour_on_common(
    usr_src: Path, modules_root: Path, tmp_path: Path
) -> None:
    tree = find(usr_src, modules_root, tmp_path / "cache")

    assert tree == tmp_path / "cache" / "6.1.0-56-amd64"
    assert (tree / "include/linux/kconfig.h").read_text() == "common kconfig\n"
    assert (tree / "include/generated/autoconf.h").read_text() == "autoconf 6.1.0-56\n"
    assert (tree / "arch/x86/include/asm/ptrace.h").read_text() == "common ptrace\n"
    assert (tree / "arch/x86/include/generated/uapi/asm/unistd_64.h").is_file()
    # Present in both: the flavour's copy wins.
    assert (tree / "Makefile").read_text() == "flavour makefile\n"
    # Directories are real (so layers can merge), leaves are links back to /usr/src.
    assert (tree / "include").is_dir() and not (tree / "include").is_symlink()
    assert (tree / "include/linux/types.h").is_symlink()
    # Relative symlinks in the source still resolve from the merged tree.
    assert (tree / "scripts/basic/fixdep").read_text() == "kbuild tool\n"
    assert (tree / MARKER_NAME).is_file()
    assert not list((tmp_path / "cache").glob(".*partial*"))


def test_second_call_reuses_the_tree(
    usr_src: Path, modules_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = find(usr_src, modules_root, cache)
    assert first is not None
    marker_inode = (first / MARKER_NAME).stat().st_ino

    def no_rebuild(*args: object) -> Path:
        raise AssertionError("a complete tree must be reused, not rebuilt")

    monkeypatch.setattr(kernel_headers, "_build_tree", no_rebuild)
    assert find(usr_src, modules_root, cache) == first
    assert (first / MARKER_NAME).stat().st_ino == marker_inode


def test_tree_without_marker_is_rebuilt(usr_src: Path, modules_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    half = cache / "6.1.0-56-amd64"
    write(half / "include/linux/kconfig.h", "leftover\n")  # looks populated, no marker

    tree = find(usr_src, modules_root, cache)

    assert tree == half
    assert (tree / "include/linux/kconfig.h").read_text() == "common kconfig\n"
    assert (tree / MARKER_NAME).is_file()


def test_interrupted_build_leaves_no_tree(
    usr_src: Path, modules_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    real_overlay = kernel_headers._overlay
    calls = 0

    def overlay_then_die(src: Path, dst: Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the common layer is in, the flavour layer is not
            raise KeyboardInterrupt
        real_overlay(src, dst)

    monkeypatch.setattr(kernel_headers, "_overlay", overlay_then_die)
    with pytest.raises(KeyboardInterrupt):
        find(usr_src, modules_root, cache)
    assert list(cache.iterdir()) == []

    monkeypatch.setattr(kernel_headers, "_overlay", real_overlay)
    tree = find(usr_src, modules_root, cache)
    assert tree is not None and (tree / MARKER_NAME).is_file()


def test_stale_partial_from_dead_builder_is_removed(
    usr_src: Path, modules_root: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    # PID 2**22 + 1 is above the kernel's pid_max ceiling, so it is never alive.
    stale = cache / f".6.1.0-56-amd64.partial-{2**22 + 1}"
    write(stale / "include/junk.h", "")

    find(usr_src, modules_root, cache)

    assert not stale.exists()


def test_real_headers_mean_no_override(usr_src: Path, modules_root: Path, tmp_path: Path) -> None:
    (modules_root / RELEASE / "build" / "include").mkdir(parents=True)
    assert find(usr_src, modules_root, tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()


def test_newest_version_and_exact_flavour_win(tmp_path: Path) -> None:
    usr_src = tmp_path / "src"
    make_debian_headers(usr_src, "6.1.0-9", "amd64")
    make_debian_headers(usr_src, "6.1.0-56", "cloud-amd64")
    make_debian_headers(usr_src, "6.1.0-56", "rt-amd64")  # pairs with -common-rt: ignored
    make_debian_headers(usr_src, "6.1.0-56", "amd64")

    sources = locate_header_sources(usr_src, machine="x86_64")

    assert sources.common.name == "linux-headers-6.1.0-56-common"
    assert sources.flavour.name == "linux-headers-6.1.0-56-amd64"
    assert sources.name == "6.1.0-56-amd64"


def test_other_architectures_use_their_flavour(tmp_path: Path) -> None:
    usr_src = tmp_path / "src"
    make_debian_headers(usr_src, "6.1.0-56", "amd64")
    make_debian_headers(usr_src, "6.1.0-56", "arm64")

    assert locate_header_sources(usr_src, machine="aarch64").flavour.name.endswith("-arm64")


def test_missing_usr_src_raises(modules_root: Path, tmp_path: Path) -> None:
    with pytest.raises(KernelHeadersMissing, match="apt-get install linux-headers-amd64"):
        find(tmp_path / "nothing", modules_root, tmp_path / "cache")


def test_common_without_flavour_raises(modules_root: Path, tmp_path: Path) -> None:
    usr_src = tmp_path / "src"
    write(usr_src / "linux-headers-6.1.0-56-common/include/linux/kconfig.h", "")
    with pytest.raises(KernelHeadersMissing, match=r"no matching linux-headers-6\.1\.0-56-amd64"):
        find(usr_src, modules_root, tmp_path / "cache")


def test_incomplete_flavour_raises_one_line(modules_root: Path, tmp_path: Path) -> None:
    usr_src = tmp_path / "src"
    write(usr_src / "linux-headers-6.1.0-56-common/include/linux/kconfig.h", "")
    (usr_src / "linux-headers-6.1.0-56-amd64").mkdir()
    with pytest.raises(KernelHeadersMissing) as info:
        find(usr_src, modules_root, tmp_path / "cache")
    assert "lacks include/generated/autoconf.h" in str(info.value)
    assert "\n" not in str(info.value)


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TLSCAP_CACHE_DIR", str(tmp_path))
    assert kernel_headers.default_cache_dir() == tmp_path / "kernel-headers"
    monkeypatch.delenv("TLSCAP_CACHE_DIR")
    assert kernel_headers.default_cache_dir() == Path("/var/cache/tlscap/kernel-headers")


def test_bcc_environment() -> None:
    assert bcc_environment(None) == {}
    assert bcc_environment(Path("/x")) == {BCC_KERNEL_SOURCE: "/x"}


def test_prepare_bcc_environment_respects_user_choice() -> None:
    env = {BCC_KERNEL_SOURCE: "/my/headers"}
    assert prepare_bcc_environment(environ=env) == Path("/my/headers")
    assert env == {BCC_KERNEL_SOURCE: "/my/headers"}


# --- this machine, for real -------------------------------------------------------------


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """This machine's tree, built once into a scratch cache (None: real headers exist)."""
    try:
        return find_kernel_source(tmp_path_factory.mktemp("cache"))
    except KernelHeadersMissing as exc:
        pytest.skip(f"no kernel headers on this machine: {exc}")


def test_real_machine_tree_has_headers(real_tree: Path | None) -> None:
    if real_tree is None:
        pytest.skip(f"/lib/modules/{os.uname().release}/build exists; no merged tree needed")
    assert (real_tree / "include/linux/kconfig.h").is_file()
    assert (real_tree / "include/generated/autoconf.h").is_file()
    if platform.machine() == "x86_64":
        assert (real_tree / "arch/x86/include/generated/uapi/asm/unistd_64.h").is_file()


@pytest.mark.ebpf
def test_real_bcc_compiles_against_tree(
    real_tree: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to load a BPF program")
    try:
        from bcc import BPF
    except Exception as exc:
        pytest.skip(f"bcc not importable: {exc}")
    monkeypatch.delenv(BCC_KERNEL_SOURCE, raising=False)
    for key, value in bcc_environment(real_tree).items():
        monkeypatch.setenv(key, value)

    bpf = BPF(text=b"int f(void *ctx) { return 0; }")
    try:
        # KPROBE is the program type uprobes use, so this proves the whole load path.
        assert bpf.load_func(b"f", BPF.KPROBE).fd >= 0
    finally:
        bpf.cleanup()
