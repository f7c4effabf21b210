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
from agent.fallback.proxy import TlsProxy
from agent.fallback.rules import InterceptRules
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


def _listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


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
        v6 = _ipv6_available()
        if rules.outbound_port is not None:
            for host in ("127.0.0.1", "::1") if v6 else ("127.0.0.1",):
                self._listeners.append((_listener(host, rules.outbound_port), "outbound"))
        if rules.inbound_port is not None:
            for host in ("0.0.0.0", "::") if v6 else ("0.0.0.0",):
                self._listeners.append((_listener(host, rules.inbound_port), "inbound"))
        self._proxy = TlsProxy(
            config,
            self._leaves,
            services,
            upstreams,
            self._out.write,
            max_capture=self.options.max_capture,
            owners=SocketOwners(),
        )
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

    def run(self) -> None:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        assert self._proxy is not None
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._watch_stop(stop))
        try:
            await self._proxy.serve(self._listeners, stop)
        finally:
            watcher.cancel()

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
