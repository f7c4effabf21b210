"""TokenReviewer against the fake API server over real loopback HTTP(S): what a
review decides, what is cached (by the token's hash), and an API server that is down."""

from __future__ import annotations

import time

import pytest

from agent.certs.identity import Identity
from agent.collector.tokens import (
    TokenReviewer,
    TokenReviewUnavailable,
    bearer_token,
    parse_service_account,
    token_digest,
    token_expiry,
)
from agent.k8s.api import ApiConfig, KubeApi
from tests.k8s.fake_apiserver import FakeApiServer, free_port

COLLECTOR_TOKEN = "collector-sa-token"


@pytest.fixture
def api_server():
    with FakeApiServer(token=COLLECTOR_TOKEN, tls=True) as server:
        yield server


def reviewer(server: FakeApiServer, **kwargs) -> TokenReviewer:
    config = ApiConfig(server=server.url, token=COLLECTOR_TOKEN, ca_data=server.ca_pem)
    return TokenReviewer(KubeApi(config, connect_timeout=2, read_timeout=5), **kwargs)


def test_an_agent_token_is_the_agent_of_its_node(api_server):
    token = api_server.add_token("tlscap", "tlscap-agent", node="node-a")
    verdict = reviewer(api_server).review(token)
    assert verdict.identity == Identity("agent", "node-a")
    assert verdict.expires_at == pytest.approx(time.time() + 3600, abs=5)
    (request,) = api_server.token_reviews()
    # The collector asks with its own credential, for its audience only.
    assert request.headers["authorization"] == f"Bearer {COLLECTOR_TOKEN}"
    assert request.body["spec"] == {"token": token, "audiences": ["tlscap-collector"]}


@pytest.mark.parametrize(
    ("make", "unauthenticated", "words"),
    [
        (lambda s: "not-a-known-token", True, "invalid bearer token"),
        (lambda s: s.add_token("tlscap", "tlscap-agent", node="a", ttl=-5), True, "expired"),
        (
            lambda s: s.add_token("tlscap", "tlscap-agent", node="a", audiences=["other"]),
            True,
            "invalid for the target audiences",
        ),
        (lambda s: s.add_token("shop", "default", node="a"), False, "only"),
        (lambda s: s.add_token("tlscap", "tlscap-agent", node=None), False, "names no node"),
    ],
    ids=["unknown", "expired", "audience", "other-service-account", "no-node-name"],
)
def test_everything_else_is_refused(api_server, make, unauthenticated, words):
    verdict = reviewer(api_server).review(make(api_server))
    assert verdict.identity is None
    assert verdict.unauthenticated is unauthenticated
    assert words in verdict.error


def test_the_agent_service_account_is_configurable(api_server):
    token = api_server.add_token("obs", "capture", node="n9")
    assert reviewer(api_server).review(token).identity is None
    other = reviewer(api_server, agent_service_account="obs:capture")
    assert other.review(token).identity == Identity("agent", "n9")
    with pytest.raises(ValueError):
        parse_service_account("just-a-name")
    assert parse_service_account("system:serviceaccount:a:b") == "system:serviceaccount:a:b"


def test_results_are_cached_by_hash_with_bounded_ttl_and_size(api_server):
    clock = [time.time()]
    r = reviewer(api_server, ttl=60, negative_ttl=10, max_entries=2, clock=lambda: clock[0])
    good = api_server.add_token("tlscap", "tlscap-agent", node="a", ttl=30)
    for _ in range(3):
        assert r.review(good).identity == Identity("agent", "a")
        assert r.review("bogus").identity is None
    assert len(api_server.token_reviews()) == 2  # one each, the rest from the cache
    assert r.stats() == {"token_reviews": 2, "token_review_cache_hits": 4}
    # The cache never holds a token, only its hash.
    assert set(r._cache) == {token_digest(good), token_digest("bogus")}
    assert all(good not in repr(v) for v in r._cache.values())
    # Negative results expire first; positive ones at the token's expiry (30 s), not 60.
    clock[0] += 11
    r.review("bogus")
    r.review(good)
    assert len(api_server.token_reviews()) == 3
    clock[0] += 20  # past the token's exp: not even asked
    verdict = r.review(good)
    assert verdict.identity is None and "expired" in verdict.error
    assert len(api_server.token_reviews()) == 3
    # Bounded: two entries at most.
    for i in range(5):
        r.review(f"bogus-{i}")
    assert len(r._cache) <= 2


def test_revocation_is_seen_once_the_cache_entry_ages_out(api_server):
    clock = [time.time()]
    r = reviewer(api_server, ttl=5, clock=lambda: clock[0])
    token = api_server.add_token("tlscap", "tlscap-agent", node="a")
    assert r.review(token).identity is not None
    api_server.revoke_token(token)  # the pod was deleted
    assert r.review(token).identity is not None  # cached
    clock[0] += 6
    assert r.review(token).identity is None


def test_api_server_down_or_refusing_the_collector_is_unavailable(api_server):
    token = api_server.add_token("tlscap", "tlscap-agent", node="a")
    down = ApiConfig(server=f"https://127.0.0.1:{free_port()}", token="x")
    with pytest.raises(TokenReviewUnavailable, match="cannot reach the API server") as err:
        TokenReviewer(KubeApi(down, connect_timeout=1)).review(token)
    assert token not in str(err.value)
    # No system:auth-delegator binding: the collector's problem, not the agent's token's.
    api_server.deny_token_reviews = True
    r = reviewer(api_server)
    with pytest.raises(TokenReviewUnavailable, match="forbidden"):
        r.review(token)
    api_server.deny_token_reviews = False
    # Nothing was cached from the failures.
    assert r.review(token).identity == Identity("agent", "a")
    # The caller's own bearer token is checked by the (fake) API server too.
    wrong = ApiConfig(server=api_server.url, token="not-the-collector", ca_data=api_server.ca_pem)
    with pytest.raises(TokenReviewUnavailable, match="401"):
        TokenReviewer(KubeApi(wrong)).review(token)


def test_token_helpers():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1")]) is None
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("authorization", "Bearer ")]) == ""
    with FakeApiServer() as server:
        token = server.add_token("tlscap", "tlscap-agent", node="a", ttl=100)
    assert token_expiry(token) == pytest.approx(time.time() + 100, abs=5)
    assert token_expiry("not.a.jwt!") is None
    assert token_expiry("opaque") is None
