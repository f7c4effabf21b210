"""The wire schema: generated protobuf/gRPC modules plus the Record conversion.

`pb` holds the messages and `pb_grpc` the service stubs, both generated from
`proto/tlscap/v1/tlscap.proto` by `make setup` (scripts/generate_proto.py).
"""

from __future__ import annotations

try:
    from agent.schema.generated.tlscap.v1 import tlscap_pb2 as pb
    from agent.schema.generated.tlscap.v1 import tlscap_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - only on a tree that skipped `make setup`
    raise ImportError(
        "tlscap's protobuf code is not generated: run `make setup` "
        "(or `.venv/bin/python scripts/generate_proto.py`)"
    ) from exc

__all__ = ["pb", "pb_grpc"]
