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

import re
from dataclasses import dataclass

# Header values masked by default; each can be switched off by name.
DEFAULT_HEADERS: frozenset[str] = frozenset(
    {"authorization", "cookie", "set-cookie", "proxy-authorization", "x-api-key"}
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

    @property
    def enabled(self) -> bool:
        """Anything to do at all."""
        return bool(self.header_names or self.regexes)


DEFAULT_RULES = RedactionRules(header_names=DEFAULT_HEADERS)
NO_RULES = RedactionRules()


def header_rule_name(name: str) -> str:
    """What masking a value of header `name` is reported as."""
    return f"header:{name.lower()}"


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
    return RedactionRules(header_names=frozenset(names), regexes=tuple(regexes))
