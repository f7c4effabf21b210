"""Prometheus metrics over the agent's summary counters.

The capture and proxy sessions already keep every number worth watching in one
flat `summary()` dict (the same one the `type:"stats"` record carries at exit).
`SummaryCollector` turns one call of that snapshot into metric families per
scrape, so there is a single source of truth and nothing to keep in step: no
prometheus_client objects are updated on the capture path.

Which keys are counters and which are gauges is declared in `METRICS`; a key the
table does not know yet is still exposed, as a gauge, so a counter added to a
session is never invisible on a dashboard.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "tlscap_"
UNTYPED_HELP = "untyped agent counter"

Snapshot = Callable[[], Mapping[str, int | float]]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as exposed in the text format: counters end in _total
    kind: Literal["counter", "gauge"]
    help: str


def _counter(name: str, help: str) -> MetricSpec:
    return MetricSpec(f"{PREFIX}{name}_total", "counter", help)


def _gauge(name: str, help: str) -> MetricSpec:
    return MetricSpec(f"{PREFIX}{name}", "gauge", help)


# Flat names rather than one family with a `kind` label: the keys are unrelated
# quantities (events, bytes, calls), and summing across such a label would be
# meaningless; flat names are also what alert rules are easiest to write against.
METRICS: dict[str, MetricSpec] = {
    # -- the session (agent/capture/session.py, agent/fallback/session.py) ----
    "events": _counter(
        "events", "Events handled: ring-buffer events (eBPF), accepted connections (proxy)"
    ),
    "records": _counter("records", "Records written to the outputs"),
    "bytes": _counter("captured_bytes", "Plaintext payload bytes carried in data records"),
    "lost": _counter(
        "lost_events", "Events the kernel could not hand over (ring buffer full, unreadable)"
    ),
    "decode_errors": _counter("decode_errors", "Ring-buffer events that failed to decode"),
    "incomplete_calls": _counter(
        "incomplete_calls", "TLS calls emitted with some of their chunks missing"
    ),
    "workers": _gauge("workers", "Capture worker processes (--workers N > 1; absent: none)"),
    "worker_failures": _counter(
        "worker_failures", "Capture workers that died or did not finish at exit"
    ),
    "worker_lost_events": _counter(
        "worker_lost_events", "Events meant for a capture worker that had died (also in lost)"
    ),
    "targets_attached": _gauge("attached_targets", "Files with TLS probes attached"),
    "attach_failures": _counter("attach_failures", "Files whose TLS probes failed to attach"),
    "go_binaries_refused": _counter(
        "go_binaries_refused", "Go programs not probed (unsupported ABI or architecture)"
    ),
    "rescan_attached": _counter(
        "rescan_attached", "Files probed by the periodic rescan (their exec/mmap event was lost)"
    ),
    "flow_exits_recovered": _counter(
        "flow_exits_recovered", "Ended processes found by the periodic sweep (exit event lost)"
    ),
    "held_processes": _counter(
        "held_processes", "Processes stopped at a TLS library mapping until probed"
    ),
    "hold_timeouts": _counter(
        "hold_timeouts", "Held processes resumed because the hold's bound ran out"
    ),
    # -- kernel counters (bpf/tlscap.h `enum counter`) ------------------------
    "kernel_calls": _counter("kernel_calls", "TLS calls that moved data, seen in the kernel"),
    "kernel_chunks": _counter("kernel_chunks", "Chunk events submitted to the ring buffer"),
    "ring_peak_pending_bytes": _gauge(
        "ring_peak_pending_bytes",
        "Most bytes ever waiting in the ring buffer at a drain (events are lost at ring_bytes)",
    ),
    "ring_bytes": _gauge("ring_bytes", "Size of the kernel ring buffer"),
    "kernel_lost_events": _counter(
        "kernel_lost_events", "Events dropped in the kernel: ring buffer full"
    ),
    "kernel_lost_bytes": _counter(
        "kernel_lost_bytes", "Payload bytes in events dropped because the ring buffer was full"
    ),
    "kernel_read_errors": _counter(
        "kernel_read_errors", "Payloads the kernel could not read from the process"
    ),
    "kernel_truncated_calls": _counter(
        "kernel_truncated_calls", "TLS calls larger than the capture cap"
    ),
    "kernel_truncated_bytes": _counter(
        "kernel_truncated_bytes", "Payload bytes beyond the capture cap, not captured"
    ),
    "kernel_nested_calls": _counter(
        "kernel_nested_calls", "TLS calls made inside another traced TLS call"
    ),
    "kernel_go_fd_fallbacks": _counter(
        "kernel_go_fd_fallbacks", "Go TLS calls whose fd could not be read from the *tls.Conn"
    ),
    "kernel_nss_plain_calls": _counter(
        "kernel_nss_plain_calls", "NSS (NSPR) calls on descriptors without TLS: not recorded"
    ),
    "kernel_map_full": _counter(
        "kernel_map_full",
        "Kernel tracking-map updates refused (full): a call, socket or process not followed",
    ),
    "kernel_stale_calls": _counter(
        "kernel_stale_calls", "TLS call entries replaced because their return was never seen"
    ),
    "kernel_unknown_fds": _counter(
        "kernel_unknown_fds",
        "read/write fds inside TLS calls not known as sockets (keylog, files): not trusted",
    ),
    "kernel_membio_binds": _counter(
        "kernel_membio_binds", "Memory-BIO TLS objects bound to the socket their thread used"
    ),
    "kernel_membio_refused": _counter(
        "kernel_membio_refused",
        "Memory-BIO binds refused: socket owned by another TLS object, or a write too small",
    ),
    "kernel_membio_stale": _counter(
        "kernel_membio_stale", "Memory-BIO binds not made: the socket syscall came too late"
    ),
    "kernel_ring_retried": _counter(
        "kernel_ring_retried",
        "Records the ring buffer refused with room to spare (its lock gave up), submitted again",
    ),
    # -- load shedding (bpf/calls.c; the kernel's shed_* counters, see shed_summary)
    "shed_connections": _counter(
        "shed_connections",
        "Connections not captured at all: they started while the ring buffer was too full",
    ),
    "shed_calls": _counter("shed_calls", "TLS calls of shed connections, not captured"),
    "shed_bytes": _counter("shed_bytes", "Bytes moved by shed connections, not captured"),
    "shed_connections_unattributed": _counter(
        "shed_connections_unattributed",
        "Shed connections left out of the per-process counts (the kernel's table was full)",
    ),
    "shed_midstream": _counter(
        "shed_midstream",
        "Followed connections cut when their data took the ring buffer past its cut mark "
        "(or it refused their data); each resumes, with a gap, once the ring has drained "
        "below the high-water mark",
    ),
    "shed_processes": _gauge("shed_processes", "Processes that had connections shed"),
    # -- flow table (agent/flows/table.py FlowStats) --------------------------
    "flow_connections": _counter("flow_connections", "Connections tracked by the flow table"),
    "flow_inferred_closes": _counter(
        "flow_inferred_closes", "Sockets replaced on their fd without a close being seen"
    ),
    "flow_gaps": _counter("flow_gaps", "Offset jumps: data lost before it reached the agent"),
    "flow_gap_bytes": _counter("flow_gap_bytes", "Bytes missing in offset jumps"),
    "flow_overlaps": _counter("flow_overlaps", "Offsets that went backwards (should stay 0)"),
    "flow_fds_learned_late": _counter(
        "flow_fds_learned_late", "Connections whose first calls came without an fd"
    ),
    "flow_evicted_connections": _counter(
        "flow_evicted_connections",
        "Connections dropped from the flow table past its bound (a close record is written)",
    ),
    "flow_evicted_adoptions": _counter(
        "flow_evicted_adoptions",
        "Sockets found at start-up dropped from the flow table before carrying TLS",
    ),
    "flow_bound_connections": _counter(
        "flow_bound_connections", "Memory-BIO connections whose held records got their socket"
    ),
    "flow_held_records": _counter(
        "flow_held_records", "Records held until their memory-BIO connection's socket was known"
    ),
    "flow_unbound_connections": _counter(
        "flow_unbound_connections",
        "Memory-BIO connections whose held records went out without a socket (hold expired)",
    ),
    "flow_unbound_records": _counter(
        "flow_unbound_records", "Data records written without a socket (memory BIO, unbound)"
    ),
    "flow_ssl_reused": _counter(
        "flow_ssl_reused", "Socket-less TLS objects whose offsets restarted: a new connection"
    ),
    "flow_closes_recovered": _counter(
        "flow_closes_recovered",
        "Connections closed by the periodic sweep: their fd was no socket any more (close lost)",
    ),
    "flow_sweep_reopened": _counter(
        "flow_sweep_reopened",
        "Connections the sweep closed that spoke again on the same socket (reopened as they were)",
    ),
    # -- exporter (agent/export/exporter.py Exporter.stats) -------------------
    "export_sent_records": _counter("export_sent_records", "Records sent to the collector"),
    "export_acked_records": _counter("export_acked_records", "Records the collector acknowledged"),
    "export_queued_records": _gauge("export_queue_depth", "Records in the in-memory export queue"),
    "export_queue_dropped": _counter(
        "export_queue_dropped_records", "Records dropped because the export queue was full"
    ),
    "export_spooled_records": _gauge(
        "export_spool_records", "Records in the on-disk spool, waiting for the collector"
    ),
    "export_spool_bytes": _gauge("export_spool_bytes", "Bytes in the on-disk spool"),
    "export_spool_dropped_records": _counter(
        "export_spool_dropped_records", "Records evicted from the full spool"
    ),
    "export_spool_dropped_bytes": _counter(
        "export_spool_dropped_bytes", "Bytes evicted from the full spool"
    ),
    "export_spool_failed_records": _counter(
        "export_spool_failed_records", "Records that could not be written to the spool"
    ),
    "export_spool_corrupt_bytes": _counter(
        "export_spool_corrupt_bytes", "Damaged spool bytes cut off when reading it back"
    ),
    "export_rejected_records": _counter(
        "export_rejected_records", "Records the collector rejected"
    ),
    "export_lost_records": _counter(
        "export_lost_records", "Records lost on the way to the collector, all causes"
    ),
    "export_reconnects": _counter("export_reconnects", "Reconnections to the collector"),
    "export_failovers": _counter(
        "export_failovers", "Switches to another collector after the current one failed"
    ),
    "export_refused": _counter(
        "export_refused_streams", "Streams the collector refused (token, certificate or node)"
    ),
    # -- OpenTelemetry spans (agent/otlp/sink.py), the local store (agent/sinks/store.py)
    # and HAR entries (agent/sinks/har.py)
    "otlp_spans_exported": _counter("otlp_spans_exported", "Exchanges exported as OTLP spans"),
    "otlp_spans_dropped": _counter(
        "otlp_spans_dropped", "Exchanges not exported: queue full, or the endpoint down too long"
    ),
    "otlp_export_failures": _counter("otlp_export_failures", "OTLP export batches that failed"),
    "otlp_queue_depth": _gauge("otlp_queue_depth", "Exchanges waiting for OTLP export"),
    "otlp_traceparent_invalid": _counter(
        "otlp_traceparent_invalid", "Requests whose traceparent header could not be used"
    ),
    "otlp_traceparent_linked": _counter(
        "otlp_traceparent_linked", "Spans that joined the trace of the request's traceparent"
    ),
    "store_records": _counter("store_records", "Records written to the --store SQLite file"),
    "har_entries": _counter("har_entries", "Exchanges written to the HAR file"),
    "har_skipped_exchanges": _counter(
        "har_skipped_exchanges", "Exchanges left out of the HAR file: their request was not seen"
    ),
    "export_connected": _gauge(
        "collector_connected", "1 while the collector connection is up and acknowledging"
    ),
    # -- proxy mode (agent/fallback/proxy.py ProxyStats, fallback/session.py) --
    # -- proxy mode inside pods' network namespaces (agent/fallback/pod_proxy.py)
    "proxy_pods_active": _gauge("proxy_pods_active", "Pods whose namespace the proxy serves"),
    "proxy_pods_installed": _counter(
        "proxy_pods_installed", "Pod namespaces given rules and listeners"
    ),
    "proxy_pods_removed": _counter("proxy_pods_removed", "Pod namespaces cleaned up"),
    "proxy_pods_bad_annotations": _counter(
        "proxy_pods_bad_annotations", "Pods left uncaptured because of their annotations"
    ),
    "proxy_pods_failed": _counter(
        "proxy_pods_failed", "Pod proxy setups that failed (certificate, iptables, port)"
    ),
    "proxy_pods_stale_swept": _counter(
        "proxy_pods_stale_swept", "Unselected pod namespaces cleaned of an earlier run's chains"
    ),
    "proxy_pods_host_network": _gauge(
        "proxy_pods_host_network", "Selected host-network pods (the node's own rules apply)"
    ),
    "proxy_accepted": _counter("proxy_accepted", "Connections accepted by the proxy"),
    "proxy_intercepted": _counter(
        "proxy_intercepted", "Connections whose TLS the proxy terminated"
    ),
    "proxy_plaintext": _counter("proxy_plaintext", "Connections that were not TLS"),
    "proxy_passthrough": _counter("proxy_passthrough", "Connections relayed without decryption"),
    "proxy_passthrough_destinations": _counter(
        "proxy_passthrough_destinations", "Destinations switched to passthrough"
    ),
    "proxy_pinned_clients": _counter(
        "proxy_pinned_clients", "Clients that refused the proxy's certificate"
    ),
    "proxy_client_handshake_failures": _counter(
        "proxy_client_handshake_failures", "Other client-side TLS handshake failures"
    ),
    "proxy_malformed_hellos": _counter("proxy_malformed_hellos", "Unparseable ClientHellos"),
    "proxy_upstream_connect_failures": _counter(
        "proxy_upstream_connect_failures", "Failed connections to the original destination"
    ),
    "proxy_upstream_tls_failures": _counter(
        "proxy_upstream_tls_failures", "Failed TLS handshakes with the original destination"
    ),
    "proxy_refused_not_redirected": _counter(
        "proxy_refused_not_redirected", "Connections refused: not redirected by the rules"
    ),
    "proxy_empty_connections": _counter(
        "proxy_empty_connections", "Connections closed before sending a byte"
    ),
    "proxy_relay_errors": _counter(
        "proxy_relay_errors", "Connections reset by one side mid-stream"
    ),
    "proxy_truncated_bytes": _counter(
        "proxy_truncated_bytes", "Payload bytes beyond the capture cap, not carried in records"
    ),
    "proxy_owner_unknown": _counter(
        "proxy_owner_unknown", "Connections whose owning process was not found"
    ),
    "proxy_internal_errors": _counter("proxy_internal_errors", "Proxy internal errors"),
    "proxy_leaves_issued": _counter(
        "proxy_leaves_issued", "Leaf certificates issued by the local CA"
    ),
    "proxy_passthrough_remembered": _gauge(
        "proxy_passthrough_remembered", "Destinations currently remembered as passthrough"
    ),
    # -- Kubernetes attribution (agent/k8s) -----------------------------------
    "k8s_connected": _gauge("k8s_connected", "1 while the pods watch on the API server is up"),
    "k8s_namespaces_connected": _gauge(
        "k8s_namespaces_connected", "1 while the namespaces watch on the API server is up"
    ),
    "k8s_pods": _gauge("k8s_pods", "Pods of this node known from the API server"),
    "k8s_namespaces": _gauge("k8s_namespaces", "Namespaces known from the API server"),
    "k8s_lists": _counter("k8s_lists", "LIST requests made to the API server"),
    "k8s_relists": _counter("k8s_relists", "Re-LISTs after a watch's version expired (410)"),
    "k8s_rewatches": _counter("k8s_rewatches", "Watches resumed after their stream ended"),
    "k8s_errors": _counter("k8s_errors", "Failed API server requests"),
    "k8s_events": _counter("k8s_events", "Watch events applied"),
    "k8s_bookmarks": _counter("k8s_bookmarks", "Watch bookmarks received"),
    "k8s_policy_dropped_records": _counter(
        "k8s_policy_dropped_records", "Records left out by the tlscap.io/capture policy"
    ),
    "k8s_cgroup_walks": _counter(
        "k8s_cgroup_walks", "Walks of the cgroup2 tree to name a new cgroup id"
    ),
    # HTTP/gRPC parsing and redaction (agent/l7)
    "l7_exchanges": _counter("l7_exchanges", "HTTP/gRPC exchanges parsed"),
    "l7_parse_failures": _counter(
        "l7_parse_failures", "Connections whose HTTP parsing stopped (protocol error, gap)"
    ),
    "l7_redacted_records": _counter(
        "l7_redacted_records", "Data records with bytes masked by a redaction rule"
    ),
    "l7_redacted_exchanges": _counter(
        "l7_redacted_exchanges", "Exchanges changed by a redaction rule"
    ),
    "l7_gaps": _counter("l7_gaps", "Holes in connections' byte streams (lost or truncated)"),
    "l7_connections_evicted": _counter(
        "l7_connections_evicted", "Connections dropped from L7 tracking past its bound"
    ),
    "l7_http1_connections": _counter("l7_http1_connections", "Connections parsed as HTTP/1"),
    "l7_http2_connections": _counter("l7_http2_connections", "Connections parsed as HTTP/2"),
    "l7_midstream_http2_connections": _counter(
        "l7_midstream_http2_connections",
        "HTTP/2 connections first seen mid-stream: framing followed, header blocks masked",
    ),
    "l7_header_blocks_masked_unknown": _counter(
        "l7_header_blocks_masked_unknown",
        "HTTP/2 header blocks masked whole because the HPACK state was unknown",
    ),
    "l7_midstream_unknown_connections": _counter(
        "l7_midstream_unknown_connections",
        "Connections of unknown protocol first seen past their start: first line masked",
    ),
    "l7_connections_tracked": _gauge(
        "l7_connections_tracked", "Connections the L7 stage follows now"
    ),
}

# Shed connections per process travel in the flat summary as one key per
# process, `shed_connections_pid_<pid>_<comm>` (the stats record is a flat map
# of ints), and come out of /metrics as one labelled family.
SHED_PROCESS_KEY = "shed_connections_pid_"
SHED_PROCESS_KEY_RE = re.compile(r"shed_connections_pid_(\d+)(?:_(.*))?", re.DOTALL)
SHED_BY_PROCESS = _counter(
    "shed_connections_by_process", "Shed connections per process (the processes with the most)"
)
SHED_TOP_PROCESSES = 20

UP = f"{PREFIX}up"
SNAPSHOT_ERRORS = f"{PREFIX}snapshot_errors_total"
BUILD_INFO = f"{PREFIX}build"  # exposed as tlscap_build_info{version=...} 1


def shed_summary(
    kernel: Mapping[str, int],
    processes: Mapping[int, tuple[str, int]],
    top: int = SHED_TOP_PROCESSES,
) -> dict[str, int]:
    """The load-shedding keys of a capture summary.

    `kernel` is the kernel's counters (its shed_* ones are reported under their
    own names, not again as kernel_shed_*); `processes` is pid -> (comm,
    connections shed).  Only the `top` processes with the most shed
    connections get a key each; `shed_processes` says how many there were.
    """
    out = {k: v for k, v in kernel.items() if k.startswith("shed_")}
    out["shed_processes"] = len(processes)
    ranked = sorted(processes.items(), key=lambda item: (-item[1][1], item[0]))
    for pid, (comm, connections) in ranked[:top]:
        out[f"{SHED_PROCESS_KEY}{pid}_{comm}" if comm else f"{SHED_PROCESS_KEY}{pid}"] = connections
    return out


def agent_version() -> str:
    try:
        return importlib.metadata.version("tlscap")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def metric_name(key: str) -> str:
    """The exposed name of a summary key: declared in METRICS, or derived from the key."""
    spec = METRICS.get(key)
    return spec.name if spec else PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class SummaryCollector(Collector):
    """Exposes one `snapshot()` per scrape; `snapshot` may be called from server threads."""

    def __init__(self, snapshot: Snapshot, *, version: str | None = None) -> None:
        self._snapshot = snapshot
        self._version = version if version is not None else agent_version()
        self._lock = threading.Lock()
        self._errors = 0
        # A broken snapshot fails every scrape: warn when the failure starts or
        # changes, not every 15 s for as long as it lasts.
        self._last_error: str | None = None

    def describe(self) -> Iterator[Metric]:
        # Without describe() the registry would call collect(), i.e. the snapshot,
        # at registration time, before the session has anything to report.
        yield from self._fixed_families(up=None)
        for spec in METRICS.values():
            yield _family(spec)
        yield _shed_by_process_family()

    def collect(self) -> Iterator[Metric]:
        values = self._take_snapshot()
        yield from self._fixed_families(up=values is not None)
        if values is None:
            return
        taken = {UP, SNAPSHOT_ERRORS, SNAPSHOT_ERRORS.removesuffix("_total")}
        taken |= {BUILD_INFO, f"{BUILD_INFO}_info"}
        for key, spec in METRICS.items():
            family = _family(spec)
            # Reserve the name even when the key is absent: an unknown key must
            # not take it over (a declared key that comes and goes would flap).
            taken.update(_exposed_names(family))
            if key in values and _add(family, values[key]):
                yield family
        by_process = _shed_by_process_family()
        taken.update(_exposed_names(by_process))
        if _add_shed_by_process(by_process, values):
            yield by_process
        unknown = sorted(
            (str(k), v)
            for k, v in values.items()
            if k not in METRICS and not str(k).startswith(SHED_PROCESS_KEY)
        )
        for key, value in unknown:
            name = metric_name(key)
            if not key or name in taken:
                log.debug("metrics: summary key %r clashes with %s; not exposed", key, name)
                continue
            family = GaugeMetricFamily(name, UNTYPED_HELP)
            if _add(family, value):
                taken.add(name)
                yield family

    def _take_snapshot(self) -> dict[str, int | float] | None:
        try:
            values = dict(self._snapshot())
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._errors += 1
                repeated = message == self._last_error
                self._last_error = message
            if repeated:
                log.debug("metrics: agent summary still failing: %s", message)
            else:
                log.warning(
                    "metrics: agent summary failed, scrape reports tlscap_up 0: %s", message
                )
            return None
        with self._lock:
            if self._last_error is not None:
                log.info("metrics: agent summary works again")
                self._last_error = None
        return values

    def _fixed_families(self, up: bool | None) -> Iterator[Metric]:
        info = InfoMetricFamily(BUILD_INFO, "tlscap agent build")
        gauge = GaugeMetricFamily(UP, "1 if the agent's counters could be read for this scrape")
        errors = CounterMetricFamily(SNAPSHOT_ERRORS, "Scrapes whose agent summary failed")
        if up is not None:
            info.add_metric([], {"version": self._version})
            gauge.add_metric([], 1 if up else 0)
            with self._lock:
                errors.add_metric([], self._errors)
        yield from (info, gauge, errors)


def _family(spec: MetricSpec) -> Metric:
    cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    return cls(spec.name, spec.help)  # CounterMetricFamily takes the _total off itself


def _add(family: Metric, value: object) -> bool:
    # bool is an int: export_connected may come as True/False. Anything not a
    # number is a bug elsewhere; it must not break the whole scrape.
    if not isinstance(value, int | float):
        log.debug("metrics: %s has a non-numeric value %r; not exposed", family.name, value)
        return False
    if family.type == "counter" and (math.isnan(value) or value < 0):
        log.debug("metrics: counter %s has an invalid value %r; not exposed", family.name, value)
        return False
    family.add_metric([], float(value))  # type: ignore[attr-defined]
    return True


def _shed_by_process_family() -> Metric:
    return CounterMetricFamily(SHED_BY_PROCESS.name, SHED_BY_PROCESS.help, labels=["pid", "comm"])


def _add_shed_by_process(family: Metric, values: Mapping[str, object]) -> bool:
    added = False
    for key, value in values.items():
        match = SHED_PROCESS_KEY_RE.fullmatch(str(key))
        if not match or not isinstance(value, int | float) or value < 0:
            continue
        family.add_metric([match[1], match[2] or ""], float(value))  # type: ignore[attr-defined]
        added = True
    return added


def _exposed_names(family: Metric) -> set[str]:
    if family.type == "counter":
        return {family.name, f"{family.name}_total", f"{family.name}_created"}
    return {family.name}
