#!/usr/bin/env python3
"""The Vagrant lab on libvirt, from a fresh Debian 12 host (`make lab-box`, `make lab-up`,
`make lab-test`; docs/vagrant-lab.md).

    scripts/vm/lab.py host      host packages, libvirt daemons, the default storage pool
    scripts/vm/lab.py box       host + the box (scripts/vm/build-box.sh, cached) added
                                to Vagrant as tlscap/bookworm64 (a version per build)
    scripts/vm/lab.py driver    bounded KVM probe -> CACHE/lab-libvirt-driver (kvm|qemu)
    scripts/vm/lab.py up        box + driver + `vagrant up --provider=libvirt` (lab VM)
    scripts/vm/lab.py test [PYTEST_ARGS...]
                                `vagrant ssh -c 'cd /vagrant && sudo make test ...'`

No box can be downloaded here: the libvirt provider uses a box built from the same
rootfs image `make test-kernels` boots.  KVM guests hang at kernel entry on these
machines, so the domain type is chosen by the same bounded probe boot the kernel
matrix uses (scripts/vm/kernel_matrix.py): `kvm` only when a KVM guest reaches
userspace in time, TCG (`lv.driver = "qemu"`) otherwise.  The Vagrantfile reads the
probe's answer from CACHE/lab-libvirt-driver (TLSCAP_LAB_LIBVIRT_DRIVER overrides).

Standard library only; runs as root with the system python3.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import kernel_matrix  # noqa: E402  (the image location and the bounded KVM probe)

CACHE = kernel_matrix.CACHE
BOX_DIR = CACHE / "box"
BOX_FILE = BOX_DIR / "tlscap-bookworm64-libvirt.box"
BOX_CATALOG = BOX_DIR / "tlscap-bookworm64.json"  # the Vagrantfile's LIBVIRT_BOX_CATALOG
BOX_NAME = "tlscap/bookworm64"  # the Vagrantfile's LIBVIRT_BOX
DRIVER_FILE = CACHE / "lab-libvirt-driver"  # the Vagrantfile's LIBVIRT_DRIVER_FILE
LIBVIRT = "qemu:///system"
POOL = "default"
POOL_DIR = "/var/lib/libvirt/images"

# What the host needs for the libvirt lab (Debian 12 packages).  `vagrant` is also in
# bootstrap.sh (for `vagrant validate`); the rest only this path needs.
HOST_PACKAGES = [
    "vagrant",
    "vagrant-libvirt",
    "libvirt-daemon-system",
    "libvirt-clients",
    "dnsmasq-base",  # DHCP/DNS of the NAT network libvirt makes
    "iptables",  # libvirt's NAT rules
    "qemu-system-x86",
    "qemu-utils",  # qemu-img: the box's qcow2
    "debootstrap",  # build-image.sh
    "e2fsprogs",
    "rsync",  # build-box.sh, and Vagrant's rsync synced folder
]


def say(msg: str) -> None:
    print(f"lab: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def quiet(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def missing_packages(status_output: str, wanted: list[str]) -> list[str]:
    """Packages of `wanted` not installed, given the output of
    `dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' PACKAGES...`."""
    installed = {
        line.split()[0]
        for line in status_output.splitlines()
        if len(line.split()) >= 2 and line.split()[1] == "ii"
    }
    return [p for p in wanted if p not in installed]


def ensure_packages() -> None:
    out = quiet(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\\n", *HOST_PACKAGES])
    missing = missing_packages(out.stdout, HOST_PACKAGES)
    if not missing:
        say("host packages: all present")
        return
    say(f"installing host packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def libvirt_up() -> bool:
    return quiet(["virsh", "-c", LIBVIRT, "version"], timeout=20).returncode == 0


def ensure_daemons() -> None:
    """libvirtd (and virtlogd, which it sends qemu's logs to) running and answering."""
    if libvirt_up():
        say("libvirtd: running")
        return
    if Path("/run/systemd/system").is_dir():
        run(["systemctl", "start", "virtlogd.socket", "libvirtd.socket", "libvirtd.service"])
    else:
        # No systemd (a container-like host): the daemons as their own daemons.
        for daemon in ("virtlogd", "libvirtd"):
            if quiet(["pgrep", "-x", daemon]).returncode != 0:
                say(f"starting {daemon} (no systemd here)")
                run([f"/usr/sbin/{daemon}", "-d"])
    deadline = time.monotonic() + 30
    while not libvirt_up():
        if time.monotonic() > deadline:
            sys.exit(f"lab: libvirtd does not answer on {LIBVIRT} after 30 s")
        time.sleep(0.5)
    say("libvirtd: started")


def ensure_pool() -> None:
    """vagrant-libvirt uploads the box image into the storage pool named `default`."""
    virsh = ["virsh", "-q", "-c", LIBVIRT]
    info = quiet([*virsh, "pool-info", POOL])
    if info.returncode != 0:
        say(f"defining storage pool {POOL} ({POOL_DIR})")
        run(
            [*virsh, "pool-define-as", POOL, "dir", "--target", POOL_DIR], stdout=subprocess.DEVNULL
        )
        run([*virsh, "pool-build", POOL], stdout=subprocess.DEVNULL)
        info = quiet([*virsh, "pool-info", POOL])
    if "running" not in info.stdout:
        run([*virsh, "pool-start", POOL], stdout=subprocess.DEVNULL)
    quiet([*virsh, "pool-autostart", POOL])


def host() -> None:
    if os.geteuid() != 0:
        sys.exit("lab: run as root (packages, libvirt, image build)")
    ensure_packages()
    ensure_daemons()
    ensure_pool()


def vagrant_env() -> dict[str, str]:
    return {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_DEFAULT_PROVIDER": "libvirt"}


def box_version() -> str:
    try:
        return (BOX_DIR / "VERSION").read_text().strip()
    except OSError:
        return ""


def box_listed(vagrant_box_list: str, version: str) -> bool:
    """Whether `vagrant box list` shows tlscap/bookworm64 `version` for libvirt."""
    for line in vagrant_box_list.splitlines():
        parts = line.replace("(", " ").replace(")", " ").replace(",", " ").split()
        if parts[:3] == [BOX_NAME, "libvirt", version]:
            return True
    return False


def box() -> None:
    host()
    t0 = time.monotonic()
    run([str(HERE / "build-box.sh"), str(CACHE)])
    version = box_version()
    if box_listed(quiet(["vagrant", "box", "list"], timeout=120).stdout, version):
        say(f"box {BOX_NAME} {version}: already in Vagrant")
        return
    # From the catalog: the version comes with it, so vagrant-libvirt keeps each
    # build's disk apart, and machines made from an older build keep theirs.
    say(f"vagrant box add {BOX_CATALOG} ({BOX_NAME} {version})")
    run(["vagrant", "box", "add", "--provider", "libvirt", str(BOX_CATALOG)], env=vagrant_env())
    say(f"box ready in {time.monotonic() - t0:.0f}s (older versions: `vagrant box prune`)")


def driver_line(kvm_ok: bool, why: str) -> str:
    """The content of CACHE/lab-libvirt-driver: the driver, then why."""
    return f"{'kvm' if kvm_ok else 'qemu'} # {why}\n"


def driver() -> str:
    forced = os.environ.get("TLSCAP_LAB_LIBVIRT_DRIVER")
    if forced:
        say(f"libvirt driver: {forced} (TLSCAP_LAB_LIBVIRT_DRIVER)")
        return forced
    kernels = (kernel_matrix.IMAGE / "kernels.txt").read_text().split("\n")
    suite, version = next(ln.split() for ln in kernels if ln.strip())
    workdir = Path(tempfile.mkdtemp(prefix="tlscap-lab-kvm-probe-"))
    ok, why = kernel_matrix.kvm_works(kernel_matrix.Kernel(suite, version), workdir)
    line = driver_line(ok, why)
    DRIVER_FILE.write_text(line)
    shutil.rmtree(workdir, ignore_errors=True)
    say(f"libvirt driver: {line.strip()}")
    return line.split()[0]


def up(machine: str) -> None:
    box()
    drv = driver()
    t0 = time.monotonic()
    env = {**vagrant_env(), "TLSCAP_LAB_LIBVIRT_DRIVER": drv}
    run(["vagrant", "up", "--provider=libvirt", machine], cwd=REPO, env=env)
    say(f"vagrant up {machine}: {time.monotonic() - t0:.0f}s")


def current_driver() -> str:
    forced = os.environ.get("TLSCAP_LAB_LIBVIRT_DRIVER")
    if forced:
        return forced
    try:
        return DRIVER_FILE.read_text().split()[0]
    except (OSError, IndexError):
        return "kvm"


def test_command(pytest_args: list[str], driver: str) -> str:
    """The command `vagrant ssh -c` runs: `sudo make test` in /vagrant.  Under TCG
    (driver qemu) bcc's clang takes minutes to compile the probes at each agent
    start, so the tests get the agent-start and per-test timeouts the kernel
    matrix's guests use."""
    args = list(pytest_args)
    env = ""
    if driver == "qemu":
        env = "env TLSCAP_TEST_AGENT_START_TIMEOUT=600 TLSCAP_GO_BUILD_TIMEOUT=3600 "
        args.append("--timeout=1200")
    cmd = f"cd /vagrant && sudo {env}make test"
    if args:
        cmd += " PYTEST_ARGS=" + shlex.quote(" ".join(args))
    return cmd


def test(pytest_args: list[str]) -> int:
    cmd = test_command(pytest_args, current_driver())
    say(f"vagrant ssh lab -c {shlex.quote(cmd)}")
    t0 = time.monotonic()
    rc = subprocess.run(
        ["vagrant", "ssh", "lab", "-c", cmd], cwd=REPO, env=vagrant_env()
    ).returncode
    say(f"in-VM tests: exit {rc} after {time.monotonic() - t0:.0f}s")
    return rc


def pytest_arguments(argv: list[str]) -> list[str]:
    """Everything after the `test` subcommand, in order."""
    return argv[argv.index("test") + 1 :]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("host")
    sub.add_parser("box")
    sub.add_parser("driver")
    p_up = sub.add_parser("up")
    p_up.add_argument("machine", nargs="?", default="lab")
    p_test = sub.add_parser("test")
    p_test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    # Options after `test` (-v, -k ...) are pytest's: parse_known_args leaves them.
    args, extra = ap.parse_known_args(argv)
    if extra and args.cmd != "test":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if os.geteuid() != 0:
        print("lab: run as root (packages, libvirt, image build)", file=sys.stderr)
        return 2
    if args.cmd == "host":
        host()
    elif args.cmd == "box":
        box()
    elif args.cmd == "driver":
        driver()
    elif args.cmd == "up":
        up(args.machine)
    elif args.cmd == "test":
        return test(pytest_arguments(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
