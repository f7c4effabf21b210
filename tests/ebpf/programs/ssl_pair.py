"""A real Python `ssl` client and server in one process, for the capture tests.

Modes (the last stdout line is a JSON summary the test compares with the capture):
  bulk     each side sends SIZE random bytes in one sendall, reads the other's
  wait     connect, print the 4-tuple, block until a line on stdin, then `bulk`
  repeat   COUNT connections, one request/response each, INTERVAL s apart
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import ssl
import sys
import threading


def recv_exactly(conn: ssl.SSLSocket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = conn.recv(min(1 << 20, size - len(buf)))
        if not chunk:
            raise EOFError(f"peer closed after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def exchange(conn: ssl.SSLSocket, send: bytes, expect: int, *, first: bool) -> bytes:
    # One side sends everything, then the other: an SSL object must not be
    # read and written from two threads at once, and two large sendalls facing
    # each other would deadlock on full socket buffers.
    if first:
        conn.sendall(send)
        return recv_exactly(conn, expect)
    got = recv_exactly(conn, expect)
    conn.sendall(send)
    return got


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("bulk", "wait", "repeat"))
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.1)
    args = p.parse_args()

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(args.cert, args.key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((args.host, 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    client_out = os.urandom(args.size)
    server_out = os.urandom(args.size)
    summary: dict = {"pid": os.getpid(), "port": port, "size": args.size}

    def serve(count: int) -> None:
        for _ in range(count):
            raw, _ = listener.accept()
            with server_ctx.wrap_socket(raw, server_side=True) as conn:
                got = exchange(conn, server_out, args.size, first=False)
                summary.setdefault("server_got_sha256", []).append(hashlib.sha256(got).hexdigest())

    count = args.count if args.mode == "repeat" else 1
    server = threading.Thread(target=serve, args=(count,))
    server.start()

    for i in range(count):
        raw = socket.create_connection((args.host, port))
        with client_ctx.wrap_socket(raw) as conn:
            local = conn.getsockname()
            summary.setdefault("client_ports", []).append(local[1])
            if args.mode == "wait":
                print(json.dumps({"connected": True, "client_port": local[1], "port": port}))
                sys.stdout.flush()
                sys.stdin.readline()
            got = exchange(conn, client_out, args.size, first=True)
            summary.setdefault("client_got_sha256", []).append(hashlib.sha256(got).hexdigest())
        if args.mode == "repeat" and i + 1 < count:
            threading.Event().wait(args.interval)
    server.join()
    summary["client_sent_sha256"] = hashlib.sha256(client_out).hexdigest()
    summary["server_sent_sha256"] = hashlib.sha256(server_out).hexdigest()
    with open("/proc/self/maps") as maps:
        summary["maps_libssl"] = sorted({ln.split()[-1] for ln in maps if "libssl" in ln})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
