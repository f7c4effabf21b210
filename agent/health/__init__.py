"""Liveness, readiness and Prometheus metrics for a running agent.

`metrics.py` turns the session's summary counters into metric families (pure);
`server.py` is the small HTTP server that serves /healthz, /readyz and /metrics.
"""

from agent.health.metrics import SummaryCollector
from agent.health.server import HealthServer, parse_listen

__all__ = ["HealthServer", "SummaryCollector", "parse_listen"]
