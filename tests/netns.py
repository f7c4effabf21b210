"""A two-namespace network lab for tests that need real routing and iptables.

    with netns_lab() as lab:
        lab.run(lab.client, ["iptables-save", "-t", "nat"])

The client and server namespaces are joined by a veth pair and have addresses from the
benchmarking ranges 198.18.0.0/15 and 2001:2::/48, so nothing here can collide with the
host's own networks, and the host's network namespace (and its iptables) is never touched.
Namespaces are named tlscap-t<pid>-<n>-{c,s}; ones left behind by a test process that
died are swept when the next lab is created.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from agent.probes.targets import pid_alive

_NAME_RE = re.compile(r"tlscap-t(\d+)-\d+-[cs]")
_counter = itertools.count()
_counter_lock = threading.Lock()
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
_READY_TIMEOUT = 10.0
_CLIENT_IFINDEX = 10

# Run in the client namespace: a connection to a closed port of the server is refused
# (RST) once both families route, and times out or fails differently while they do not.
_PROBE = """
import errno, json, socket, sys
res = {}
for host in sys.argv[1:]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((host, 9))
        res[host] = "connected"
    except OSError as exc:
        res[host] = "refused" if exc.errno == errno.ECONNREFUSED else repr(exc)
    finally:
        s.close()
print(json.dumps(res))
"""


@dataclass
class NetnsLab:
    client: str
    server: str
    client_ip: str
    server_ip: str
    client_ip6: str
    server_ip6: str

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)

    def run(self, ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("check", False)
        kw.setdefault("timeout", 60)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)


def lab_unavailable_reason() -> str | None:
    """None when labs can be built here, else why not (for a pytest skip)."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (run `sudo make test`)"
    try:
        import pyroute2  # noqa: F401
    except ImportError as exc:
        return f"pyroute2 is not importable ({exc}); `make setup` installs it"
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} not found in PATH (`make setup` installs iproute2 and iptables)"
    return None


def _sweep_stale() -> None:
    from pyroute2 import netns

    for name in netns.listnetns():
        m = _NAME_RE.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                netns.remove(name)


def _next_index() -> int:
    with _counter_lock:
        return next(_counter) % 250 + 1


def _configure(ns: str, ifname: str, ip4: str, ip6: str) -> None:
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo, state="up")
        (idx,) = ipr.link_lookup(ifname=ifname)
        ipr.addr("add", index=idx, address=ip4, prefixlen=24)
        # nodad: duplicate address detection would keep the address tentative (unusable)
        # for about a second; there is nothing on the link to collide with.
        ipr.addr("add", index=idx, address=ip6, prefixlen=64, IFA_FLAGS=IFA_F_NODAD)
        ipr.link("set", index=idx, state="up")


def _tentative(ns: str, address: str) -> bool:
    """Whether `address` is still tentative (or not there yet).  Link-local addresses
    still run DAD, but the lab only uses its global ones."""
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        for msg in ipr.get_addr(family=10, address=address):
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            return bool(flags & IFA_F_TENTATIVE)
    return True


def _link_up(ns: str, ifname: str) -> bool:
    # A SYN sent before the veth has carrier is dropped and only retried after a second.
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        (link,) = ipr.get_links(ifname=ifname)
        return link.get_attr("IFLA_OPERSTATE") == "UP"


def _wait_ready(lab: NetnsLab) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    last: object = None
    while time.monotonic() < deadline:
        if (
            _link_up(lab.client, "veth-c")
            and _link_up(lab.server, "veth-s")
            and not _tentative(lab.client, lab.client_ip6)
            and not _tentative(lab.server, lab.server_ip6)
        ):
            out = lab.run(lab.client, [sys.executable, "-c", _PROBE, lab.server_ip, lab.server_ip6])
            if out.returncode == 0:
                last = json.loads(out.stdout)
                if all(v == "refused" for v in last.values()):
                    return
            else:
                last = out.stderr.strip()
        time.sleep(0.05)
    raise RuntimeError(f"lab network not usable after {_READY_TIMEOUT:g}s: {last}")


@contextlib.contextmanager
def netns_lab() -> Iterator[NetnsLab]:
    """A fresh client/server namespace pair joined by a veth; deleted on exit."""
    from pyroute2 import NetNS, netns

    _sweep_stale()
    n = _next_index()
    base = f"tlscap-t{os.getpid()}-{n}"
    lab = NetnsLab(
        client=f"{base}-c",
        server=f"{base}-s",
        client_ip=f"198.18.{n}.1",
        server_ip=f"198.18.{n}.2",
        client_ip6=f"2001:2:0:{n}::1",
        server_ip6=f"2001:2:0:{n}::2",
    )
    created: list[str] = []
    try:
        for name in (lab.client, lab.server):
            # A namespace of ours by this name can only be a leftover of this process
            # (e.g. a KeyboardInterrupt mid-teardown); start clean.
            if name in netns.listnetns():
                netns.remove(name)
            netns.create(name)
            created.append(name)
        # The veth is created inside the client namespace with its peer placed straight
        # into the server's: it never exists in the host namespace, so names can't clash.
        with NetNS(lab.client) as ipr:
            # The client end gets ifindex 10 (the server end gets 2, the first free one in
            # its namespace): the kernel treats a carrier change on a device whose ifindex
            # equals its peer's as non-urgent and applies it up to a second later.
            ipr.link(
                "add",
                ifname="veth-c",
                index=_CLIENT_IFINDEX,
                kind="veth",
                peer={"ifname": "veth-s", "net_ns_fd": lab.server},
            )
        _configure(lab.client, "veth-c", lab.client_ip, lab.client_ip6)
        _configure(lab.server, "veth-s", lab.server_ip, lab.server_ip6)
        _wait_ready(lab)
        yield lab
    finally:
        for name in reversed(created):
            with contextlib.suppress(OSError):
                netns.remove(name)
