# tlscap developer entry points. Everything runs from the .venv that `make setup` builds
# (a --system-site-packages venv of Debian's python3, so Debian's bcc is importable).

VENV        := .venv
PYTHON      := $(VENV)/bin/python
RUFF        := $(VENV)/bin/ruff
LINT_PATHS  := agent tests bench scripts

ARGS        ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help setup run test lint fmt bench clean test-kernels lab-box lab-up lab-test lab-destroy

help:
	@echo "make setup               install system packages + .venv (idempotent; run as root)"
	@echo "make run ARGS='...'      run the capture agent, e.g. ARGS='--output jsonl'"
	@echo "make test [PYTEST_ARGS=] run the test suite (needs root for the eBPF tests)"
	@echo "make lint | fmt          ruff check / ruff format"
	@echo "make bench               run the benchmarks (bench/run_all.py)"
	@echo "make test-kernels        boot Debian's 5.10/6.1/6.12 kernels in qemu, run the smoke suite (root)"
	@echo "make lab-box             host side of the libvirt Vagrant lab + the locally built box (root)"
	@echo "make lab-up              lab-box, KVM probe, vagrant up --provider=libvirt (root; docs/vagrant-lab.md)"
	@echo "make lab-test [LAB_PYTEST_ARGS=]  sudo make test in the lab VM (default: tests/ebpf)"
	@echo "make lab-destroy         vagrant destroy -f (the box stays)"
	@echo "make clean               remove caches and build leftovers (keeps .venv)"

# Always runs the bootstrap: it is the one place that knows what "set up" means, and a
# no-op run takes well under a second.
setup:
	@./scripts/bootstrap.sh

run: setup
	$(VENV)/bin/tlscap run $(ARGS)

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: setup
	$(RUFF) check $(LINT_PATHS)
	$(RUFF) format --check $(LINT_PATHS)

fmt: setup
	$(RUFF) check --fix $(LINT_PATHS)
	$(RUFF) format $(LINT_PATHS)

bench: setup
	$(PYTHON) bench/run_all.py

# Not part of `make test`: it boots one VM per kernel (TCG here: tens of minutes).
# KERNELS=5.10,6.1 narrows it; docs/kernels.md says what it does and costs.
KERNELS ?=
test-kernels: setup
	@command -v qemu-system-x86_64 >/dev/null && command -v debootstrap >/dev/null || \
		apt-get install -y -q --no-install-recommends qemu-system-x86 debootstrap e2fsprogs
	/usr/bin/python3 scripts/vm/kernel_matrix.py $(if $(KERNELS),--kernels $(KERNELS))

# The Vagrant lab on libvirt (docs/vagrant-lab.md): not part of `make test` either.
# scripts/vm/lab.py installs what the host needs (vagrant-libvirt, libvirt-daemon-system,
# ...), starts libvirtd, builds the box from the test-kernels rootfs (cached in
# /var/cache/tlscap-vm/box) and adds it to Vagrant; lab-up probes KVM (TCG otherwise)
# and boots the lab VM, which provisions itself with scripts/bootstrap.sh.
LAB_PYTEST_ARGS ?= tests/ebpf
lab-box:
	/usr/bin/python3 scripts/vm/lab.py box

lab-up:
	/usr/bin/python3 scripts/vm/lab.py up

lab-test:
	/usr/bin/python3 scripts/vm/lab.py test $(LAB_PYTEST_ARGS)

lab-destroy:
	VAGRANT_DEFAULT_PROVIDER=libvirt vagrant destroy -f

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
