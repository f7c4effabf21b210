"""Which pods of this node proxy mode intercepts, in which network namespace, and how.

`PodScanner` joins the processes on the node to their pods: every pid's cgroup names
its container and pod (agent/k8s/cgroup.py, read once per pid and cached), the pod
index (fed by the API watch) names the pod, and /proc/<pid>/ns/net names the pod's
network namespace.  The pod's sandbox ("pause") process is found the same way: its
cgroup carries the pod UID even though no container status lists it.

`plan_pod` turns one pod's `tlscap.io/*` annotations into what its proxy needs: the
redirect rules, per-pod upstream settings (client certificate, upstreams not
verified) and the certificates for inbound termination, read from the pod's own
Secret mounts through /proc/<pid>/root (agent/fallback/container_files.py).  Any
problem rejects the whole pod with one line saying why: a pod half-configured could
break (inbound redirected with no certificate to present), a pod left alone cannot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.fallback.config import DestinationPattern, ProxyConfig, UpstreamRule
from agent.fallback.container_files import read_in_root
from agent.fallback.netns import netns_ident
from agent.fallback.rules import InterceptRules
from agent.k8s.metadata import PodInfo, PodResolver, ProxyAnnotations
from agent.k8s.podspec import SecretMount

log = logging.getLogger(__name__)

TLS_CERT_KEY, TLS_KEY_KEY = "tls.crt", "tls.key"  # kubernetes.io/tls Secret keys
_EVERYWHERE = ("0.0.0.0/0", "::/0")

NetnsIdent = tuple[int, int]


@dataclass
class PodProcesses:
    """A pod with live processes on this node."""

    pod: PodInfo
    pids: dict[str, list[int]] = field(default_factory=dict)  # container name -> pids
    netns: NetnsIdent | None = None
    netns_pid: int = 0  # a process in that namespace

    def all_pids(self) -> list[int]:
        return [pid for pids in self.pids.values() for pid in pids]

    @property
    def label(self) -> str:
        return f"{self.pod.namespace}/{self.pod.name}"


class PodScanner:
    """One pass over /proc: the pods of the index that have processes here."""

    def __init__(self, resolver: PodResolver, proc_root: str = "/proc") -> None:
        self.resolver = resolver
        self.proc_root = proc_root
        self._seen: set[int] = set()
        self._recheck: set[int] = set()
        self.own_netns = netns_ident(os.getpid(), proc_root)
        self.scans = 0

    def scan(self) -> dict[str, PodProcesses]:
        self.scans += 1
        pids = {int(n) for n in os.listdir(self.proc_root) if n.isdigit()}
        for gone in self._seen - pids:
            self.resolver.forget(gone)  # a reused pid must be read again
        self._known = self._seen
        self._seen = pids
        found: dict[str, PodProcesses] = {}
        cache = self.resolver.cache
        # A container's first process is forked outside the container's cgroup and moved
        # in before it execs: read at the wrong instant, it looks like a host process.
        # So a pid first seen outside any container is read once more on the next pass
        # (well after the runtime has moved it), and trusted from then on.
        for pid in self._recheck & pids:
            cache.forget(pid)
        fresh = pids - self._known
        self._recheck = set()
        for pid in sorted(pids):
            ref = cache.get(pid)
            if ref is None:
                if pid in fresh:
                    self._recheck.add(pid)
                continue
            owner = self.resolver.pod_of(ref)
            if owner is None:
                continue  # not (yet) in the index: nothing says what it wants
            pod, container = owner
            entry = found.get(pod.uid)
            if entry is None:
                entry = found[pod.uid] = PodProcesses(pod)
            entry.pids.setdefault(container, []).append(pid)
        for entry in found.values():
            # The lowest pid is usually the sandbox, which holds the namespace longest.
            for pid in sorted(entry.all_pids()):
                ident = netns_ident(pid, self.proc_root)
                if ident is not None:
                    entry.netns, entry.netns_pid = ident, pid
                    break
        return found

    def host_network(self, entry: PodProcesses) -> bool:
        """In the agent's own namespace: the node's rules cover it already."""
        return entry.pod.host_network or (entry.netns is not None and entry.netns == self.own_netns)


# ---------------------------------------------------------------------------------------
# What one pod asks for


class PodRejected(Exception):
    """The pod cannot be intercepted as its annotations ask; str() is one line.

    `permanent`: the annotations are wrong (retried when they change); otherwise the
    pod's state is (a Secret not mounted yet): retried after a while."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


@dataclass(frozen=True)
class PodPlan:
    rules: InterceptRules
    config: ProxyConfig  # the node's settings with the pod's upstream rules
    inbound_pems: dict[int, bytes]  # port -> certificate chain + key (PEM)


FileReader = Callable[[str, str], bytes]  # (container root, path) -> bytes


def plan_pod(
    entry: PodProcesses,
    base: ProxyConfig,
    extra_excludes: tuple[str, ...] = (),
    proc_root: str = "/proc",
    read: FileReader = read_in_root,
) -> PodPlan:
    """Raises PodRejected."""
    annotations, errors = ProxyAnnotations.from_pod(entry.pod)
    if errors:
        raise PodRejected("; ".join(errors), permanent=True)
    client_pem = None
    if annotations.upstream_client_cert_secret:
        client_pem = _secret_pair(entry, annotations.upstream_client_cert_secret, proc_root, read)
    inbound_pems: dict[int, bytes] = {}
    if annotations.inbound_cert_secret:
        pem = _secret_pair(entry, annotations.inbound_cert_secret, proc_root, read)
        inbound_pems = dict.fromkeys(annotations.inbound_ports, pem)
    config = pod_config(base, annotations, client_pem)
    rules = base.intercept_rules(extra_excludes)
    if inbound_pems:
        rules = replace(rules, inbound_port=base.inbound_port, inbound_ports=tuple(inbound_pems))
    else:
        rules = replace(rules, inbound_port=None, inbound_ports=())
    if rules.outbound_port is None and rules.inbound_port is None:
        raise PodRejected(
            "nothing to intercept (no outbound ports, no inbound annotations)", permanent=True
        )
    try:
        rules.validate()
    except ValueError as exc:
        raise PodRejected(str(exc), permanent=True) from None
    return PodPlan(rules, config, inbound_pems)


def pod_config(
    base: ProxyConfig, annotations: ProxyAnnotations, client_pem: bytes | None
) -> ProxyConfig:
    """The node's upstream rules, with the pod's client certificate and unverified
    upstreams.  First match wins: the pod's named destinations, then the node's rules,
    then a catch-all carrying what applies to every upstream of the pod."""
    pod_rules = [
        UpstreamRule(DestinationPattern.parse(d), insecure=True, client_pem=client_pem)
        for d in annotations.upstream_insecure_destinations
    ]
    node_rules = [
        replace(
            rule,
            insecure=rule.insecure or annotations.upstream_insecure,
            client_pem=client_pem if not rule.client_cert else None,
        )
        for rule in base.upstream_rules
    ]
    catch_all = []
    if client_pem is not None or annotations.upstream_insecure:
        catch_all = [
            UpstreamRule(
                DestinationPattern.parse(net),
                insecure=annotations.upstream_insecure,
                client_pem=client_pem,
            )
            for net in _EVERYWHERE
        ]
    config = replace(base, upstream_rules=(), inbound=())
    for rule in (*pod_rules, *node_rules, *catch_all):
        config = config.with_rule(rule)
    return config


def _secret_pair(entry: PodProcesses, secret: str, proc_root: str, read: FileReader) -> bytes:
    """tls.crt + tls.key of a Secret, as a running container of the pod mounts it."""
    mounts = [m for m in entry.pod.secret_mounts if m.secret == secret]
    if not mounts:
        raise PodRejected(
            f"Secret {secret!r} is not mounted by any container of the pod (the agent "
            "reads certificates from the pod's own mounts; it has no access to Secrets)",
            permanent=True,
        )
    problems = []
    for mount in mounts:
        for pid in entry.pids.get(mount.container, ()):
            try:
                return _read_pair(mount, f"{proc_root}/{pid}/root", read)
            except OSError as exc:
                problems.append(f"{mount.container}:{mount.mount_path}: {exc.strerror or exc}")
                break  # the next container, if any; the same one would say the same
        else:
            problems.append(f"container {mount.container!r} is not running")
    raise PodRejected(
        f"cannot read Secret {secret!r} from the pod's mounts ({'; '.join(problems)})",
        permanent=False,
    )


def _read_pair(mount: SecretMount, root: str, read: FileReader) -> bytes:
    paths = [mount.path_of(TLS_CERT_KEY), mount.path_of(TLS_KEY_KEY)]
    if None in paths:
        raise OSError(f"the volume's items leave out {TLS_CERT_KEY} or {TLS_KEY_KEY}")
    cert, key = (read(root, p) for p in paths if p)
    return cert.rstrip(b"\n") + b"\n" + key


def proc_net_dir(proc_root: str, pid: int) -> str:
    return str(Path(proc_root) / str(pid) / "net")
