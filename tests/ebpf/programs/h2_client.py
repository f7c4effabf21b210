"""An HTTP/2 client (h2 over ssl) that connects first and sends later.

    h2_client.py HOST PORT --secret-prefix P --requests N

Connects, negotiates h2 by ALPN, does one request, prints "CONNECTED <pid>" and
waits for a line on stdin (the test starts the agent meanwhile); then sends N
requests on the same connection, each with `authorization: Bearer P<i>`, reads
their responses, prints one JSON line and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def request(conn: h2.connection.H2Connection, sock: ssl.SSLSocket, host: str, auth: str) -> int:
    stream = conn.get_next_available_stream_id()
    conn.send_headers(
        stream,
        [(":method", "GET"), (":path", "/h2"), (":scheme", "https"), (":authority", host),
         ("authorization", auth), ("user-agent", "tlscap-h2-test")],
        end_stream=True,
    )  # fmt: skip
    sock.sendall(conn.data_to_send())
    status = 0
    while True:
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                sock.sendall(conn.data_to_send())
                return status
        sock.sendall(conn.data_to_send())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--secret-prefix", required=True)
    p.add_argument("--requests", type=int, default=3)
    args = p.parse_args()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection((args.host, args.port)))
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    authority = f"{args.host}:{args.port}"
    first = request(conn, sock, authority, "Bearer before-the-agent")
    print(f"CONNECTED {os.getpid()}", flush=True)
    sys.stdin.readline()
    statuses = [
        request(conn, sock, authority, f"Bearer {args.secret_prefix}{i}")
        for i in range(args.requests)
    ]
    print(json.dumps({"first": first, "statuses": statuses}), flush=True)
    sock.close()


if __name__ == "__main__":
    main()
