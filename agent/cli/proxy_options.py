"""The `tlscap run` flags of proxy mode, and the ProxyConfig they build.

Flags and `--proxy-config FILE` say the same things; the file is read first and flags
given on the command line override or add to it.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from dataclasses import replace
from pathlib import Path

from agent.fallback.config import (
    DEFAULT_CA_DIR,
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT,
    ConfigError,
    DestinationPattern,
    ProxyConfig,
    UpstreamRule,
    config_from_toml,
    parse_cidr,
    parse_client_cert,
    parse_inbound,
    parse_port,
    parse_port_list,
)
from agent.fallback.rules import DEFAULT_PROXY_MARK


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "proxy mode (--mode proxy, or auto where eBPF cannot run): iptables redirection "
        "to a local TLS-terminating proxy"
    )
    g.add_argument(
        "--proxy-config", type=Path, metavar="FILE", help="TOML file of the settings below"
    )
    g.add_argument(
        "--intercept-ports",
        metavar="PORTS",
        help="destination ports whose outbound connections are intercepted (default 443; "
        "none: inbound only)",
    )
    g.add_argument(
        "--intercept-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="intercept only destinations in this network (repeatable; default any)",
    )
    g.add_argument(
        "--exclude-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="never intercept destinations in this network (repeatable)",
    )
    g.add_argument(
        "--intercept-loopback",
        action="store_true",
        default=None,
        help="also intercept connections to 127.0.0.0/8 and ::1 (default: left alone)",
    )
    g.add_argument(
        "--ca-dir",
        type=Path,
        metavar="DIR",
        help=f"where the proxy's root CA lives; created if missing (default {DEFAULT_CA_DIR})",
    )
    g.add_argument(
        "--upstream-ca",
        type=Path,
        metavar="PEM",
        help="also trust these CA certificates for upstream servers",
    )
    g.add_argument(
        "--upstream-client-cert",
        action="append",
        default=[],
        metavar="DEST=CERT:KEY",
        help="present this client certificate to upstreams matching DEST (mutual TLS; "
        "DEST is a name, *.suffix, IP or CIDR, optionally :port; repeatable)",
    )
    g.add_argument(
        "--upstream-insecure",
        action="append",
        default=[],
        metavar="DEST",
        help="do not verify upstreams matching DEST (self-signed dev services; repeatable)",
    )
    g.add_argument(
        "--inbound",
        action="append",
        default=[],
        metavar="PORT:CERT:KEY",
        help="terminate TLS of incoming connections to this local port with the service's "
        "own certificate and key (repeatable)",
    )
    g.add_argument(
        "--proxy-port",
        type=int,
        metavar="PORT",
        help=f"local port of the outbound proxy (default {DEFAULT_OUTBOUND_PORT})",
    )
    g.add_argument(
        "--inbound-proxy-port",
        type=int,
        metavar="PORT",
        help=f"local port of the inbound proxy (default {DEFAULT_INBOUND_PORT})",
    )
    g.add_argument(
        "--proxy-pods",
        choices=("auto", "on", "off"),
        default="auto",
        help="also intercept inside each selected pod's own network namespace (rules and "
        "listeners there, no sidecar; --capture-scope and tlscap.io annotations choose the "
        "pods): auto when pod metadata comes from the API server (default), on: required",
    )
    g.add_argument(
        "--proxy-mark",
        type=lambda s: int(s, 0),
        metavar="MARK",
        help=f"packet mark of the proxy's own connections, exempt from redirection "
        f"(default {DEFAULT_PROXY_MARK:#x})",
    )


def proxy_config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Raises ConfigError (or OSError for an unreadable --proxy-config)."""
    config = ProxyConfig()
    if args.proxy_config:
        config = config_from_toml(args.proxy_config.read_text(), str(args.proxy_config))
    if args.intercept_ports:
        config = replace(config, ports=parse_port_list(args.intercept_ports))
    if args.intercept_cidr:
        config = replace(
            config, cidrs=tuple(parse_cidr(c, "--intercept-cidr") for c in args.intercept_cidr)
        )
    if args.exclude_cidr:
        extra = tuple(parse_cidr(c, "--exclude-cidr") for c in args.exclude_cidr)
        config = replace(config, exclude_cidrs=(*config.exclude_cidrs, *extra))
    if args.intercept_loopback:
        config = replace(config, intercept_loopback=True)
    if args.ca_dir:
        config = replace(config, ca_dir=args.ca_dir)
    if args.upstream_ca:
        config = replace(config, upstream_ca=args.upstream_ca)
    for text in args.upstream_client_cert:
        config = config.with_rule(parse_client_cert(text))
    for text in args.upstream_insecure:
        config = config.with_rule(UpstreamRule(DestinationPattern.parse(text), insecure=True))
    if args.inbound:
        # A flag for a port the file also names replaces the file's entry.
        flagged = [parse_inbound(text) for text in args.inbound]
        ports = {service.port for service in flagged}
        kept = tuple(service for service in config.inbound if service.port not in ports)
        config = replace(config, inbound=(*kept, *flagged))
    if args.proxy_port is not None:
        config = replace(config, outbound_port=parse_port(args.proxy_port, "--proxy-port"))
    if args.inbound_proxy_port is not None:
        port = parse_port(args.inbound_proxy_port, "--inbound-proxy-port")
        config = replace(config, inbound_port=port)
    if args.proxy_mark is not None:
        config = replace(config, mark=args.proxy_mark)
    return config


def collector_excludes(target: str | None) -> tuple[str, ...]:
    """The collector's addresses as /32 or /128 networks, so exports are never redirected."""
    if not target:
        return ()
    host, _, _port = target.rpartition(":")
    host = host.strip("[]") or target
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigError(f"cannot resolve the collector {host!r}: {exc}") from None
    nets = {str(ipaddress.ip_network(info[4][0])) for info in infos}
    return tuple(sorted(nets))
