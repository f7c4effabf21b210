"""Pod attribution survives every hop: protobuf both ways, JSON lines, filters."""

from __future__ import annotations

from agent.records.filter import RecordFilter
from agent.records.record import Endpoint, PodRef, Record
from agent.schema.convert import filter_from_pb, filter_to_pb, from_pb, to_pb

POD = PodRef("web-7d9f-x2", "shop", "5b2c-uid", "nginx", {"app": "web", "tier": "front"})


def record(**kw) -> Record:
    base = dict(type="data", ts_ns=1, agent_id="a", seq=1, pid=7, comm="nginx",
                source="openssl", conn_id="c", local=Endpoint("198.18.0.1", 443),
                direction="ingress", len=2, captured_len=2, data=b"hi",
                container_id="ab" * 32, pod=POD)  # fmt: skip
    base.update(kw)
    return Record(**base)


def test_pod_round_trips_through_protobuf() -> None:
    back = from_pb(to_pb(record()))
    assert back.pod == POD and back.container_id == "ab" * 32
    assert from_pb(to_pb(record(pod=None))).pod is None


def test_pod_in_json_lines() -> None:
    out = record().to_json()
    assert out["pod"] == {
        "name": "web-7d9f-x2",
        "namespace": "shop",
        "uid": "5b2c-uid",
        "container": "nginx",
        "labels": {"app": "web", "tier": "front"},
    }
    assert record(pod=None).to_json()["pod"] is None


def test_filters_by_namespace_pod_and_container() -> None:
    flt = RecordFilter(namespaces=frozenset({"shop"}), pods=frozenset({"web-7d9f-x2"}))
    assert filter_from_pb(filter_to_pb(flt)) == flt
    assert flt.matches(record())
    assert not flt.matches(record(pod=None))
    assert not RecordFilter(namespaces=frozenset({"other"})).matches(record())
    assert RecordFilter(container_ids=frozenset({"ab" * 32})).matches(record())
