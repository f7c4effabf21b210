"""SummaryCollector: summary keys become Prometheus families, one snapshot per scrape."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from agent.events import layout
from agent.fallback.proxy import ProxyStats
from agent.flows.connection import FlowStats
from agent.health.metrics import METRICS, UNTYPED_HELP, SummaryCollector, metric_name

# Exporter.stats() needs a live exporter; its keys are listed here instead.
EXPORTER_KEYS = [
    "export_sent_records",
    "export_acked_records",
    "export_queued_records",
    "export_queue_dropped",
    "export_spooled_records",
    "export_spool_bytes",
    "export_spool_dropped_records",
    "export_spool_dropped_bytes",
    "export_spool_failed_records",
    "export_spool_corrupt_bytes",
    "export_rejected_records",
    "export_lost_records",
    "export_reconnects",
    "export_refused",
    "export_connected",
]
SESSION_KEYS = [
    "events",
    "records",
    "bytes",
    "lost",
    "decode_errors",
    "incomplete_calls",
    "targets_attached",
    "attach_failures",
    "go_binaries_refused",
    "held_processes",
    "hold_timeouts",
    "rescan_attached",
    "proxy_leaves_issued",
    "proxy_passthrough_remembered",
]


def scrape(collector: SummaryCollector) -> dict[str, tuple[str, str, dict[str, float]]]:
    """{family name: (type, help, {sample name + labels: value})} from the text format."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        samples = {
            s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())): s.value
            for s in family.samples
        }
        out[family.name] = (family.type, family.documentation, samples)
    return out


def sample(collector: SummaryCollector, name: str) -> float:
    for _type, _help, samples in scrape(collector).values():
        if name in samples:
            return samples[name]
    raise KeyError(name)


def test_every_key_the_agent_reports_today_is_declared() -> None:
    keys = (
        SESSION_KEYS
        + EXPORTER_KEYS
        # The kernel's shed_* counters are reported under their own names.
        + [f"kernel_{name}" for name in layout.COUNTERS if not name.startswith("shed_")]
        + [name for name in layout.COUNTERS if name.startswith("shed_")]
        + ["shed_processes"]
        + [f"flow_{name}" for name in FlowStats().as_dict()]
        + list(ProxyStats().as_dict())
    )
    # An undeclared key is still exposed (as an untyped gauge); declaring it gives it
    # the right type and help text. Add new summary keys to METRICS.
    assert sorted(set(keys) - set(METRICS)) == []


@pytest.mark.parametrize(
    ("key", "name", "kind"),
    [
        ("records", "tlscap_records_total", "counter"),
        ("bytes", "tlscap_captured_bytes_total", "counter"),
        ("lost", "tlscap_lost_events_total", "counter"),
        ("kernel_lost_events", "tlscap_kernel_lost_events_total", "counter"),
        ("targets_attached", "tlscap_attached_targets", "gauge"),
        ("export_queued_records", "tlscap_export_queue_depth", "gauge"),
        ("export_spool_bytes", "tlscap_export_spool_bytes", "gauge"),
        ("export_connected", "tlscap_collector_connected", "gauge"),
    ],
)
def test_declared_names_and_types(key: str, name: str, kind: str) -> None:
    assert METRICS[key].name == name
    assert METRICS[key].kind == kind
    assert metric_name(key) == name


def test_declared_names_are_unique_and_counters_end_in_total() -> None:
    names = [spec.name for spec in METRICS.values()]
    assert len(names) == len(set(names))
    for spec in METRICS.values():
        assert spec.name.startswith("tlscap_")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.help


def test_counters_and_gauges_are_exposed_with_their_values() -> None:
    collector = SummaryCollector(
        lambda: {"records": 7, "bytes": 1024, "targets_attached": 2, "export_connected": True},
        version="1.2.3",
    )
    families = scrape(collector)
    assert families["tlscap_records"][0] == "counter"
    assert families["tlscap_records"][2] == {"tlscap_records_total": 7}
    assert families["tlscap_captured_bytes"][2] == {"tlscap_captured_bytes_total": 1024}
    assert families["tlscap_attached_targets"][:1] == ("gauge",)
    assert families["tlscap_attached_targets"][2] == {"tlscap_attached_targets": 2}
    assert families["tlscap_collector_connected"][2] == {"tlscap_collector_connected": 1}
    assert families["tlscap_up"][2] == {"tlscap_up": 1}
    assert families["tlscap_build_info"][2] == {"tlscap_build_info,version=1.2.3": 1}
    # Keys the session does not report (proxy_* in eBPF mode) are absent, not 0.
    assert "tlscap_proxy_accepted" not in families


def test_snapshot_is_taken_once_per_scrape_and_never_at_registration() -> None:
    calls = []

    def snapshot() -> dict[str, int]:
        calls.append(1)
        return {"records": len(calls)}

    collector = SummaryCollector(snapshot)
    registry = CollectorRegistry()
    registry.register(collector)
    assert calls == []
    generate_latest(registry)
    assert len(calls) == 1
    assert sample(collector, "tlscap_records_total") == 2


def test_unknown_keys_become_gauges_with_sanitized_names() -> None:
    collector = SummaryCollector(lambda: {"k8s_pods_seen": 4, "odd-key.x": 1.5})
    families = scrape(collector)
    assert families["tlscap_k8s_pods_seen"] == (
        "gauge",
        UNTYPED_HELP,
        {"tlscap_k8s_pods_seen": 4},
    )
    assert families["tlscap_odd_key_x"][2] == {"tlscap_odd_key_x": 1.5}


def test_unknown_key_cannot_take_over_a_declared_name() -> None:
    # "attached_targets" would sanitize to tlscap_attached_targets, declared for
    # targets_attached; "records_total" would clash with tlscap_records_total.
    collector = SummaryCollector(
        lambda: {
            "targets_attached": 3,
            "attached_targets": 99,
            "records_total": 5,
            "up": 0,
            "build": 2,
            "snapshot_errors": 7,
        }
    )
    families = scrape(collector)
    assert families["tlscap_up"][2] == {"tlscap_up": 1}
    assert "tlscap_build" not in families
    assert "tlscap_snapshot_errors" in families  # the declared counter, untouched
    assert families["tlscap_snapshot_errors"][2] == {"tlscap_snapshot_errors_total": 0}
    assert families["tlscap_attached_targets"][2] == {"tlscap_attached_targets": 3}
    assert "tlscap_records_total" not in families
    assert "tlscap_records" not in families


def test_values_that_are_not_numbers_are_left_out_not_fatal() -> None:
    collector = SummaryCollector(
        lambda: {"records": "seven", "bytes": -1, "events": 3, "mystery": None}  # type: ignore[dict-item]
    )
    families = scrape(collector)
    assert "tlscap_records" not in families
    assert "tlscap_captured_bytes" not in families
    assert "tlscap_mystery" not in families
    assert families["tlscap_events"][2] == {"tlscap_events_total": 3}


def test_failing_snapshot_reports_up_0_and_warns_once_per_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = {"fail": True}

    def snapshot() -> dict[str, int]:
        if state["fail"]:
            raise RuntimeError("session gone")
        return {"records": 1}

    collector = SummaryCollector(snapshot)
    with caplog.at_level(logging.DEBUG, logger="agent.health.metrics"):
        first = scrape(collector)
        second = scrape(collector)
    assert first["tlscap_up"][2] == {"tlscap_up": 0}
    assert "tlscap_records" not in first
    assert "tlscap_build_info" in first
    assert second["tlscap_snapshot_errors"][2] == {"tlscap_snapshot_errors_total": 2}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "session gone" in warnings[0].getMessage()
    assert warnings[0].exc_info is None  # no traceback in the agent's log

    state["fail"] = False
    assert sample(collector, "tlscap_up") == 1
    assert sample(collector, "tlscap_records_total") == 1


def test_openmetrics_exposition_is_valid() -> None:
    collector = SummaryCollector(
        lambda: {"records": 3, "export_queued_records": 5, "new_thing": 1}, version="9"
    )
    registry = CollectorRegistry()
    registry.register(collector)
    families = {f.name: f for f in parse_openmetrics(generate_openmetrics(registry).decode())}
    assert families["tlscap_records"].type == "counter"
    assert families["tlscap_records"].samples[0].value == 3
    assert families["tlscap_build"].type == "info"
    assert families["tlscap_build"].samples[0].labels == {"version": "9"}
    assert families["tlscap_new_thing"].samples[0].value == 1


def test_kernel_counter_names_follow_the_enum_in_tlscap_h() -> None:
    # Every kernel counter reaches /metrics through layout.COUNTERS, by index:
    # it must list enum counter's members in order, one for one.
    header = (Path(__file__).resolve().parents[2] / "bpf" / "tlscap.h").read_text()
    body = header.split("enum counter {", 1)[1].split("};", 1)[0]
    members = re.findall(r"^\s*(CNT_\w+)\s*=\s*(\d+)", body, re.MULTILINE)
    indexes = {name: int(value) for name, value in members}
    assert indexes.pop("CNT_MAX") == len(layout.COUNTERS)
    assert sorted(indexes.values()) == list(range(len(layout.COUNTERS)))
    by_index = {value: name for name, value in indexes.items()}
    assert by_index[14] == "CNT_MAP_FULL" and layout.COUNTERS[14] == "map_full"
    assert by_index[15] == "CNT_STALE_CALLS" and layout.COUNTERS[15] == "stale_calls"
    assert by_index[16] == "CNT_UNKNOWN_FDS" and layout.COUNTERS[16] == "unknown_fds"
    for name in ("map_full", "stale_calls", "unknown_fds"):
        assert METRICS[f"kernel_{name}"].kind == "counter"
