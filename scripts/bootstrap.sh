#!/usr/bin/env bash
# Idempotent bootstrap for tlscap on Debian 12 (run by `make setup`, as root).
#
#   1. system packages (bcc, headers, tools the tests drive, Go 1.19 for the Go TLS
#      tests) - installed only if missing
#   2. .venv made from /usr/bin/python3 with --system-site-packages, because bcc comes
#      from Debian's python3-bpfcc and is not on PyPI
#   3. `pip install -e '.[dev]'`, re-run only when pyproject.toml changes (stamp file)
#   4. protobuf/gRPC code generated from proto/ (only when a .proto changed), and the
#      C extensions built in place (setup.py; only when a source changed)
#   5. tracefs mounted (a fresh boot of some VMs leaves it unmounted; bcc needs it)
#
# A second run with everything in place does no network or package work.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

SYSTEM_PYTHON=/usr/bin/python3
VENV=.venv
STAMP="$VENV/.tlscap-bootstrap-stamp"

# --- 1. system packages ------------------------------------------------------------
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script expects Debian 12 (or similar)"

arch="$(dpkg --print-architecture)"
packages=(
    python3-bpfcc libbpfcc bpftool "linux-headers-$arch"
    iptables iproute2 curl openssl ca-certificates
    python3-venv gcc libssl-dev make
    # Python.h, for tlscap's own C extensions (setup.py: agent/*/_*.c)
    python3-dev
    golang-go binutils
    # GnuTLS and NSS programs the capture tests drive (wget, gnutls-serv, NSS's
    # tstclnt/httpserv), and a JVM for `tlscap targets`' tests
    wget gnutls-bin libnss3-tools default-jre-headless
    # `vagrant validate` of the lab's Vagrantfile (no VM provider is needed for it)
    vagrant
    # tshark dissects the pcapng files tlscap writes (tests of agent/pcap)
    tshark
    # HTTPS load on a busy node: tests/ebpf/test_load_nginx.py and bench/load_nginx.py
    # run their own nginx (own config, loopback port) under wrk; the system service
    # the package sets up is stopped below, since `--comm nginx` would capture it too
    nginx wrk
    # Node.js: TLS over memory BIOs (OpenSSL linked into the node binary, libuv
    # moving the ciphertext) - tests/ebpf/test_membio.py drives its https client/server
    nodejs
    # bench/pipeline.py --instructions: instruction counts (callgrind) that do not
    # move with the load other work puts on these shared machines
    valgrind
)

# One dpkg-query for all of them; unknown packages print nothing on stdout.
installed="$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${packages[@]}" 2>/dev/null || true)"
missing=()
for pkg in "${packages[@]}"; do
    if ! grep -qxF "$pkg ii " <<<"$installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]]; then
        die "missing system packages: ${missing[*]} - run \`sudo make setup\` (or apt-get install them)"
    fi
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [[ " ${missing[*]} " == *" nginx "* ]]; then
        # Debian starts and enables nginx on port 80 where init scripts may run.
        if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
            systemctl disable --now nginx >/dev/null 2>&1 || true
        else
            invoke-rc.d nginx stop >/dev/null 2>&1 || true
            update-rc.d nginx disable >/dev/null 2>&1 || true
        fi
    fi
else
    say "system packages: all present"
fi

# --- 2. virtualenv -----------------------------------------------------------------
[[ -x $SYSTEM_PYTHON ]] || die "$SYSTEM_PYTHON not found (Debian's python3 is required: bcc is built for it)"

venv_ok() {
    [[ -x $VENV/bin/python && -f $VENV/pyvenv.cfg ]] || return 1
    grep -qE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" || return 1
    # Must be Debian's interpreter: bcc's dist-packages only work with that exact Python.
    [[ "$(readlink -f "$VENV/bin/python")" == "$(readlink -f "$SYSTEM_PYTHON")" ]]
}

if ! venv_ok; then
    if [[ -e $VENV ]]; then
        say "recreating $VENV (not a --system-site-packages venv of $SYSTEM_PYTHON)"
    else
        say "creating $VENV"
    fi
    "$SYSTEM_PYTHON" -m venv --clear --system-site-packages "$VENV"
fi

# --- 3. python packages ------------------------------------------------------------
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ $want != "$have" ]]; then
    say "installing tlscap and dev tools into $VENV (pip install -e '.[dev]')"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
    printf '%s\n' "$want" >"$STAMP"
else
    say "python packages: up to date"
fi

# mitmproxy, in a venv of its own: tests/ebpf/test_har_output.py reads tlscap's HAR
# files with mitmproxy's own reader, and mitmproxy pins cryptography and h2 older
# than tlscap's, so it cannot live in .venv.
MITM_VENV=.cache/mitmproxy-venv
MITM_SPEC='mitmproxy>=10.1,<13'
if ! "$MITM_VENV/bin/python" -c 'import mitmproxy.io' 2>/dev/null; then
    say "creating $MITM_VENV ($MITM_SPEC)"
    mkdir -p .cache
    "$SYSTEM_PYTHON" -m venv --clear "$MITM_VENV"
    "$MITM_VENV/bin/python" -m pip install -q --disable-pip-version-check "$MITM_SPEC"
else
    say "mitmproxy venv: present"
fi

# --- 4. generated code and C extensions -------------------------------------------
"$VENV/bin/python" scripts/generate_proto.py
# Built in place, so the source tree imports them; only when a source is newer than
# its module (setuptools itself takes a second to say so).  PYTHONWARNINGS:
# setuptools' deprecation banners are noise here.
# A shared header (agent/*/_*.h) is a source of every module: any newer one rebuilds.
native_stale=0
newest_header=$(find agent -name '_*.h' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
while IFS= read -r src; do
    built=("${src%.c}".cpython-*.so)
    if [[ ! -e ${built[0]} || $src -nt ${built[0]} || setup.py -nt ${built[0]} ]] ||
        [[ -n $newest_header && $newest_header -nt ${built[0]} ]]; then
        native_stale=1
    fi
done < <(find agent -name '_*.c')
if ((native_stale)); then
    say "building the C extensions (setup.py)"
    PYTHONWARNINGS=ignore "$VENV/bin/python" setup.py -q build_ext --inplace \
        || die "building the C extensions failed (setup.py); see the compiler output above"
else
    say "C extensions: up to date"
fi

# --- 5. tracefs --------------------------------------------------------------------
if [[ ! -d /sys/kernel/tracing/events && ! -d /sys/kernel/debug/tracing/events ]]; then
    if [[ $EUID -eq 0 ]] && mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; then
        say "mounted tracefs at /sys/kernel/tracing"
    else
        say "warning: tracefs is not mounted; as root run: mount -t tracefs nodev /sys/kernel/tracing"
    fi
fi

# Cheap end-to-end proof that the venv sees bcc; a clear message beats a later traceback.
if ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
    die "$VENV/bin/python cannot import bcc; check that python3-bpfcc is installed for $SYSTEM_PYTHON"
fi

say "ready"
