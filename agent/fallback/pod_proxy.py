"""Proxy mode for pods: one proxy process serving every selected pod's network namespace.

No sidecar and no pod restart.  For each selected pod (the `tlscap.io/capture` policy,
as in eBPF mode) with processes on this node, a reconcile thread (every 0.5 s):

1. plans it from its annotations (agent/fallback/pods.py); a bad one is logged and
   counted, and the pod is left untouched;
2. opens listeners *inside the pod's namespace* (a thread setns()es there, binds, and
   hands the sockets back; they stay in that namespace), and starts serving them on the
   agent's event loop with a TlsProxy of the pod's own, whose upstream sockets are
   created in the pod's namespace too (so the pod's routes, source address and network
   policies apply) and whose records carry the pod;
3. installs TLSCAP_OUT/TLSCAP_IN (IPv4 and IPv6) in that namespace with
   iptables-restore run from a thread inside it; the install replaces any stale chains
   a killed agent left there, so a restart leaves exactly one set.

Order at both ends as for the node's proxy: listeners before rules, rules gone before
listeners close.  A pod that goes (deleted, no longer selected, its processes gone, a
new sandbox namespace) is torn down at the next pass; at exit every pod is.  At start,
unselected pods' namespaces that still hold tlscap chains (a crashed run's, for a pod
selected then) have them removed, and nothing else is done there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.fallback import iptables
from agent.fallback.config import ProxyConfig
from agent.fallback.contexts import LeafCache, ServiceContexts, UpstreamContexts
from agent.fallback.flow_records import Side
from agent.fallback.netns import Netns
from agent.fallback.owners import SocketOwners
from agent.fallback.pods import PodPlan, PodProcesses, PodRejected, PodScanner, plan_pod
from agent.fallback.proxy import ProxyStats, TlsProxy
from agent.fallback.rules import InterceptRules
from agent.fallback.sock_diag import SockDiag
from agent.fallback.sockets import ipv6_available, listening_socket, marked_socket
from agent.k8s.attribution import Attribution
from agent.records.record import PodRef, Record

log = logging.getLogger(__name__)

INTERVAL_S = 0.5
RETRY_S = 10.0  # a pod whose setup failed for a passing reason (Secret not mounted yet)
WORKERS = 4  # pods set up or torn down at once (each is mostly iptables subprocesses)


@dataclass
class _Pod:
    uid: str
    label: str
    netns: Netns
    plan: PodPlan
    pids: list[int]
    netns_pid: int
    listeners: list[tuple[socket.socket, Side]] = field(default_factory=list)
    proxy: TlsProxy | None = None
    owners: SocketOwners | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    serving: concurrent.futures.Future | None = None
    rules_installed: bool = False
    upstreams_key: object = None


@dataclass
class PodProxyStats:
    active: int = 0
    installed: int = 0
    removed: int = 0
    bad_annotations: int = 0  # pods left alone because of their annotations
    failed: int = 0  # setups that failed (unreadable Secret, iptables, port in use)
    stale_swept: int = 0  # unselected namespaces cleaned of a crashed run's chains
    host_network: int = 0  # selected pods in the node's namespace (the node's rules apply)

    def as_dict(self) -> dict[str, int]:
        return {f"proxy_pods_{k}": v for k, v in self.__dict__.items()}


class PodProxies:
    def __init__(
        self,
        config: ProxyConfig,
        attribution: Attribution,
        leaves: LeafCache,
        emit: Callable[[Record], None],
        *,
        max_capture: int = 1 << 20,
        extra_excludes: tuple[str, ...] = (),
        proc_root: str | None = None,
        interval: float = INTERVAL_S,
    ) -> None:
        self.config = config
        self.attribution = attribution
        self.leaves = leaves
        self.emit = emit
        self.max_capture = max_capture
        self.extra_excludes = extra_excludes
        self.proc_root = proc_root or attribution.resolver.cache.proc_root
        self.interval = interval
        self.scanner = PodScanner(attribution.resolver, self.proc_root)
        self.stats = PodProxyStats()
        self._pods: dict[str, _Pod] = {}
        self._lock = threading.Lock()  # _pods and the retired stats, read by summary()
        self._retired = ProxyStats()
        self._upstreams: dict[object, list] = {}  # settings -> [UpstreamContexts, users]
        self._rejected: dict[str, tuple[str, bool, float]] = {}  # uid -> (why, permanent, at)
        self._said: set[tuple[str, str]] = set()
        self._swept = False
        self._checked: set[str] = set()  # rejected pods checked for a dead run's rules
        self._loop: asyncio.AbstractEventLoop | None = None
        self._home: Netns | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, "pod-proxy")

    # -- life cycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call on the event loop's thread: its namespace is where upstream sockets
        return to after being made in a pod's."""
        self._loop = loop
        self._home = Netns.current()
        self._thread = threading.Thread(target=self._run, name="pod-proxy", daemon=True)
        self._thread.start()

    def reconcile_once(self) -> None:
        """One pass (the thread's body; tests and benchmarks call it directly)."""
        watcher = self.attribution.watcher
        if watcher is not None and not watcher.pods.synced.is_set():
            return  # an empty index would mean "no pods": wait for the first list
        found = self.scanner.scan()
        index = self.attribution.resolver.index
        wanted: dict[str, PodProcesses] = {}
        unselected: list[PodProcesses] = []
        for uid, entry in found.items():
            namespace = index.namespace(entry.pod.namespace)
            selected = self.attribution.policy.wants(
                entry.pod, namespace.annotations if namespace else None
            )
            if entry.netns is None or self.scanner.host_network(entry):
                if selected and entry.netns is not None:
                    self._say(uid, "host-network", logging.INFO,
                              "pod %s shares the node's network namespace: the node's "
                              "rules intercept it", entry.label)  # fmt: skip
                continue
            if selected:
                wanted[uid] = entry
            else:
                unselected.append(entry)
        with self._lock:
            current = dict(self._pods)
        gone = [
            pod
            for uid, pod in current.items()
            if uid not in wanted or wanted[uid].netns != pod.netns.ident
        ]
        for pod in current.values():
            entry = wanted.get(pod.uid)
            if entry is not None and entry.netns == pod.netns.ident:
                pod.pids, pod.netns_pid = entry.all_pids(), entry.netns_pid
        list(self._pool.map(self._teardown, gone))
        todo = [e for uid, e in wanted.items() if uid not in current or current[uid] in gone]
        todo = [e for e in todo if self._may_try(e)]
        list(self._pool.map(self._setup, todo))
        if not self._swept:
            self._swept = True
            list(self._pool.map(self._sweep, unselected))
        for uid in list(self._rejected):
            if uid not in found:
                del self._rejected[uid]
        self.stats.active = len(self._pods)

    def stop(self) -> None:
        """Stop reconciling and tear every pod down (rules first, then listeners)."""
        if self._halt.is_set():
            return
        self._halt.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        with self._lock:
            pods = list(self._pods.values())
        list(self._pool.map(self._teardown, pods))
        self._pool.shutdown(wait=True)
        if self._home is not None:
            self._home.close()
            self._home = None

    def _run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                self.reconcile_once()
            except Exception:  # keep intercepting the pods we have
                log.exception("pod proxy: reconcile pass failed")
            self._halt.wait(max(0.05, self.interval - (time.monotonic() - started)))

    # -- one pod

    def _may_try(self, entry: PodProcesses) -> bool:
        rejected = self._rejected.get(entry.pod.uid)
        if rejected is None:
            return True
        why, permanent, at = rejected
        key = repr(sorted(entry.pod.annotations.items()))
        if permanent:
            return why != key  # annotations changed: try again
        return time.monotonic() - at >= RETRY_S

    def _setup(self, entry: PodProcesses) -> None:
        uid = entry.pod.uid
        try:
            plan = plan_pod(entry, self.config, self.extra_excludes, self.proc_root)
        except PodRejected as exc:
            self._reject(entry, str(exc), exc.permanent)
            if uid not in self._checked:
                # Rules a killed run left for this pod would now redirect into nothing.
                self._checked.add(uid)
                self._sweep(entry)
            return
        try:
            ns = Netns.open(f"{self.proc_root}/{entry.netns_pid}/ns/net")
        except OSError as exc:
            log.debug("pod %s: its namespace went away: %s", entry.label, exc)
            return
        if ns.ident != entry.netns:  # the pid exited and was reused since the scan
            ns.close()
            return
        pod = _Pod(uid, entry.label, ns, plan, entry.all_pids(), entry.netns_pid)
        try:
            self._start_pod(pod, entry)
        except (OSError, iptables.IptablesError, ValueError) as exc:
            self._stop_pod(pod)
            self._reject(entry, f"setup in its network namespace failed: {exc}", False)
            return
        with self._lock:
            self._pods[uid] = pod
            self.stats.installed += 1
        self._rejected.pop(uid, None)
        log.info(
            "pod %s: intercepting in its network namespace (inode %d): %s",
            entry.label,
            ns.inode,
            _describe(plan.rules),
        )

    def _start_pod(self, pod: _Pod, entry: PodProcesses) -> None:
        plan = pod.plan
        services = ServiceContexts.from_pem(plan.inbound_pems)
        upstreams = self._upstream_contexts(plan.config)
        pod.upstreams_key = _upstreams_key(plan.config)
        pod.listeners = pod.netns.call(_open_listeners, plan.rules)
        proc_root = self.proc_root
        pod.owners = SocketOwners(
            proc_root,
            diag_factory=lambda: pod.netns.call(SockDiag),
            net_dir=lambda: f"{proc_root}/{pod.netns_pid}/net",
            candidates=lambda: pod.pids,
        )
        meta = entry.pod
        pod.proxy = TlsProxy(
            plan.config,
            self.leaves,
            services,
            upstreams,
            self.emit,
            max_capture=self.max_capture,
            owners=pod.owners,
            socket_factory=self._socket_factory(pod.netns),
            pod=PodRef(meta.name, meta.namespace, meta.uid, "", meta.labels),
        )
        assert self._loop is not None
        pod.serving = asyncio.run_coroutine_threadsafe(
            pod.proxy.serve(pod.listeners, pod.stop), self._loop
        )
        pod.rules_installed = True  # a partial install is removed on the way out too
        pod.netns.call(iptables.install, plan.rules)

    def _upstream_contexts(self, config: ProxyConfig) -> UpstreamContexts:
        """Shared by pods with the same upstream settings (most pods: the node's).  An
        SSLContext holding the system trust store costs ~0.5 MiB; one per pod would be
        most of a pod's memory."""
        key = _upstreams_key(config)
        with self._lock:
            shared = self._upstreams.get(key)
            if shared is not None:
                shared[1] += 1
                return shared[0]
        contexts = UpstreamContexts(config.upstream_ca)
        for rule in config.upstream_rules:
            contexts.context(rule, ())  # a client certificate that does not load: now
        with self._lock:
            shared = self._upstreams.setdefault(key, [contexts, 0])
            shared[1] += 1
            return shared[0]

    def _release_upstreams(self, pod: _Pod) -> None:
        with self._lock:
            shared = self._upstreams.get(pod.upstreams_key)
            if shared is not None:
                shared[1] -= 1
                if shared[1] <= 0:
                    del self._upstreams[pod.upstreams_key]
        pod.upstreams_key = None

    def _socket_factory(self, ns: Netns) -> Callable[[int, int | None], socket.socket]:
        home = self._home
        assert home is not None

        def make(family: int, mark: int | None) -> socket.socket:
            # On the event loop's thread, which is back home before anything else runs.
            with ns.entered(home):
                return marked_socket(family, mark)

        return make

    def _teardown(self, pod: _Pod) -> None:
        self._stop_pod(pod)
        with self._lock:
            self._pods.pop(pod.uid, None)
            if pod.proxy is not None:
                _add(self._retired, pod.proxy.stats)
            self.stats.removed += 1
            self.stats.active = len(self._pods)
        log.info("pod %s: interception removed from its network namespace", pod.label)

    def _stop_pod(self, pod: _Pod) -> None:
        if pod.rules_installed:
            try:
                pod.netns.call(iptables.remove, pod.plan.rules.chain_prefix)
            except (iptables.IptablesError, OSError) as exc:
                log.error("pod %s: could not remove its interception rules: %s", pod.label, exc)
            pod.rules_installed = False
        if pod.serving is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(pod.stop.set)
                pod.serving.result(timeout=10)
            except (RuntimeError, concurrent.futures.TimeoutError, asyncio.CancelledError):
                pass  # the loop is gone (its end cancelled the task) or stuck
            except Exception:
                log.exception("pod %s: its proxy ended with an error", pod.label)
        for sock, _ in pod.listeners:
            sock.close()
        pod.listeners = []
        if pod.upstreams_key is not None:
            self._release_upstreams(pod)
        if pod.owners is not None:
            pod.owners.close()
        pod.netns.close()

    def _sweep(self, entry: PodProcesses) -> None:
        try:
            ns = Netns.open(f"{self.proc_root}/{entry.netns_pid}/ns/net")
        except OSError:
            return
        try:
            if ns.ident != entry.netns:
                return
            found = ns.call(_installed_families)
            if found:
                ns.call(iptables.remove)
                with self._lock:
                    self.stats.stale_swept += 1
                log.warning(
                    "pod %s: removed the tlscap rules an earlier run left in its network "
                    "namespace (it is not intercepted now)",
                    entry.label,
                )
        except (iptables.IptablesError, OSError) as exc:
            log.debug("pod %s: stale-rule check failed: %s", entry.label, exc)
        finally:
            ns.close()

    def _reject(self, entry: PodProcesses, why: str, permanent: bool) -> None:
        key = repr(sorted(entry.pod.annotations.items()))
        self._rejected[entry.pod.uid] = (key if permanent else why, permanent, time.monotonic())
        with self._lock:
            if permanent:
                self.stats.bad_annotations += 1
            else:
                self.stats.failed += 1
        if permanent:
            log.warning(
                "pod %s: not intercepted, its tlscap.io annotations are invalid: %s "
                "(the pod is left untouched; fix the annotations to have it captured)",
                entry.label,
                why,
            )
        else:
            if (entry.pod.uid, why) not in self._said:
                self._said.add((entry.pod.uid, why))
                log.warning(
                    "pod %s: not intercepted: %s; retrying every %gs", entry.label, why, RETRY_S
                )

    def _say(self, uid: str, what: str, level: int, msg: str, *args: object) -> None:
        if (uid, what) not in self._said:
            self._said.add((uid, what))
            if what == "host-network":
                self.stats.host_network += 1
            log.log(level, msg, *args)

    # -- reporting

    def summary(self) -> dict[str, int]:
        """Pod counters and the proxy_* counters of every pod's proxy, past and present."""
        with self._lock:
            total = ProxyStats(**self._retired.__dict__)
            for pod in self._pods.values():
                if pod.proxy is not None:
                    _add(total, pod.proxy.stats)
            self.stats.active = len(self._pods)
        return {**total.as_dict(), **self.stats.as_dict()}

    def active_pods(self) -> dict[str, int]:
        """uid -> namespace inode of the pods intercepted now."""
        with self._lock:
            return {uid: pod.netns.inode for uid, pod in self._pods.items()}


def _open_listeners(rules: InterceptRules) -> list[tuple[socket.socket, Side]]:
    """Runs inside the pod's namespace."""
    hosts6 = ipv6_available()
    out: list[tuple[socket.socket, Side]] = []
    try:
        if rules.outbound_port is not None:
            for host in ("127.0.0.1", "::1") if hosts6 else ("127.0.0.1",):
                out.append((listening_socket(host, rules.outbound_port), "outbound"))
        if rules.inbound_port is not None:
            for host in ("0.0.0.0", "::") if hosts6 else ("0.0.0.0",):
                out.append((listening_socket(host, rules.inbound_port), "inbound"))
    except OSError:
        for sock, _ in out:
            sock.close()
        raise
    return out


def _installed_families() -> list[int]:
    """Runs inside a namespace: the families holding tlscap chains."""
    found = []
    for family in (4, 6):
        try:
            if "TLSCAP" in iptables.current_nat(family):
                found.append(family)
        except iptables.IptablesError:
            continue
    return found


def _upstreams_key(config: ProxyConfig) -> object:
    return (config.upstream_ca, config.upstream_rules)


def _add(total: ProxyStats, more: ProxyStats) -> None:
    for key, value in more.__dict__.items():
        setattr(total, key, getattr(total, key) + value)


def _describe(rules: InterceptRules) -> str:
    parts = []
    if rules.outbound_port is not None:
        parts.append(f"outbound TCP ports {','.join(map(str, rules.ports))}")
    if rules.inbound_port is not None:
        parts.append(f"inbound ports {','.join(map(str, rules.inbound_ports))}")
    return " and ".join(parts)
