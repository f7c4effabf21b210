"""A proxy-mode run: listeners, iptables rules, the proxy's event loop, clean exit.

Same life cycle as the eBPF CaptureSession (start / run / close, a threading stop_event
the CLI's signal handlers set), so the command line drives both the same way.  Order
matters at both ends: listeners exist before any rule redirects to them, and rules are
gone before the listeners close, so no connection is ever redirected into a closed port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.certs.authority import CertificateAuthority
from agent.fallback import iptables
from agent.fallback.config import ProxyConfig
from agent.fallback.contexts import LeafCache, ServiceContexts, UpstreamContexts
from agent.fallback.flow_records import Side
from agent.fallback.owners import SocketOwners
from agent.fallback.pod_proxy import PodProxies
from agent.fallback.proxy import TlsProxy
from agent.fallback.rules import InterceptRules
from agent.fallback.sockets import ipv6_available, listening_socket
from agent.health.liveness import Liveness
from agent.k8s.attribution import Attribution
from agent.l7.stage import L7Stage
from agent.records.record import Record
from agent.records.writer import RecordWriter, new_agent_id
from agent.sinks.base import Sink

log = logging.getLogger(__name__)


@dataclass
class ProxyOptions:
    config: ProxyConfig = field(default_factory=ProxyConfig)
    max_capture: int = 1 << 20
    duration: float | None = None
    ready_file: Path | None = None
    node: str = field(default_factory=socket.gethostname)
    agent_id: str = field(default_factory=new_agent_id)
    # Destinations never redirected whatever the config says: the collector, so the
    # agent's own export is not captured in a loop.
    extra_excludes: tuple[str, ...] = ()
    # Also intercept inside each selected pod's network namespace (pod_proxy.py):
    # "auto" when pod metadata comes from the API server, "on" required, "off" never.
    pods: str = "auto"


def _event_loop_factory():
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class ProxySession:
    def __init__(
        self,
        options: ProxyOptions,
        sinks: list[Sink],
        attribution: Attribution | None = None,
        l7: L7Stage | None = None,
    ) -> None:
        self.options = options
        self.stop_event = threading.Event()
        self.liveness = Liveness()
        self._out = RecordWriter(sinks, options.agent_id, options.node, attribution, l7)
        self._attribution = attribution
        self._pods: PodProxies | None = None
        self._listeners: list[tuple[socket.socket, Side]] = []
        self._rules: InterceptRules | None = None  # set once their install is attempted
        self._proxy: TlsProxy | None = None
        self._leaves: LeafCache | None = None

    def start(self) -> None:
        """Raises CertificateError, OSError (a port in use) or IptablesError."""
        config = self.options.config
        ca = CertificateAuthority.load_or_create(config.ca_dir)
        self._leaves = LeafCache(ca)
        services = ServiceContexts(config.inbound)
        upstreams = UpstreamContexts(config.upstream_ca)
        rules = config.intercept_rules(self.options.extra_excludes)
        v6 = ipv6_available()
        if rules.outbound_port is not None:
            for host in ("127.0.0.1", "::1") if v6 else ("127.0.0.1",):
                self._listeners.append((listening_socket(host, rules.outbound_port), "outbound"))
        if rules.inbound_port is not None:
            for host in ("0.0.0.0", "::") if v6 else ("0.0.0.0",):
                self._listeners.append((listening_socket(host, rules.inbound_port), "inbound"))
        self._proxy = TlsProxy(
            config,
            self._leaves,
            services,
            upstreams,
            self._out.write,
            max_capture=self.options.max_capture,
            owners=SocketOwners(),
        )
        self._pods = self._pod_proxies()
        self._rules = rules  # a partial install is removed in close() too
        families = iptables.install(rules)
        log.info(
            "proxy mode: redirecting %s to the proxy (IPv%s); CA in %s",
            _describe(config),
            "/".join(map(str, families)),
            config.ca_dir,
        )
        self.liveness.mark_ready()
        if self.options.ready_file:
            self.options.ready_file.write_text("ready\n")

    def _pod_proxies(self) -> PodProxies | None:
        mode = self.options.pods
        has_metadata = self._attribution is not None and self._attribution.watcher is not None
        if mode == "off" or (mode == "auto" and not has_metadata):
            return None
        if not has_metadata:
            raise RuntimeError(
                "--proxy-pods on needs pod metadata from the API server "
                "(--k8s-metadata on/auto with --kubeconfig or in a cluster)"
            )
        assert self._attribution is not None and self._leaves is not None
        log.info("proxy mode: also intercepting inside selected pods' network namespaces")
        return PodProxies(
            self.options.config,
            self._attribution,
            self._leaves,
            self._out.write,
            max_capture=self.options.max_capture,
            extra_excludes=self.options.extra_excludes,
        )

    def run(self) -> None:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        assert self._proxy is not None
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._watch_stop(stop))
        loop = asyncio.get_running_loop()
        if self._pods is not None:
            self._pods.start(loop)
        try:
            await self._proxy.serve(self._listeners, stop)
        finally:
            watcher.cancel()
            if self._pods is not None:
                # Rules out of every pod, then its proxy stopped (on this loop).
                await loop.run_in_executor(None, self._pods.stop)

    async def _watch_stop(self, stop: asyncio.Event) -> None:
        # The CLI's signal handlers set a threading.Event (the eBPF session's contract);
        # a 50 ms poll turns that into the loop's own event without touching signals.
        deadline = None
        if self.options.duration is not None:
            deadline = time.monotonic() + self.options.duration
        while not self.stop_event.is_set():
            self.liveness.beat()  # from the event loop: a wedged loop stops beating
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        stop.set()

    def close(self) -> None:
        """Remove the rules, close the listeners, write the stats record."""
        if self._pods is not None:
            self._pods.stop()
        if self._rules is not None:
            try:
                iptables.remove(self._rules.chain_prefix)
            except iptables.IptablesError as exc:
                log.error("could not remove the interception rules: %s", exc)
            self._rules = None
        for sock, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        try:
            if self._proxy is not None:
                self._out.write(Record(type="stats", ts_ns=time.time_ns(), stats=self.summary()))
        except BrokenPipeError:
            pass
        finally:
            self._out.close()

    def summary(self) -> dict[str, int]:
        proxy = self._proxy
        out = {
            "events": proxy.stats.accepted if proxy else 0,
            "records": self._out.records,
            "bytes": self._out.data_bytes,
            # Records are written as the bytes pass, with no buffer in between that
            # could overflow; what a sink loses is in its own counters below, and
            # payload beyond --max-capture in proxy_truncated_bytes.
            "lost": 0,
        }
        if proxy is not None:
            out.update(proxy.stats.as_dict())
            if self._pods is not None:
                for key, value in self._pods.summary().items():
                    out[key] = out.get(key, 0) + value
                out["events"] = out["proxy_accepted"]
            out["proxy_leaves_issued"] = self._leaves.issued if self._leaves else 0
            out["proxy_passthrough_remembered"] = len(proxy.passthrough)
        out.update(self._out.sink_stats())
        return out


def _describe(config: ProxyConfig) -> str:
    parts = []
    if config.ports:
        where = ", ".join(config.cidrs) if config.cidrs else "any destination"
        parts.append(f"outbound TCP ports {','.join(map(str, config.ports))} ({where})")
    if config.inbound:
        parts.append(f"inbound ports {','.join(str(s.port) for s in config.inbound)}")
    return " and ".join(parts)
