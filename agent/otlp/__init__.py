"""OpenTelemetry export: captured HTTP/gRPC exchanges as OTLP spans (see spans.py, sink.py)."""
