"""An HTTPS server (Python `ssl`) that reports exactly what it received and sent.

    https_truth_server.py CERT KEY [--count N] [--body-size BYTES] [--host H] [--hold]

Prints ``ready PORT`` once listening, then serves N connections one after another:
reads one request (up to the blank line), answers ``200 OK`` with a random body of
BYTES and ``Connection: close``, closes.  With --hold it prints ``received`` once it
has a request and answers only after a line on stdin.  Then it prints one JSON line: a list of
{"peer": [ip, port], "received_b64", "sent_b64"} - the ground truth a capture of the
*client* is compared with.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import ssl
import sys


def serve_one(conn: ssl.SSLSocket, body: bytes, hold: bool) -> tuple[bytes, bytes]:
    received = bytearray()
    while b"\r\n\r\n" not in received:
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    if hold:
        print("received", flush=True)
        sys.stdin.readline()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    response = head.encode() + body
    conn.sendall(response)
    # Send close_notify for clients that wait for it (wget), but don't wait long for the
    # peer's: some (NSS's tstclnt) answer only once the TCP connection closes.
    conn.settimeout(1.0)
    with contextlib.suppress(OSError, ssl.SSLError):
        conn.unwrap()
    return bytes(received), response


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cert")
    p.add_argument("key")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--body-size", type=int, default=3000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--hold", action="store_true")
    args = p.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((args.host, 0))
        listener.listen(8)
        print(f"ready {listener.getsockname()[1]}", flush=True)
        results = []
        for _ in range(args.count):
            raw, peer = listener.accept()
            with ctx.wrap_socket(raw, server_side=True) as conn:
                received, sent = serve_one(conn, os.urandom(args.body_size), args.hold)
            results.append({
                "peer": list(peer[:2]),
                "received_b64": base64.b64encode(received).decode(),
                "sent_b64": base64.b64encode(sent).decode(),
            })  # fmt: skip
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
