"""Stamp records with the run's identity and hand them to every sink.

Both capture paths (the eBPF session and the fallback proxy) end here, so a record
gets its (agent_id, node, seq) the same way whichever path made it.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from agent.records._record import stamp
from agent.records.record import Record
from agent.sinks.base import Sink

if TYPE_CHECKING:
    from agent.k8s.attribution import Attribution
    from agent.l7.stage import L7Stage

log = logging.getLogger(__name__)


def new_agent_id() -> str:
    """`<hostname>-<random>`: unique per run, still readable in a listing."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"


class RecordWriter:
    """Numbers records (seq restarts per run, hence one agent_id per run) and fans them out."""

    def __init__(
        self,
        sinks: Iterable[Sink],
        agent_id: str,
        node: str,
        attribution: Attribution | None = None,
        l7: L7Stage | None = None,
        *,
        seq_slot: int = 0,
        seq_stride: int = 1,
    ) -> None:
        self.sinks = list(sinks)
        # HTTP parsing and redaction (agent/l7): between the policy and the sinks, so
        # nothing unredacted reaches any sink.  None (or an inactive stage): off; so
        # is redaction alone when no sink is there to protect (--output none).
        if l7 is not None and not self.sinks and not l7.options.parse:
            l7 = None
        self.l7 = l7 if l7 is not None and l7.active else None
        self.agent_id = agent_id
        self.node = node
        self.attribution = attribution  # container/pod stamping and the capture policy
        self.records = 0
        self.data_bytes = 0
        # Several writers in one run (capture workers) share its agent_id, so each
        # numbers in its own slot: the k-th record gets seq slot + 1 + k * stride.
        if not 0 <= seq_slot < seq_stride:
            raise ValueError(f"seq slot {seq_slot} outside a stride of {seq_stride}")
        self._seq_slot = seq_slot
        self._seq_stride = seq_stride

    def write(self, record: Record) -> None:
        if record.type != "stats":
            self.write_many([record])
            return
        if self.l7 is not None:
            # Held records and unfinished exchanges go out before the run's last word,
            # and the stats line carries the stage's final counters.
            self._emit_many(self.l7.flush())
            record.stats.update(self.l7.stats())
            if "records" in record.stats:  # counted before the flush above
                record.stats["records"] = self.records
                record.stats["bytes"] = self.data_bytes
        self._emit_many([record])

    def write_many(self, records: list[Record]) -> None:
        """write() for each of `records` (no stats record among them), with the sinks
        given them in one call each: a batch from the ring costs one buffered write."""
        attribution, l7 = self.attribution, self.l7
        if attribution is None and l7 is None:
            self._emit_many(records)
            return
        if attribution is not None:
            # Left out by the tlscap.io/capture policy (counted there).
            records = [record for record in records if attribution.apply(record)]
        self._emit_many(records if l7 is None else l7.process_many(records))

    def _emit_many(self, records: list[Record]) -> None:
        if not records:
            return
        stride = self._seq_stride
        seq = self._seq_slot + 1 + self.records * stride
        self.data_bytes += stamp(records, self.agent_id, self.node, seq, stride)
        self.records += len(records)
        for sink in self.sinks:
            write_many = getattr(sink, "write_many", None)
            if write_many is not None:
                write_many(records)
            else:
                for record in records:
                    sink.write(record)

    def process_exited(self, pid: int) -> None:
        """Forget what was cached about the process: its pid may be reused."""
        if self.attribution is not None:
            self.attribution.forget(pid)

    def sink_stats(self) -> dict[str, int]:
        """Counters of sinks that can lose data (the exporter), and attribution's, for
        the stats record."""
        out: dict[str, int] = {}
        if self.l7 is not None:
            out.update(self.l7.stats())
        if self.attribution is not None:
            out.update(self.attribution.stats())
        for sink in self.sinks:
            stats = getattr(sink, "stats", None)
            if callable(stats):
                out.update(stats())
        return out

    def close(self) -> None:
        if self.l7 is not None:
            try:
                self._emit_many(self.l7.flush())
            except OSError as exc:
                log.error("writing the last records: %s", exc)
        if self.attribution is not None:
            self.attribution.close()
        for sink in self.sinks:
            try:
                sink.close()
            except OSError as exc:
                log.error("closing output: %s", exc)
