"""An HTTPS server (Python `ssl`, so OpenSSL) speaking HTTP/1.1 and HTTP/2 (by ALPN).

    http_server.py CERT KEY [--host H]

Prints ``ready PORT`` once listening and serves until killed, one thread per
connection.  What it answers, on either protocol:

- ``/chunked``: 200, a chunked body (HTTP/1.1) of CHUNKED_BODY in 3 chunks
- ``/status/NNN``: that status, a short body
- any path with content-type ``application/grpc``: a gRPC unary "echo" -- the
  request's messages back, then trailers grpc-status 0 (or 5 NOT_FOUND with a
  grpc-message for the method ``/test.Echo/Missing``)
- anything else: 200 and ``you asked for <path>`` (Content-Length)

HTTP/1.1 connections are kept alive until the client closes them.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import threading

import h2.config
import h2.connection
import h2.events

CHUNKED_BODY = [b"first chunk\n", b"second, longer chunk of the body\n", b"third\n"]


def answer(path: str) -> tuple[int, bytes]:
    if path.startswith("/status/"):
        return int(path.split("/")[2]), b"status body\n"
    return 200, f"you asked for {path}\n".encode()


# -- HTTP/1.1 --------------------------------------------------------------------


def serve_http1(conn: ssl.SSLSocket) -> None:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            buf += conn.recv(65536)
        buf = buf[length:]
        if path == "/chunked":
            out = (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                b"Set-Cookie: sid=s3cr3t-cookie\r\n\r\n"
            )
            for piece in CHUNKED_BODY:
                out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            conn.sendall(out)
            conn.sendall(b"0\r\n\r\n")  # the last chunk in its own TLS record
            continue
        status, body = answer(path)
        body_out = b"" if method == "HEAD" else body
        conn.sendall(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body_out
        )


# -- HTTP/2 and gRPC ---------------------------------------------------------------


def serve_http2(conn: ssl.SSLSocket) -> None:
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    h2c.initiate_connection()
    conn.sendall(h2c.data_to_send())
    requests: dict[int, dict] = {}
    while True:
        data = conn.recv(65536)
        if not data:
            return
        for event in h2c.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                requests[event.stream_id] = {"headers": dict(event.headers), "body": b""}
            elif isinstance(event, h2.events.DataReceived):
                requests[event.stream_id]["body"] += event.data
                h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                respond_h2(h2c, event.stream_id, requests.pop(event.stream_id))
        out = h2c.data_to_send()
        if out:
            conn.sendall(out)


def respond_h2(h2c: h2.connection.H2Connection, stream_id: int, request: dict) -> None:
    headers = request["headers"]
    path = headers[b":path"].decode()
    if headers.get(b"content-type", b"").startswith(b"application/grpc"):
        if path == "/test.Echo/Missing":
            h2c.send_headers(
                stream_id,
                [(":status", "200"), ("content-type", "application/grpc"),
                 ("grpc-status", "5"), ("grpc-message", "no such method%21")],
                end_stream=True,
            )  # fmt: skip
            return
        h2c.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        h2c.send_data(stream_id, request["body"])  # the length-prefixed messages, echoed
        h2c.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        return
    status, body = answer(path)
    h2c.send_headers(
        stream_id,
        [(":status", str(status)), ("content-length", str(len(body))),
         ("set-cookie", "sid=s3cr3t-cookie")],
    )  # fmt: skip
    h2c.send_data(stream_id, body, end_stream=True)


def handle(conn: ssl.SSLSocket) -> None:
    try:
        if conn.selected_alpn_protocol() == "h2":
            serve_http2(conn)
        else:
            serve_http1(conn)
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cert")
    p.add_argument("key")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.host, 0))
        listener.listen(16)
        print("ready", listener.getsockname()[1], flush=True)
        while True:
            raw, _ = listener.accept()
            try:
                conn = ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
