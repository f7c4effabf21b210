"""The role identity a client certificate carries: a URI SAN naming what it is.

    tlscap://agent/<node>        an agent: may Ingest, only records of <node>
    tlscap://consumer/<name>     a consumer: may Subscribe (read), never Ingest
    tlscap://agent/*             an agent of any node: may Ingest records of any node,
                                 never Subscribe. Only for deployments that cannot give
                                 each node its own certificate (see docs/kubernetes.md)

`tlscap certs` puts one of these in every client certificate it issues; the collector
(agent/collector/identity.py) reads it from the verified peer certificate. The name
part is a Kubernetes node name or a consumer name: letters, digits, '.', '_', '-'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

SCHEME = "tlscap"
AGENT = "agent"
CONSUMER = "consumer"
ROLES = (AGENT, CONSUMER)
ANY_NODE = "*"  # the name of an agent identity not bound to one node
Role = Literal["agent", "consumer"]

# A DNS-1123 subdomain (what Kubernetes node names are) fits, so do underscores.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")


class IdentityError(ValueError):
    """A tlscap identity URI that is malformed, or a name that cannot be one."""


@dataclass(frozen=True)
class Identity:
    role: Role
    name: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}://{self.role}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def check_name(name: str, what: str = "name") -> str:
    """`name` if it can be the name part of an identity; IdentityError otherwise."""
    if not _NAME.fullmatch(name):
        raise IdentityError(
            f"{what} {name!r}: use letters, digits, '.', '_', '-' "
            "(starting and ending with a letter or digit, at most 253)"
        )
    return name


def identity_uri(role: str, name: str) -> str:
    """The URI SAN for `role` ("agent"/"consumer") and `name`."""
    if role not in ROLES:
        raise IdentityError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    if role == AGENT and name == ANY_NODE:
        return Identity(AGENT, ANY_NODE).uri
    return Identity(role, check_name(name, f"{role} name")).uri  # type: ignore[arg-type]


def is_identity_uri(uri: str) -> bool:
    """True for anything in the tlscap:// scheme (well-formed or not)."""
    return uri.lower().startswith(f"{SCHEME}://")


def parse_identity_uri(uri: str) -> Identity:
    """Identity from `tlscap://<role>/<name>`; IdentityError for anything else."""
    prefix = f"{SCHEME}://"
    if not uri.startswith(prefix):
        raise IdentityError(f"not a tlscap identity: {uri!r}")
    role, sep, name = uri[len(prefix) :].partition("/")
    if not sep or role not in ROLES:
        raise IdentityError(f"{uri!r}: expected {prefix}agent/<node> or {prefix}consumer/<name>")
    if role == AGENT and name == ANY_NODE:
        return Identity(AGENT, ANY_NODE)
    try:
        check_name(name)
    except IdentityError:
        raise IdentityError(f"{uri!r}: bad name {name!r}") from None
    return Identity(role, name)  # type: ignore[arg-type]


def identity_from_uris(uris: list[str]) -> Identity:
    """The one tlscap identity among a certificate's URI SANs.

    None, several or a malformed one: IdentityError (a certificate that claims two
    roles, or two nodes, is refused rather than guessed about).
    """
    ours = [u for u in uris if is_identity_uri(u)]
    if not ours:
        raise IdentityError("certificate has no tlscap:// identity (URI SAN)")
    if len(set(ours)) > 1:
        raise IdentityError(f"certificate has several tlscap identities: {', '.join(ours)}")
    return parse_identity_uri(ours[0])
