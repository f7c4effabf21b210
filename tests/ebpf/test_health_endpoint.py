"""The agent's /healthz, /readyz and /metrics while it captures real traffic: the
counters move when TLS calls are captured."""

from __future__ import annotations

import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.ebpf.conftest import free_port, wait_for


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def status(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.status


def test_health_and_metrics_follow_the_capture(agent, s_server):
    health_port = free_port()
    a = agent("--health-listen", f"127.0.0.1:{health_port}")
    assert status(health_port, "/healthz") == 200
    assert status(health_port, "/readyz") == 200  # the ready file exists: probes attached
    before = scrape(health_port)
    assert before["tlscap_up"] == 1
    assert before["tlscap_attached_targets"] >= 1

    port = s_server("127.0.0.1")
    for _ in range(3):
        subprocess.run(
            ["curl", "-sk", "--http1.1", "-o", "/dev/null", f"https://127.0.0.1:{port}/m"],
            check=True, timeout=30,
        )  # fmt: skip

    def moved() -> bool:
        now = scrape(health_port)
        return now["tlscap_records_total"] >= before["tlscap_records_total"] + 12

    wait_for(moved, 10, "the records counter to move")
    after = scrape(health_port)
    assert after["tlscap_captured_bytes_total"] > before["tlscap_captured_bytes_total"]
    assert after["tlscap_kernel_calls_total"] >= before["tlscap_kernel_calls_total"] + 12
    assert after["tlscap_lost_events_total"] == 0
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    assert len(cap.data()) >= 12  # 3 x (curl + s_server) x (request + response)
