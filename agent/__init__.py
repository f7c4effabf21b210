"""tlscap: capture TLS plaintext with eBPF, mapped to TCP flows and processes."""

__version__ = "0.1.0"
