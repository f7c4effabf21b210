"""`tlscap certs`: a CA plus collector and client certificates for the gRPC links."""

from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
from datetime import timedelta
from pathlib import Path

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
from agent.cli.argtypes import positive_int
from agent.cli.errors import fail

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_CLIENTS = ("agent", "consumer")
SERVER_NAME = "collector"
# Client names become file names next to ca.* and collector.*, so keep them plain.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# Which command each default client certificate is for, to print ready-to-use flags.
_CLIENT_COMMANDS = {"agent": "run", "consumer": "tail"}


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
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help=f"client certificate NAME.crt/NAME.key to create (repeatable; "
        f"default: {' and '.join(DEFAULT_CLIENTS)})",
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
        print(f"kept    {crt}, {key}: exists, --force replaces it{note}")
        return
    issued = ca.issue(name if name != SERVER_NAME else "tlscap collector", **issue_args)
    write_private(key, issued.key_pem)
    write_public(crt, issued.cert_pem)
    print(f"wrote   {crt}, {key}: {describe}, until {issued.not_after:%Y-%m-%d}")


def certs_command(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    hosts = args.host or list(DEFAULT_HOSTS)
    clients = args.client or list(DEFAULT_CLIENTS)
    try:
        dns_names, ips = split_hosts(hosts)
    except ValueError as exc:
        return fail(str(exc))
    for name in clients:
        if not _CLIENT_NAME.fullmatch(name) or name in ("ca", SERVER_NAME):
            return fail(f"--client {name!r}: use letters, digits, '.', '_', '-' (not ca/collector)")
    if len(set(clients)) != len(clients):
        return fail("--client names must be different")
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
        for name in clients:
            _write_leaf(
                ca,
                directory,
                name,
                force=args.force,
                describe=f"client certificate {name!r}",
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


def print_usage(directory: Path, host: str, clients: list[str]) -> None:
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
    for name in clients:
        command = _CLIENT_COMMANDS.get(name)
        flags = f"--tls-cert {q(name + '.crt')} --tls-key {q(name + '.key')} --tls-ca {ca}"
        if command:
            print(f"{'Agent' if command == 'run' else 'Consumer'} ({name}):")
            print(f"  tlscap {command} --collector {address} {flags}")
        else:
            print(f"Client {name}:")
            print(f"  {flags}")
    print(
        "Reaching the collector by a name or address not listed above? Reissue with --host, "
        "or add --tls-server-name NAME on the client."
    )
