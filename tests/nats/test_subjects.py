"""Subjects and message ids of records in the stream (pure)."""

from __future__ import annotations

import pytest

from agent.collector.jetstream.config import NatsConfig, NatsConfigError, parse_servers
from agent.collector.jetstream.subjects import (
    filter_subjects,
    msg_id,
    subject_for,
    token,
    untoken,
)
from agent.records.filter import RecordFilter
from agent.records.record import PodRef, Record


@pytest.mark.parametrize(
    ("name", "tok"),
    [
        ("node-1", "node-1"),
        ("ip-10-0-0-1.ec2.internal", "ip-10-0-0-1%2Eec2%2Einternal"),
        ("a b*c>d", "a%20b%2Ac%3Ed"),
        ("", "_"),
        ("_", "%5F"),
        ("50%", "50%25"),
        ("nœud", "n%C5%93ud"),
    ],
)
def test_token_escapes_what_breaks_subjects_and_round_trips(name: str, tok: str) -> None:
    assert token(name) == tok
    assert untoken(tok) == name


def test_subject_of_a_record() -> None:
    rec = Record(type="data", ts_ns=1, node="n.1", pod=PodRef("web", "shop"))
    assert subject_for(rec) == "tlscap.v1.n%2E1.shop.data"
    host = Record(type="stats", ts_ns=1, node="n1")
    assert subject_for(host, "x.y") == "x.y.n1._.stats"


def test_msg_id_is_agent_id_and_seq() -> None:
    assert msg_id("agent-a", 7) == "agent-a:7"
    assert msg_id("a:b", 7) == "a:b:7"  # split at the last ':'
    assert msg_id("a\r\nb%", 1) == "a%0D%0Ab%25:1"


def test_filter_subjects() -> None:
    everything = RecordFilter(types=frozenset({"data", "open", "close", "stats", "exchange"}))
    assert filter_subjects(everything) == ["tlscap.v1.>"]
    # The default types leave out stats: four subjects.
    assert filter_subjects(RecordFilter()) == [
        f"tlscap.v1.*.*.{t}" for t in ("data", "open", "close", "exchange")
    ]
    flt = RecordFilter(
        nodes=frozenset({"n1", "n.2"}),
        namespaces=frozenset({"shop"}),
        types=frozenset({"open"}),
    )
    assert filter_subjects(flt) == ["tlscap.v1.n%2E2.shop.open", "tlscap.v1.n1.shop.open"]


def test_filter_subjects_widen_the_largest_dimension_past_the_limit() -> None:
    flt = RecordFilter(nodes=frozenset(f"n{i}" for i in range(100)), types=frozenset({"data"}))
    assert filter_subjects(flt) == ["tlscap.v1.*.*.data"]


def test_parse_servers() -> None:
    assert parse_servers("nats://h1:4222,h2,h3:5222") == (
        "nats://h1:4222",
        "nats://h2:4222",
        "nats://h3:5222",
    )
    assert parse_servers("tls://h1") == ("tls://h1:4222",)
    with pytest.raises(NatsConfigError):
        parse_servers("http://h1")
    with pytest.raises(NatsConfigError, match="no credentials"):
        parse_servers("nats://user:pw@h1")


def test_plaintext_nats_needs_an_explicit_opt_in() -> None:
    with pytest.raises(NatsConfigError, match="--nats-insecure"):
        NatsConfig(servers=("nats://h1:4222",)).check()
    NatsConfig(servers=("nats://h1:4222",), insecure=True).check()
    assert NatsConfig(servers=("tls://h1:4222",)).check().use_tls


def test_dedup_window_never_exceeds_the_retention() -> None:
    cfg = NatsConfig(servers=("tls://h",), max_age=60.0, dedup_window=900.0)
    assert cfg.effective_dedup_window == 60.0
