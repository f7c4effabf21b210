"""One SSL object over memory BIOs reused for a second connection (SSL_clear), as an
event loop with a pool of SSL objects does: the second connection must be a new
connection with its own tuple, not the first one's stream going on.

programs/membio_reuse.c speaks HTTP/1.1 on its first connection and HTTP/2 (by ALPN)
on the second, both with credentials.  Were the second taken for the rest of the
first, its HPACK-coded header block would go through the HTTP/1 masker and leave
the agent; split correctly, it is parsed and masked as HTTP/2 from its preface.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import h2.config
import h2.connection
import hpack.huffman
import hpack.huffman_constants
import pytest

from tests.ebpf.conftest import PROGRAMS, start_http_server

FIRST_SECRET = "Bearer first-secret-membio-123"
SECOND_SECRET = "Bearer second-secret-membio-456"


@pytest.fixture(scope="module")
def membio_reuse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("membio") / "membio_reuse"
    subprocess.run(
        ["gcc", "-O1", "-o", str(binary), str(PROGRAMS / "membio_reuse.c"), "-lssl", "-lcrypto"],
        check=True, capture_output=True,
    )  # fmt: skip
    return binary


def huffman(text: str) -> bytes:
    encoder = hpack.huffman.HuffmanEncoder(
        hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH
    )
    return encoder.encode(text.encode())


def test_reused_ssl_object_on_memory_bios_is_a_new_connection(
    agent, tls_cert, membio_reuse, tmp_path
) -> None:
    first = tmp_path / "first"
    first.write_bytes(
        b"GET /first HTTP/1.1\r\nHost: localhost\r\n"
        + f"Authorization: {FIRST_SECRET}\r\nConnection: close\r\n\r\n".encode()
    )
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    h2c.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"),
         (":path", "/second"), ("authorization", SECOND_SECRET)],
        end_stream=True,
    )  # fmt: skip
    second = tmp_path / "second"
    second.write_bytes(h2c.data_to_send())
    assert huffman(SECOND_SECRET) in second.read_bytes()  # the secret as it goes out

    server, port = start_http_server(tls_cert)
    try:
        a = agent("--comm", "membio_reuse")
        out = subprocess.run(
            [str(membio_reuse), str(port), "http/1.1", str(first), "h2", str(second)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        cap = a.stop(settle=1.0)
    finally:
        server.kill()
        server.wait()
    printed = re.findall(r"conn (\d) local_port (\d+) sent (\d+) received (\d+)", out.stdout)
    local_ports = {int(i): int(p) for i, p, _, _ in printed}
    assert set(local_ports) == {1, 2}, out.stdout

    by_conn: dict[str, list[dict]] = defaultdict(list)
    for r in cap.of_type("data"):
        if r["comm"] == "membio_reuse":
            by_conn[r["conn_id"]].append(r)
    assert len(by_conn) == 2, f"expected two connections, got {sorted(by_conn)}"
    conns = sorted(by_conn.values(), key=lambda rs: min(r["ts_ns"] for r in rs))
    for (i, sent), records in zip(((1, first), (2, second)), conns, strict=True):
        for r in records:
            assert r["role"] == "client", r
            assert r["local"] == {"ip": "127.0.0.1", "port": local_ports[i]}, r
            assert r["remote"] == {"ip": "127.0.0.1", "port": port}, r
        egress = sorted((r["offset"], r) for r in records if r["direction"] == "egress")
        assert egress[0][0] == 0, "each connection's offsets start again at 0"
        assert sum(r["len"] for _, r in egress) == len(sent.read_bytes())
        assert all(r["captured_len"] == r["len"] for r in records)
    assert {r["protocol"] for r in conns[0]} == {"http1"}
    assert {r["protocol"] for r in conns[1]} == {"http2"}

    raw = a.output.read_bytes()
    payloads = b"".join(base64.b64decode(r["data_b64"]) for r in cap.of_type("data"))
    for secret in (FIRST_SECRET, SECOND_SECRET):
        for needle in (secret.encode(), huffman(secret), secret.split()[1].encode()):
            assert needle not in raw, f"{needle!r} in the JSON lines"
            assert needle not in payloads, f"{needle!r} in a captured payload"
    assert cap.stats["lost"] == 0
