"""Record (storage and constructor in C, agent/records/_record.c) and the writer's
batch numbering (stamp)."""

from __future__ import annotations

import pytest
from agent.records._record import stamp

from agent.records.record import Endpoint, Record


def test_defaults_and_a_new_list_and_dict_per_record() -> None:
    a, b = Record("data", 1), Record("data", 1)
    assert (a.agent_id, a.seq, a.fd, a.role, a.pod, a.data, a.truncated) == (
        "", 0, -1, "unknown", None, b"", False,
    )  # fmt: skip
    assert a.redactions == [] and a.redactions is not b.redactions
    assert a.stats == {} and a.stats is not b.stats
    assert a == b and a.replace(pid=3) != b and a.replace(pid=3).pid == 3


def test_positional_and_keyword_construction_agree() -> None:
    e = Endpoint("10.0.0.1", 443)
    positional = Record(
        "data", 5, "a", "n", 7, 100, 101, "curl", 9, "cid", None, "openssl", "c1", 4, e, e,
        "client", "egress", 10, 20, 20, False, b"xy",
    )  # fmt: skip
    keywords = Record(
        type="data", ts_ns=5, agent_id="a", node="n", seq=7, pid=100, tid=101, comm="curl",
        cgroup_id=9, container_id="cid", source="openssl", conn_id="c1", fd=4, local=e,
        remote=e, role="client", direction="egress", offset=10, len=20, captured_len=20,
        data=b"xy",
    )  # fmt: skip
    assert positional == keywords
    assert repr(positional).startswith("Record(type='data', ts_ns=5, agent_id='a',")


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "missing required argument 'type'"),
        (("data",), {}, "missing required argument 'ts_ns'"),
        (("data", 1), {"nope": 1}, "unexpected keyword argument 'nope'"),
        (("data", 1), {"type": "open"}, "multiple values for argument 'type'"),
        (tuple(range(28)), {}, "at most 27 arguments"),
    ],
)
def test_bad_construction_is_a_type_error(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        Record(*args, **kwargs)


def test_stamp_numbers_a_batch_and_counts_data_bytes() -> None:
    records = [Record("open", 1), Record("data", 2, captured_len=7), Record("data", 3)]
    records[2].captured_len = 5
    assert stamp(records, "agent-1", "node-a", 4, 3) == 12
    assert [(r.agent_id, r.node, r.seq) for r in records] == [
        ("agent-1", "node-a", 4), ("agent-1", "node-a", 7), ("agent-1", "node-a", 10),
    ]  # fmt: skip
    assert stamp([], "a", "n", 1, 1) == 0


def test_stamp_refuses_what_is_not_a_record() -> None:
    with pytest.raises(TypeError, match="not a Record"):
        stamp([Record("open", 1), object()], "a", "n", 1, 1)
    with pytest.raises(TypeError):
        stamp((Record("open", 1),), "a", "n", 1, 1)


def test_for_call_copies_the_calls_fields_and_computes_the_rest() -> None:
    from agent.events.decode import KernelSocket, TlsCall

    e = Endpoint("10.0.0.1", 443)
    call = TlsCall(
        tgid=7, tid=8, fd=9, ts_mono_ns=10, ssl=11, len=6, offset=12, captured_len=5,
        chunk_off=0, direction="ingress", source="gnutls", comm="wget",
        socket=KernelSocket(0, None, None, "unknown"), data=b"hello", cgroup_id=44,
    )  # fmt: skip
    record = Record.for_call(call, 99, "c1", 3, e, None, "client")
    assert type(record) is Record
    assert record == Record(
        "data", 99, pid=7, tid=8, comm="wget", cgroup_id=44, source="gnutls", conn_id="c1",
        fd=3, local=e, role="client", direction="ingress", offset=12, len=6, captured_len=5,
        truncated=True, data=b"hello",
    )  # fmt: skip
    call.len = 5
    assert not Record.for_call(call, 99, "c1", 3, e, None, "client").truncated
    with pytest.raises(TypeError, match="needs a TlsCall"):
        Record.for_call(object(), 99, "c1", 3, e, None, "client")
    with pytest.raises(TypeError):
        Record.for_call(call, 99, "c1", 3, e, None)


def test_for_exchange_takes_the_connections_identity_and_nothing_else() -> None:
    from agent.l7.exchange import Exchange

    e = Endpoint("10.0.0.1", 443)
    last = Record(
        "data", 5, "a", "n", 7, 100, 101, "curl", 9, "cid", None, "openssl", "c1", 4, e, None,
        "client", "ingress", 10, 20, 20, False, b"xy", "http1", ["header:cookie"],
    )  # fmt: skip
    ex = Exchange("http2")
    record = Record.for_exchange(last, 77, ex)
    assert type(record) is Record
    assert record == Record(
        "exchange", 77, pid=100, tid=101, comm="curl", cgroup_id=9, container_id="cid",
        source="openssl", conn_id="c1", fd=4, local=e, role="client", protocol="http2",
        exchange=ex,
    )  # fmt: skip
    assert record.redactions == [] and record.redactions is not last.redactions
    with pytest.raises(TypeError, match="needs a Record"):
        Record.for_exchange(object(), 1, ex)
    with pytest.raises(AttributeError):
        Record.for_exchange(last, 1, object())


def test_the_documented_fields_are_the_c_fields_in_order() -> None:
    from agent.records._record import FIELDS

    assert tuple(Record.__annotations__) == FIELDS


def test_redactions_and_stats_read_in_python_are_the_record_s_own() -> None:
    """A record starts with a shared empty list and dict (_record.c: own_container),
    which Python code never gets: what it reads it may change, for this record only."""
    a, b = Record("data", 1), Record("data", 1)
    a.redactions.append("bearer")
    a.stats["records"] = 3
    assert (a.redactions, a.stats) == (["bearer"], {"records": 3})
    assert (b.redactions, b.stats) == ([], {})
    assert Record("data", 1).redactions == [] and Record("stats", 1).stats == {}
    assert a != b and a.replace(redactions=[], stats={}) == b
    given = ["x"]
    c = Record("data", 1, redactions=given)
    assert c.redactions is given
    c.redactions = ["y"]
    assert c.redactions == ["y"]
    del c.stats
    with pytest.raises(AttributeError, match="stats"):
        c.stats  # noqa: B018
    with pytest.raises(AttributeError, match="stats"):
        del c.stats


def test_records_reused_from_the_free_list_start_clean() -> None:
    """Dead records are kept for the next ones (_record.c: record_alloc): a reused one
    has only its own fields, its type, and the type's references add up."""
    import sys

    from agent.records import _record

    class WithDict(Record):  # its own memory layout (a __dict__): never kept
        pass

    refs = sys.getrefcount(Record), sys.getrefcount(WithDict)
    for _ in range(3):
        made = [Record("data", i, pid=i, redactions=[str(i)], stats={"n": i}) for i in range(5000)]
        made += [_record.Record("open", 5, comm="x") for _ in range(50)]
        made += [WithDict("close", 6) for _ in range(50)]
        del made
        fresh = [Record("data", 7) for _ in range(5000)]
        base = [_record.Record("exchange", 8) for _ in range(50)]
        assert all(type(r) is Record and r == Record("data", 7) for r in fresh)
        assert all(type(r) is _record.Record and r.type == "exchange" for r in base)
        assert all(r.pid == 0 and r.redactions == [] and r.stats == {} for r in fresh + base)
        del fresh, base
    assert (sys.getrefcount(Record), sys.getrefcount(WithDict)) == refs
