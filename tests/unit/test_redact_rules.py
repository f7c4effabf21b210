"""Redaction rules from configuration, and the length-preserving regex masking."""

from __future__ import annotations

import re

import pytest

from agent.redact.payload import mask_regexes
from agent.redact.rules import (
    DEFAULT_HEADERS,
    DEFAULT_QUERY_PARAMS,
    DEFAULT_RULES,
    RedactionConfigError,
    RedactionRules,
    RegexRule,
    build_rules,
    mask_query_values,
)


def test_defaults() -> None:
    expected = {"authorization", "cookie", "set-cookie", "proxy-authorization", "x-api-key"}
    assert expected < DEFAULT_HEADERS
    credential_headers = {"x-auth-token", "x-amz-security-token", "x-vault-token"}
    assert (
        credential_headers | {"private-token", "x-csrf-token", "x-goog-api-key"} < DEFAULT_HEADERS
    )
    assert {"access_token", "token", "x-amz-signature", "sig", "password"} < DEFAULT_QUERY_PARAMS
    rules = build_rules([], [], [])
    assert rules == DEFAULT_RULES and rules.enabled and rules.regexes == ()
    assert rules.query_params == DEFAULT_QUERY_PARAMS


def test_query_values_masked_at_the_same_length() -> None:
    target = b"/s3/o?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&keep=1&Token=t#frag"
    masked, hits = mask_query_values(target, DEFAULT_QUERY_PARAMS)
    assert masked == b"/s3/o?X-Amz-Credential=********&X-Amz-Signature=******&keep=1&Token=*#frag"
    assert hits == {"query:x-amz-credential", "query:x-amz-signature", "query:token"}
    # Only whole parameter names after a separator: not "mytoken=", not a path.
    assert mask_query_values(b"/token=x?mytoken=y&a=b", DEFAULT_QUERY_PARAMS) == (
        b"/token=x?mytoken=y&a=b",
        set(),
    )


def test_extra_and_disabled_headers_are_lowercased() -> None:
    rules = build_rules(["X-My-Token", " x-session "], ["Cookie", "SET-COOKIE"], [])
    assert rules.header_names == (DEFAULT_HEADERS - {"cookie", "set-cookie"}) | {
        "x-my-token",
        "x-session",
    }
    # Disabling a name that is not a rule is harmless.
    assert build_rules([], ["x-nothing"], []).header_names == DEFAULT_HEADERS


def test_all_headers_off_and_no_regex_is_not_enabled() -> None:
    rules = build_rules([], sorted(DEFAULT_HEADERS), [])
    assert rules.header_names == frozenset() and rules.enabled  # the query rules remain
    assert not RedactionRules(header_names=frozenset()).enabled
    assert RedactionRules(regexes=(RegexRule("a", re.compile(b"a")),)).enabled


def test_disabled_means_no_rules_but_still_validates() -> None:
    rules = build_rules(["x-a"], [], ["card=\\d{16}"], disabled=True)
    assert not rules.enabled
    with pytest.raises(RedactionConfigError):
        build_rules([], [], ["bad=("], disabled=True)


def test_regex_specs_named_and_unnamed() -> None:
    rules = build_rules([], [], [r"card=\d{16}", r"sk_live_\w+", r"(?i)pass(word)?=\S+", "a.b=x"])
    assert [r.name for r in rules.regexes] == ["card", "regex1", "regex2", "a.b"]
    assert rules.regexes[0].pattern.pattern == rb"\d{16}"
    assert rules.regexes[2].pattern.pattern == rb"(?i)pass(word)?=\S+"
    assert rules.regexes[0].rule_name == "regex:card"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regex_specs": ["=abc"]}, "empty rule name"),
        ({"regex_specs": ["card="]}, "empty pattern"),
        ({"regex_specs": [""]}, "empty pattern"),
        ({"regex_specs": ["card=(\\d"]}, "bad redaction regex 'card'"),
        ({"regex_specs": ["[a-"]}, "bad redaction regex 'regex1'"),
        ({"regex_specs": ["a=x", "a=y"]}, "two redaction regexes named 'a'"),
        ({"extra_headers": [""]}, "empty header name"),
        ({"extra_headers": ["bad header"]}, "invalid header name"),
        ({"disabled_headers": ["bad:name"]}, "invalid header name"),
    ],
)
def test_config_errors_are_one_line(kwargs: dict, message: str) -> None:
    args = {"extra_headers": [], "disabled_headers": [], "regex_specs": [], **kwargs}
    with pytest.raises(RedactionConfigError) as err:
        build_rules(**args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_rules_are_frozen() -> None:
    with pytest.raises(AttributeError):
        DEFAULT_RULES.header_names = frozenset()  # type: ignore[misc]


# -- mask_regexes --------------------------------------------------------------


def rules(*specs: str) -> tuple[RegexRule, ...]:
    return build_rules([], [], list(specs)).regexes


def test_matches_masked_at_the_same_length() -> None:
    data = b"card 4111111111111111 and 5500000000000004, key sk_live_abc"
    out, hits = mask_regexes(data, rules(r"card=\d{16}", r"key=sk_live_\w+"))
    assert out == b"card **************** and ****************, key ***********"
    assert hits == {"regex:card", "regex:key"}


def test_no_match_returns_the_input_and_no_hits() -> None:
    data = b"nothing here"
    out, hits = mask_regexes(data, rules(r"card=\d{16}"))
    assert out is data and hits == set()
    assert mask_regexes(data, ()) == (data, set())


def test_zero_length_matches_are_ignored() -> None:
    out, hits = mask_regexes(b"abc", rules(r"empty=x*"))
    assert out == b"abc" and hits == set()
    out, hits = mask_regexes(b"abxxc", rules(r"empty=x*"))
    assert out == b"ab**c" and hits == {"regex:empty"}


def test_rules_apply_in_order_to_binary_data() -> None:
    data = bytes(range(256)) + b"token=abc\x00\xff"
    out, hits = mask_regexes(data, rules(r"t=token=\w+", r"star=\*{3}"))
    assert len(out) == len(data)
    assert out.endswith(b"*********\x00\xff")
    assert hits == {"regex:t", "regex:star"}
