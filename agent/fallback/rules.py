"""The iptables nat rules that send TLS connections to the fallback proxy (pure text).

Layout, per address family (iptables for IPv4, ip6tables for IPv6), all in the nat table:

    OUTPUT      -p tcp -j TLSCAP_OUT          (first rule: see below)
    TLSCAP_OUT  -m mark --mark 0x7c5 -j RETURN          the proxy's own upstream sockets
                -m owner --uid-owner U -j RETURN        optional extra exclusions
                -m owner --gid-owner G -j RETURN
                -d 127.0.0.0/8 -j RETURN  (::1/128)     loopback, unless intercepted
                -d EXCLUDED -j RETURN                   each exclude_cidr of this family
                [-d CIDR] -p tcp -m multiport --dports 443,8443 -j REDIRECT --to-ports 15443

    PREROUTING  -p tcp -j TLSCAP_IN
    TLSCAP_IN   -p tcp -m multiport --dports 8443 -m addrtype --dst-type LOCAL
                    -j REDIRECT --to-ports 15444

Why a mark and not a uid: the proxy runs as root, so `--uid-owner 0` would also exempt
every other root process (often the very clients to capture).  Instead the proxy sets
SO_MARK on its upstream sockets and those packets return before any REDIRECT, which is
what keeps the proxy from redirecting its own connections back to itself.

The jumps are inserted as the first rule of OUTPUT/PREROUTING: a DNAT earlier in the
chain (kube-proxy service VIPs, docker) would otherwise rewrite the destination first and
the connection would never reach us; with ours first the proxy sees the address the
client used, and its marked upstream connection is then DNATed as usual.  The inbound
rule only takes connections addressed to this host (addrtype LOCAL), so traffic routed
through it (containers, a gateway) is left alone.  REDIRECT sends OUTPUT traffic to
127.0.0.1/::1 and PREROUTING traffic to the incoming interface's address, so the proxy
listens on both families (and on the wildcard address for inbound).

Everything here is rendered for `iptables-restore --noflush`, which applies one `*nat`
block atomically.  Rules are written exactly as `iptables-save` prints them, because
stale state is found and deleted by text: a jump from the saved table is deleted by its
own `-A` line with `-D`.  Installing removes whatever an earlier (possibly crashed) run
left behind in the same transaction, so installing twice gives the same table.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from typing import Literal

CHAIN_PREFIX = "TLSCAP"
DEFAULT_PROXY_MARK = 0x7C5
MULTIPORT_MAX = 15  # xt_multiport: at most 15 ports per rule

Family = Literal[4, 6]
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_PREFIX_RE = re.compile(r"[A-Z][A-Z0-9_-]{0,19}")
_U32_MAX = 0xFFFFFFFF
_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
_JUMP_OPTS = ("-j", "--jump", "-g", "--goto")


@dataclass(frozen=True)
class InterceptRules:
    """What to redirect to the proxy; render with render_install()."""

    outbound_port: int | None = None
    ports: tuple[int, ...] = (443,)
    cidrs: tuple[str, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()
    exclude_loopback: bool = True
    mark: int | None = DEFAULT_PROXY_MARK
    mark_mask: int = _U32_MAX
    owner_uid: int | None = None
    owner_gid: int | None = None
    inbound_port: int | None = None
    inbound_ports: tuple[int, ...] = ()
    chain_prefix: str = CHAIN_PREFIX

    def outbound_chain(self) -> str:
        return f"{self.chain_prefix}_OUT"

    def inbound_chain(self) -> str:
        return f"{self.chain_prefix}_IN"

    def validate(self) -> None:
        """Raise ValueError (one line) when the rules cannot be rendered safely."""
        if not _PREFIX_RE.fullmatch(self.chain_prefix):
            raise ValueError(
                f"chain prefix {self.chain_prefix!r}: use 1-20 of A-Z, 0-9, _ and -, "
                "starting with a letter"
            )
        if self.outbound_port is None and self.inbound_port is None:
            raise ValueError("nothing to intercept: neither an outbound nor an inbound proxy port")
        if self.outbound_port is not None:
            _check_port(self.outbound_port, "outbound proxy port")
            if not self.ports:
                raise ValueError("outbound interception needs at least one destination port")
            for port in self.ports:
                _check_port(port, "intercept port")
            if self.outbound_port in self.ports:
                raise ValueError(
                    f"outbound proxy port {self.outbound_port} is also an intercepted port "
                    "(connections to it would loop)"
                )
            if self.mark is None and self.owner_uid is None and self.owner_gid is None:
                raise ValueError(
                    "outbound interception needs a mark or owner exclusion for the proxy's "
                    "own connections (they would be redirected back to it)"
                )
        if self.inbound_port is not None:
            _check_port(self.inbound_port, "inbound proxy port")
            if not self.inbound_ports:
                raise ValueError("inbound interception needs at least one local service port")
            for port in self.inbound_ports:
                _check_port(port, "inbound service port")
            if self.inbound_port in self.inbound_ports:
                raise ValueError(
                    f"inbound proxy port {self.inbound_port} is also an inbound service port "
                    "(connections to it would loop)"
                )
            if self.inbound_port == self.outbound_port:
                raise ValueError(
                    f"inbound and outbound proxy ports are both {self.inbound_port}; "
                    "they must differ"
                )
        if self.mark is not None:
            if not _is_u32(self.mark) or self.mark == 0:
                raise ValueError(f"proxy mark {self.mark!r} is not in 1..0xffffffff")
            if not _is_u32(self.mark_mask) or self.mark_mask == 0:
                raise ValueError(f"mark mask {self.mark_mask!r} is not in 1..0xffffffff")
            if self.mark & ~self.mark_mask:
                raise ValueError(
                    f"proxy mark {self.mark:#x} has bits outside mask {self.mark_mask:#x} "
                    "(it could never match)"
                )
        for what, ident in (("owner uid", self.owner_uid), ("owner gid", self.owner_gid)):
            if ident is not None and not _is_u32(ident):
                raise ValueError(f"{what} {ident!r} is not a valid id")
        for cidr in self.cidrs:
            _parse_network(cidr, "intercept cidr")
        for cidr in self.exclude_cidrs:
            _parse_network(cidr, "exclude cidr")


def _is_u32(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U32_MAX


def _check_port(port: object, what: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"{what} {port!r} is not in 1..65535")


def _parse_network(text: str, what: str) -> _Network:
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IP network (CIDR)") from None


def _networks(cidrs: tuple[str, ...], family: Family) -> list[_Network]:
    nets = [_parse_network(c, "cidr") for c in cidrs]
    return list(dict.fromkeys(n for n in nets if n.version == family))


def _dest(net: _Network) -> str:
    # iptables-save omits a match-everything destination and prints others normalised
    # (host bits cleared, /32 or /128 spelled out) -- as str(ip_network) does.
    return "" if net.prefixlen == 0 else f"-d {net} "


def _port_matches(ports: tuple[int, ...]) -> list[str]:
    unique = list(dict.fromkeys(ports))
    chunks = [unique[i : i + MULTIPORT_MAX] for i in range(0, len(unique), MULTIPORT_MAX)]
    return [
        f"-m tcp --dport {c[0]}"
        if len(c) == 1
        else f"-m multiport --dports {','.join(map(str, c))}"
        for c in chunks
    ]


def _outbound_rules(rules: InterceptRules, family: Family) -> list[str]:
    """Rule bodies (after `-A CHAIN `) of the outbound chain; [] if nothing to redirect."""
    if rules.outbound_port is None:
        return []
    if rules.cidrs:
        targets = _networks(rules.cidrs, family)
        if not targets:  # only other-family destinations were asked for
            return []
    else:
        targets = [None]
    body: list[str] = []
    if rules.mark is not None:
        mark = f"{rules.mark:#x}"
        if rules.mark_mask != _U32_MAX:
            mark += f"/{rules.mark_mask:#x}"
        body.append(f"-m mark --mark {mark} -j RETURN")
    if rules.owner_uid is not None:
        body.append(f"-m owner --uid-owner {rules.owner_uid} -j RETURN")
    if rules.owner_gid is not None:
        body.append(f"-m owner --gid-owner {rules.owner_gid} -j RETURN")
    if rules.exclude_loopback:
        body.append(f"-d {_LOOPBACK[family]} -j RETURN")
    body += [f"{_dest(net)}-j RETURN" for net in _networks(rules.exclude_cidrs, family)]
    for net in targets:
        dest = "" if net is None else _dest(net)
        body += [
            f"{dest}-p tcp {match} -j REDIRECT --to-ports {rules.outbound_port}"
            for match in _port_matches(rules.ports)
        ]
    return body


def _inbound_rules(rules: InterceptRules) -> list[str]:
    if rules.inbound_port is None or not rules.inbound_ports:
        return []
    return [
        f"-p tcp {match} -m addrtype --dst-type LOCAL -j REDIRECT --to-ports {rules.inbound_port}"
        for match in _port_matches(rules.inbound_ports)
    ]


# --- reading the current table ------------------------------------------------------------


def _nat_lines(current: str) -> list[str]:
    """The lines of the nat table in iptables-save output (all lines if no table header)."""
    lines, table = [], "nat"
    for raw in current.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if table == "nat" and line != "COMMIT":
            lines.append(line)
    return lines


def _is_ours(chain: str, prefix: str) -> bool:
    # PREFIX_<word> only: another instance with prefix "TLSCAP_X" owns TLSCAP_X_OUT,
    # which must not be mistaken for ours.
    head = f"{prefix}_"
    return chain.startswith(head) and re.fullmatch(r"[A-Z0-9]+", chain[len(head) :]) is not None


def find_installed(current: str, prefix: str = CHAIN_PREFIX) -> list[str]:
    """Names of our chains that exist (declared or used) in `current`, in order seen."""
    found: dict[str, None] = {}
    for line in _nat_lines(current):
        if line.startswith(":"):
            name = line[1:].split()[0] if line[1:].split() else ""
            if _is_ours(name, prefix):
                found[name] = None
        elif line.startswith("-A "):
            chain, target = _chain_and_target(line)
            for name in (chain, target):
                if name and _is_ours(name, prefix):
                    found[name] = None
    return list(found)


def _chain_and_target(line: str) -> tuple[str, str | None]:
    try:
        tokens = shlex.split(line)
    except ValueError:  # unbalanced quotes: not a line iptables-save writes
        tokens = line.split()
    chain = tokens[1] if len(tokens) > 1 else ""
    target = None
    for i, tok in enumerate(tokens[:-1]):
        if tok in _JUMP_OPTS:
            target = tokens[i + 1]
    return chain, target


def _foreign_jumps(current: str, prefix: str) -> list[str]:
    """`-D` lines for every rule outside our chains that jumps to one of ours."""
    deletes = []
    for line in _nat_lines(current):
        if not line.startswith("-A "):
            continue
        chain, target = _chain_and_target(line)
        if target and _is_ours(target, prefix) and not _is_ours(chain, prefix):
            deletes.append("-D " + line[3:])
    return deletes


# --- rendering ----------------------------------------------------------------------------


def render_install(rules: InterceptRules, family: Family, current: str) -> str:
    """Input for `iptables-restore --noflush` (ip6tables- for family 6) that replaces any
    earlier tlscap state in `current` (that family's `iptables-save -t nat`) with `rules`."""
    rules.validate()
    if family not in (4, 6):
        raise ValueError(f"address family {family!r} is not 4 or 6")
    prefix = rules.chain_prefix
    wanted: dict[str, tuple[str, list[str]]] = {}
    outbound = _outbound_rules(rules, family)
    if outbound:
        wanted[rules.outbound_chain()] = ("OUTPUT", outbound)
    inbound = _inbound_rules(rules)
    if inbound:
        wanted[rules.inbound_chain()] = ("PREROUTING", inbound)
    stale = [c for c in find_installed(current, prefix) if c not in wanted]

    # Declaring a chain creates it or, with --noflush, empties it; stale chains are
    # emptied that way too so that -X (which needs an empty, unreferenced chain) works.
    out = ["*nat"]
    out += [f":{chain} - [0:0]" for chain in [*wanted, *stale]]
    out += _foreign_jumps(current, prefix)
    out += [f"-X {chain}" for chain in stale]
    for chain, (hook, _) in wanted.items():
        out.append(f"-I {hook} 1 -p tcp -j {chain}")
    for chain, (_, body) in wanted.items():
        out += [f"-A {chain} {rule}" for rule in body]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_remove(current: str, prefix: str = CHAIN_PREFIX) -> str:
    """Input for `iptables-restore --noflush` deleting all our jumps and chains found in
    `current`; "" when there is nothing of ours."""
    ours = find_installed(current, prefix)
    if not ours:
        return ""
    out = ["*nat"]
    out += [f":{chain} - [0:0]" for chain in ours]
    out += _foreign_jumps(current, prefix)
    out += [f"-X {chain}" for chain in ours]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def installed_rules(current: str, prefix: str = CHAIN_PREFIX) -> list[str]:
    """The `-A` lines of `current` that are ours (in our chains or jumping to them), as
    iptables-save printed them; for tests and diagnostics."""
    found = []
    for line in _nat_lines(current):
        if line.startswith("-A "):
            chain, target = _chain_and_target(line)
            if _is_ours(chain, prefix) or (target is not None and _is_ours(target, prefix)):
                found.append(line)
    return found


def expected_rules(rules: InterceptRules, family: Family) -> list[str]:
    """The `-A` lines iptables-save prints once `rules` are installed (jumps first, then
    chain contents) -- the same order installed_rules() returns for a table holding only
    our rules in its hooks."""
    rules.validate()
    jumps, chains = [], {}
    for chain, hook, body in (
        (rules.inbound_chain(), "PREROUTING", _inbound_rules(rules)),
        (rules.outbound_chain(), "OUTPUT", _outbound_rules(rules, family)),
    ):
        if body:
            jumps.append(f"-A {hook} -p tcp -j {chain}")
            chains[chain] = [f"-A {chain} {rule}" for rule in body]
    # iptables-save prints builtin chains in hook order, then user chains sorted by name.
    return jumps + [line for chain in sorted(chains) for line in chains[chain]]
