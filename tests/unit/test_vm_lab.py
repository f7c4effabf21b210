"""The VM tooling's pure parts (scripts/vm/lab.py, kernel_matrix.py, guest_nobpf.py,
build-box.sh): no VM, no libvirt, no root needed."""

from __future__ import annotations

import errno
import importlib.util
import os
import platform
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VM = REPO / "scripts" / "vm"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"vm_{name}", VM / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(VM))  # lab.py imports kernel_matrix
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(VM))
    return module


lab = load("lab")
matrix = load("kernel_matrix")
nobpf = load("guest_nobpf")


def test_missing_packages_reads_dpkg_query_status() -> None:
    out = "vagrant ii \nvagrant-libvirt rc \nrsync ii \n"
    assert lab.missing_packages(out, ["vagrant", "vagrant-libvirt", "rsync", "qemu-utils"]) == [
        "vagrant-libvirt",
        "qemu-utils",
    ]


def test_host_packages_cover_the_libvirt_lab() -> None:
    for pkg in ("vagrant-libvirt", "libvirt-daemon-system", "dnsmasq-base", "qemu-utils"):
        assert pkg in lab.HOST_PACKAGES


def test_box_listed_needs_the_libvirt_provider_and_the_version() -> None:
    v = "0.20261205.114153"
    assert lab.box_listed(f"tlscap/bookworm64 (libvirt, {v})\n", v)
    assert not lab.box_listed("tlscap/bookworm64 (libvirt, 0.20261205.93000)\n", v)
    assert not lab.box_listed(f"tlscap/bookworm64 (virtualbox, {v})\n", v)
    assert not lab.box_listed(f"debian/bookworm64 (libvirt, {v})\n", v)
    assert not lab.box_listed("There are no installed boxes! Use `vagrant box add` to add some.", v)


def test_driver_line_is_what_the_vagrantfile_reads() -> None:
    assert lab.driver_line(False, "KVM probe: no userspace").split()[0] == "qemu"
    assert lab.driver_line(True, "reached userspace").split()[0] == "kvm"
    vagrantfile = (REPO / "Vagrantfile").read_text()
    # The Vagrantfile takes the first word of the file lab.py writes.
    assert f'LIBVIRT_DRIVER_FILE = "{lab.DRIVER_FILE}"' in vagrantfile
    assert "File.read(LIBVIRT_DRIVER_FILE).split.first" in vagrantfile
    assert f'"{lab.BOX_NAME}"' in vagrantfile
    assert f'LIBVIRT_BOX_CATALOG = "{lab.BOX_CATALOG}"' in vagrantfile


def test_vagrantfile_libvirt_networks_stay_in_the_benchmarking_range() -> None:
    vagrantfile = (REPO / "Vagrantfile").read_text()
    mgmt = re.search(r'LIBVIRT_MGMT_ADDRESS = "([\d./]+)"', vagrantfile)
    assert mgmt
    import ipaddress

    assert ipaddress.ip_network(mgmt.group(1)).subnet_of(ipaddress.ip_network("198.18.0.0/15"))


def test_nobpf_kernel_choice() -> None:
    ks = [
        matrix.Kernel("bullseye", "5.10.0-32-cloud-amd64"),
        matrix.Kernel("bookworm", "6.1.0-50-cloud-amd64"),
    ]
    assert matrix.nobpf_kernel(ks, "6.1") == ks[1]
    assert matrix.nobpf_kernel(ks, "none") is None
    assert matrix.nobpf_kernel(ks[:1], "6.1") is None  # only when that kernel is run


def test_deny_bpf_program_shape() -> None:
    code = nobpf.deny_bpf_program(errno.EPERM)
    insns = [struct.unpack("HBBI", code[i : i + 8]) for i in range(0, len(code), 8)]
    assert insns[1] == (nobpf.BPF_JEQ_K, 0, 3, nobpf.AUDIT_ARCH_X86_64)
    assert insns[3] == (nobpf.BPF_JEQ_K, 0, 1, 321)
    assert insns[4][3] == nobpf.SECCOMP_RET_ERRNO | errno.EPERM
    assert insns[5][3] == nobpf.SECCOMP_RET_ALLOW


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter is for x86_64")
def test_deny_bpf_filter_really_denies_bpf_and_nothing_else() -> None:
    # In a child: ENOSYS, which bpf() never gives on a kernel that has it, so the
    # answer can only come from the filter (with or without root).
    code = (
        "import errno, os, sys\n"
        f"sys.path.insert(0, {str(VM)!r})\n"
        "import guest_nobpf as g\n"
        "g.install_deny_bpf(errno.ENOSYS)\n"
        "err = g.bpf_map_create_errno()\n"
        "print(errno.errorcode[err], os.getpid() > 0, len(open('/proc/self/stat').read()) > 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    if "Operation not permitted" in out.stderr or "Invalid argument" in out.stderr:
        pytest.skip(f"seccomp filters cannot be installed here: {out.stderr.strip()[-200:]}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ENOSYS", "True", "True"]


def test_reasons_are_the_indented_lines_after_the_headline() -> None:
    stderr = (
        "some log line\n"
        "eBPF capture cannot run here:\n"
        "  the bpf() syscall is denied (EPERM) even as root: check ...\n"
        "  tracefs is not mounted\n"
    )
    assert nobpf.reasons(stderr) == [
        "the bpf() syscall is denied (EPERM) even as root: check ...",
        "tracefs is not mounted",
    ]
    assert nobpf.reasons("no headline\n  indented\n") == []


def test_build_box_stamp_covers_its_inputs() -> None:
    text = (VM / "build-box.sh").read_text()
    # rebuilt when the script, the image or Vagrant's key changes
    assert 'cat "$here/build-box.sh" "$CACHE/image/STAMP" "$pubkey"' in text
    # the box comes from the test-kernels rootfs, via build-image.sh
    assert '"$here/build-image.sh" "$CACHE"' in text


def test_lab_make_targets_exist_and_stay_out_of_make_test() -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in ("lab-box:", "lab-up:", "lab-test:"):
        assert target in makefile
    test_rule = re.search(r"^test:.*\n((?:\t.*\n)*)", makefile, re.M)
    assert test_rule and "lab" not in test_rule.group(0)
    assert os.access(VM / "lab.py", os.X_OK) and os.access(VM / "build-box.sh", os.X_OK)


def test_lab_test_command_widens_timeouts_under_tcg_only() -> None:
    assert lab.test_command([], "kvm") == "cd /vagrant && sudo make test"
    tcg = lab.test_command(["tests/ebpf"], "qemu")
    assert tcg.startswith(
        "cd /vagrant && sudo env TLSCAP_TEST_AGENT_START_TIMEOUT=600"
        " TLSCAP_GO_BUILD_TIMEOUT=3600 make test"
    )
    assert tcg.endswith("PYTEST_ARGS='tests/ebpf --timeout=1200'")


def test_pytest_arguments_keep_their_order_and_options() -> None:
    assert lab.pytest_arguments(["test", "-v", "tests/ebpf", "-k", "curl"]) == [
        "-v",
        "tests/ebpf",
        "-k",
        "curl",
    ]
    assert lab.pytest_arguments(["test"]) == []


def test_kernel_prefixes_end_at_a_dot_or_dash() -> None:
    assert matrix.version_matches("6.1.0-50-cloud-amd64", "6.1")
    assert not matrix.version_matches("6.12.117+deb13-cloud-amd64", "6.1")
    assert matrix.version_matches("6.12.117+deb13-cloud-amd64", "6.12")
    assert matrix.version_matches("5.10.0-32-cloud-amd64", "5.10.0-32-cloud-amd64")
    ks = [matrix.Kernel("bookworm", "6.1.0-50-cloud-amd64"), matrix.Kernel("trixie", "6.12.1")]
    assert matrix.nobpf_kernel(ks[::-1], "6.1") == ks[0]
