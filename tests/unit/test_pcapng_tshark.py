"""The pcapng sink and `tlscap export --pcapng`, checked with the real tshark:
HTTP/1.1 keep-alive with a chunked response, HTTP/2 (gRPC) made with the h2 library,
comments, checksums, lost-segment analysis, IPv6, reading a file still being written."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent.records.record import Endpoint, Record
from agent.sinks.base import OutputError
from agent.sinks.pcapng import PcapngSink

TSHARK = shutil.which("tshark") or "/usr/bin/tshark"
pytestmark = pytest.mark.skipif(
    not Path(TSHARK).exists(), reason="tshark is not installed (apt-get install tshark)"
)

TS = 1_795_442_587_000_000_000
CLIENT = Endpoint("10.0.0.5", 51234)
SERVER = Endpoint("10.0.0.9", 443)

REQ1 = b"GET /index.html HTTP/1.1\r\nHost: shop.example\r\nAuthorization: xxxxxxxx\r\n\r\n"
RESP1 = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
REQ2 = b'POST /api/cart HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 7\r\n\r\n{"a":1}'
RESP2_HEAD = (
    b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
)
RESP2_BODY = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


def tshark(path: Path, fields: list[str], *options: str, display: str = "") -> list[list[str]]:
    """One row per packet, one column per field (multiple values joined by '|')."""
    cmd = [TSHARK, "-n", "-r", str(path), *options, "-T", "fields", "-E", "aggregator=|"]
    if display:
        cmd += ["-Y", display]
    for f in fields:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines()]


def column(rows: list[list[str]], i: int) -> list[str]:
    return [r[i] for r in rows if r[i]]


class Conn:
    """Data records of one connection, offsets kept per direction."""

    def __init__(self, conn_id: str, local: Endpoint, remote: Endpoint, role: str = "client"):
        self.base = dict(pid=4211, comm="curl", source="openssl", conn_id=conn_id,
                         local=local, remote=remote, role=role, agent_id="a1")  # fmt: skip
        self.offset = {"egress": 0, "ingress": 0}
        self.records: list[Record] = []
        self.t = 0

    def lifecycle(self, kind: str) -> None:
        self.t += 1000
        self.records.append(Record(type=kind, ts_ns=TS + self.t, **self.base))

    def send(self, direction: str, data: bytes, skip: int = 0, **kw) -> None:
        self.t += 1000
        self.offset[direction] += skip
        self.records.append(
            Record(type="data", ts_ns=TS + self.t, direction=direction,
                   offset=self.offset[direction], len=len(data), captured_len=len(data),
                   data=data, **self.base, **kw)
        )  # fmt: skip
        self.offset[direction] += len(data)


def write(path: Path, records: list[Record]) -> PcapngSink:
    with PcapngSink.open(str(path)) as sink:
        for r in records:
            sink.write(r)
    return sink


def http1_conn(conn_id: str = "c1", local: Endpoint = CLIENT, remote: Endpoint = SERVER) -> Conn:
    c = Conn(conn_id, local, remote)
    c.lifecycle("open")
    c.send("egress", REQ1, redactions=["header:authorization"])
    c.send("ingress", RESP1)
    c.send("egress", REQ2)
    c.send("ingress", RESP2_HEAD)
    c.send("ingress", RESP2_BODY)
    c.lifecycle("close")
    return c


HTTP_FIELDS = ["tcp.srcport", "tcp.dstport", "http.request.method", "http.request.uri",
               "http.response.code", "frame.comment", "tcp.analysis.lost_segment",
               "tcp.checksum.status", "ip.checksum.status", "http.file_data"]  # fmt: skip
CHECKSUMS = ("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")


@pytest.mark.parametrize("decode_as", [False, True])
def test_http1_keepalive_with_chunked_response(tmp_path: Path, decode_as: bool):
    path = tmp_path / "h1.pcapng"
    sink = write(path, http1_conn().records)
    assert sink.stats() == {"pcapng_packets": 3 + 5 + 3, "pcapng_connections": 1}
    # Debian's tshark 4.0 needs no option for HTTP/1 on 443: the TLS dissector
    # rejects the plaintext and TCP's HTTP heuristic takes it.
    opts = ("-d", "tcp.port==443,http") if decode_as else ()
    rows = tshark(path, HTTP_FIELDS, *CHECKSUMS, *opts)
    assert len(rows) == 11
    assert column(rows, 2) == ["GET", "POST"]
    assert column(rows, 3) == ["/index.html", "/api/cart"]
    assert column(rows, 4) == ["200", "201"]
    assert {(r[0], r[1]) for r in rows} == {("51234", "443"), ("443", "51234")}
    assert column(rows, 6) == []  # no tcp.analysis.lost_segment: no gap
    assert tshark(path, ["frame.number"], display="tcp.analysis.flags") == []  # nor any other
    assert set(column(rows, 7)) == {"1"} and set(column(rows, 8)) == {"1"}  # 1 = good
    # The chunked body is reassembled and de-chunked.
    assert "hello world" in "".join(column(rows, 9)).replace("\\n", "")
    comments = column(rows, 5)
    assert comments[3] == (
        f"pid=4211 comm=curl source=openssl conn=c1 egress offset=0 len={len(REQ1)} "
        "redacted=header:authorization"
    )
    assert "handshake synthesized role=client" in comments[0]
    # ns timestamps: the open record at TS + 1 µs, the handshake just before it.
    times = column(tshark(path, ["frame.time_epoch"]), 0)
    assert times[:4] == ["1795442586.999998000", "1795442586.999999000",
                         "1795442587.000000000", "1795442587.000002000"]  # fmt: skip


def test_gap_shows_as_lost_segment_and_truncation_in_the_comment(tmp_path: Path):
    c = Conn("gap", CLIENT, Endpoint("10.0.0.9", 8080))
    c.send("egress", REQ1)
    c.send("ingress", RESP1)
    c.send("egress", REQ2, skip=300)  # 300 bytes the capture lost
    c.send("ingress", b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b"x" * 10,
           truncated=True)  # fmt: skip
    c.records[-1].len += 30
    path = tmp_path / "gap.pcapng"
    write(path, c.records)
    rows = tshark(path, ["frame.number", "frame.comment"], display="tcp.analysis.lost_segment")
    assert len(rows) == 1 and f"egress offset={len(REQ1) + 300} len={len(REQ2)}" in rows[0][1]
    rows = tshark(path, ["frame.comment"], display='frame.comment contains "truncated"')
    assert rows and rows[0][0].endswith("truncated: 30 bytes not captured")


def _h2_records(port: int) -> tuple[Conn, list[tuple[int, str]]]:
    import h2.config
    import h2.connection

    c = Conn("h2", Endpoint("fd00::5", 40000), Endpoint("fd00::9", port))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    client.initiate_connection()
    server.initiate_connection()

    def pump() -> None:
        while True:
            out, back = client.data_to_send(), b""
            if out:
                c.send("egress", out)
                server.receive_data(out)
            back = server.data_to_send()
            if back:
                c.send("ingress", back)
                client.receive_data(back)
            if not out and not back:
                return

    c.lifecycle("open")
    pump()
    headers = [(":method", "POST"), (":scheme", "https"), (":authority", "api.example"),
               (":path", "/shop.Cart/Add"), ("content-type", "application/grpc")]  # fmt: skip
    client.send_headers(1, headers)
    client.send_data(1, b"\x00\x00\x00\x00\x05\x0a\x03abc", end_stream=True)  # protobuf
    pump()
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    server.send_data(1, b"\x00\x00\x00\x00\x02\x08\x01")
    server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    pump()
    c.lifecycle("close")
    return c, headers


def test_http2_grpc_from_h2_over_ipv6(tmp_path: Path):
    conn, headers = _h2_records(50051)
    path = tmp_path / "h2.pcapng"
    sink = write(path, conn.records)
    assert sink.http2_ports == [50051]
    fields = ["ipv6.src", "tcp.dstport", "http2.header.name", "http2.header.value",
              "frame.protocols", "tcp.checksum.status"]  # fmt: skip
    # HTTP/2 needs decode-as off the HTTP ports (there is no TCP heuristic for it).
    plain = tshark(path, fields)
    assert not column(plain, 2)
    rows = tshark(path, fields, "-d", "tcp.port==50051,http2", *CHECKSUMS)
    names = "|".join(column(rows, 2)).split("|")
    values = "|".join(column(rows, 3)).split("|")
    pairs = set(zip(names, values, strict=True))
    assert set(headers) <= pairs
    assert {(":status", "200"), ("grpc-status", "0")} <= pairs
    assert any("grpc" in p for p in column(rows, 4))
    grpc = tshark(path, ["grpc.message_length"], "-d", "tcp.port==50051,http2")
    assert column(grpc, 0) == ["5", "2"]
    assert tshark(path, ["frame.number"], display="tcp.analysis.flags") == []
    assert set(column(rows, 5)) == {"1"}
    assert "fd00::5" in column(rows, 0)


def test_unknown_endpoints_dissect_and_say_so(tmp_path: Path):
    c = http1_conn("anon", local=None, remote=None)  # type: ignore[arg-type]
    path = tmp_path / "anon.pcapng"
    write(path, c.records)
    rows = tshark(path, ["ip.src", "ip.dst", "tcp.dstport", "frame.comment"],
                  display="tcp.flags.syn == 1 && tcp.flags.ack == 0")  # fmt: skip
    assert len(rows) == 1
    src, dst, port, comment = rows[0]
    assert src.startswith("192.0.2.") and dst.startswith("198.51.100.")
    assert 49152 <= int(port) <= 65535
    assert "endpoint unknown: local and remote (placeholder)" in comment
    assert column(tshark(path, ["http.request.method"], "-d", f"tcp.port=={port},http"), 0) == [
        "GET",
        "POST",
    ]


def test_file_is_readable_while_the_sink_is_open(tmp_path: Path):
    path = tmp_path / "live.pcapng"
    sink = PcapngSink.open(str(path), flush_interval=0.05)
    try:
        for r in http1_conn().records[:3]:
            sink.write(r)
        time.sleep(0.3)  # the periodic flush, no close
        rows = tshark(path, ["http.request.method"])
        assert column(rows, 0) == ["GET"]
    finally:
        sink.close()


def test_open_failure_is_an_output_error(tmp_path: Path):
    with pytest.raises(OutputError, match=r"cannot write pcapng to .*No such file"):
        PcapngSink.open(str(tmp_path / "missing" / "x.pcapng"))


def test_export_command_from_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from agent.cli.main import main
    from agent.collector.store import RecordStore
    from agent.schema.convert import to_pb

    h1 = http1_conn("c1")
    h2conn, _ = _h2_records(50051)
    for r in h2conn.records:
        r.protocol = "http2" if r.type == "data" else ""
    other = http1_conn("c3", local=Endpoint("10.0.0.6", 40001))
    records = h1.records + h2conn.records + other.records
    stats = Record(type="stats", ts_ns=TS, agent_id="a1", stats={"records": 3})
    for seq, r in enumerate([*records, stats], start=1):
        r.seq = seq
    db = tmp_path / "records.db"
    with RecordStore(db) as store:
        store.insert([(r, to_pb(r).SerializeToString()) for r in [*records, stats]])
    out = tmp_path / "out.pcapng"
    assert main(["export", "--store", str(db), "--pcapng", str(out), "--since", "all"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {len(tshark(out, ['frame.number']))} packets for 3 connections" in err
    assert "-d tcp.port==50051,http2" in err
    rows = tshark(out, ["http.request.method", "http2.header.value"], "-d", "tcp.port==50051,http2")
    assert column(rows, 0) == ["GET", "POST", "GET", "POST"]
    assert "/shop.Cart/Add" in "|".join(column(rows, 1))
    # Filters: one connection by its local port.
    one = tmp_path / "one.pcapng"
    assert main(["export", "--store", str(db), "--pcapng", str(one), "--local-port", "40001"]) == 0
    assert "for 1 connections" in capsys.readouterr().err
    assert {r[0] for r in tshark(one, ["tcp.srcport"], display="http.request")} == {"40001"}
    # HTTP/gRPC criteria select whole connections, open and close records included.
    h2only = tmp_path / "h2.pcapng"
    assert main(["export", "--store", str(db), "--pcapng", str(h2only), "--protocol", "http2"]) == 0
    assert "for 1 connections" in capsys.readouterr().err
    rows = tshark(h2only, ["tcp.dstport", "tcp.flags.fin"], display="tcp.flags.fin == 1")
    assert len(rows) == 2
    assert main(["export", "--store", str(db), "--pcapng", str(h2only), "--method", "PUT"]) == 0
    assert "wrote 0 packets for 0 connections" in capsys.readouterr().err
    # Missing store, unwritable output.
    assert main(["export", "--store", str(tmp_path / "nope.db"), "--pcapng", str(one)]) == 2
    bad = str(tmp_path / "no" / "dir.pcapng")
    assert main(["export", "--store", str(db), "--pcapng", bad]) == 2
    assert "cannot write pcapng" in capsys.readouterr().err
