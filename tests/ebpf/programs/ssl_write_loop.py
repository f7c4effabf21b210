"""One Python `ssl` connection writing numbered lines in a loop, from before the
agent starts until told to stop: the attach-order window test (test_loss_paths.py).

Prints {"looping": true, ...} once the loop runs.  A line on stdin marks the next
sequence number; the client then writes COUNT more lines as fast as it can and
stops.  The last stdout line is a JSON summary: pid, ports, the marked range.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import threading
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--pause", type=float, default=2e-5, help="between writes before the mark")
    args = p.parse_args()

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(args.cert, args.key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    received = [0]

    def serve() -> None:
        raw, _ = listener.accept()
        with server_ctx.wrap_socket(raw, server_side=True) as conn:
            while chunk := conn.recv(1 << 16):
                received[0] += len(chunk)

    server = threading.Thread(target=serve)
    server.start()

    mark: list[int] = []
    marked = threading.Event()

    def wait_for_mark() -> None:
        sys.stdin.readline()
        marked.set()

    threading.Thread(target=wait_for_mark, daemon=True).start()
    raw = socket.create_connection(("127.0.0.1", port))
    conn = client_ctx.wrap_socket(raw)
    seq = 0
    stop = None
    announced = False
    while stop is None or seq < stop:
        conn.sendall(b"%010d\n" % seq)
        seq += 1
        if stop is None:
            if marked.is_set():
                mark.append(seq)
                stop = seq + args.count
            elif args.pause:
                time.sleep(args.pause)
            if not announced and seq >= 100:
                print(json.dumps({"looping": True, "pid": os.getpid()}), flush=True)
                announced = True
    sent = seq * 11
    client_port = conn.getsockname()[1]
    # Half-close, then wait: closing with the server's session tickets still
    # unread would reset the connection and lose the last lines.
    conn.shutdown(socket.SHUT_WR)
    server.join()
    conn.close()
    summary = {
        "pid": os.getpid(),
        "port": port,
        "client_port": client_port,
        "mark": mark[0],
        "stop": stop,
        "sent": sent,
        "received": received[0],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
