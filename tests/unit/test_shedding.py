"""Load shedding, the parts without a kernel: the high-water and cut marks the
BPF program is built with, and how the shed counters reach the stats and /metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.events import layout
from agent.health.metrics import SHED_TOP_PROCESSES, SummaryCollector, shed_summary
from agent.probes.bpf_program import PAGE_SIZE, ProbeSettings


def cflag(settings: ProbeSettings, name: str) -> int:
    (value,) = [f.split("=", 1)[1] for f in settings.cflags() if f.startswith(f"-D{name}=")]
    return int(value)


def test_high_water_mark_defaults_to_half_the_real_ring() -> None:
    settings = ProbeSettings(self_tgid=1, ringbuf_bytes=1 << 20)
    assert cflag(settings, "TLSCAP_SHED_BYTES") == 512 << 10
    # The ring is rounded up to a power of two of pages: the mark follows it.
    odd = ProbeSettings(self_tgid=1, ringbuf_bytes=3 << 20)
    assert cflag(odd, "TLSCAP_RINGBUF_PAGES") * PAGE_SIZE == 4 << 20
    assert cflag(odd, "TLSCAP_SHED_BYTES") == 2 << 20


def test_shed_fraction_sets_the_mark() -> None:
    settings = ProbeSettings(self_tgid=1, ringbuf_bytes=64 << 20, shed_fraction=0.75)
    assert cflag(settings, "TLSCAP_SHED_BYTES") == 48 << 20


def test_cut_mark_keeps_an_eighth_of_the_ring_free_and_at_least_256_kib() -> None:
    big = ProbeSettings(self_tgid=1, ringbuf_bytes=64 << 20)
    assert cflag(big, "TLSCAP_CUT_BYTES") == 56 << 20
    small = ProbeSettings(self_tgid=1, ringbuf_bytes=1 << 20)
    assert cflag(small, "TLSCAP_CUT_BYTES") == (1 << 20) - (256 << 10)
    # Never below the high-water mark, where cut connections resume.
    high = ProbeSettings(self_tgid=1, ringbuf_bytes=1 << 20, shed_fraction=0.9)
    assert cflag(high, "TLSCAP_CUT_BYTES") == cflag(high, "TLSCAP_SHED_BYTES")


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_zero_or_one_turns_shedding_off(fraction: float) -> None:
    settings = ProbeSettings(self_tgid=1, shed_fraction=fraction)
    assert cflag(settings, "TLSCAP_SHED_BYTES") == 0
    assert cflag(settings, "TLSCAP_CUT_BYTES") == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_fraction_out_of_range_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="shed_fraction"):
        ProbeSettings(self_tgid=1, shed_fraction=fraction)


def test_shed_counters_follow_the_kernel_enum_order() -> None:
    # enum counter in bpf/tlscap.h: CNT_SHED_CONNECTIONS = 10 ... 13, CNT_SHED_MIDSTREAM = 21.
    assert layout.COUNTERS[10:14] == (
        "shed_connections",
        "shed_calls",
        "shed_bytes",
        "shed_connections_unattributed",
    )
    assert layout.COUNTERS[21] == "shed_midstream"


KERNEL = {
    "calls": 90,
    "lost_events": 0,
    "shed_connections": 7,
    "shed_calls": 30,
    "shed_bytes": 4096,
    "shed_connections_unattributed": 1,
    "shed_midstream": 3,
}


def test_shed_summary_names_the_kernel_counters_once_and_each_process() -> None:
    out = shed_summary(KERNEL, {4242: ("curl", 4), 77: ("nginx", 2)})
    assert out == {
        "shed_connections": 7,
        "shed_calls": 30,
        "shed_bytes": 4096,
        "shed_connections_unattributed": 1,
        "shed_midstream": 3,
        "shed_processes": 2,
        "shed_connections_pid_4242_curl": 4,
        "shed_connections_pid_77_nginx": 2,
    }


def test_shed_summary_keeps_the_top_processes_only() -> None:
    processes = {pid: (f"p{pid}", pid) for pid in range(1, 51)}
    out = shed_summary({}, processes)
    per_process = {k: v for k, v in out.items() if k.startswith("shed_connections_pid_")}
    assert len(per_process) == SHED_TOP_PROCESSES
    assert min(per_process.values()) == 50 - SHED_TOP_PROCESSES + 1
    assert out["shed_processes"] == 50
    # A process whose comm could not be read keeps a key all the same.
    assert shed_summary({}, {9: ("", 3)})["shed_connections_pid_9"] == 3


def scrape(snapshot: dict) -> dict[str, tuple[str, dict[str, float]]]:
    registry = CollectorRegistry()
    registry.register(SummaryCollector(lambda: snapshot, version="t"))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        samples = {
            s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())): s.value
            for s in family.samples
        }
        out[family.name] = (family.type, samples)
    return out


def test_metrics_expose_shed_counters_and_one_labelled_family_per_process() -> None:
    snapshot = {"records": 3, **shed_summary(KERNEL, {4242: ("curl", 4), 77: ("my_app", 2)})}
    families = scrape(snapshot)
    assert families["tlscap_shed_connections"] == (
        "counter",
        {"tlscap_shed_connections_total": 7},
    )
    assert families["tlscap_shed_bytes"][1] == {"tlscap_shed_bytes_total": 4096}
    assert families["tlscap_shed_processes"] == ("gauge", {"tlscap_shed_processes": 2})
    assert families["tlscap_shed_connections_by_process"] == (
        "counter",
        {
            "tlscap_shed_connections_by_process_total,comm=curl,pid=4242": 4,
            # An underscore in the comm stays in the comm.
            "tlscap_shed_connections_by_process_total,comm=my_app,pid=77": 2,
        },
    )
    # Not also exposed one untyped gauge per process.
    assert not any(name.startswith("tlscap_shed_connections_pid") for name in families)


def test_no_shed_process_no_labelled_family() -> None:
    families = scrape({"records": 1, **shed_summary({"shed_connections": 0}, {})})
    assert "tlscap_shed_connections_by_process" not in families
    assert families["tlscap_shed_connections"][1] == {"tlscap_shed_connections_total": 0}
