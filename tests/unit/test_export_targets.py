"""--collector address handling: parsing, DNS names with several addresses, rotation."""

from __future__ import annotations

import pytest

from agent.cli.main import build_parser
from agent.export.targets import (
    CollectorTargets,
    Endpoint,
    expand,
    parse_collector_addresses,
    split_host_port,
)


def test_one_address_several_flags_and_comma_lists() -> None:
    assert parse_collector_addresses("c1:7300") == ["c1:7300"]
    assert parse_collector_addresses(["c1:7300,c2:7300", " c3:7300 ", "c1:7300"]) == [
        "c1:7300",
        "c2:7300",
        "c3:7300",
    ]
    assert parse_collector_addresses(None) == []
    assert parse_collector_addresses(["[::1]:7300", "127.0.0.1:7300,"]) == [
        "[::1]:7300",
        "127.0.0.1:7300",
    ]


@pytest.mark.parametrize(
    "bad", ["c1", "c1:", ":7300", "c1:port", "c1:0", "c1:70000", "::1:7300", "[zz]:1", ","]
)
def test_malformed_addresses_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_collector_addresses(bad)


def test_split_host_port() -> None:
    assert split_host_port("collector.tlscap.svc:7300") == ("collector.tlscap.svc", 7300)
    assert split_host_port("[fd00::1]:7300") == ("fd00::1", 7300)


def test_a_name_with_several_addresses_is_several_endpoints_checked_by_name() -> None:
    def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("collectors.tlscap.svc", 7300)
        return ["198.18.0.1", "198.18.0.2", "fd00::3"]

    got = expand("collectors.tlscap.svc:7300", resolve)
    assert [e.address for e in got] == ["198.18.0.1:7300", "198.18.0.2:7300", "[fd00::3]:7300"]
    assert all(e.server_name == "collectors.tlscap.svc" for e in got)
    assert got[0].channel_options() == [("grpc.ssl_target_name_override", "collectors.tlscap.svc")]
    assert str(got[0]) == "collectors.tlscap.svc:7300 (198.18.0.1:7300)"


def test_one_address_names_and_literals_are_left_to_grpc() -> None:
    assert expand("c1:7300", lambda h, p: ["198.18.0.1"]) == [Endpoint("c1:7300", "c1:7300")]

    def unresolvable(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    assert expand("c1:7300", unresolvable) == [Endpoint("c1:7300", "c1:7300")]

    def never(host: str, port: int) -> list[str]:
        raise AssertionError("literals are not resolved")

    assert expand("198.18.0.9:7300", never)[0].channel_options() == []


def test_rotation_goes_round_and_resolves_names_again() -> None:
    answers = [["198.18.0.1", "198.18.0.2"], ["198.18.0.2", "198.18.0.3"]]

    def resolve(host: str, port: int) -> list[str]:
        return answers[0] if len(answers) == 1 else answers.pop(0)

    targets = CollectorTargets(["svc:7300", "198.18.1.1:7300"], resolve=resolve, start=0)
    assert len(targets) == 3
    assert targets.current.address == "198.18.0.1:7300"
    assert targets.advance().address == "198.18.0.2:7300"
    assert targets.advance().address == "198.18.1.1:7300"
    # After the last one: the name is resolved again, and the rotation starts over.
    assert [targets.advance().address, targets.advance().address] == [
        "198.18.0.2:7300",
        "198.18.0.3:7300",
    ]
    assert targets.describe() == "svc:7300,198.18.1.1:7300"


def test_the_first_collector_is_spread() -> None:
    firsts = {
        CollectorTargets(["a:1", "b:1", "c:1"], resolve=lambda h, p: []).current.address
        for _ in range(60)
    }
    assert firsts == {"a:1", "b:1", "c:1"}


def test_run_takes_repeated_and_comma_separated_collectors() -> None:
    args = build_parser().parse_args(
        ["run", "--collector", "c1:7300,c2:7300", "--collector", "c3:7300"]
    )
    assert parse_collector_addresses(args.collector) == ["c1:7300", "c2:7300", "c3:7300"]
    single = build_parser().parse_args(["run", "--collector", "c1:7300"])
    assert parse_collector_addresses(single.collector) == ["c1:7300"]
