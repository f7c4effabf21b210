"""Parsed HTTP/1.1, HTTP/2 and gRPC exchanges from real captures, redaction of what
leaves the agent, and the pcapng file tshark reads.

The traffic is real: curl (OpenSSL) and a grpcio client against
programs/http_server.py (Python `ssl`, OpenSSL too), so each connection is seen
from both ends -- curl as client, the server as server -- and each end must parse
into the same exchanges.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.ebpf.conftest import REPO, TLSCAP, run_program, wait_for

SECRET = "Bearer tok-4f9c2e7a1b"  # never to be seen outside the agent
COOKIE = "s3cr3t-cookie"  # the server's Set-Cookie value


def curl(*args: str) -> str:
    out = subprocess.run(
        ["curl", "-sSk", "--max-time", "20", *args], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def exchanges(cap, role: str) -> list[dict]:
    """curl's exchanges (role client) or the server's (role server)."""
    return [r for r in cap.of_type("exchange") if r["role"] == role]


def headers(message: dict) -> dict[str, str]:
    return {k: v for k, v in message["headers"]}


def body(message: dict) -> bytes:
    return base64.b64decode(message["body_b64"])


def assert_secret_absent(blob: bytes) -> None:
    for secret in (SECRET.encode(), b"tok-4f9c2e7a1b", COOKIE.encode()):
        assert secret not in blob
        assert base64.b64encode(secret)[:12] not in blob  # nor inside a data_b64 field


def all_payloads(cap) -> bytes:
    return b"".join(base64.b64decode(r["data_b64"]) for r in cap.of_type("data"))


def test_http1_keepalive_chunked_exchanges_and_redaction(agent, http_server: int) -> None:
    port = http_server
    a = agent()
    t0 = time.time_ns()
    curl(
        "--http1.1",
        "-H",
        f"Authorization: {SECRET}",
        f"https://127.0.0.1:{port}/api/users",
        f"https://127.0.0.1:{port}/chunked",
        f"https://127.0.0.1:{port}/status/404",
        "-d",
        "name=ada",
    )
    t1 = time.time_ns()
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    for role in ("client", "server"):
        ex = exchanges(cap, role)
        assert [e["exchange"]["protocol"] for e in ex] == ["http1"] * 3, (role, ex)
        assert {e["conn_id"] for e in ex} == {ex[0]["conn_id"]}, "one keep-alive connection"
        if role == "client":
            assert ex[0]["comm"] == "curl"
        reqs = [e["exchange"]["request"] for e in ex]
        resps = [e["exchange"]["response"] for e in ex]
        # curl -d makes every request a POST with the same body.
        assert [(r["method"], r["target"]) for r in reqs] == [
            ("POST", "/api/users"),
            ("POST", "/chunked"),
            ("POST", "/status/404"),
        ]
        assert all(body(r) == b"name=ada" and r["complete"] for r in reqs)
        assert [r["status"] for r in resps] == [200, 200, 404]
        assert body(resps[0]) == b"you asked for /api/users\n"
        # The chunked body arrives de-chunked, whole, with every chunk's bytes.
        assert body(resps[1]) == b"first chunk\nsecond, longer chunk of the body\nthird\n"
        assert resps[1]["body_len"] == len(body(resps[1]))
        assert headers(resps[1])["transfer-encoding"] == "chunked"
        for e in ex:
            lat = e["exchange"]["latency_ns"]
            assert 0 < lat < t1 - t0, lat
            # Redaction: the header is there, its value is not.
            assert headers(e["exchange"]["request"])["authorization"] == "[REDACTED]"
            assert "header:authorization" in e["exchange"]["redactions"]
        assert headers(resps[1])["set-cookie"] == "[REDACTED]"

    # The raw records of the same connections are masked, length kept.
    redacted = [r for r in cap.of_type("data") if r["redactions"]]
    assert redacted and all(r["protocol"] == "http1" for r in redacted)
    for r in redacted:
        assert len(base64.b64decode(r["data_b64"])) == r["captured_len"] == r["len"]
    payloads = all_payloads(cap)
    assert b"Authorization: " + b"*" * len(SECRET) in payloads
    assert_secret_absent(payloads)
    assert_secret_absent(cap_text(a).encode())
    assert cap.stats["l7_exchanges"] == 6
    assert cap.stats["l7_redacted_records"] >= 6


def cap_text(a) -> str:
    return a.output.read_text()


def test_http2_curl_exchanges(agent, http_server: int) -> None:
    port = http_server
    a = agent()
    curl(
        "--http2",
        "-H",
        f"Authorization: {SECRET}",
        f"https://127.0.0.1:{port}/one",
        f"https://127.0.0.1:{port}/status/503",
        f"https://127.0.0.1:{port}/three",
    )
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    for role in ("client", "server"):
        ex = exchanges(cap, role)
        assert [e["exchange"]["protocol"] for e in ex] == ["http2"] * 3, (role, ex)
        reqs = [e["exchange"]["request"] for e in ex]
        resps = [e["exchange"]["response"] for e in ex]
        assert [(r["method"], r["target"], r["version"]) for r in reqs] == [
            ("GET", "/one", "2"),
            ("GET", "/status/503", "2"),
            ("GET", "/three", "2"),
        ]
        assert [e["exchange"]["stream_id"] for e in ex] == [1, 3, 5]
        assert [r["status"] for r in resps] == [200, 503, 200]
        assert body(resps[2]) == b"you asked for /three\n"
        for e in ex:
            assert e["exchange"]["latency_ns"] > 0
            # Decoded through HPACK's dynamic table: the 2nd and 3rd requests send
            # the header as an index, and it must still come out (redacted).
            assert headers(e["exchange"]["request"])["authorization"] == "[REDACTED]"
            assert headers(e["exchange"]["response"])["set-cookie"] == "[REDACTED]"
    assert_secret_absent(all_payloads(cap))
    assert_secret_absent(cap_text(a).encode())


def test_grpc_calls_seen_at_the_server(agent, http_server: int, tls_cert) -> None:
    a = agent()
    result = run_program("grpc_client.py", str(tls_cert[0]), str(http_server))
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr
    ex = exchanges(cap, "server")
    calls = [e["exchange"] for e in ex if e["exchange"]["protocol"] == "grpc"]
    assert [(c["grpc"]["service"], c["grpc"]["method"]) for c in calls] == [
        ("test.Echo", "Say"),
        ("test.Echo", "Say"),
        ("test.Echo", "Missing"),
    ]
    sent = [base64.b64decode(m) for m in result["sent_b64"]]
    for call, message in zip(calls[:2], sent, strict=True):
        g = call["grpc"]
        assert g["status"] == 0
        assert [base64.b64decode(m["data_b64"]) for m in g["request_messages"]] == [message]
        assert [base64.b64decode(m["data_b64"]) for m in g["response_messages"]] == [message]
        assert call["latency_ns"] > 0
    missing = calls[2]["grpc"]
    assert (missing["status"], missing["message"]) == (5, "no such method!")
    assert result["missing"] == [5, "no such method!"]


def tshark_fields(pcap: Path, fields: list[str], *extra: str) -> list[list[str]]:
    cmd = ["tshark", "-r", str(pcap), *extra, "-T", "fields", "-E", "separator=|"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return [line.split("|") for line in out.stdout.splitlines() if line.strip("|")]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_pcapng_output_dissected_by_tshark(tmp_path: Path, http_server: int) -> None:
    port = http_server
    pcap = tmp_path / "capture.pcapng"
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*TLSCAP, "run", "--comm", "curl", "--output", "pcapng", "--output-file", str(pcap),
         "--ready-file", str(ready)],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the agent")
        assert proc.poll() is None, proc.stderr.read()
        curl("--http1.1", "-H", f"Authorization: {SECRET}", f"https://127.0.0.1:{port}/pcap/one")
        curl("--http2", "-H", f"Authorization: {SECRET}", f"https://127.0.0.1:{port}/pcap/two")
        time.sleep(0.3)
    finally:
        proc.send_signal(2)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    decode = ["-d", f"tcp.port=={port},http"]
    rows = tshark_fields(pcap, ["tcp.dstport", "http.request.method", "http.request.uri"], *decode)
    assert [str(port), "GET", "/pcap/one"] in rows, rows
    rows = tshark_fields(pcap, ["tcp.srcport", "http.response.code"], *decode)
    assert [str(port), "200"] in rows, rows
    h2 = tshark_fields(
        pcap, ["tcp.dstport", "http2.header.name", "http2.header.value"],
        "-d", f"tcp.port=={port},http2", "-Y", "http2.type == 1",
    )  # fmt: skip
    names_values = [(r[1], r[2]) for r in h2 if r[0] == str(port)]
    assert any(":path" in n and "/pcap/two" in v for n, v in names_values), h2
    # tshark decodes HPACK: the value it shows is the masked one, never the secret.
    assert any("authorization" in n and "*" * 8 in v for n, v in names_values), h2
    blob = pcap.read_bytes()
    assert_secret_absent(blob)
    text = subprocess.run(
        ["tshark", "-r", str(pcap), "-V", *decode], capture_output=True, text=True, check=True
    ).stdout
    assert "tok-4f9c2e7a1b" not in text
    comments = tshark_fields(pcap, ["frame.comment"])
    assert any("comm=curl" in c[0] and "source=openssl" in c[0] for c in comments), comments[:5]


def test_collector_store_never_holds_the_secret(agent, http_server: int, tmp_path: Path) -> None:
    """Through the real gRPC path: agent -> collector -> its SQLite store."""
    from tests.ebpf.conftest import free_port

    store = tmp_path / "collector.db"
    cport = free_port()
    collector = subprocess.Popen(
        [*TLSCAP, "collector", "--listen", f"127.0.0.1:{cport}", "--store", str(store),
         "--insecure"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        from tests.ebpf.conftest import wait_for_port

        wait_for_port("127.0.0.1", cport)
        a = agent("--collector", f"127.0.0.1:{cport}", "--insecure", "--spool-dir", str(tmp_path))
        curl("--http1.1", "-H", f"Authorization: {SECRET}", f"https://127.0.0.1:{http_server}/s")
        curl("--http2", "-H", f"Authorization: {SECRET}", f"https://127.0.0.1:{http_server}/s2")
        cap = a.stop()
        assert cap.returncode == 0, cap.stderr
        out = subprocess.run(
            [*TLSCAP, "tail", "--store", str(store), "--since", "all", "--no-follow",
             "--output", "jsonl", "--type", "exchange", "--path-prefix", "/s"],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        stored = [json.loads(line) for line in out.stdout.splitlines()]
        targets = sorted(r["exchange"]["request"]["target"] for r in stored)
        assert targets == ["/s", "/s", "/s2", "/s2"], targets  # client and server ends
    finally:
        collector.terminate()
        collector.wait(timeout=30)
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("collector.db*"))
    assert b"/s2" in blob  # the store holds the traffic...
    assert_secret_absent(blob)  # ...but not the secret
