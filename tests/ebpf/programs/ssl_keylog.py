"""A Python `ssl` client and server whose handshakes run inside their first
SSL_write / SSL_read and write files while they do: SSLKEYLOGFILE-style key logs
(keylog_filename) and, with --msg-log, a line per TLS message (written before
the message goes out, so a file write is the first syscall of that call).

Starts listening, prints {"pid": ...}, waits for a line on stdin, then one
request/response.  The last stdout line is a JSON summary with both sides' fds.
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
        chunk = conn.recv(size - len(buf))
        if not chunk:
            raise EOFError(f"peer closed after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--keylog-dir", required=True)
    p.add_argument("--msg-log", action="store_true")
    p.add_argument("--size", type=int, default=5000)
    args = p.parse_args()

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(args.cert, args.key)
    server_ctx.keylog_filename = os.path.join(args.keylog_dir, "server.keys")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.keylog_filename = os.path.join(args.keylog_dir, "client.keys")
    if args.msg_log:
        log_fd = os.open(os.path.join(args.keylog_dir, "messages.log"), os.O_WRONLY | os.O_CREAT)

        def log_message(conn, direction, version, content_type, msg_type, data) -> None:
            os.write(log_fd, f"{direction} {content_type} {msg_type} {len(data)}\n".encode())

        # CPython's debugging hook (SSL_CTX_set_msg_callback): called inside the
        # SSL call for every record and message, some before they are sent.
        client_ctx._msg_callback = log_message  # type: ignore[attr-defined]
        server_ctx._msg_callback = log_message  # type: ignore[attr-defined]

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    request, response = os.urandom(args.size), os.urandom(args.size)
    summary: dict = {"pid": os.getpid(), "port": port}

    def serve() -> None:
        raw, _ = listener.accept()
        summary["server_fd"] = raw.fileno()
        # No handshake here: the first recv (SSL_read_ex) does it.
        with server_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False) as c:
            summary["server_got_sha256"] = hashlib.sha256(recv_exactly(c, args.size)).hexdigest()
            c.sendall(response)

    print(json.dumps({"pid": os.getpid(), "port": port}), flush=True)
    sys.stdin.readline()
    server = threading.Thread(target=serve)
    server.start()
    raw = socket.create_connection(("127.0.0.1", port))
    summary["client_fd"] = raw.fileno()
    summary["client_port"] = raw.getsockname()[1]
    # Nor here: the first sendall (SSL_write_ex) does it.
    with client_ctx.wrap_socket(raw, do_handshake_on_connect=False) as conn:
        conn.sendall(request)
        summary["client_got_sha256"] = hashlib.sha256(recv_exactly(conn, args.size)).hexdigest()
    server.join()
    summary["request_sha256"] = hashlib.sha256(request).hexdigest()
    summary["response_sha256"] = hashlib.sha256(response).hexdigest()
    summary["keylog_bytes"] = sum(
        os.path.getsize(os.path.join(args.keylog_dir, n)) for n in ("client.keys", "server.keys")
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
