"""agent.fallback.flow_records: one proxied connection as eBPF-shaped records."""

from __future__ import annotations

import base64
import itertools
import json

import pytest

from agent.fallback.flow_records import SOURCE, FlowIdentity, ProxiedFlow, new_conn_id
from agent.records.record import Endpoint

CLIENT = Endpoint("10.0.0.5", 40001)
SERVER = Endpoint("198.18.0.2", 443)


def fake_clock(start: int = 1_700_000_000_000_000_000):
    ticks = itertools.count(start, 1000)
    return lambda: next(ticks)


def outbound(max_capture: int = 1024, **kw: object) -> ProxiedFlow:
    identity = FlowIdentity("outbound", CLIENT, SERVER, pid=4242, comm="curl")
    return ProxiedFlow(identity, max_capture, clock_ns=fake_clock(), **kw)  # type: ignore[arg-type]


def inbound(max_capture: int = 1024) -> ProxiedFlow:
    identity = FlowIdentity("inbound", CLIENT, Endpoint("192.0.2.1", 8443), pid=77, comm="nginx")
    return ProxiedFlow(identity, max_capture, clock_ns=fake_clock())


def test_outbound_view_is_the_clients() -> None:
    flow = outbound()
    assert (flow.local, flow.remote, flow.role) == (CLIENT, SERVER, "client")
    sent = flow.data(from_client=True, payload=b"GET / HTTP/1.1\r\n\r\n")
    got = flow.data(from_client=False, payload=b"HTTP/1.1 200 OK\r\n\r\n")
    assert sent.direction == "egress"
    assert got.direction == "ingress"
    for record in (sent, got):
        assert record.type == "data"
        assert (record.local, record.remote, record.role) == (CLIENT, SERVER, "client")
        assert record.source == SOURCE == "proxy"
        assert (record.pid, record.tid, record.comm) == (4242, 4242, "curl")


def test_inbound_view_is_the_services() -> None:
    flow = inbound()
    service = Endpoint("192.0.2.1", 8443)
    assert (flow.local, flow.remote, flow.role) == (service, CLIENT, "server")
    request = flow.data(from_client=True, payload=b"request")
    response = flow.data(from_client=False, payload=b"response")
    assert request.direction == "ingress"
    assert response.direction == "egress"
    assert (request.local, request.remote, request.role) == (service, CLIENT, "server")
    assert (request.pid, request.comm) == (77, "nginx")
    assert flow.bytes_moved(from_client=True) == len(b"request")
    assert flow.bytes_moved(from_client=False) == len(b"response")


def test_offsets_advance_per_direction() -> None:
    flow = outbound()
    records = [
        flow.data(True, b"abc"),
        flow.data(False, b"12345"),
        flow.data(True, b"de"),
        flow.data(True, b""),
        flow.data(False, b"6"),
        flow.data(True, b"f"),
    ]
    assert [(r.direction, r.offset, r.len) for r in records] == [
        ("egress", 0, 3),
        ("ingress", 0, 5),
        ("egress", 3, 2),
        ("egress", 5, 0),
        ("ingress", 5, 1),
        ("egress", 5, 1),
    ]
    assert flow.bytes_moved(True) == 6
    assert flow.bytes_moved(False) == 6


def test_truncation_at_max_capture() -> None:
    flow = outbound(max_capture=4)
    short = flow.data(True, b"abcd")
    assert (short.len, short.captured_len, short.truncated, short.data) == (4, 4, False, b"abcd")
    long = flow.data(True, b"0123456789")
    assert (long.len, long.captured_len, long.truncated) == (10, 4, True)
    assert long.data == b"0123"
    assert flow.truncated_bytes == 6
    after = flow.data(True, b"xy")
    assert after.offset == 14  # offsets count the real bytes, not the captured ones
    back = flow.data(False, b"zzzzzz")
    assert (back.offset, back.captured_len, back.truncated) == (0, 4, True)
    assert flow.truncated_bytes == 8


def test_zero_max_capture_keeps_lengths_only() -> None:
    flow = outbound(max_capture=0)
    record = flow.data(True, b"secret")
    assert (record.len, record.captured_len, record.data, record.truncated) == (6, 0, b"", True)


def test_open_and_close_records() -> None:
    flow = outbound()
    opened = flow.opened()
    data = flow.data(True, b"x")
    closed = flow.closed()
    assert (opened.type, closed.type) == ("open", "close")
    assert opened.conn_id == data.conn_id == closed.conn_id == flow.conn_id
    for record in (opened, closed):
        assert record.source == "proxy"
        assert (record.pid, record.tid, record.comm) == (4242, 4242, "curl")
        assert (record.local, record.remote, record.role) == (CLIENT, SERVER, "client")
        assert record.direction is None
        assert record.len == 0
    assert opened.ts_ns < data.ts_ns < closed.ts_ns  # the flow's clock, not time.time_ns


def test_unknown_process_has_empty_identity() -> None:
    flow = ProxiedFlow(FlowIdentity("outbound", CLIENT, SERVER), 16)
    record = flow.opened()
    assert (record.pid, record.comm) == (0, "")


def test_explicit_conn_id_is_used() -> None:
    assert outbound(conn_id="proxy-test-1").opened().conn_id == "proxy-test-1"


def test_new_conn_id_unique_and_prefixed() -> None:
    ids = [new_conn_id(lambda: 0xABC) for _ in range(100)]
    assert len(set(ids)) == 100
    for conn_id in ids:
        assert conn_id.startswith("proxy-")
        assert conn_id.endswith("-abc")
        _prefix, number, _stamp = conn_id.split("-")
        assert number.isdigit()
    flows = {outbound().conn_id for _ in range(10)}
    assert len(flows) == 10
    assert all(c.startswith("proxy-") for c in flows)


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(256))])
def test_data_record_json(payload: bytes) -> None:
    flow = outbound()
    flow.data(True, b"before")
    record = flow.data(True, payload)
    out = json.loads(json.dumps(record.to_json()))
    assert base64.b64decode(out["data_b64"]) == payload
    assert out["type"] == "data"
    assert out["source"] == "proxy"
    assert out["direction"] == "egress"
    assert out["offset"] == 6
    assert out["len"] == out["captured_len"] == len(payload)
    assert out["truncated"] is False
    assert out["local"] == {"ip": CLIENT.ip, "port": CLIENT.port}
    assert out["remote"] == {"ip": SERVER.ip, "port": SERVER.port}
    assert out["role"] == "client"
    assert out["conn_id"] == flow.conn_id


def test_open_record_json_has_no_data_fields() -> None:
    out = outbound().opened().to_json()
    assert out["type"] == "open"
    assert "data_b64" not in out
    assert "direction" not in out
