"""What gets redacted: sensitive header names and payload regexes, validated once.

Captured plaintext routinely carries credentials (bearer tokens, session cookies,
API keys).  Every record passes the redaction stage before it reaches a sink, and
that stage only needs a small immutable description of the rules -- built here
from the command line / config file, with a clear one-line error for anything
that cannot work (a regex that does not compile, a rule without a name), so a
typo fails at start-up instead of silently leaking secrets later.

Rule names are what redacted records and exchanges report ("header:cookie",
"regex:card"), so a reader can tell which rule changed what.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Header values masked by default; each can be switched off by name.  Beyond the
# standard ones: headers that carry a bearer credential or session-bound token in
# widely deployed software -- AWS (STS session token), HashiCorp Vault, GitLab
# (private and CI job tokens), Google APIs, OpenStack/Keystone and many APIs
# (x-auth-token), OAuth2 proxies (x-forwarded-access-token), and the CSRF tokens
# web frameworks bind to a session.
DEFAULT_HEADERS: frozenset[str] = frozenset(
    {
        "authorization",
        "cookie",
        "set-cookie",
        "proxy-authorization",
        "x-api-key",
        "x-auth-token",
        "x-access-token",
        "x-amz-security-token",
        "x-vault-token",
        "x-goog-api-key",
        "private-token",
        "job-token",
        "x-csrf-token",
        "x-xsrf-token",
        "x-forwarded-access-token",
    }
)

# Query parameters (of request targets, and of any "?"/"&"-separated text in an
# HTTP/1 stream) whose values are masked by default: OAuth 2.0 tokens in URLs
# (RFC 6750 section 2.3, OpenID Connect), API keys, AWS SigV4 and Google V4
# presigned URLs, Azure SAS signatures ("sig"), passwords in form-style queries.
DEFAULT_QUERY_PARAMS: frozenset[str] = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "api_key",
        "apikey",
        "client_secret",
        "password",
        "passwd",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
    }
)

# An HTTP header name (RFC 9110 token characters), or an HTTP/2 pseudo-header.
_TOKEN = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The NAME of a "NAME=PATTERN" regex spec.
_RULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class RedactionConfigError(ValueError):
    """A redaction rule that cannot be used; the message is one line, for the user."""


@dataclass(frozen=True)
class RegexRule:
    """A payload regex: every match is replaced, byte for byte, with b"*"."""

    name: str
    pattern: re.Pattern[bytes]

    @property
    def rule_name(self) -> str:
        """What a redaction by this rule is reported as."""
        return f"regex:{self.name}"


@dataclass(frozen=True)
class RedactionRules:
    header_names: frozenset[str] = frozenset()  # lower-case
    regexes: tuple[RegexRule, ...] = ()
    query_params: frozenset[str] = frozenset()  # lower-case

    @property
    def enabled(self) -> bool:
        """Anything to do at all."""
        return bool(self.header_names or self.regexes or self.query_params)


DEFAULT_RULES = RedactionRules(header_names=DEFAULT_HEADERS, query_params=DEFAULT_QUERY_PARAMS)
NO_RULES = RedactionRules()


def header_rule_name(name: str) -> str:
    """What masking a value of header `name` is reported as."""
    return f"header:{name.lower()}"


def query_rule_name(name: str) -> str:
    """What masking a value of query parameter `name` is reported as."""
    return f"query:{name.lower()}"


# A query value ends at the next separator, fragment, whitespace or quote.
_QUERY_VALUE_END = rb"&#;\s\"'<>"


@functools.lru_cache(maxsize=16)
def query_pattern(names: frozenset[str]) -> re.Pattern[bytes] | None:
    """`[?&;]NAME=VALUE` for any of `names` (case-insensitive): group 1 the name,
    group 2 the value (possibly empty, possibly cut by the end of the text)."""
    if not names:
        return None
    alternatives = b"|".join(
        re.escape(n.encode("latin-1")) for n in sorted(names, key=len, reverse=True)
    )
    # A look-ahead on the names' first letters turns most separators away before
    # the case-insensitive alternation is tried (~20% less on binary bodies).
    first = {c for n in names for c in (n[:1].lower(), n[:1].upper())}
    lead = rb"(?=[" + b"".join(re.escape(c.encode("latin-1")) for c in sorted(first)) + rb"])"
    return re.compile(
        rb"[?&;]" + lead + rb"((?i:" + alternatives + rb"))=([^" + _QUERY_VALUE_END + rb"]*)"
    )


def mask_query_values(data: bytes, names: frozenset[str]) -> tuple[bytes, set[str]]:
    """`data` with the values of the query parameters `names` replaced by as many
    b"*" (same length), and the rules ("query:NAME") that matched."""
    pattern = query_pattern(names)
    if pattern is None:
        return data, set()
    out: bytearray | None = None
    hits: set[str] = set()
    for m in pattern.finditer(data):
        start, end = m.span(2)
        if end > start:
            if out is None:
                out = bytearray(data)
            out[start:end] = b"*" * (end - start)
            hits.add(query_rule_name(m.group(1).decode("latin-1")))
    return (data if out is None else bytes(out)), hits


def _header_name(raw: str, what: str) -> str:
    name = raw.strip().lower()
    if not name:
        raise RedactionConfigError(f"empty header name in {what}")
    if not _TOKEN.fullmatch(name):
        raise RedactionConfigError(f"invalid header name {raw!r} in {what}")
    return name


def _parse_regex_spec(spec: str, unnamed: int) -> tuple[RegexRule, bool]:
    """ "NAME=PATTERN", or a bare PATTERN (named "regex<unnamed + 1>").

    The text before the first "=" is taken as a name when it looks like one
    (letters, digits, "_", ".", "-"); a pattern that itself contains "=" after
    such a prefix must therefore be given a name.  Returns the rule and whether
    the spec named it.
    """
    name, sep, pattern = spec.partition("=")
    if sep and name == "":
        raise RedactionConfigError(f"empty rule name in redaction regex {spec!r}")
    named = bool(sep and _RULE_NAME.fullmatch(name))
    if not named:
        name, pattern = f"regex{unnamed + 1}", spec
    if not pattern:
        raise RedactionConfigError(f"empty pattern in redaction regex {spec!r}")
    try:
        compiled = re.compile(pattern.encode("utf-8"))
    except re.error as err:
        msg = str(err).splitlines()[0] if str(err) else "invalid"
        raise RedactionConfigError(f"bad redaction regex {name!r} ({pattern!r}): {msg}") from None
    return RegexRule(name, compiled), named


def build_rules(
    extra_headers: list[str],
    disabled_headers: list[str],
    regex_specs: list[str],
    disabled: bool = False,
) -> RedactionRules:
    """The rules from configuration: defaults plus `extra_headers`, minus
    `disabled_headers`, plus one RegexRule per spec.  `disabled`: no redaction
    at all (the specs are still validated, so a bad config never slips through).

    Raises RedactionConfigError for an empty or invalid header name, a regex that
    does not compile, an empty name or pattern, or two regex rules of one name.
    """
    names = set(DEFAULT_HEADERS)
    names.update(_header_name(h, "redaction headers") for h in extra_headers)
    names.difference_update(_header_name(h, "disabled redaction headers") for h in disabled_headers)
    regexes: list[RegexRule] = []
    seen: set[str] = set()
    unnamed = 0
    for spec in regex_specs:
        rule, named = _parse_regex_spec(spec, unnamed)
        unnamed += not named
        if rule.name in seen:
            raise RedactionConfigError(f"two redaction regexes named {rule.name!r}")
        seen.add(rule.name)
        regexes.append(rule)
    if disabled:
        return NO_RULES
    return RedactionRules(
        header_names=frozenset(names), regexes=tuple(regexes), query_params=DEFAULT_QUERY_PARAMS
    )
