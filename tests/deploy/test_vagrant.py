"""The Vagrant lab: `vagrant validate`, plus what the Vagrantfile promises in its text.

`vagrant validate` needs no box and no network; without a VM provider on this machine
it runs with --ignore-provider (the provider blocks are checked as text below).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO

VAGRANTFILE = REPO / "Vagrantfile"
VAGRANT = "/usr/bin/vagrant"
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
PRIVATE_RANGES = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
]


def vagrantfile() -> str:
    return VAGRANTFILE.read_text()


def code_lines() -> str:
    """The Vagrantfile without its comments (the comments may name what it avoids)."""
    return "\n".join(line.split("#", 1)[0] for line in vagrantfile().splitlines())


def provisioner_scripts() -> list[Path]:
    """Files the Vagrantfile hands to shell provisioners (path: "...")."""
    return [REPO / p for p in re.findall(r'path:\s*"([^"]+)"', code_lines())]


def vagrant_validate(directory: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "VAGRANT_HOME": str(home),
        # No update check, no plugin or box index lookups: this runs offline.
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_NO_PLUGINS": "1",
    }
    for inherited in ("VAGRANT_CWD", "VAGRANT_VAGRANTFILE", "VAGRANT_DEFAULT_PROVIDER"):
        env.pop(inherited, None)
    return subprocess.run(
        [VAGRANT, "validate", "--ignore-provider", "--no-color"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def lab_copy(tmp_path: Path) -> Path:
    """The Vagrantfile and the files it refers to, alone in a temporary directory."""
    if not Path(VAGRANT).exists():
        pytest.skip(f"{VAGRANT} is not installed (Debian's vagrant package; `make setup`)")
    copy = tmp_path / "lab"
    copy.mkdir()
    shutil.copy(VAGRANTFILE, copy / "Vagrantfile")
    for script in [REPO / "scripts" / "bootstrap.sh", *provisioner_scripts()]:
        target = copy / script.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(script, target)
    return copy


def test_vagrant_validate(lab_copy, tmp_path):
    result = vagrant_validate(lab_copy, tmp_path / "vagrant-home")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout
    # Both machines were validated, and nothing was downloaded.
    for machine in ("lab", "peer"):
        assert f"==> {machine}:" in result.stdout
    assert not list((tmp_path / "vagrant-home").glob("boxes/*"))


def test_vagrant_validate_rejects_a_broken_vagrantfile(lab_copy, tmp_path):
    # The check above must not be vacuous with --ignore-provider: a misspelt setting
    # outside the provider blocks still fails.
    path = lab_copy / "Vagrantfile"
    path.write_text(path.read_text().replace("config.vm.box = BOX", "config.vm.boxx = BOX"))
    result = vagrant_validate(lab_copy, tmp_path / "vagrant-home")
    assert result.returncode != 0
    assert "boxx" in result.stdout + result.stderr


def test_provisioning_is_the_bootstrap_script():
    code = code_lines()
    inline = re.findall(r'inline:\s*"([^"]+)"', code)
    assert inline, "no inline shell provisioner"
    for command in inline:
        assert command in ("/vagrant/scripts/bootstrap.sh", "make -C /vagrant setup"), command
    # One list of packages and steps: scripts/bootstrap.sh. None in the Vagrantfile...
    assert not re.search(r"\bapt(-get)?\b|\bdpkg\b|\bpip\b", code)
    # ...nor in the scripts it runs besides bootstrap.
    for script in provisioner_scripts():
        text = script.read_text()
        assert not re.search(r"^[^#]*\b(apt-get|apt|dpkg|pip)\s", text, re.M), script
    # `make setup` runs the same script.
    assert "./scripts/bootstrap.sh" in (REPO / "Makefile").read_text()


def test_box_and_synced_folder():
    code = code_lines()
    assert re.search(r'BOX\s*=\s*"debian/bookworm64"', code)
    assert "config.vm.box = BOX" in code
    synced = re.search(r'config\.vm\.synced_folder\s+"\.",\s*"/vagrant",\s*type:\s*"rsync"', code)
    assert synced, "the repo must be synced to /vagrant with rsync"
    # The host's venv and generated code must not overwrite the VM's.
    for excluded in (".venv/", "agent/schema/generated/", ".vagrant/"):
        assert f'"{excluded}"' in code


def test_both_providers_get_memory_and_cpus():
    code = code_lines()
    for provider in ("virtualbox", "libvirt"):
        block = re.search(
            rf'\.vm\.provider\s+"{provider}"\s+do\s+\|(\w+)\|(.*?)\n\s*end', code, re.S
        )
        assert block, f"no {provider} provider block"
        var, body = block.groups()
        assert re.search(rf"{var}\.memory\s*=\s*memory", body)
        assert re.search(rf"{var}\.cpus\s*=\s*cpus", body)
    assert re.search(r"resources\(lab, memory: 4096, cpus: 2\)", code)
    assert re.search(r"resources\(peer, memory: \d+, cpus: \d+\)", code)


def test_lab_addresses_come_from_the_benchmarking_range():
    addresses = re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", code_lines())
    assert addresses, "no lab addresses"
    for text in addresses:
        address = ipaddress.ip_address(text)
        assert address in LAB_RANGE, text
        assert not any(address in net for net in PRIVATE_RANGES), text
    # The peer is optional and serves TLS on the lab network.
    code = code_lines()
    assert re.search(r'config\.vm\.define\s+"peer",\s*autostart:\s*false', code)
    assert re.search(r'config\.vm\.define\s+"lab",\s*primary:\s*true', code)
    assert "openssl s_server" in (REPO / "deploy" / "vagrant" / "peer-tls-server.sh").read_text()
