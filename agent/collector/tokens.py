"""Per-node agent identity from projected ServiceAccount tokens, checked with TokenReview.

The agent sends its pod's projected token (audience `tlscap-collector`) as call
metadata `authorization: Bearer <token>`. The collector (`--token-review`) asks the
API server about it (POST /apis/authentication.k8s.io/v1/tokenreviews, with the
collector's own credentials: ClusterRole system:auth-delegator). A token is the
identity `tlscap://agent/<node>` only if the review says all of:

- authenticated, for our audience (status.audiences must name it: an API server that
  does not check audiences would return none, and is not trusted);
- user `system:serviceaccount:<namespace>:<agent service account>`;
- user.extra["authentication.kubernetes.io/node-name"]: the node of the pod the token
  is bound to (Kubernetes >= 1.30). Without it (an older cluster, or a token not bound
  to a pod) the token is refused: no fallback to "any node".

Results are cached, keyed by the token's SHA-256 (never the token): positive ones for
`ttl` seconds at most and never past the token's own expiry (its JWT `exp`, read
without verification only to shorten the cache), negative ones for `negative_ttl`.
The cache is bounded (oldest entries go first). An API server that cannot be asked
is not an answer: TokenReviewUnavailable, nothing cached.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.certs.identity import AGENT, Identity, IdentityError, check_name
from agent.k8s.api import ApiConnectionError, ApiError, ConfigError, KubeApi

log = logging.getLogger(__name__)

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
DEFAULT_AUDIENCE = "tlscap-collector"
DEFAULT_AGENT_SERVICE_ACCOUNT = "tlscap:tlscap-agent"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
MAX_TOKEN_BYTES = 16 * 1024  # projected tokens are ~1 KiB; more is not a token


class TokenReviewUnavailable(Exception):
    """The API server could not review the token (down, refused us, answered garbage)."""


@dataclass(frozen=True)
class TokenVerdict:
    """What a token stands for: an agent identity, or why not.

    `unauthenticated`: the token itself is not good (unknown, expired, wrong audience);
    otherwise a refusal means it is good but names no agent of a node."""

    identity: Identity | None
    error: str = ""
    unauthenticated: bool = False
    expires_at: float | None = None  # wall clock (the JWT's exp), when known


def parse_service_account(text: str) -> str:
    """`NAMESPACE:NAME` or `system:serviceaccount:NAMESPACE:NAME` -> the full user name."""
    rest = text.removeprefix(SERVICE_ACCOUNT_PREFIX)
    namespace, sep, name = rest.partition(":")
    if not sep or not namespace or not name or ":" in name:
        raise ValueError(
            f"{text!r}: expected NAMESPACE:NAME (or system:serviceaccount:NAMESPACE:NAME)"
        )
    return f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def token_expiry(token: str) -> float | None:
    """The JWT's `exp` claim (seconds since the epoch), unverified; None if unreadable."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` call metadata entry, if any.

    Returns "" for an authorization entry that is not a usable bearer token."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_BYTES:
            return ""
        return token
    return None


class TokenReviewer:
    """Reviews agents' tokens with the API server; thread-safe, cached (see module doc)."""

    def __init__(
        self,
        api: KubeApi,
        *,
        audience: str = DEFAULT_AUDIENCE,
        agent_service_account: str = DEFAULT_AGENT_SERVICE_ACCOUNT,
        ttl: float = 60.0,
        negative_ttl: float = 10.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.audience = audience
        self.agent_user = parse_service_account(agent_service_account)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, TokenVerdict]] = OrderedDict()
        self.reviews = 0  # calls to the API server
        self.cache_hits = 0

    def review(self, token: str) -> TokenVerdict:
        """The verdict on `token`; TokenReviewUnavailable if the API cannot say."""
        key = token_digest(token)
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                if hit[0] > now:
                    self._cache.move_to_end(key)
                    self.cache_hits += 1
                    return hit[1]
                del self._cache[key]
        expires_at = token_expiry(token)
        if expires_at is not None and expires_at <= now:
            # Not worth a round trip: the API server would say the same.
            verdict = TokenVerdict(None, "the token has expired", unauthenticated=True)
        else:
            verdict = self._ask(token, expires_at)
        until = now + (self.ttl if verdict.identity is not None else self.negative_ttl)
        if expires_at is not None:
            until = min(until, expires_at)
        if until > now:
            with self._lock:
                self._cache[key] = (until, verdict)
                self._cache.move_to_end(key)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return verdict

    def _ask(self, token: str, expires_at: float | None) -> TokenVerdict:
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        with self._lock:
            self.reviews += 1
        try:
            reply = self.api.create(TOKEN_REVIEW_PATH, request)
        except ApiError as exc:
            # 401/403 here are about the collector's own credential (no
            # system:auth-delegator binding?), never about the agent's token.
            raise TokenReviewUnavailable(
                f"the API server refused the collector's TokenReview: {_scrub(str(exc), token)}"
            ) from None
        except (ApiConnectionError, ConfigError) as exc:
            raise TokenReviewUnavailable(
                f"cannot reach the API server for a TokenReview: {_scrub(str(exc), token)}"
            ) from None
        return self._verdict(reply, token, expires_at)

    def _verdict(self, reply: dict[str, Any], token: str, expires_at: float | None) -> TokenVerdict:
        status = reply.get("status")
        if not isinstance(status, dict):
            raise TokenReviewUnavailable("the API server's TokenReview reply has no status")
        if status.get("authenticated") is not True:
            why = _scrub(str(status.get("error") or "token not authenticated"), token)
            return TokenVerdict(
                None, f"the API server did not accept the token: {why}", unauthenticated=True
            )
        audiences = status.get("audiences")
        if not isinstance(audiences, list) or self.audience not in audiences:
            return TokenVerdict(
                None,
                f"the token is not for audience {self.audience!r} (the review names {audiences!r})",
                unauthenticated=True,
            )
        user = status.get("user") if isinstance(status.get("user"), dict) else {}
        username = str(user.get("username") or "")
        if username != self.agent_user:
            return TokenVerdict(
                None,
                f"token of {username or 'an unnamed user'!r}; only {self.agent_user!r} "
                "(the agents' ServiceAccount) may send records",
            )
        extra = user.get("extra") if isinstance(user.get("extra"), dict) else {}
        nodes = extra.get(NODE_NAME_EXTRA)
        if not isinstance(nodes, list) or len(nodes) != 1 or not isinstance(nodes[0], str):
            return TokenVerdict(
                None,
                f"the token names no node ({NODE_NAME_EXTRA} is missing: Kubernetes < 1.30, "
                "or not a pod-bound projected token); refused, there is no node-less agent "
                "token",
            )
        try:
            node = check_name(nodes[0], "node name")
        except IdentityError as exc:
            return TokenVerdict(None, f"the token's {exc}")
        return TokenVerdict(Identity(AGENT, node), expires_at=expires_at)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"token_reviews": self.reviews, "token_review_cache_hits": self.cache_hits}


def _scrub(text: str, token: str) -> str:
    """Never pass a token on: an API server (or proxy) might echo it in an error."""
    return text.replace(token, "<token>") if token else text
