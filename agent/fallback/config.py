"""What the fallback proxy intercepts and how it talks to each destination (pure).

The same settings come from command-line flags (`tlscap run --mode proxy ...`) and from
a TOML file (`--proxy-config`); both end up in one ProxyConfig.  File format:

    intercept_ports = [443, 8443]
    intercept_cidrs = ["198.18.0.0/15"]      # only these destinations (default: any)
    exclude_cidrs = ["198.18.9.0/24"]        # never intercepted
    intercept_loopback = false
    ca_dir = "/var/lib/tlscap/ca"
    upstream_ca = "/etc/ssl/corp-root.pem"   # trusted for upstreams, on top of the system store

    [[upstream]]                             # per destination; first match wins
    match = "api.internal:8443"              # name, *.suffix, IP or CIDR, optional :port
    client_cert = "/etc/tlscap/client.crt"   # mutual TLS towards that upstream
    client_key = "/etc/tlscap/client.key"
    insecure = false                         # true: skip verification (self-signed dev services)
    ca = "/etc/tlscap/internal-ca.pem"

    [[inbound]]                              # a local TLS server whose traffic is terminated here
    port = 8443
    cert = "/etc/tls/tls.crt"                # the service's own certificate and key
    key = "/etc/tls/tls.key"
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.fallback.rules import DEFAULT_PROXY_MARK, InterceptRules

DEFAULT_OUTBOUND_PORT = 15443
DEFAULT_INBOUND_PORT = 15444
DEFAULT_CA_DIR = Path("/var/lib/tlscap/ca")


class ConfigError(ValueError):
    """A proxy setting is malformed; str() is one line naming the setting."""


def parse_port(text: str | int, what: str = "port") -> int:
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ConfigError(f"{what}: {text!r} is not a port number")
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what}: {port} is not in 1..65535")
    return port


def parse_port_list(text: str) -> tuple[int, ...]:
    """`443,8443` -> (443, 8443); duplicates dropped, order kept.  `none`: no outbound
    interception (an inbound-only setup)."""
    if text.strip().lower() == "none":
        return ()
    ports = [parse_port(p.strip(), "intercept port") for p in text.split(",") if p.strip()]
    if not ports:
        raise ConfigError("intercept ports: empty list")
    return tuple(dict.fromkeys(ports))


def parse_cidr(text: str, what: str = "network") -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an IP network (CIDR)") from None


@dataclass(frozen=True)
class DestinationPattern:
    """Which upstream a per-destination setting applies to.

    `api.example.com`, `*.example.com` (any subdomain), `198.18.0.2`, `198.18.0.0/16`,
    `[2001:2::2]`, each optionally followed by `:port`.  Names match the SNI the client
    sent; addresses match the original destination.
    """

    text: str
    host: str = ""
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> DestinationPattern:
        raw = text.strip()
        host, port = raw, None
        if raw.startswith("["):
            end = raw.find("]")
            if end < 0:
                raise ConfigError(f"destination {text!r}: unclosed [")
            host, rest = raw[1:end], raw[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(f"destination {text!r}: junk after ]")
                port = parse_port(rest[1:], f"destination {text!r}")
        elif raw.count(":") == 1:
            host, port_text = raw.split(":")
            port = parse_port(port_text, f"destination {text!r}")
        if not host:
            raise ConfigError(f"destination {text!r}: empty host")
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            name = host.lower().rstrip(".")
            if not name or any(c.isspace() or c in "/@" for c in name):
                raise ConfigError(f"destination {text!r}: not a name, address or CIDR") from None
            return cls(text=raw, host=name, port=port)
        return cls(text=raw, network=network, port=port)

    def matches(self, ip: str, port: int, sni: str | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(ip) in self.network
            except ValueError:
                return False
        if sni is None:
            return False
        if self.host.startswith("*."):
            return sni.endswith(self.host[1:])
        return sni == self.host


@dataclass(frozen=True)
class UpstreamRule:
    pattern: DestinationPattern
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure: bool = False
    ca: Path | None = None
    # A client certificate chain and key as PEM bytes, instead of client_cert/key files
    # (proxy mode for pods reads them from the pod's mounts and keeps them in memory).
    client_pem: bytes | None = field(default=None, repr=False)

    def merged(self, other: UpstreamRule) -> UpstreamRule:
        """Settings given for the same destination in two places combine."""
        return UpstreamRule(
            pattern=self.pattern,
            client_cert=other.client_cert or self.client_cert,
            client_key=other.client_key or self.client_key,
            insecure=self.insecure or other.insecure,
            ca=other.ca or self.ca,
            client_pem=other.client_pem or self.client_pem,
        )


@dataclass(frozen=True)
class InboundService:
    port: int
    cert: Path
    key: Path


def parse_inbound(text: str) -> InboundService:
    """`PORT:CERT:KEY` (paths may not hold a colon; use the config file for those)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ConfigError(f"--inbound {text!r}: expected PORT:CERT:KEY")
    return InboundService(parse_port(parts[0], "--inbound"), Path(parts[1]), Path(parts[2]))


def parse_client_cert(text: str) -> UpstreamRule:
    """`DEST=CERT:KEY`: present this client certificate to upstreams matching DEST."""
    dest, sep, files = text.partition("=")
    cert, sep2, key = files.partition(":")
    if not sep or not sep2 or not cert or not key:
        raise ConfigError(f"--upstream-client-cert {text!r}: expected DEST=CERT:KEY")
    return UpstreamRule(
        DestinationPattern.parse(dest), client_cert=Path(cert), client_key=Path(key)
    )


@dataclass(frozen=True)
class ProxyConfig:
    ports: tuple[int, ...] = (443,)
    cidrs: tuple[str, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()
    intercept_loopback: bool = False
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    mark: int = DEFAULT_PROXY_MARK
    ca_dir: Path = DEFAULT_CA_DIR
    upstream_ca: Path | None = None
    upstream_rules: tuple[UpstreamRule, ...] = ()
    inbound: tuple[InboundService, ...] = field(default=())

    def upstream_rule_for(self, ip: str, port: int, sni: str | None) -> UpstreamRule | None:
        for rule in self.upstream_rules:
            if rule.pattern.matches(ip, port, sni):
                return rule
        return None

    def inbound_service(self, port: int) -> InboundService | None:
        for service in self.inbound:
            if service.port == port:
                return service
        return None

    def with_rule(self, rule: UpstreamRule) -> ProxyConfig:
        """Add a per-destination rule; one for the same pattern text is merged into it."""
        rules = list(self.upstream_rules)
        for i, existing in enumerate(rules):
            if existing.pattern == rule.pattern:
                rules[i] = existing.merged(rule)
                return replace(self, upstream_rules=tuple(rules))
        return replace(self, upstream_rules=(*rules, rule))

    def intercept_rules(self, extra_excludes: tuple[str, ...] = ()) -> InterceptRules:
        inbound_ports = tuple(s.port for s in self.inbound)
        rules = InterceptRules(
            outbound_port=self.outbound_port if self.ports else None,
            ports=self.ports,
            cidrs=self.cidrs,
            exclude_cidrs=tuple(dict.fromkeys((*self.exclude_cidrs, *extra_excludes))),
            exclude_loopback=not self.intercept_loopback,
            mark=self.mark,
            inbound_port=self.inbound_port if inbound_ports else None,
            inbound_ports=inbound_ports,
        )
        try:
            rules.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return rules


def _want(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.get(key)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    return value


def config_from_toml(text: str, source: str = "config") -> ProxyConfig:
    """Parse the file format in the module docstring; unknown keys are errors (typos)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    known = {
        "intercept_ports",
        "intercept_cidrs",
        "exclude_cidrs",
        "intercept_loopback",
        "ca_dir",
        "upstream_ca",
        "upstream",
        "inbound",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    config = ProxyConfig()
    ports = _want(data, "intercept_ports", list, source)
    if ports is not None:
        config = replace(config, ports=tuple(parse_port(p, "intercept_ports") for p in ports))
    for key, attr in (("intercept_cidrs", "cidrs"), ("exclude_cidrs", "exclude_cidrs")):
        cidrs = _want(data, key, list, source)
        if cidrs is not None:
            where = f"{source}: {key}"
            config = replace(config, **{attr: tuple(parse_cidr(str(c), where) for c in cidrs)})
    loopback = _want(data, "intercept_loopback", bool, source)
    if loopback is not None:
        config = replace(config, intercept_loopback=loopback)
    for key in ("ca_dir", "upstream_ca"):
        value = _want(data, key, str, source)
        if value is not None:
            config = replace(config, **{key: Path(value)})
    for i, table in enumerate(_want(data, "upstream", list, source) or []):
        where = f"{source}: [[upstream]] #{i + 1}"
        if not isinstance(table, dict) or "match" not in table:
            raise ConfigError(f'{where}: needs a match = "..." destination')
        extra = sorted(set(table) - {"match", "client_cert", "client_key", "insecure", "ca"})
        if extra:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(extra)}")
        cert = _want(table, "client_cert", str, where)
        key = _want(table, "client_key", str, where)
        ca = _want(table, "ca", str, where)
        if bool(cert) != bool(key):
            raise ConfigError(f"{where}: client_cert and client_key go together")
        rule = UpstreamRule(
            DestinationPattern.parse(str(table["match"])),
            client_cert=Path(cert) if cert else None,
            client_key=Path(key) if key else None,
            insecure=bool(_want(table, "insecure", bool, where)),
            ca=Path(ca) if ca else None,
        )
        config = config.with_rule(rule)
    services = []
    for i, table in enumerate(_want(data, "inbound", list, source) or []):
        where = f"{source}: [[inbound]] #{i + 1}"
        if not isinstance(table, dict) or not {"port", "cert", "key"} <= set(table):
            raise ConfigError(f"{where}: needs port, cert and key")
        services.append(
            InboundService(
                parse_port(table["port"], where),
                Path(_want(table, "cert", str, where)),
                Path(_want(table, "key", str, where)),
            )
        )
    if services:
        config = replace(config, inbound=tuple(services))
    return config
