"""A grpcio channel opened before the agent starts, used after it is ready.

    grpc_channel.py CA_CERT PORT --secret-prefix P --calls N [--message-size BYTES]

Opens one channel to http_server.py, makes one call (the connection and both HPACK
tables are then warm), prints "CONNECTED" and waits for a line on stdin (the test
starts the agent meanwhile).  Then makes N calls of /test.Echo/Say on the same
channel, each with metadata `authorization: Bearer P<i>` and `x-api-key: P-key<i>`
and a message of --message-size bytes: larger than a TLS record, so the server's
reads start inside DATA frames.  Prints one JSON line: what it sent and what came
back.  grpcio's own BoringSSL is not probed; the capture is the server's side.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path

import grpc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ca", type=Path)
    p.add_argument("port", type=int)
    p.add_argument("--secret-prefix", required=True)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--message-size", type=int, default=40_000)
    args = p.parse_args()
    creds = grpc.ssl_channel_credentials(root_certificates=args.ca.read_bytes())
    with grpc.secure_channel(
        f"127.0.0.1:{args.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        say = channel.unary_unary("/test.Echo/Say")  # bytes in, bytes out
        say(b"warm-up", timeout=10, metadata=[("x-api-key", "not-a-secret-yet")])
        print("CONNECTED", flush=True)
        sys.stdin.readline()
        sent, got = [], []
        for i in range(args.calls):
            message = hashlib.sha256(b"%d" % i).digest() * (args.message_size // 32)
            metadata = [
                ("authorization", f"Bearer {args.secret_prefix}{i}"),
                ("x-api-key", f"{args.secret_prefix}key{i}"),
            ]
            sent.append(message)
            got.append(say(message, timeout=10, metadata=metadata))
    print(
        json.dumps(
            {
                "sent_b64": [base64.b64encode(m).decode() for m in sent],
                "echoed": [a == b for a, b in zip(sent, got, strict=True)],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
