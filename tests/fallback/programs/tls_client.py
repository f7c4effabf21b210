"""A TLS (or plain TCP) client that reports exactly what it sent and received.

    tls_client.py HOST:PORT [--sni NAME] [--cafile PEM] [--alpn h2,http/1.1]
                  [--send TEXT | --send-hex HEX] [--plain] [--read-first]

Connects, sends the payload, half-closes nothing, reads until the server closes (or 10 s
pass), and prints one JSON line: ok, error, pid, local [ip, port], alpn, sent_b64,
received_b64.  With --read-first it reads before sending (a server-speaks-first peer).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import ssl
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--sni")
    p.add_argument("--cafile")
    p.add_argument("--alpn", default="")
    p.add_argument("--send", default="")
    p.add_argument("--send-hex", default="")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--read-first", action="store_true")
    args = p.parse_args()
    host, port = args.target.rsplit(":", 1)
    host = host.strip("[]")
    payload = bytes.fromhex(args.send_hex) if args.send_hex else args.send.encode()
    out: dict = {"ok": False, "pid": os.getpid(), "error": None, "alpn": None, "local": None}
    received = b""
    try:
        raw = socket.create_connection((host, int(port)), timeout=10)
        out["local"] = list(raw.getsockname()[:2])
        sock: socket.socket = raw
        if not args.plain:
            ctx = ssl.create_default_context(cafile=args.cafile)
            if args.alpn:
                ctx.set_alpn_protocols(args.alpn.split(","))
            # Strict EOFs: a reset or a close without close_notify is an error here, not
            # a quiet end of stream (Python would otherwise treat the two alike).
            sock = ctx.wrap_socket(
                raw, server_hostname=args.sni or host, suppress_ragged_eofs=False
            )
            out["alpn"] = sock.selected_alpn_protocol()
        if args.read_first:
            received += sock.recv(65536)
        sock.sendall(payload)
        while chunk := sock.recv(65536):
            received += chunk
        out["ok"] = True
    except (OSError, ssl.SSLError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["sent_b64"] = base64.b64encode(payload).decode()
    out["received_b64"] = base64.b64encode(received).decode()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
