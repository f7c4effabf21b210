"""`tlscap certs`: a CA plus collector and client certificates for the gRPC links."""

from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from agent.certs.authority import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    CertificateError,
    is_issued_by,
    parse_certificates,
    read_file,
    write_private,
    write_public,
)
from agent.certs.identity import ANY_NODE, IdentityError, check_name, identity_uri
from agent.cli.argtypes import positive_int
from agent.cli.errors import fail

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_CONSUMER = "consumer"
# The default agent certificate is for this machine, under the node name `tlscap run`
# puts on its records by default (the host name), in agent.crt.
DEFAULT_AGENT_FILE = "agent"
SERVER_NAME = "collector"
# Client names become file names next to ca.* and collector.*, so keep them plain.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class ClientCert:
    """One client certificate to write: file stem, role, identity name."""

    file: str  # <file>.crt / <file>.key
    role: str  # "agent" or "consumer"
    name: str  # node name or consumer name

    @property
    def uri(self) -> str:
        return identity_uri(self.role, self.name)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs",
        help="create a CA and certificates for TLS between agents, collector and consumers",
        description="Create (or reuse) a CA in DIR, a collector server certificate and client "
        "certificates signed by it, then print the flags that use them.",
    )
    p.add_argument("--dir", type=Path, required=True, help="directory for the CA and certificates")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="name or address clients use to reach the collector (repeatable; "
        f"default: {', '.join(DEFAULT_HOSTS)})",
    )
    p.add_argument(
        "--agent-node",
        action="append",
        default=[],
        metavar="NODE",
        help="agent certificate agent-NODE.crt/.key with identity tlscap://agent/NODE: it "
        "may only send records whose node is NODE (repeatable; one per node). '*' makes "
        "agent-any-node.crt (tlscap://agent/*): may send records of any node, for "
        "deployments that cannot give each node its own certificate",
    )
    p.add_argument(
        "--consumer",
        "--client",
        dest="consumer",
        action="append",
        default=[],
        metavar="NAME",
        help="consumer certificate NAME.crt/.key with identity tlscap://consumer/NAME, for "
        "`tlscap tail` (repeatable). With neither --agent-node nor --consumer: agent.crt "
        f"for this host (node {socket.gethostname()!r}) and {DEFAULT_CONSUMER}.crt",
    )
    p.add_argument(
        "--days",
        type=positive_int,
        default=397,
        help="validity of the collector and client certificates in days (default 397)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace existing collector and client certificates"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.set_defaults(handler=certs_command)


def split_hosts(hosts: list[str]) -> tuple[list[str], list[str]]:
    """Sort --host values into DNS names and IP addresses; ValueError on junk."""
    dns_names: list[str] = []
    ips: list[str] = []
    for host in hosts:
        host = host.strip().removeprefix("[").removesuffix("]")
        try:
            ips.append(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise ValueError(f"not a host name or IP address: --host {host!r}")
        dns_names.append(host)
    return dns_names, ips


def _load_ca(directory: Path) -> tuple[CertificateAuthority, bool]:
    """(CA, created?)"""
    existed = (directory / CA_CERT_FILE).exists() or (directory / CA_KEY_FILE).exists()
    return CertificateAuthority.load_or_create(directory), not existed


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sans.get_values_for_type(x509.UniformResourceIdentifier)


def _write_leaf(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    *,
    force: bool,
    describe: str,
    **issue_args,
) -> None:
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    if not force and (crt.exists() or key.exists()):
        if not (crt.exists() and key.exists()):
            present, missing = (crt, key) if crt.exists() else (key, crt)
            raise CertificateError(f"{present} exists but {missing} does not; --force reissues")
        existing = parse_certificates(read_file(crt, "certificate"), str(crt))[0]
        note = ""
        if not is_issued_by(existing, ca.certificate):
            note = f" (WARNING: not signed by {directory / CA_CERT_FILE}; --force reissues)"
        elif (want := list(issue_args.get("uris", ()))) and not set(want) <= set(_uris(existing)):
            note = f" (WARNING: lacks the identity {want[0]}; --force reissues)"
        print(f"kept    {crt}, {key}: exists, --force replaces it{note}")
        return
    issued = ca.issue(name if name != SERVER_NAME else "tlscap collector", **issue_args)
    write_private(key, issued.key_pem)
    write_public(crt, issued.cert_pem)
    print(f"wrote   {crt}, {key}: {describe}, until {issued.not_after:%Y-%m-%d}")


def client_certs(agent_nodes: list[str], consumers: list[str]) -> list[ClientCert]:
    """What to write for --agent-node/--consumer; ValueError with a one-line message."""
    if not agent_nodes and not consumers:
        return [
            ClientCert(DEFAULT_AGENT_FILE, "agent", socket.gethostname()),
            ClientCert(DEFAULT_CONSUMER, "consumer", DEFAULT_CONSUMER),
        ]
    out = []
    for node in agent_nodes:
        if node == ANY_NODE:
            out.append(ClientCert("agent-any-node", "agent", ANY_NODE))
            continue
        try:
            check_name(node, "--agent-node")
        except IdentityError as exc:
            raise ValueError(str(exc)) from None
        if not _CLIENT_NAME.fullmatch(f"agent-{node}"):
            raise ValueError(f"--agent-node {node!r}: at most 56 characters")
        out.append(ClientCert(f"agent-{node}", "agent", node))
    for name in consumers:
        if not _CLIENT_NAME.fullmatch(name) or name in ("ca", SERVER_NAME):
            raise ValueError(
                f"--client {name!r}: use letters, digits, '.', '_', '-' (not ca/collector)"
            )
        out.append(ClientCert(name, "consumer", name))
    files = [c.file for c in out]
    if len(set(files)) != len(files):
        raise ValueError("--agent-node and --client/--consumer names must be different")
    return out


def certs_command(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    hosts = args.host or list(DEFAULT_HOSTS)
    try:
        dns_names, ips = split_hosts(hosts)
        clients = client_certs(args.agent_node, args.consumer)
    except ValueError as exc:
        return fail(str(exc))
    valid_for = timedelta(days=args.days)

    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca, created = _load_ca(directory)
        state = "created" if created else "using  "
        print(f"{state} {directory / CA_CERT_FILE} (CA; {directory / CA_KEY_FILE} stays private)")
        _write_leaf(
            ca,
            directory,
            SERVER_NAME,
            force=args.force,
            describe=f"collector server certificate for {', '.join(hosts)}",
            dns_names=dns_names,
            ip_addresses=ips,
            server=True,
            client=False,
            valid_for=valid_for,
        )
        for client in clients:
            _write_leaf(
                ca,
                directory,
                client.file,
                force=args.force,
                describe=f"{client.role} certificate {client.uri}",
                uris=[client.uri],
                server=False,
                client=True,
                valid_for=valid_for,
            )
    except CertificateError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write certificates in {directory}: {exc.strerror or exc}")

    print_usage(directory, hosts[0], clients)
    return 0


def print_usage(directory: Path, host: str, clients: list[ClientCert]) -> None:
    def q(name: str) -> str:
        return shlex.quote(str(directory / name))

    ca = q(CA_CERT_FILE)
    host = host.strip()
    address = f"[{host}]:PORT" if ":" in host and not host.startswith("[") else f"{host}:PORT"
    print()
    print("Collector (clients must present a certificate signed by the CA):")
    print(
        f"  tlscap collector --tls-cert {q('collector.crt')} --tls-key {q('collector.key')} "
        f"--tls-ca {ca}"
    )
    for client in clients:
        flags = f"--tls-cert {q(client.file + '.crt')} --tls-key {q(client.file + '.key')}"
        flags += f" --tls-ca {ca}"
        if client.role == "agent":
            if client.name == ANY_NODE:
                print("Agent on any node (may send records of every node, never read):")
            else:
                print(f"Agent on node {client.name} (may only send records of that node):")
            node = (
                "" if client.name in (socket.gethostname(), ANY_NODE) else f" --node {client.name}"
            )
            print(f"  tlscap run --collector {address}{node} {flags}")
        else:
            print(f"Consumer {client.name} (may only read):")
            print(f"  tlscap tail --collector {address} {flags}")
    print(
        "Reaching the collector by a name or address not listed above? Reissue with --host, "
        "or add --tls-server-name NAME on the client."
    )
