#!/bin/sh
# The smoke suite a `make test-kernels` guest runs (called by the image's
# /sbin/tlscap-guest-boot with the shared checkout as $1).  Real captures through
# the project's own eBPF tests: curl <-> openssl s_server byte-exact with tuples,
# Python ssl 1 MiB each way, stripped Go binaries (struct walk) and a wrapped
# net.Conn (the fd fallback), wget (GnuTLS), the collector round trip; and the
# preflight's one-line reasons where bpf() is denied or the ring buffer is missing.
# With tlscap.nobpf=1 on the kernel command line it runs scripts/vm/guest_nobpf.py
# instead (bpf() denied by seccomp for the whole suite; --mode auto -> proxy).
# Prints the kernel features this kernel gives the agent, then a last line
# "TLSCAP-RESULT: pass|fail <passed>/<total>" the host parses.
src="${1:-/work/main}"
cd "$src" || exit 1
export HOME=/root PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LANG=C.UTF-8
export PATH="$src/.venv/bin:$PATH"
# Go builds: the host's build cache, shared as tag gobuild (warm after one guest).
# (guest-boot.sh mounted it at /tmp/tlscap-go-builds when the host shared it.)
mkdir -p /tmp/tlscap-go-builds
export TLSCAP_GO_BUILD_DIR=/tmp/tlscap-go-builds
# Under TCG bcc's clang compiles the probes in minutes, not seconds.
export TLSCAP_TEST_AGENT_START_TIMEOUT=600

# The bpf()-denied guest (kernel command line tlscap.nobpf=1): its own checks, all
# under a seccomp filter that makes bpf() fail (scripts/vm/guest_nobpf.py).
for arg in $(cat /proc/cmdline); do
    case "$arg" in tlscap.nobpf=1) exec "$src/.venv/bin/python" "$src/scripts/vm/guest_nobpf.py" "$src" ;; esac
done

echo "TLSCAP-GUEST: kernel features:"
"$src/.venv/bin/python" - <<'PY'
from agent.probes import kernel_features, preflight
k = kernel_features.detect()
print("TLSCAP-FEATURES:", " ".join(f"{n}={int(v)}" for n, v in k.present.items()))
for line in k.off_lines():
    print("TLSCAP-GUEST:", line)
print("TLSCAP-GUEST: preflight:", preflight.check_kernel_features() or "ok")
PY

tests="
tests/ebpf/test_openssl_capture.py::test_curl_and_s_server_both_sides_exact
tests/ebpf/test_openssl_capture.py::test_python_ssl_1mib_each_way_reassembles_exactly
tests/ebpf/test_gotls_capture.py::test_go_client_and_server_both_sides_exact[go1.19-stripped]
tests/ebpf/test_gotls_capture.py::test_go_client_and_server_both_sides_exact[go-current-stripped]
tests/ebpf/test_gotls_capture.py::test_wrapped_tcp_conn_falls_back_to_the_nested_syscall
tests/ebpf/test_gnutls_capture.py::test_wget_request_and_response_exact
tests/ebpf/test_collector_e2e.py::test_subscriber_receives_exactly_what_the_agent_captured
tests/unit/test_kernel_features.py
tests/ebpf/test_kernel_features.py::test_no_ring_buffer_fails_ebpf_mode_with_a_one_line_reason
tests/ebpf/test_kernel_features.py::test_bpf_denied_gives_one_line_reasons
"
# TLSCAP_SMOKE_TESTS (kernel command line tlscap.tests=a,b) narrows the suite.
for arg in $(cat /proc/cmdline); do
    case "$arg" in tlscap.tests=*) tests="$(echo "${arg#tlscap.tests=}" | tr ',' ' ')" ;; esac
done
start=$(cut -d' ' -f1 /proc/uptime)
# -p no:cacheprovider: the checkout is shared read-only.  Timeouts are generous:
# TCG runs everything (clang compiling the probes included) ~10x slower.
{
    "$src/.venv/bin/python" -m pytest -p no:cacheprovider --timeout=1200 -rfEs -v \
        --durations=0 $tests 2>&1
    echo $? >/tmp/pytest.rc
} | tee /tmp/pytest.out
rc=$(cat /tmp/pytest.rc)
# A failed test's tlscap logs (tests/ebpf write them to tlscap.log in the test's
# tmp_path) die with the guest: put their tails on the console.
if [ "$rc" -ne 0 ]; then
    for log in $(find /tmp/pytest-of-root -name 'tlscap*.log' 2>/dev/null); do
        echo "TLSCAP-GUEST: tail of $log:"
        tail -n 20 "$log" | sed 's/^/    | /'
    done
fi
summary="$(tail -n1 /tmp/pytest.out)"
passed=$(echo "$summary" | grep -oE '[0-9]+ passed' | cut -d' ' -f1)
total=0
for n in $(echo "$summary" | grep -oE '[0-9]+ (passed|failed|error|errors|skipped)' | cut -d' ' -f1); do
    total=$((total + n))
done
end=$(cut -d' ' -f1 /proc/uptime)
echo "TLSCAP-GUEST: suite took $(echo "$start $end" | awk '{printf "%d", $2-$1}')s"
# A skip is a failure here: every test of the suite must run on every kernel.
if [ "$rc" -eq 0 ] && [ "${passed:-0}" -gt 0 ] && [ "${passed:-0}" -eq "$total" ]; then
    echo "TLSCAP-RESULT: pass ${passed:-0}/$total"
else
    echo "TLSCAP-RESULT: fail ${passed:-0}/$total"
fi
