"""The OTLP sink: exchange records -> spans -> an OTLP/gRPC endpoint, off the capture path.

write() only appends the record to a bounded queue (no span building, no I/O),
so the drain loop never waits for the network; when the queue is full the record
is dropped and counted.  One worker thread builds spans a batch at a time and
hands them to the official OTLP exporter (opentelemetry-exporter-otlp-proto-grpc),
which retries transient errors within its timeout.  A batch that still fails is
dropped and counted, and the worker backs off (exponential, capped, jittered)
before the next attempt while new records keep queueing up to the bound.  A
failed batch is not retried after the backoff: the queue's bound then holds the
newest spans of an outage, not the oldest.

Counters (in the agent's stats line and /metrics): otlp_spans_exported,
otlp_spans_dropped (queue full, failed batches, or left at exit while the
endpoint was down), otlp_export_failures (failed export calls),
otlp_queue_depth (queued or being sent), otlp_traceparent_invalid,
otlp_traceparent_linked.  The stats line is taken before the sinks close, so
close() logs the final numbers.  With capture workers (`--workers N`) each worker
has a sink and an exporter of its own, made after the fork; the stats line adds
up their final counters, and each worker's close() logs its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from agent.export.backoff import Backoff
from agent.otlp.spans import SpanBuilder
from agent.records.record import Record

log = logging.getLogger(__name__)


class SpanExporterLike(Protocol):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult: ...

    def shutdown(self) -> None: ...


class OtlpSink:
    def __init__(
        self,
        exporter: SpanExporterLike,
        endpoint: str = "",
        max_queue: int = 8192,
        batch_size: int = 512,
        flush_interval: float = 0.5,
        backoff: Backoff | None = None,
        close_timeout: float = 5.0,
        builder: SpanBuilder | None = None,
    ) -> None:
        if max_queue < 1 or batch_size < 1:
            raise ValueError("max_queue and batch_size must be positive")
        self.endpoint = endpoint
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.close_timeout = close_timeout
        self._exporter = exporter
        self._builder = builder or SpanBuilder()
        self._backoff = backoff or Backoff(initial=1.0, maximum=30.0)
        self._queue: deque[Record] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.exported = 0
        self.dropped = 0
        self.failures = 0
        self.build_errors = 0
        self._down = False  # the last export failed
        self._inflight = 0  # spans handed to the exporter, not yet acknowledged
        self._invalid_logged = False
        self._worker = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._worker.start()

    # -- the capture side: never blocks ------------------------------------------------

    def write(self, record: Record) -> None:
        if record.type != "exchange" or record.exchange is None:
            return
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                return
            self._queue.append(record)
            full = len(self._queue) >= self.batch_size
        if full:
            self._wake.set()

    def count_dropped(self, n: int) -> None:
        """Records lost before they reached this sink (a collector subscriber that lagged)."""
        with self._lock:
            self.dropped += n

    def stats(self) -> dict[str, int]:
        return {
            "otlp_spans_exported": self.exported,
            "otlp_spans_dropped": self.dropped,
            "otlp_export_failures": self.failures,
            "otlp_queue_depth": len(self._queue) + self._inflight,
            "otlp_traceparent_invalid": self._builder.traceparent_invalid,
            "otlp_traceparent_linked": self._builder.traceparent_linked,
        }

    def flush(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Export what is queued (unless the endpoint is down), then stop; bounded
        by close_timeout plus the exporter's own abort."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        self._worker.join(self.close_timeout)
        if self._worker.is_alive():
            log.warning("OTLP export to %s did not finish in %.0f s", self.endpoint,
                        self.close_timeout)  # fmt: skip
        try:
            self._exporter.shutdown()  # aborts a retry wait still in progress
        except Exception:
            log.debug("OTLP exporter shutdown failed", exc_info=True)
        self._worker.join(2.0)
        with self._lock:
            self.dropped += len(self._queue)
            self._queue.clear()
        # The run's stats line is taken before the sinks close: this is the final word.
        log.log(
            logging.WARNING if self.dropped else logging.INFO,
            "OTLP export to %s: %d spans exported, %d dropped, %d failed exports",
            self.endpoint,
            self.exported,
            self.dropped,
            self.failures,
        )

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        resume_at = 0.0  # while the endpoint is down: no attempt before this
        while True:
            pause = resume_at - time.monotonic()
            self._wake.wait(pause if pause > 0 else self.flush_interval)
            self._wake.clear()
            if self._stopping.is_set():
                if not self._down:
                    deadline = time.monotonic() + self.close_timeout
                    while self._queue and not self._down and time.monotonic() < deadline:
                        self._export_batch()
                return
            if time.monotonic() < resume_at:
                continue  # woken by a full batch during the backoff: it waits
            while self._queue and not self._stopping.is_set():
                if not self._export_batch():
                    resume_at = time.monotonic() + self._backoff.next_delay()
                    break
                if len(self._queue) < self.batch_size:
                    break  # a partial batch: wait for more (or the interval)

    def _take(self) -> list[Record]:
        with self._lock:
            n = min(self.batch_size, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _export_batch(self) -> bool:
        records = self._take()
        if not records:
            return True
        spans = []
        for record in records:
            try:
                span = self._builder.build(record)
            except Exception:  # a malformed exchange must not stop the exporter
                self.build_errors += 1
                self.count_dropped(1)
                log.debug("building a span failed", exc_info=True)
                continue
            if span is not None:
                spans.append(span)
        self._log_invalid_traceparent()
        if not spans:
            return True
        self._inflight = len(spans)
        try:
            result = self._exporter.export(spans)
        except Exception as exc:  # the exporter should not raise; count it like a failure
            log.debug("OTLP export raised", exc_info=True)
            result, reason = SpanExportResult.FAILURE, str(exc)
        else:
            reason = "the exporter gave up after its retries"
        finally:
            self._inflight = 0
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
            self._backoff.reset()
            if self._down:
                self._down = False
                log.warning("OTLP export to %s works again", self.endpoint)
            return True
        with self._lock:
            self.dropped += len(spans)
        self.failures += 1
        if not self._down:
            self._down = True
            log.warning(
                "OTLP export to %s failed (%s): spans are dropped and counted "
                "(otlp_spans_dropped) while it is down; retrying with backoff",
                self.endpoint,
                reason,
            )
        return False

    def _log_invalid_traceparent(self) -> None:
        if self._builder.traceparent_invalid and not self._invalid_logged:
            self._invalid_logged = True
            # The header's value is captured plaintext: not quoted here.
            log.warning(
                "a captured request carried an invalid traceparent header; its span starts "
                "a new trace (counted in otlp_traceparent_invalid, logged once)"
            )
