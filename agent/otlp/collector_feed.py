"""`tlscap collector --otlp-endpoint`: the stored exchanges of every agent, as spans.

The feed is one more live subscriber of the collector's hub (agent/collector/fanout.py),
for exchange records only: ingest never waits for it (the hub drops for a slow
subscriber and says how many, which the sink counts as dropped spans), and the
OTLP sink's own queue and backoff do the rest.  Records reach the collector
already redacted by their agent.
"""

from __future__ import annotations

import logging
import threading

from agent.collector.fanout import Hub, Lagged, SubscriptionClosed
from agent.otlp.sink import OtlpSink
from agent.records.filter import RecordFilter

log = logging.getLogger(__name__)


class HubFeed:
    def __init__(self, hub: Hub, sink: OtlpSink, max_pending: int = 10_000) -> None:
        self.sink = sink
        self._sub = hub.subscribe(RecordFilter(types=frozenset({"exchange"})), max_pending)
        self._thread = threading.Thread(target=self._run, name="otlp-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                batch = self._sub.next_batch(timeout=1.0)
            except SubscriptionClosed:
                return
            if batch is None:
                continue
            if isinstance(batch, Lagged):
                self.sink.count_dropped(batch.missed)
                continue
            for item in batch:
                self.sink.write(item.record)

    def stats(self) -> dict[str, int]:
        return self.sink.stats()

    def close(self) -> None:
        """Stop reading the hub, then export what the sink holds."""
        self._sub.close()
        self._thread.join(5.0)
        self.sink.close()
