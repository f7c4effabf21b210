#!/usr/bin/env python3
"""`make test-kernels`: boot each Debian kernel of scripts/vm/kernels in qemu and run
the smoke suite (scripts/vm/guest-smoke.sh) inside, with this checkout shared into
the guest: virtio-9p where the kernel has 9p, else virtiofs (Debian's cloud kernels
are built without 9p; virtiofsd is qemu's, /usr/lib/qemu/virtiofsd).  Prints a line
per kernel, then exactly `kernel matrix: K/N kernels pass`.

    scripts/vm/kernel_matrix.py [--kernels 5.10,6.1] [--accel auto|kvm|tcg] [--skip-build]
                                [--nobpf-kernel 6.1|none] [--nobpf-only]

One more guest boots the --nobpf-kernel kernel (default 6.1, when it is among the
kernels run) with `tlscap.nobpf=1`: there the suite is scripts/vm/guest_nobpf.py,
under a seccomp filter that makes bpf() fail (the preflight's one-line reasons, and
`--mode auto` capturing through the proxy).  It is a line and a count of its own in
the output (N counts guests: one per kernel, plus this one).

The image comes from scripts/vm/build-image.sh (built once, cached by the hash of its
inputs).  KVM is used only when a bounded probe boot proves it reaches userspace
(here it hangs at kernel entry); otherwise TCG (`-accel tcg -cpu max`).  A guest
that does not reach userspace in its boot budget, or overruns its suite budget, is
killed and reported with its console tail: nothing here waits unbounded.

Standard library only (runs with the system python3, as root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("TLSCAP_VM_CACHE", "/var/cache/tlscap-vm"))
IMAGE = CACHE / "image"
GO_BUILDS = Path(os.environ.get("TLSCAP_GO_BUILD_DIR", "/tmp/tlscap-go-builds"))
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")

BOOTED = "TLSCAP-GUEST: kernel"  # guest-boot.sh's first line: userspace is up
RESULT = "TLSCAP-RESULT:"
KVM_PROBE_S = 20.0  # a KVM guest reaches userspace in ~2 s; TCG in ~5 s
BOOT_BUDGET_S = float(os.environ.get("TLSCAP_VM_BOOT_BUDGET", "180"))
SUITE_BUDGET_S = float(os.environ.get("TLSCAP_VM_SUITE_BUDGET", "2400"))


@dataclass(frozen=True)
class Kernel:
    suite: str
    version: str

    @property
    def short(self) -> str:
        return ".".join(self.version.split(".")[:2]).split("-")[0]


@dataclass
class Outcome:
    kernel: Kernel
    passed: bool
    line: str
    seconds: float
    console: Path


def kernel_has_9p(kernel: Kernel) -> bool:
    return (CACHE / "rootfs" / "lib" / "modules" / kernel.version / "kernel" / "fs" / "9p").is_dir()


# The guests see a snapshot of the checkout taken when the matrix starts (rsync into
# the cache: incremental), not the live tree: others edit it while a matrix runs
# for tens of minutes.  Guests mount it at the checkout's own path, which is where
# the .venv's editable install points.
SNAPSHOT = CACHE / "checkout"
SHARES = {"tlscap": SNAPSHOT, "gobuild": GO_BUILDS}


def snapshot_checkout() -> None:
    subprocess.run(
        ["rsync", "-a", "--delete", "--exclude=/.git/", "--exclude=/.cache/",
         "--exclude=.pytest_cache/", "--exclude=.ruff_cache/", f"{REPO}/", f"{SNAPSHOT}/"],
        check=True,
    )  # fmt: skip


def start_virtiofsd(workdir: Path) -> tuple[list[subprocess.Popen], list[str]]:
    """One virtiofsd per share; returns them and qemu's arguments for them."""
    procs, args = [], []
    for i, (tag, path) in enumerate(SHARES.items()):
        sock = workdir / f"virtiofs-{tag}.sock"
        sock.unlink(missing_ok=True)
        procs.append(subprocess.Popen(
            [str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={path}",
             "-o", "cache=auto", "-o", "sandbox=chroot"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(workdir / f"virtiofsd-{tag}.log", "w"),  # noqa: SIM115
        ))  # fmt: skip
        args += ["-chardev", f"socket,id=fs{i},path={sock}",
                 "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={tag}"]  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
        (workdir / f"virtiofs-{tag}.sock").exists() for tag in SHARES
    ):
        time.sleep(0.1)
    # vhost-user needs the guest's RAM in shared memory.
    args += [
        "-object",
        "memory-backend-memfd,id=mem,size=2048M,share=on",
        "-numa",
        "node,memdev=mem",
    ]
    return procs, args


def qemu_command(
    kernel: Kernel,
    accel: str,
    console: Path,
    *,
    extra_cmdline: str = "",
    share: list[str] | None = None,
) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    cmdline = (
        "root=/dev/vda rw console=ttyS0 panic=-1 init=/sbin/tlscap-guest-boot "
        f"tlscap.src={REPO} {extra_cmdline}"
    ).strip()
    cmd = [
        "qemu-system-x86_64",
        *cpu,
        "-smp",
        "2",
        "-m",
        "2048",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(IMAGE / f"vmlinuz-{kernel.version}"),
        "-initrd",
        str(IMAGE / f"initrd.img-{kernel.version}"),
        "-append",
        cmdline,
        # snapshot=on: every guest starts from the same image and writes nothing back.
        "-drive",
        f"file={IMAGE / 'rootfs.ext4'},format=raw,if=virtio,snapshot=on",
    ]
    return cmd + (share or [])


def share_9p() -> list[str]:
    # The checkout read-only: a guest cannot damage the tree others work in (the
    # guest also mounts it ro, which is what protects it under virtiofs).
    return ["-virtfs", f"local,path={SNAPSHOT},mount_tag=tlscap,security_model=none,readonly=on",
            "-virtfs", f"local,path={GO_BUILDS},mount_tag=gobuild,security_model=none"]  # fmt: skip


def console_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def tail(path: Path, n: int = 25) -> str:
    lines = console_text(path).replace("\r", "").splitlines()
    return "\n".join("    | " + line for line in lines[-n:])


def run_guest(
    cmd: list[str],
    console: Path,
    boot_budget: float,
    total_budget: float,
    stop_when_booted: bool = False,
) -> tuple[str, float]:
    """Run qemu until it exits or a budget runs out: ('done'|'booted'|'no-boot'|'timeout', s)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(console.with_suffix(".qemu.err"), "w"),  # noqa: SIM115
    )
    booted = False
    try:
        while True:
            elapsed = time.monotonic() - start
            if not booted and BOOTED in console_text(console):
                booted = True
                if stop_when_booted:
                    return "booted", elapsed
            if proc.poll() is not None:
                return ("done" if booted else "no-boot"), elapsed
            if not booted and elapsed > boot_budget:
                return "no-boot", elapsed
            if elapsed > total_budget:
                return "timeout", elapsed
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()  # our own qemu, by its pid
            proc.wait()


def kvm_works(kernel: Kernel, workdir: Path) -> tuple[bool, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    console = workdir / "kvm-probe.console"
    state, secs = run_guest(
        qemu_command(kernel, "kvm", console),
        console,
        KVM_PROBE_S,
        KVM_PROBE_S,
        stop_when_booted=True,
    )
    if state == "booted":
        return True, f"KVM guest reached userspace in {secs:.1f}s"
    err = console_text(console.with_suffix(".qemu.err")).strip().splitlines()
    why = err[-1] if err else "no userspace"
    return False, f"KVM probe: {why} within {KVM_PROBE_S:.0f}s (hangs at kernel entry here)"


NOBPF_CMDLINE = "tlscap.nobpf=1"


def run_kernel(
    kernel: Kernel, accel: str, workdir: Path, extra_cmdline: str, label: str = ""
) -> Outcome:
    """Boot one guest; `label` names a variant (its console, its output line)."""
    console = workdir / f"console-{kernel.version}{'-' + label if label else ''}.log"
    daemons: list[subprocess.Popen] = []
    if kernel_has_9p(kernel) or not VIRTIOFSD.exists():
        share, how = share_9p(), "9p"
    else:
        daemons, share = start_virtiofsd(workdir)
        how = "virtiofs"
    cmd = qemu_command(kernel, accel, console, extra_cmdline=extra_cmdline, share=share)
    try:
        state, secs = run_guest(cmd, console, BOOT_BUDGET_S, SUITE_BUDGET_S)
    finally:
        for d in daemons:  # ours, by pid
            if d.poll() is None:
                d.terminate()
            d.wait()
    accel = f"{accel}, {how}"
    text = console_text(console).replace("\r", "")
    result = next((ln for ln in reversed(text.splitlines()) if ln.startswith(RESULT)), None)
    name = f"{kernel.version} ({kernel.suite})"
    if label == "nobpf":
        name += " with bpf() denied (seccomp)"
    if state == "no-boot":
        return Outcome(
            kernel,
            False,
            f"{name}: FAIL did not boot in {BOOT_BUDGET_S:.0f}s [{accel}]\n{tail(console)}",
            secs,
            console,
        )
    if result is None:
        why = (
            f"no result within {SUITE_BUDGET_S:.0f}s"
            if state == "timeout"
            else "guest ended without a result"
        )
        return Outcome(
            kernel,
            False,
            f"{name}: FAIL {why} [{accel}, {secs:.0f}s]\n{tail(console)}",
            secs,
            console,
        )
    verdict, counts = result[len(RESULT) :].split()[:2]
    off = [
        ln.split("kernel feature off: ", 1)[1].split(" (", 1)[0]
        for ln in text.splitlines()
        if "kernel feature off: " in ln
    ]
    features = f"features off: {', '.join(off)}" if off else "all features on"
    ok = verdict == "pass"
    what = "checks" if label == "nobpf" else f"tests, {features}"
    line = f"{name}: {'PASS' if ok else 'FAIL'} {counts} {what} [{accel}, {secs:.0f}s]"
    if label == "nobpf":
        line += "".join(
            "\n    " + ln.split("reason: ", 1)[1]
            for ln in text.splitlines()
            if ln.startswith("TLSCAP-NOBPF:") and "reason: " in ln
        )
    if not ok:
        failed = [
            ln
            for ln in text.splitlines()
            if ln.startswith(("FAILED", "ERROR", "SKIPPED", "TLSCAP-NOBPF: FAIL"))
        ]
        line += "\n" + "\n".join("    " + ln for ln in failed[-15:]) + f"\n    console: {console}"
    return Outcome(kernel, ok, line, secs, console)


def nobpf_kernel(kernels: list[Kernel], prefix: str) -> Kernel | None:
    """The kernel the bpf()-denied guest boots: the first run kernel matching `prefix`."""
    if prefix in ("", "none"):
        return None
    return next((k for k in kernels if version_matches(k.version, prefix)), None)


def version_matches(version: str, prefix: str) -> bool:
    """`6.1` names 6.1.0-50-cloud-amd64, not 6.12.117: a prefix ends at a . or -."""
    return version == prefix or version.startswith((f"{prefix}.", f"{prefix}-"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", help="comma list of kernel prefixes (5.10,6.1,...); default all")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    ap.add_argument("--cmdline", default="", help="extra kernel command line for every guest")
    ap.add_argument("--skip-build", action="store_true", help="use the image as it is")
    ap.add_argument(
        "--nobpf-kernel",
        default=os.environ.get("TLSCAP_VM_NOBPF_KERNEL", "6.1"),
        help="kernel prefix of the extra guest with bpf() denied (none: no such guest)",
    )
    ap.add_argument("--nobpf-only", action="store_true", help="boot only the bpf()-denied guest")
    args = ap.parse_args(argv)
    # SIGTERM/SIGINT (also when started in the background, where SIGINT is ignored)
    # unwind through run_guest's finally, which kills our qemu and virtiofsd.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    if os.geteuid() != 0:
        print("test-kernels: run as root (image build, qemu with 9p)", file=sys.stderr)
        return 2
    for tool in ("qemu-system-x86_64",):
        if shutil.which(tool) is None:
            print(f"test-kernels: {tool} missing: apt-get install qemu-system-x86", file=sys.stderr)
            return 2
    t0 = time.monotonic()
    if not args.skip_build:
        subprocess.run([str(HERE / "build-image.sh"), str(CACHE)], check=True)
    build_s = time.monotonic() - t0
    kernels = [
        Kernel(*ln.split()) for ln in (IMAGE / "kernels.txt").read_text().splitlines() if ln.strip()
    ]
    if args.kernels:
        wanted = args.kernels.split(",")
        kernels = [k for k in kernels if any(version_matches(k.version, w) for w in wanted)]
    GO_BUILDS.mkdir(parents=True, exist_ok=True)
    snapshot_checkout()
    workdir = Path(tempfile.mkdtemp(prefix="tlscap-kernels-"))

    accel = args.accel
    if accel == "auto":
        ok, why = kvm_works(kernels[0], workdir)
        accel = "kvm" if ok else "tcg"
        print(f"accelerator: {accel} ({why})", flush=True)
    print(f"image: {IMAGE} (build/check {build_s:.0f}s); consoles in {workdir}", flush=True)

    outcomes = []
    for kernel in [] if args.nobpf_only else kernels:
        outcome = run_kernel(kernel, accel, workdir, args.cmdline)
        outcomes.append(outcome)
        print(outcome.line, flush=True)
    nobpf = nobpf_kernel(kernels, args.nobpf_kernel)
    if nobpf is not None:
        cmdline = f"{args.cmdline} {NOBPF_CMDLINE}".strip()
        outcome = run_kernel(nobpf, accel, workdir, cmdline, label="nobpf")
        outcomes.append(outcome)
        print(outcome.line, flush=True)
    passed = sum(o.passed for o in outcomes)
    print(f"total {time.monotonic() - t0:.0f}s")
    print(f"kernel matrix: {passed}/{len(outcomes)} kernels pass")
    return 0 if passed == len(outcomes) and outcomes else 1


if __name__ == "__main__":
    sys.exit(main())
