"""Role identities in client certificates, and the collector's namespace policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.certs.authority import CertificateAuthority
from agent.certs.identity import (
    Identity,
    IdentityError,
    identity_from_uris,
    identity_uri,
    parse_identity_uri,
)
from agent.collector.identity import (
    ANONYMOUS,
    RefusalCounters,
    caller_from_auth_context,
    caller_from_pem,
)
from agent.collector.policy import PolicyDenied, PolicyError, load_policy, parse_policy
from agent.records.filter import RecordFilter


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("identity test CA")


def test_identity_uris_round_trip() -> None:
    assert identity_uri("agent", "node-1.example") == "tlscap://agent/node-1.example"
    assert parse_identity_uri("tlscap://agent/node-1.example") == Identity(
        "agent", "node-1.example"
    )
    assert parse_identity_uri("tlscap://consumer/alice") == Identity("consumer", "alice")
    assert str(Identity("consumer", "alice")) == "tlscap://consumer/alice"
    # An agent not bound to one node (shared certificates); consumers have no wildcard.
    assert parse_identity_uri("tlscap://agent/*") == Identity("agent", "*")
    assert identity_uri("agent", "*") == "tlscap://agent/*"
    with pytest.raises(IdentityError):
        parse_identity_uri("tlscap://consumer/*")


@pytest.mark.parametrize(
    "uri",
    [
        "tlscap://admin/x",  # unknown role
        "tlscap://agent/",  # no name
        "tlscap://agent",
        "tlscap://agent/a/b",  # a path is not a name
        "tlscap://agent/-x",
        "tlscap://consumer/a b",
        "spiffe://cluster.local/ns/tlscap/sa/agent",
        "https://agent/n1",
    ],
)
def test_malformed_identity_uris_are_refused(uri: str) -> None:
    with pytest.raises(IdentityError):
        parse_identity_uri(uri)


def test_identity_from_uris_wants_exactly_one() -> None:
    agent = "tlscap://agent/n1"
    assert identity_from_uris(["spiffe://x/y", agent]) == Identity("agent", "n1")
    assert identity_from_uris([agent, agent]) == Identity("agent", "n1")
    with pytest.raises(IdentityError, match="no tlscap"):
        identity_from_uris(["spiffe://x/y"])
    with pytest.raises(IdentityError, match="several"):
        identity_from_uris([agent, "tlscap://consumer/n1"])
    with pytest.raises(IdentityError, match="several"):
        identity_from_uris([agent, "tlscap://agent/n2"])
    with pytest.raises(IdentityError):
        identity_from_uris(["TLSCAP://agent/n1"])  # ours by scheme, but not well-formed
    with pytest.raises(IdentityError):
        identity_uri("root", "x")


def test_caller_from_certificates(ca: CertificateAuthority) -> None:
    agent = ca.issue("agent-n1", uris=["tlscap://agent/n1"], server=False, client=True)
    caller = caller_from_pem(agent.cert_pem)
    assert caller.identity == Identity("agent", "n1")
    assert caller.certificate and not caller.anonymous and not caller.error
    assert caller.describe() == "tlscap://agent/n1"
    assert len(caller.fingerprint) == 64

    plain = caller_from_pem(ca.issue("old-agent", server=False, client=True).cert_pem)
    assert plain.identity is None and plain.certificate
    assert "no tlscap" in plain.error and "old-agent" in plain.subject
    assert "no tlscap identity" in plain.describe()

    assert caller_from_pem(b"junk").error == "unreadable client certificate"


def test_caller_from_auth_context(ca: CertificateAuthority) -> None:
    consumer = ca.issue("alice", uris=["tlscap://consumer/alice"], server=False, client=True)
    auth = {"transport_security_type": [b"ssl"], "x509_pem_cert": [consumer.cert_pem]}
    assert caller_from_auth_context(auth).identity == Identity("consumer", "alice")
    # No certificate (plaintext, or TLS without a client CA): anonymous.
    assert caller_from_auth_context({}) is ANONYMOUS
    assert caller_from_auth_context({"transport_security_type": [b"ssl"]}).anonymous
    assert ANONYMOUS.describe() == "anonymous"


def test_refusal_counters() -> None:
    counters = RefusalCounters()
    assert set(counters.snapshot()) == set(RefusalCounters.KEYS)
    counters.count("refused_role")
    counters.count("refused_role")
    assert counters.snapshot()["refused_role"] == 2
    assert counters.first_time("a") and not counters.first_time("a") and counters.first_time("b")
    with pytest.raises(KeyError):
        counters.count("refused_something_else")


# --- policy --------------------------------------------------------------------------

POLICY = """
[consumers.oncall]

[consumers.shop-team]
namespaces = ["shop", "payments"]
"""


def test_policy_restricts_namespaces() -> None:
    policy = parse_policy(POLICY)
    everything = RecordFilter()
    assert policy.restrict("oncall", everything) is everything
    shop = policy.restrict("shop-team", everything)
    assert shop.namespaces == {"shop", "payments"}
    assert shop.types == everything.types  # the rest of the filter is kept
    narrower = RecordFilter(namespaces=frozenset({"shop"}), remote_ports=frozenset({443}))
    assert policy.restrict("shop-team", narrower) == narrower
    with pytest.raises(PolicyDenied, match="kube-system"):
        policy.restrict("shop-team", RecordFilter(namespaces=frozenset({"shop", "kube-system"})))
    with pytest.raises(PolicyDenied, match="not in the collector's policy"):
        policy.restrict("mallory", everything)


def test_policy_default_rule_for_unlisted_consumers() -> None:
    policy = parse_policy(POLICY + '[consumers."*"]\nnamespaces = ["public"]\n')
    assert policy.restrict("mallory", RecordFilter()).namespaces == {"public"}
    assert policy.restrict("oncall", RecordFilter()).namespaces == frozenset()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("consumers = 1", "must be a table"),
        ("[other]", "unknown key"),
        ("[consumers.a]\nnodes = ['x']", "unknown key"),
        ("[consumers.a]\nnamespaces = []", "non-empty list"),
        ("[consumers.a]\nnamespaces = 'shop'", "non-empty list"),
        ("[consumers.a]\nnamespaces = ['']", "non-empty list"),
        ('[consumers."a b"]', "consumer"),
        ("[consumers", "policy"),  # TOML syntax
        ("[consumers]\na = 1", "must be a table"),
    ],
)
def test_bad_policies(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_load_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    assert set(load_policy(path).consumers) == {"oncall", "shop-team"}
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")
