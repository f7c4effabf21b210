"""Make one TCP connection and report whether NAT sent it to one of our listeners.

    redirect_probe.py --listen 127.0.0.1:15443 --listen [::1]:15443 \
        --connect 198.18.1.2:443 [--mark 0x7c5] [--connect-ns NS]

The listeners are bound in the namespace the probe starts in; with --connect-ns the
connecting socket is made in another namespace (for inbound, PREROUTING redirection).
Prints one JSON line:
    {"outcome": "redirected", "listener": "127.0.0.1:15443", "original_dst": [ip, port]}
    {"outcome": "direct", "banner": "server"}       reached the real destination
    {"outcome": "refused"} / {"outcome": "error", "error": "..."}
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import struct
import sys

from agent.fallback.original_dst import original_destination

TIMEOUT = 3.0


def _addr(text: str) -> tuple[int, str, int]:
    host, port = text.rsplit(":", 1)
    host = host.strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), host, int(port)


def _listen(text: str) -> socket.socket:
    family, host, port = _addr(text)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(8)
    return s


def _raw_original_dst(sock: socket.socket) -> list:
    """SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST for IPv6, both 80) read directly."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, 80, 28)
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]]
    raw = sock.getsockopt(socket.IPPROTO_IP, 80, 16)
    return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]]


def probe(args: argparse.Namespace) -> dict:
    listeners = {_listen(text): text for text in args.listen}
    if args.connect_ns:
        from pyroute2 import netns

        netns.setns(args.connect_ns)  # the listeners stay in the namespace they were made in
    family, host, port = _addr(args.connect)
    client = socket.socket(family, socket.SOCK_STREAM)
    if args.mark is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(args.mark, 0))
    client.settimeout(TIMEOUT)
    try:
        client.connect((host, port))
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return {"outcome": "refused"}
        return {"outcome": "error", "error": repr(exc)}
    ready, _, _ = select.select(list(listeners), [], [], 1.0)
    if ready:
        accepted, _ = ready[0].accept()
        with accepted:
            result = {
                "outcome": "redirected",
                "listener": listeners[ready[0]],
                "original_dst": _raw_original_dst(accepted),
                "local": list(accepted.getsockname()[:2]),
            }
            # The agent's own decoder, reported separately so a bug there is told apart
            # from a rule that did not redirect.
            try:
                dst = original_destination(accepted)
                result["agent_original_dst"] = [dst.ip, dst.port]
            except Exception as exc:
                result["agent_original_dst_error"] = repr(exc)
            return result
    try:
        banner = client.recv(100).decode().strip()
    except OSError as exc:
        return {"outcome": "error", "error": f"connected, but {exc!r}"}
    return {"outcome": "direct", "banner": banner}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--connect", required=True)
    parser.add_argument("--mark")
    parser.add_argument("--connect-ns")
    print(json.dumps(probe(parser.parse_args())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
