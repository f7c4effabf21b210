"""Exchange records through every form they take: protobuf, JSON, filters, the terminal."""

from __future__ import annotations

import argparse
import json

import pytest

from agent.cli.filter_options import add_filter_arguments, filter_from_args
from agent.l7.exchange import Exchange, GrpcCall, GrpcMessage, HttpMessage
from agent.records.filter import RecordFilter
from agent.records.record import Endpoint, Record
from agent.schema import pb
from agent.schema.convert import SchemaError, filter_from_pb, filter_to_pb, from_pb, to_pb
from agent.sinks.jsonl import encode_record
from agent.sinks.terminal import TerminalSink


def grpc_record() -> Record:
    ex = Exchange(
        protocol="grpc",
        stream_id=3,
        request=HttpMessage(
            ts_ns=100,
            end_ts_ns=150,
            method="POST",
            target="/shop.Cart/Add",
            authority="cart:443",
            version="2",
            headers=[(":method", "POST"), ("authorization", "[REDACTED]")],
            body=b"\x00\x00\x00\x00\x02hi",
            body_len=7,
        ),
        response=HttpMessage(
            ts_ns=200,
            end_ts_ns=3_200_100,
            status=200,
            version="2",
            headers=[(":status", "200")],
            trailers=[("grpc-status", "0")],
            complete=True,
        ),
        grpc=GrpcCall(
            service="shop.Cart",
            method="Add",
            status=0,
            request_messages=[GrpcMessage(False, 2, b"hi")],
        ),
        notes=["a note"],
        redactions=["header:authorization"],
    )
    return Record(
        type="exchange",
        ts_ns=3_200_100,
        agent_id="a",
        seq=9,
        pid=7,
        comm="cart",
        source="gotls",
        conn_id="c1",
        local=Endpoint("10.0.0.1", 5000),
        remote=Endpoint("10.0.0.2", 443),
        role="client",
        protocol="grpc",
        exchange=ex,
    )


def test_exchange_record_round_trips_through_protobuf() -> None:
    r = grpc_record()
    back = from_pb(pb.Record.FromString(to_pb(r).SerializeToString()))
    assert back == r
    assert back.exchange.latency_ns == 3_200_000


def test_unfinished_exchange_round_trips_with_missing_sides() -> None:
    r = grpc_record()
    r.exchange.response = None
    r.exchange.grpc.status = None
    back = from_pb(pb.Record.FromString(to_pb(r).SerializeToString()))
    assert back.exchange.response is None and back.exchange.grpc.status is None
    assert back.exchange.latency_ns is None


def test_exchange_record_without_exchange_is_refused() -> None:
    msg = to_pb(grpc_record())
    msg.ClearField("exchange")
    with pytest.raises(SchemaError):
        from_pb(msg)


def test_data_record_carries_protocol_and_redactions() -> None:
    r = Record(type="data", ts_ns=1, direction="egress", data=b"x", len=1, captured_len=1,
               protocol="http1", redactions=["header:cookie"])  # fmt: skip
    back = from_pb(pb.Record.FromString(to_pb(r).SerializeToString()))
    assert (back.protocol, back.redactions) == ("http1", ["header:cookie"])
    line = json.loads(encode_record(r))
    assert (line["protocol"], line["redactions"]) == ("http1", ["header:cookie"])


def test_exchange_json_line() -> None:
    line = json.loads(encode_record(grpc_record()))
    assert line["type"] == "exchange" and line["protocol"] == "grpc"
    ex = line["exchange"]
    assert ex["latency_ns"] == 3_200_000
    assert ex["request"]["headers"][1] == ["authorization", "[REDACTED]"]
    assert ex["grpc"]["method"] == "Add" and ex["grpc"]["status"] == 0
    assert ex["redactions"] == ["header:authorization"]


def parse_filter(*argv: str) -> RecordFilter:
    p = argparse.ArgumentParser()
    add_filter_arguments(p)
    return filter_from_args(p.parse_args(argv))


def test_filters_match_exchanges_and_round_trip() -> None:
    r = grpc_record()
    yes = [
        parse_filter("--method", "post"),
        parse_filter("--path-prefix", "/shop."),
        parse_filter("--status", "2xx"),
        parse_filter("--status", "200"),
        parse_filter("--grpc-method", "shop.Cart/Add"),
        parse_filter("--grpc-method", "shop.Cart"),
        parse_filter("--protocol", "grpc"),
        parse_filter("--type", "exchange"),
        RecordFilter(),
    ]
    no = [
        parse_filter("--method", "GET"),
        parse_filter("--path-prefix", "/other"),
        parse_filter("--status", "5xx"),
        parse_filter("--grpc-method", "shop.Cart/Remove"),
        parse_filter("--protocol", "http1"),
    ]
    for flt in yes:
        assert flt.matches(r), flt
        assert filter_from_pb(filter_to_pb(flt)) == flt
    for flt in no:
        assert not flt.matches(r), flt
    # Exchange-only filters never select raw records.
    data = Record(type="data", ts_ns=1, direction="egress", protocol="grpc")
    assert not parse_filter("--method", "POST").matches(data)
    assert parse_filter("--protocol", "grpc").matches(data)


def test_bad_status_filter_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        parse_filter("--status", "6xx")


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def render(record: Record, **kw) -> list[str]:
    return TerminalSink(_Stream(), color=False, **kw).render(record)


def test_terminal_one_line_per_exchange_and_detail_levels() -> None:
    r = grpc_record()
    (line, note) = render(r)
    assert "cart[7/0] gotls grpc 10.0.0.1:5000 -> 10.0.0.2:443" in line
    assert "POST cart:443/shop.Cart/Add -> 200 grpc-status=0 3.2 ms" in line
    assert "redacted=header:authorization" in line and "stream=3" in line
    assert "a note" in note
    headers = render(r, detail=1)
    assert "  > authorization: [REDACTED]" in headers
    assert "  < trailer grpc-status: 0" in headers
    bodies = render(r, detail=2)
    assert any("grpc message 0: 2 bytes" in x for x in bodies)
    assert any(x.strip() == "> hi" for x in bodies)


def test_terminal_hides_raw_records_of_parsed_connections_unless_asked() -> None:
    data = Record(type="data", ts_ns=1, direction="egress", protocol="http1", data=b"GET /",
                  len=5, captured_len=5, redactions=["header:cookie"])  # fmt: skip
    assert render(data) == []
    shown = render(data, raw=True)
    assert "redacted=header:cookie" in shown[0]
    unparsed = Record(type="data", ts_ns=1, direction="egress", data=b"hi", len=2, captured_len=2)
    assert render(unparsed)[1] == "  hi"
