"""NATS JetStream as the collector's backend (docs/nats.md).

subjects.py maps records and filters to subjects (pure); config.py holds the
connection and stream settings; backend.py publishes Ingest batches to the stream and
serves Subscribe from consumers on it.
"""
