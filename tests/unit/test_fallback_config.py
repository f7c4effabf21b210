"""agent.fallback.config and agent.cli.proxy_options: proxy settings from flags and TOML."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import textwrap
from pathlib import Path

import pytest

from agent.cli import proxy_options
from agent.cli.proxy_options import (
    add_proxy_arguments,
    collector_excludes,
    proxy_config_from_args,
)
from agent.fallback import config as config_module
from agent.fallback.config import (
    DEFAULT_CA_DIR,
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT,
    ConfigError,
    DestinationPattern,
    InboundService,
    ProxyConfig,
    UpstreamRule,
    config_from_toml,
    parse_cidr,
    parse_client_cert,
    parse_inbound,
    parse_port,
    parse_port_list,
)
from agent.fallback.rules import DEFAULT_PROXY_MARK

# --- ports and networks ----------------------------------------------------------------


def test_parse_port_accepts_text_and_ints() -> None:
    assert parse_port("443") == 443
    assert parse_port(8443) == 8443
    assert parse_port(" 1 ") == 1
    assert parse_port("65535") == 65535


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("https", "'https' is not a port number"),
        ("", "'' is not a port number"),
        ("0", "0 is not in 1..65535"),
        ("65536", "65536 is not in 1..65535"),
        ("-1", "-1 is not in 1..65535"),
    ],
)
def test_parse_port_errors_name_the_setting(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_port(text, "--proxy-port")
    message = str(err.value)
    assert message.startswith("--proxy-port: ")
    assert fragment in message
    assert "\n" not in message


def test_parse_port_rejects_none() -> None:
    with pytest.raises(ConfigError, match="port: None is not a port number"):
        parse_port(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [True, 443.9])
def test_parse_port_rejects_bools_and_floats(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_port(value)  # type: ignore[arg-type]


def test_parse_port_list() -> None:
    assert parse_port_list("443") == (443,)
    assert parse_port_list("443, 8443,443 ,9443,") == (443, 8443, 9443)
    assert parse_port_list("none") == ()
    assert parse_port_list(" NONE ") == ()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "intercept ports: empty list"),
        (" , ,", "intercept ports: empty list"),
        ("443,https", "intercept port: 'https' is not a port number"),
        ("443,70000", "intercept port: 70000 is not in 1..65535"),
    ],
)
def test_parse_port_list_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_port_list(text)
    assert fragment in str(err.value)


def test_parse_cidr_normalises() -> None:
    assert parse_cidr("10.1.2.3/8") == "10.0.0.0/8"
    assert parse_cidr(" 198.18.0.2 ") == "198.18.0.2/32"
    assert parse_cidr("2001:db8::1/32") == "2001:db8::/32"
    assert parse_cidr("::1") == "::1/128"


@pytest.mark.parametrize("text", ["", "nope", "10.0.0.0/33", "300.1.1.1"])
def test_parse_cidr_errors(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_cidr(text)
    assert f"{text!r} is not an IP network (CIDR)" in str(err.value)


def test_bad_cidr_message_names_the_setting() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_toml('exclude_cidrs = ["nope"]', "proxy.toml")
    assert "exclude_cidrs" in str(err.value)


# --- destination patterns --------------------------------------------------------------


def test_pattern_name() -> None:
    p = DestinationPattern.parse(" API.Example.com. ")
    assert (p.text, p.host, p.network, p.port) == (
        "API.Example.com.",
        "api.example.com",
        None,
        None,
    )
    assert p.matches("198.18.0.2", 443, "api.example.com")
    assert p.matches("198.18.0.2", 8443, "api.example.com")  # any port
    assert not p.matches("198.18.0.2", 443, "www.example.com")
    assert not p.matches("198.18.0.2", 443, "sub.api.example.com")


def test_pattern_name_needs_sni() -> None:
    p = DestinationPattern.parse("api.example.com")
    assert not p.matches("198.18.0.2", 443, None)
    # The address is not a substitute for a name, even if it spells the same text.
    assert not DestinationPattern.parse("localhost").matches("127.0.0.1", 443, None)


def test_pattern_wildcard_matches_any_subdomain_only() -> None:
    p = DestinationPattern.parse("*.example.com")
    assert p.host == "*.example.com"
    assert p.matches("198.18.0.2", 443, "sub.example.com")
    assert p.matches("198.18.0.2", 443, "a.b.example.com")
    assert not p.matches("198.18.0.2", 443, "example.com")
    assert not p.matches("198.18.0.2", 443, "badexample.com")
    assert not p.matches("198.18.0.2", 443, "example.com.evil")
    assert not p.matches("198.18.0.2", 443, None)


def test_pattern_ipv4_and_port() -> None:
    p = DestinationPattern.parse("198.18.0.2:8443")
    assert p.network == ipaddress.ip_network("198.18.0.2/32")
    assert p.port == 8443
    assert p.matches("198.18.0.2", 8443, None)
    assert p.matches("198.18.0.2", 8443, "whatever.test")  # addresses ignore the SNI
    assert not p.matches("198.18.0.2", 443, None)  # port mismatch
    assert not p.matches("198.18.0.3", 8443, None)
    assert not p.matches("not-an-ip", 8443, None)


def test_pattern_cidr() -> None:
    p = DestinationPattern.parse("198.18.0.0/16")
    assert p.port is None
    assert p.matches("198.18.255.1", 1, None)
    assert not p.matches("198.19.0.1", 443, None)
    assert not p.matches("::1", 443, None)


def test_pattern_ipv6() -> None:
    bracketed = DestinationPattern.parse("[2001:2::2]:443")
    assert bracketed.network == ipaddress.ip_network("2001:2::2/128")
    assert bracketed.port == 443
    assert bracketed.matches("2001:2::2", 443, None)
    assert not bracketed.matches("2001:2::2", 8443, None)
    assert not bracketed.matches("2001:2::3", 443, None)

    no_port = DestinationPattern.parse("[2001:2::/64]")
    assert no_port.port is None
    assert no_port.matches("2001:2::99", 8443, None)

    bare = DestinationPattern.parse("2001:2::2")  # several colons: no port part
    assert bare.port is None
    assert bare.matches("2001:2::2", 443, None)


def test_pattern_name_with_port() -> None:
    p = DestinationPattern.parse("api.internal:8443")
    assert (p.host, p.port) == ("api.internal", 8443)
    assert p.matches("10.0.0.1", 8443, "api.internal")
    assert not p.matches("10.0.0.1", 443, "api.internal")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[2001:2::2", "unclosed ["),
        ("[2001:2::2]443", "junk after ]"),
        ("[2001:2::2]:0", "0 is not in 1..65535"),
        ("api.test:https", "'https' is not a port number"),
        ("api.test:", "'' is not a port number"),
        (":443", "empty host"),
        ("[]", "empty host"),
        ("", "empty host"),
        ("10.0.0.0/33", "not a name, address or CIDR"),
        ("user@host", "not a name, address or CIDR"),
        ("two words", "not a name, address or CIDR"),
    ],
)
def test_pattern_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        DestinationPattern.parse(text)
    message = str(err.value)
    assert f"destination {text!r}" in message
    assert fragment in message


# --- --inbound and --upstream-client-cert ------------------------------------------------


def test_parse_inbound() -> None:
    assert parse_inbound("8443:/etc/tls/tls.crt:/etc/tls/tls.key") == InboundService(
        8443, Path("/etc/tls/tls.crt"), Path("/etc/tls/tls.key")
    )


@pytest.mark.parametrize("text", ["8443", "8443:a", "8443::k", "8443:c:", "8443:c:k:x", ""])
def test_parse_inbound_shape_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="expected PORT:CERT:KEY") as err:
        parse_inbound(text)
    assert str(err.value).startswith(f"--inbound {text!r}")


def test_parse_inbound_bad_port() -> None:
    with pytest.raises(ConfigError, match=r"^--inbound: 'x' is not a port number"):
        parse_inbound("x:c:k")


def test_parse_client_cert() -> None:
    rule = parse_client_cert("*.corp.test:8443=/etc/c.crt:/etc/c.key")
    assert rule.pattern == DestinationPattern.parse("*.corp.test:8443")
    assert rule.client_cert == Path("/etc/c.crt")
    assert rule.client_key == Path("/etc/c.key")
    assert not rule.insecure
    assert rule.ca is None


@pytest.mark.parametrize(
    "text", ["api.test", "api.test=", "api.test=c.crt", "api.test=:k", "api.test=c:", "=c:k"]
)
def test_parse_client_cert_errors(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_client_cert(text)
    message = str(err.value)
    assert "--upstream-client-cert" in message or "destination" in message


# --- ProxyConfig -------------------------------------------------------------------------


def rule(text: str, **kw: object) -> UpstreamRule:
    return UpstreamRule(DestinationPattern.parse(text), **kw)  # type: ignore[arg-type]


def test_upstream_rule_for_first_match_wins() -> None:
    specific = rule("api.corp.test", insecure=True)
    wildcard = rule("*.corp.test", ca=Path("/corp.pem"))
    network = rule("10.0.0.0/8:8443", client_cert=Path("c"), client_key=Path("k"))
    config = ProxyConfig(upstream_rules=(specific, wildcard, network))
    assert config.upstream_rule_for("10.0.0.1", 8443, "api.corp.test") is specific
    assert config.upstream_rule_for("10.0.0.1", 8443, "db.corp.test") is wildcard
    assert config.upstream_rule_for("10.0.0.1", 8443, None) is network
    assert config.upstream_rule_for("10.0.0.1", 443, None) is None
    assert config.upstream_rule_for("192.0.2.1", 443, "other.test") is None

    reordered = ProxyConfig(upstream_rules=(wildcard, specific))
    assert reordered.upstream_rule_for("10.0.0.1", 443, "api.corp.test") is wildcard


def test_inbound_service_lookup() -> None:
    svc = InboundService(8443, Path("c"), Path("k"))
    config = ProxyConfig(inbound=(svc,))
    assert config.inbound_service(8443) is svc
    assert config.inbound_service(443) is None


def test_with_rule_appends_and_merges_same_pattern() -> None:
    base = ProxyConfig()
    one = base.with_rule(rule("api.test", ca=Path("/a.pem")))
    two = one.with_rule(rule("other.test", insecure=True))
    assert [r.pattern.text for r in two.upstream_rules] == ["api.test", "other.test"]
    assert base.upstream_rules == ()  # frozen: with_rule returns a new config

    merged = two.with_rule(rule("api.test", client_cert=Path("c"), client_key=Path("k")))
    assert len(merged.upstream_rules) == 2
    first = merged.upstream_rules[0]
    assert first.pattern.text == "api.test"
    assert (first.ca, first.client_cert, first.client_key) == (Path("/a.pem"), Path("c"), Path("k"))
    assert not first.insecure

    insecure = merged.with_rule(rule("api.test", insecure=True, ca=Path("/b.pem")))
    first = insecure.upstream_rules[0]
    assert first.insecure
    assert first.ca == Path("/b.pem")  # the later setting wins
    assert first.client_cert == Path("c")  # kept
    # insecure is sticky: a later rule without it does not turn verification back on
    again = insecure.with_rule(rule("api.test"))
    assert again.upstream_rules[0].insecure


def test_intercept_rules_defaults() -> None:
    rules = ProxyConfig().intercept_rules()
    assert rules.outbound_port == DEFAULT_OUTBOUND_PORT
    assert rules.ports == (443,)
    assert rules.cidrs == ()
    assert rules.exclude_cidrs == ()
    assert rules.exclude_loopback is True
    assert rules.mark == DEFAULT_PROXY_MARK
    assert rules.inbound_port is None
    assert rules.inbound_ports == ()


def test_intercept_rules_loopback_mirrors_setting() -> None:
    assert ProxyConfig(intercept_loopback=True).intercept_rules().exclude_loopback is False
    assert ProxyConfig(intercept_loopback=False).intercept_rules().exclude_loopback is True


def test_intercept_rules_extra_excludes_deduplicated() -> None:
    config = ProxyConfig(exclude_cidrs=("10.0.0.0/8", "127.0.0.1/32"))
    rules = config.intercept_rules(("127.0.0.1/32", "10.1.0.0/16", "10.1.0.0/16"))
    assert rules.exclude_cidrs == ("10.0.0.0/8", "127.0.0.1/32", "10.1.0.0/16")


def test_intercept_rules_inbound() -> None:
    services = (
        InboundService(8443, Path("c"), Path("k")),
        InboundService(9443, Path("c"), Path("k")),
    )
    rules = ProxyConfig(inbound=services).intercept_rules()
    assert rules.inbound_port == DEFAULT_INBOUND_PORT
    assert rules.inbound_ports == (8443, 9443)
    assert rules.outbound_port == DEFAULT_OUTBOUND_PORT

    inbound_only = ProxyConfig(ports=(), inbound=services).intercept_rules()
    assert inbound_only.outbound_port is None
    assert inbound_only.inbound_ports == (8443, 9443)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (ProxyConfig(ports=()), "nothing to intercept"),
        (ProxyConfig(ports=(443, DEFAULT_OUTBOUND_PORT)), "would loop"),
        (ProxyConfig(mark=0), "proxy mark"),
        (
            ProxyConfig(inbound=(InboundService(8443, Path("c"), Path("k")),), inbound_port=8443),
            "would loop",
        ),
    ],
)
def test_intercept_rules_invalid_is_config_error(config: ProxyConfig, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        config.intercept_rules()


# --- TOML --------------------------------------------------------------------------------


def docstring_example() -> str:
    doc = config_module.__doc__
    assert doc is not None
    return textwrap.dedent(doc.split("File format:\n", 1)[1])


def test_toml_docstring_example() -> None:
    config = config_from_toml(docstring_example(), "example.toml")
    assert config.ports == (443, 8443)
    assert config.cidrs == ("198.18.0.0/15",)
    assert config.exclude_cidrs == ("198.18.9.0/24",)
    assert config.intercept_loopback is False
    assert config.ca_dir == Path("/var/lib/tlscap/ca")
    assert config.upstream_ca == Path("/etc/ssl/corp-root.pem")
    assert config.upstream_rules == (
        UpstreamRule(
            DestinationPattern.parse("api.internal:8443"),
            client_cert=Path("/etc/tlscap/client.crt"),
            client_key=Path("/etc/tlscap/client.key"),
            insecure=False,
            ca=Path("/etc/tlscap/internal-ca.pem"),
        ),
    )
    assert config.inbound == (
        InboundService(8443, Path("/etc/tls/tls.crt"), Path("/etc/tls/tls.key")),
    )
    # Not in the file: defaults.
    assert config.outbound_port == DEFAULT_OUTBOUND_PORT
    assert config.inbound_port == DEFAULT_INBOUND_PORT
    assert config.mark == DEFAULT_PROXY_MARK
    rules = config.intercept_rules()
    assert rules.inbound_ports == (8443,)
    assert rules.ports == (443, 8443)


def test_toml_empty_is_default() -> None:
    assert config_from_toml("") == ProxyConfig()
    assert ProxyConfig().ca_dir == DEFAULT_CA_DIR


def test_toml_same_match_twice_merges() -> None:
    text = """
        [[upstream]]
        match = "api.test"
        insecure = true

        [[upstream]]
        match = "api.test"
        client_cert = "c.crt"
        client_key = "c.key"

        [[upstream]]
        match = "10.0.0.0/8"
        ca = "ca.pem"
    """
    config = config_from_toml(textwrap.dedent(text))
    assert len(config.upstream_rules) == 2
    first, second = config.upstream_rules
    assert first.insecure
    assert (first.client_cert, first.client_key) == (Path("c.crt"), Path("c.key"))
    assert second.ca == Path("ca.pem")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("intercept_port = [443]", "my.toml: unknown setting(s) intercept_port"),
        ("b = 1\na = 2", "my.toml: unknown setting(s) a, b"),
        (
            '[[upstream]]\nmatch = "x"\nverify = false',
            "my.toml: [[upstream]] #1: unknown setting(s) verify",
        ),
    ],
)
def test_toml_unknown_keys(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_toml(text, "my.toml")
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("intercept_ports = 443", "my.toml: intercept_ports has the wrong type (int)"),
        ('intercept_cidrs = "10.0.0.0/8"', "my.toml: intercept_cidrs has the wrong type (str)"),
        ('exclude_cidrs = "10.0.0.0/8"', "my.toml: exclude_cidrs has the wrong type (str)"),
        ('intercept_loopback = "yes"', "my.toml: intercept_loopback has the wrong type (str)"),
        ("ca_dir = 5", "my.toml: ca_dir has the wrong type (int)"),
        ("upstream_ca = true", "my.toml: upstream_ca has the wrong type (bool)"),
        ('upstream = "api.test"', "my.toml: upstream has the wrong type (str)"),
        ("inbound = 8443", "my.toml: inbound has the wrong type (int)"),
        (
            '[[upstream]]\nmatch = "x"\ninsecure = "yes"',
            "my.toml: [[upstream]] #1: insecure has the wrong type (str)",
        ),
        ('intercept_ports = ["https"]', "intercept_ports: 'https' is not a port number"),
        ("intercept_ports = [0]", "intercept_ports: 0 is not in 1..65535"),
    ],
)
def test_toml_wrong_types(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_toml(text, "my.toml")
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        '[[upstream]]\nmatch = "x"\nca = 5',
        '[[upstream]]\nmatch = "x"\nclient_cert = 5\nclient_key = "k"',
        '[[upstream]]\nmatch = "x"\nclient_cert = "c"\nclient_key = 5',
        '[[inbound]]\nport = 8443\ncert = 5\nkey = "k"',
        '[[inbound]]\nport = 8443\ncert = "c"\nkey = ["k"]',
    ],
)
def test_toml_wrong_path_types_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        config_from_toml(text, "my.toml")


@pytest.mark.parametrize(
    "table",
    [
        'client_cert = "c.crt"',
        'client_key = "c.key"',
        'client_cert = "c.crt"\nclient_key = ""',
    ],
)
def test_toml_client_cert_needs_key(table: str) -> None:
    text = f'[[upstream]]\nmatch = "api.test"\n{table}'
    with pytest.raises(ConfigError) as err:
        config_from_toml(text, "my.toml")
    assert str(err.value) == "my.toml: [[upstream]] #1: client_cert and client_key go together"


def test_toml_upstream_needs_match() -> None:
    text = '[[upstream]]\nmatch = "a.test"\n[[upstream]]\ninsecure = true'
    with pytest.raises(ConfigError) as err:
        config_from_toml(text, "my.toml")
    assert str(err.value) == 'my.toml: [[upstream]] #2: needs a match = "..." destination'
    with pytest.raises(ConfigError, match="needs a match"):
        config_from_toml('upstream = ["api.test"]', "my.toml")


def test_toml_bad_match_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"destination '\[::1': unclosed \["):
        config_from_toml('[[upstream]]\nmatch = "[::1"', "my.toml")


@pytest.mark.parametrize(
    "table",
    [
        'cert = "c"\nkey = "k"',
        'port = 8443\nkey = "k"',
        'port = 8443\ncert = "c"',
    ],
)
def test_toml_inbound_missing_fields(table: str) -> None:
    text = f'[[inbound]]\nport = 1\ncert = "c"\nkey = "k"\n[[inbound]]\n{table}'
    with pytest.raises(ConfigError) as err:
        config_from_toml(text, "my.toml")
    assert str(err.value) == "my.toml: [[inbound]] #2: needs port, cert and key"


def test_toml_inbound_bad_port() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_toml('[[inbound]]\nport = 70000\ncert = "c"\nkey = "k"', "my.toml")
    assert str(err.value) == "my.toml: [[inbound]] #1: 70000 is not in 1..65535"


def test_toml_syntax_error_names_the_source() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_toml("intercept_ports = [443", "/etc/tlscap/proxy.toml")
    message = str(err.value)
    assert message.startswith("/etc/tlscap/proxy.toml: ")
    assert "\n" not in message


# --- command-line flags ------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_proxy_arguments(parser)
    return parser.parse_args(list(argv))


def test_no_flags_give_the_defaults() -> None:
    assert proxy_config_from_args(parse()) == ProxyConfig()


def test_flags_override_and_add_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        textwrap.dedent(
            """
            intercept_ports = [443]
            intercept_cidrs = ["198.18.0.0/15"]
            exclude_cidrs = ["198.18.9.0/24"]
            ca_dir = "/from/file"
            upstream_ca = "/file-ca.pem"

            [[upstream]]
            match = "api.test"
            ca = "/api-ca.pem"

            [[inbound]]
            port = 8443
            cert = "/file.crt"
            key = "/file.key"
            """
        )
    )
    config = proxy_config_from_args(
        parse(
            "--proxy-config",
            str(path),
            "--intercept-ports",
            "8443,9443",
            "--intercept-cidr",
            "10.0.0.0/8",
            "--exclude-cidr",
            "10.9.0.0/16",
            "--intercept-loopback",
            "--ca-dir",
            "/from/flag",
            "--upstream-insecure",
            "api.test",
            "--upstream-insecure",
            "dev.test",
            "--inbound",
            "9000:/flag.crt:/flag.key",
            "--proxy-port",
            "16000",
            "--inbound-proxy-port",
            "16001",
        )
    )
    assert config.ports == (8443, 9443)  # overridden
    assert config.cidrs == ("10.0.0.0/8",)  # overridden
    assert config.exclude_cidrs == ("198.18.9.0/24", "10.9.0.0/16")  # added
    assert config.intercept_loopback is True
    assert config.ca_dir == Path("/from/flag")
    assert config.upstream_ca == Path("/file-ca.pem")  # kept from the file
    assert [r.pattern.text for r in config.upstream_rules] == ["api.test", "dev.test"]
    api = config.upstream_rules[0]
    assert api.insecure and api.ca == Path("/api-ca.pem")  # file rule merged with the flag
    assert [s.port for s in config.inbound] == [8443, 9000]
    assert config.outbound_port == 16000
    assert config.inbound_port == 16001


def test_file_values_survive_when_no_flag_given(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("intercept_ports = [8443]\nintercept_loopback = true\n")
    config = proxy_config_from_args(parse("--proxy-config", str(path)))
    assert config.ports == (8443,)
    assert config.intercept_loopback is True


def test_insecure_and_client_cert_for_same_destination_merge() -> None:
    config = proxy_config_from_args(
        parse(
            "--upstream-insecure",
            "*.dev.test:8443",
            "--upstream-client-cert",
            "*.dev.test:8443=/c.crt:/c.key",
        )
    )
    assert len(config.upstream_rules) == 1
    only = config.upstream_rules[0]
    assert only.insecure
    assert (only.client_cert, only.client_key) == (Path("/c.crt"), Path("/c.key"))
    assert config.upstream_rule_for("10.0.0.1", 8443, "x.dev.test") == only


def test_proxy_mark_accepts_hex() -> None:
    assert proxy_config_from_args(parse("--proxy-mark", "0x10")).mark == 0x10
    assert proxy_config_from_args(parse("--proxy-mark", "17")).mark == 17


def test_intercept_ports_none_with_inbound() -> None:
    config = proxy_config_from_args(
        parse("--intercept-ports", "none", "--inbound", "8443:/c.crt:/c.key")
    )
    rules = config.intercept_rules()
    assert rules.outbound_port is None
    assert rules.inbound_ports == (8443,)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("--proxy-port", "0"), "--proxy-port: 0 is not in 1..65535"),
        (("--inbound-proxy-port", "70000"), "--inbound-proxy-port: 70000 is not in 1..65535"),
        (("--intercept-ports", "https"), "intercept port: 'https' is not a port number"),
        (("--inbound", "8443"), "--inbound '8443': expected PORT:CERT:KEY"),
        (("--upstream-client-cert", "api.test"), "--upstream-client-cert 'api.test'"),
        (("--upstream-insecure", "[::1"), "unclosed ["),
        (("--exclude-cidr", "nope"), "'nope' is not an IP network (CIDR)"),
    ],
)
def test_flag_errors(argv: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        proxy_config_from_args(parse(*argv))
    assert fragment in str(err.value)


def test_missing_config_file_is_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        proxy_config_from_args(parse("--proxy-config", str(tmp_path / "missing.toml")))


def test_bad_config_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("intercept_portz = [443]\n")
    with pytest.raises(ConfigError) as err:
        proxy_config_from_args(parse("--proxy-config", str(path)))
    assert str(err.value) == f"{path}: unknown setting(s) intercept_portz"


# --- the collector's addresses -------------------------------------------------------------


def test_collector_excludes() -> None:
    assert collector_excludes("127.0.0.1:50051") == ("127.0.0.1/32",)
    assert collector_excludes("[::1]:50051") == ("::1/128",)
    assert collector_excludes(None) == ()
    assert collector_excludes("") == ()


def test_collector_excludes_unresolvable(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object, **_kw: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(proxy_options.socket, "getaddrinfo", fail)
    with pytest.raises(ConfigError, match=r"cannot resolve the collector 'collector\.test'"):
        collector_excludes("collector.test:50051")


def test_collector_excludes_are_deduplicated_host_networks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 0)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::5", 0, 0, 0)),
    ]
    seen: list[str] = []

    def fake(host: str, *_args: object, **_kw: object) -> list:
        seen.append(host)
        return infos

    monkeypatch.setattr(proxy_options.socket, "getaddrinfo", fake)
    assert collector_excludes("collector.test:50051") == ("10.0.0.5/32", "2001:db8::5/128")
    assert seen == ["collector.test"]
