"""Collector addresses: parsing `--collector` values, and the rotation an exporter
(or a subscriber) fails over along.

`--collector` takes one address, a comma-separated list, or is given several times;
an address is `HOST:PORT` (`[V6]:PORT` for an IPv6 literal).  A host name that
resolves to several addresses (a headless Kubernetes Service, round-robin DNS)
counts as that many collectors: each is dialed by its IP, and TLS still checks the
name that was given.  A name with one address (or none yet) is left to gRPC to
resolve, exactly as a single `--collector` always was.  Names are resolved again
each time the rotation comes round, so collectors that move are found.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]  # (host, port) -> IP addresses, in order


@dataclass(frozen=True)
class Endpoint:
    """One collector to dial."""

    address: str  # what the channel dials: HOST:PORT as given, or IP:PORT of a name
    configured: str  # the --collector address it came from
    server_name: str | None = None  # the name TLS must check when `address` is its IP

    def channel_options(self) -> list[tuple[str, Any]]:
        """Options a TLS channel to `address` needs (none unless dialing a name's IP)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def __str__(self) -> str:
        if self.address == self.configured:
            return self.address
        return f"{self.configured} ({self.address})"


def split_host_port(address: str) -> tuple[str, int]:
    """('host', port) of HOST:PORT or [V6]:PORT; ValueError with a one-line message."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{address!r}: bad host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{address!r}: the port must be a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{address!r}: port out of range")
    return host, port


def parse_collector_addresses(values: str | Iterable[str] | None) -> list[str]:
    """The addresses of one or several `--collector` values (each maybe a comma list),
    checked, in order, without repeats.  ValueError for a malformed one."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            address = part.strip()
            if not address:
                continue
            split_host_port(address)
            if address not in out:
                out.append(address)
    if not out:
        raise ValueError("no collector address given")
    return out


def resolve_addresses(host: str, port: int) -> list[str]:
    """The host's TCP addresses in the resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def expand(address: str, resolve: Resolver = resolve_addresses) -> list[Endpoint]:
    """The endpoints one configured address stands for."""
    host, port = split_host_port(address)
    try:
        ipaddress.ip_address(host)
        return [Endpoint(address, address)]  # a literal: nothing to resolve
    except ValueError:
        pass
    try:
        ips = resolve(host, port)
    except OSError as exc:
        # Not fatal: gRPC resolves it again on every connect, and we do each round.
        log.debug("cannot resolve collector %s now: %s", host, exc)
        ips = []
    if len(ips) <= 1:
        return [Endpoint(address, address)]
    return [
        Endpoint(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", address, server_name=host)
        for ip in ips
    ]


class CollectorTargets:
    """The collectors to use, in rotation: `current` until it fails, then the next.

    `start` (default: random) is where the first round begins, so a DaemonSet's
    agents spread over the collectors instead of all picking the first one.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        resolve: Resolver = resolve_addresses,
        start: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.addresses = parse_collector_addresses(addresses)
        self._resolve = resolve
        self._endpoints = self._expand_all()
        if start is None:
            start = (rng or random.Random()).randrange(len(self._endpoints))
        self._index = start % len(self._endpoints)

    def _expand_all(self) -> list[Endpoint]:
        endpoints: list[Endpoint] = []
        for address in self.addresses:
            for endpoint in expand(address, self._resolve):
                if endpoint not in endpoints:
                    endpoints.append(endpoint)
        return endpoints

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    @property
    def current(self) -> Endpoint:
        return self._endpoints[self._index]

    def __len__(self) -> int:
        return len(self._endpoints)

    def advance(self) -> Endpoint:
        """Move on to the next collector (after the last: resolve names again, and
        start over) and return it."""
        self._index += 1
        if self._index >= len(self._endpoints):
            previous = self._endpoints
            self._endpoints = self._expand_all()
            self._index = 0
            if self._endpoints != previous:
                log.info("collectors now: %s", ", ".join(str(e) for e in self._endpoints))
        return self.current

    def describe(self) -> str:
        return ",".join(self.addresses)
