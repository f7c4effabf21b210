"""A TCP server that greets every connection with a banner (a stand-in for a real
upstream, so a test can tell it reached the server and not the local proxy port).

    banner_server.py [::]:443 [BANNER]

Listens dual-stack, prints "ready" once listening and serves until killed.
"""

from __future__ import annotations

import socket
import sys


def main(argv: list[str]) -> int:
    host, port = argv[0].rsplit(":", 1)
    banner = (argv[1] if len(argv) > 1 else "server").encode() + b"\n"
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((host, int(port)))
    srv.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(banner)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
