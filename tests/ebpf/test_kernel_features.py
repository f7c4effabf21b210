"""Real probes with kernel features forced off (TLSCAP_KERNEL_FEATURES_OFF): the
program an older kernel gets, loaded and run on this one.  On 5.10 (no
bpf_task_pt_regs) this is the build `make test-kernels` boots for real."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from agent.probes.kernel_features import OVERRIDE_ENV
from tests.ebpf.conftest import REPO, TLSCAP
from tests.ebpf.test_gotls_capture import (  # noqa: F401  (fixtures)
    go_https_current,
    go_programs,
)
from tests.ebpf.test_gotls_capture import test_position_independent_go_binary as _pie_go
from tests.ebpf.test_gotls_capture import (
    test_wrapped_tcp_conn_falls_back_to_the_nested_syscall as _wrapped_go,
)
from tests.ebpf.test_openssl_capture import curl_request, run_curl

OPTIONAL_OFF = "task_pt_regs,cgroup_id,send_signal,sock_length_tracepoints"


@pytest.fixture
def optional_features_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE_ENV, OPTIONAL_OFF)


def test_openssl_capture_with_optional_features_off(optional_features_off, agent, s_server,
                                                    tmp_path):  # fmt: skip
    a = agent()
    port = s_server("127.0.0.1")
    body = tmp_path / "body"
    run_curl("127.0.0.1", port, "/off", body)
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    (client,) = cap.conns(comm="curl")
    assert cap.stream(client, "egress") == curl_request("127.0.0.1", port, "/off")
    assert cap.stream(client, "ingress").endswith(body.read_bytes())
    first = cap.data(conn_id=client)[0]
    assert first["remote"] == {"ip": "127.0.0.1", "port": port} and first["local"]
    # Visible: one log line per feature off, and the gauges in the stats record.
    for name in OPTIONAL_OFF.split(","):
        assert f"kernel feature off: {name} (" in cap.stderr
    assert cap.stats["kernel_features_missing"] == 4
    assert cap.stats["kernel_feature_task_pt_regs"] == 0
    assert cap.stats["kernel_feature_ringbuf"] == 1


def test_go_fd_fallback_without_task_pt_regs(
    optional_features_off,
    agent,
    go_programs,  # noqa: F811 (the fixture imported above)
    go_https_current,  # noqa: F811
):
    """Wrapped net.Conn: the fd comes from the thread's first socket syscall."""
    _wrapped_go(agent, go_programs, go_https_current)


def test_pie_go_binary_without_task_pt_regs(optional_features_off, agent, go_programs):  # noqa: F811
    _pie_go(agent, go_programs)


def test_no_ring_buffer_fails_ebpf_mode_with_a_one_line_reason(monkeypatch, tmp_path):
    monkeypatch.setenv(OVERRIDE_ENV, "ringbuf")
    out = subprocess.run(
        [*TLSCAP, "run", "--mode", "ebpf", "--output", "jsonl", "--output-file",
         str(tmp_path / "o.jsonl"), "--duration", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    reason = [ln for ln in out.stderr.splitlines() if "ring buffer" in ln]
    assert len(reason) == 1, out.stderr
    assert "5.8+" in reason[0] and "--mode proxy" in reason[0]


def test_bpf_denied_gives_one_line_reasons(tmp_path):
    """bpf() refused (here: root of a user namespace, without CAP_BPF on the host):
    the preflight lists what is wrong, one line each, and ebpf mode exits."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    out = subprocess.run(
        ["unshare", "--user", "--map-root-user", *TLSCAP, "run", "--mode", "ebpf",
         "--output", "jsonl", "--output-file", str(tmp_path / "o.jsonl"), "--duration", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if "unshare:" in out.stderr:
        pytest.skip(f"no user namespaces here: {out.stderr.strip()}")
    assert out.returncode != 0
    assert "eBPF capture cannot run here" in out.stderr, out.stderr
    denied = [ln for ln in out.stderr.splitlines() if "bpf() syscall is denied" in ln]
    assert len(denied) == 1, out.stderr
