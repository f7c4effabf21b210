"""A real grpcio client making unary calls over TLS to http_server.py.

    grpc_client.py CA_CERT PORT

Calls /test.Echo/Say twice (each request message echoed back) and
/test.Echo/Missing once (answered NOT_FOUND), all on one channel, and prints one
JSON line: what it sent and what it got.  grpcio carries its own BoringSSL,
stripped of symbols, so it is the *server's* OpenSSL that a capture sees.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import grpc


def main() -> None:
    ca, port = Path(sys.argv[1]), int(sys.argv[2])
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        say = channel.unary_unary("/test.Echo/Say")  # bytes in, bytes out
        sent = [b"hello grpc", b"second message \x00\x01\x02"]
        got = [say(m, timeout=10) for m in sent]
        try:
            channel.unary_unary("/test.Echo/Missing")(b"x", timeout=10)
            missing = None
        except grpc.RpcError as exc:
            missing = [exc.code().value[0], exc.details()]
    print(
        json.dumps(
            {
                "sent_b64": [base64.b64encode(m).decode() for m in sent],
                "got_b64": [base64.b64encode(m).decode() for m in got],
                "missing": missing,
            }
        )
    )


if __name__ == "__main__":
    main()
