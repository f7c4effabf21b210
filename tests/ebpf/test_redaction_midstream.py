"""An HTTP/2 connection opened before the agent started: its header blocks are
picked up mid-stream (the HPACK state is unknown), and the credentials sent on it
after the agent is ready must not leave the agent, plain or Huffman-coded.

- nginx (HTTP/2 by ALPN, tests/ebpf/nginx_lab.py) and an h2 client that connects and
  makes one request first; then the agent starts; then the client sends requests
  with new `authorization` values on the same connection.
- The same for gRPC: a grpcio channel to programs/http_server.py, warm before the
  agent, then calls with credentials in their metadata and messages larger than a
  TLS record, so the server's reads start inside DATA frames.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import hpack.huffman
import hpack.huffman_constants
import pytest

from tests.ebpf import nginx_lab
from tests.ebpf.conftest import PROGRAMS, REPO, TLSCAP, start_http_server

SECRET = "s3cr3t-midstream-token-"
REQUESTS = 4


def huffman(text: str) -> bytes:
    encoder = hpack.huffman.HuffmanEncoder(
        hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH
    )
    return encoder.encode(text.encode())


def connected_before_the_agent(client: subprocess.Popen, start_agent) -> tuple[dict, object]:
    """`client` connects (and prints CONNECTED); then the agent starts; then the client
    goes on on the same connection: (its JSON result line, the agent's capture)."""
    line = client.stdout.readline()
    assert line.startswith("CONNECTED"), line
    a = start_agent()
    client.stdin.write("go\n")
    client.stdin.flush()
    result = json.loads(client.stdout.readline())
    client.wait(timeout=30)
    return result, a


def assert_never_captured(cap, raw: bytes, secrets: list[str]) -> None:
    """None of `secrets` in the JSON lines or any payload, plain or Huffman-coded."""
    payloads = b"".join(base64.b64decode(r["data_b64"]) for r in cap.of_type("data"))
    assert payloads, "the connection's data was not captured at all"
    for secret in secrets:
        for needle in (secret.encode(), huffman(secret)):
            assert needle not in raw, f"{needle!r} in the JSON lines"
            assert needle not in payloads, f"{needle!r} in a captured payload"
    # Lengths are kept: every byte moved is accounted for.
    for r in cap.of_type("data"):
        assert r["captured_len"] == r["len"] == len(base64.b64decode(r["data_b64"]))


def test_http2_credentials_on_a_connection_older_than_the_agent_never_leak(agent, tmp_path):
    missing = nginx_lab.missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make setup` (it installs them)")
    lab = nginx_lab.start_nginx(tmp_path / "nginx", http2=True)
    client = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "h2_client.py"), lab.host, str(lab.port),
         "--secret-prefix", SECRET, "--requests", str(REQUESTS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    store = tmp_path / "agent.db"
    pids = [client.pid, lab.proc.pid, *lab.workers]
    try:
        result, a = connected_before_the_agent(
            client,
            lambda: agent("--store", str(store), *(arg for p in pids for arg in ("--pid", str(p)))),
        )
        cap = a.stop()
    finally:
        client.kill()
        lab.stop()
    assert result["statuses"] == [200] * REQUESTS

    secrets = []
    for i in range(REQUESTS):
        secrets += [f"Bearer {SECRET}{i}", f"{SECRET}{i}"]
    assert_never_captured(cap, a.output.read_bytes(), secrets)
    # Every other output gets the same masked records: the SQLite store (the
    # collector's own format) with its WAL, and a pcapng file exported from it.
    pcapng = tmp_path / "export.pcapng"
    subprocess.run([*TLSCAP, "export", "--store", str(store), "--pcapng", str(pcapng)],
                   check=True, capture_output=True, cwd=REPO)  # fmt: skip
    files = [pcapng, *tmp_path.glob("agent.db*")]
    assert pcapng.stat().st_size > 0 and len(files) >= 2, files
    body = nginx_lab.make_body()[:64]  # not secret: there in every output
    assert body in pcapng.read_bytes()
    assert any(body in p.read_bytes() for p in files[1:]), "the store holds no payloads"
    for path in files:
        blob = path.read_bytes()
        for secret in secrets:
            for needle in (secret.encode(), huffman(secret)):
                assert needle not in blob, f"{needle!r} in {path.name}"
    stats = cap.stats
    assert stats["l7_midstream_http2_connections"] >= 1, stats
    assert stats["l7_header_blocks_masked_unknown"] >= REQUESTS, stats


def test_grpc_metadata_on_a_channel_older_than_the_agent_never_leaks(agent, tls_cert):
    server, port = start_http_server(tls_cert)
    calls = 3
    client = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "grpc_channel.py"), str(tls_cert[0]), str(port),
         "--secret-prefix", SECRET, "--calls", str(calls)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        result, a = connected_before_the_agent(client, lambda: agent("--pid", str(server.pid)))
        cap = a.stop()
    finally:
        client.kill()
        server.kill()
        server.wait()
    assert result["echoed"] == [True] * calls
    secrets = []
    for i in range(calls):
        secrets += [f"Bearer {SECRET}{i}", f"{SECRET}{i}", f"{SECRET}key{i}"]
    assert_never_captured(cap, a.output.read_bytes(), secrets)
    # The messages themselves are not secrets: the echoed bodies are all there.
    ingress = b"".join(
        base64.b64decode(r["data_b64"]) for r in cap.of_type("data") if r["direction"] == "ingress"
    )
    for sent in result["sent_b64"]:
        message = base64.b64decode(sent)
        assert message[:16_000] in ingress or message[-16_000:] in ingress
    stats = cap.stats
    assert stats["l7_midstream_http2_connections"] == 1, stats
    assert stats["l7_header_blocks_masked_unknown"] >= calls, stats
