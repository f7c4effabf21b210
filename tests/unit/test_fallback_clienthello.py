"""Tests for agent.fallback.clienthello: real hellos from Python's ssl and openssl s_client,
hand-built edge cases, every prefix, re-framing, and seeded fuzzing."""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from agent.fallback.clienthello import (
    MAX_CLIENT_HELLO,
    MAX_RECORD,
    ClientHello,
    MalformedClientHello,
    NeedMore,
    NotTls,
    parse_client_hello,
)

TLS13 = 0x0304


def real_hello(
    server_hostname: str | None = "api.example.test",
    alpn: list[str] | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The bytes Python's ssl (OpenSSL) sends as its first flight."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- hand-built hellos -----------------------------------------------------------------


def vec(size: int, body: bytes) -> bytes:
    return len(body).to_bytes(size, "big") + body


def ext(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + vec(2, body)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


def alpn_ext(*protocols: bytes) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, p) for p in protocols)))


def versions_ext(*versions: int) -> bytes:
    return ext(43, vec(1, b"".join(v.to_bytes(2, "big") for v in versions)))


def hello_body(
    exts: list[bytes] | None = None,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    version: int = 0x0303,
) -> bytes:
    body = version.to_bytes(2, "big") + bytes(32) + vec(1, session_id)
    body += vec(2, suites) + vec(1, compression)
    if exts is not None:
        body += vec(2, b"".join(exts))
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def frame(hs: bytes, sizes: list[int] | None = None, content_type: int = 0x16) -> bytes:
    """Wrap handshake bytes in records of the given fragment sizes (rest in the last)."""
    out, pos = b"", 0
    for size in [*(sizes or []), len(hs)]:
        chunk = hs[pos : pos + size]
        if chunk:
            out += bytes([content_type, 3, 1]) + vec(2, chunk)
        pos += len(chunk)
    return out


def build(exts: list[bytes] | None = None, **kwargs: object) -> bytes:
    return frame(handshake(hello_body(exts, **kwargs)))  # type: ignore[arg-type]


def reframe(data: bytes, parts: int) -> bytes:
    """Split a single-record hello's handshake bytes into `parts` records."""
    hs = data[5:]
    step = -(-len(hs) // parts)
    return frame(hs, [step] * (parts - 1))


def parse_ok(data: bytes) -> ClientHello:
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello), result
    return result


def malformed(data: bytes, match: str, **kwargs: int) -> None:
    with pytest.raises(MalformedClientHello, match=match):
        parse_client_hello(data, **kwargs)


# --- real hellos -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hello() -> bytes:
    return real_hello(alpn=["h2", "http/1.1"])


def test_real_hello(hello: bytes) -> None:
    result = parse_ok(hello)
    assert result.sni == "api.example.test"
    assert result.alpn == ("h2", "http/1.1")
    assert TLS13 in result.supported_versions
    assert result.legacy_version == 0x0303
    assert result.record_bytes == len(hello)


def test_real_hello_without_sni_or_alpn() -> None:
    data = real_hello(server_hostname=None)
    result = parse_ok(data)
    assert result.sni is None
    assert result.alpn == ()
    assert result.record_bytes == len(data)


def test_real_tls12_only_hello() -> None:
    data = real_hello(alpn=["http/1.1"], max_version=ssl.TLSVersion.TLSv1_2)
    result = parse_ok(data)
    assert result.sni == "api.example.test"
    assert result.alpn == ("http/1.1",)
    assert TLS13 not in result.supported_versions
    assert result.legacy_version == 0x0303


def test_every_strict_prefix_needs_more(hello: bytes) -> None:
    for n in range(len(hello)):
        result = parse_client_hello(hello[:n])
        assert isinstance(result, NeedMore), (n, result)
        assert n < result.at_least <= len(hello)
    assert parse_client_hello(b"") == NeedMore(5)
    assert parse_client_hello(hello[:4]) == NeedMore(5)
    assert parse_client_hello(hello[:5]) == NeedMore(len(hello))


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_hello_split_over_records(hello: bytes, parts: int) -> None:
    split = reframe(hello, parts)
    assert split.count(b"\x16\x03\x01") >= parts
    result = parse_ok(split)
    assert result == ClientHello(
        "api.example.test",
        ("h2", "http/1.1"),
        0x0303,
        parse_ok(hello).supported_versions,
        len(split),
    )
    for n in range(len(split)):  # prefixes of the split hello also just need more
        more = parse_client_hello(split[:n])
        assert isinstance(more, NeedMore)
        assert more.at_least > n


def test_handshake_header_split_across_records(hello: bytes) -> None:
    split = frame(hello[5:], [1, 2])
    assert parse_ok(split).sni == "api.example.test"
    assert parse_client_hello(split[:6]) == NeedMore(11)  # first record done, next header


def test_trailing_bytes_are_not_counted(hello: bytes) -> None:
    app_data = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05hello"
    result = parse_ok(hello + app_data)
    assert result.record_bytes == len(hello)
    split = reframe(hello, 3)
    assert parse_ok(split + b"\x16\x03\x03\x00\x04junk").record_bytes == len(split)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_openssl_s_client_hello() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
        cmd += ["-servername", "X.Test.", "-alpn", "h2,http/1.1"]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                result = parse_client_hello(data)
                while isinstance(result, NeedMore):
                    chunk = conn.recv(65536)
                    assert chunk, f"s_client closed after {len(data)} bytes"
                    data += chunk
                    result = parse_client_hello(data)
        finally:
            proc.kill()
            proc.wait()
    assert isinstance(result, ClientHello), result
    assert result.sni == "x.test"
    assert result.alpn == ("h2", "http/1.1")
    assert TLS13 in result.supported_versions


# --- not TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "0x47 is not a TLS handshake"),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", "0x53 is not a TLS handshake"),
        (b"\x80\x2e\x01\x00\x02", "SSLv2"),
        (b"\x16\x02\x00\x00\x10", "major byte 0x02"),
        (b"\x16\x00", "major byte 0x00"),
        (b"\x15\x03\x03\x00\x02\x02\x28", "0x15 is not a TLS handshake"),
    ],
)
def test_not_tls(data: bytes, words: str) -> None:
    result = parse_client_hello(data)
    assert isinstance(result, NotTls)
    assert words in result.reason


# --- hand-built edge cases -------------------------------------------------------------


def test_hand_built_hello_fields() -> None:
    exts = [
        ext(0xFF01, b"\x00"),
        sni_ext(b"Mixed.Case.Test."),
        alpn_ext(b"h2"),
        versions_ext(TLS13),
    ]
    data = build(exts, session_id=bytes(32))
    assert parse_ok(data) == ClientHello("mixed.case.test", ("h2",), 0x0303, (TLS13,), len(data))


def test_hello_without_extensions() -> None:
    result = parse_ok(build(None, version=0x0301))
    assert result == ClientHello(None, (), 0x0301, (), result.record_bytes)


def test_unknown_name_types_are_skipped() -> None:
    assert parse_ok(build([sni_ext(b"opaque", name_type=7)])).sni is None


MALFORMED = [
    (build([sni_ext(b"a.test"), sni_ext(b"b.test")]), "duplicate extension 0"),
    (build([alpn_ext(b"h2"), alpn_ext(b"h2")]), "duplicate extension 16"),
    (build([sni_ext(b"a.test", b"b.test")]), "more than one host_name"),
    (build([sni_ext(b"caf\xc3\xa9.test")]), "not ASCII"),
    (build([sni_ext(b"a\0.test")]), "NUL"),
    (build([sni_ext(b"")]), "empty server name"),
    (build([sni_ext(b".")]), "empty server name"),
    (build([ext(0, b"")]), "server_name_list length"),
    (build([ext(0, vec(2, b""))]), "empty server_name list"),
    (build([alpn_ext(b"h2", b"")]), "empty ALPN protocol name"),
    (build([alpn_ext(b"\xff\xfe")]), "ALPN protocol name is not ASCII"),
    (build([ext(16, vec(2, b""))]), "empty ALPN protocol list"),
    (build([ext(16, vec(2, b"\x05h2"))]), "ALPN protocol name"),
    (build([ext(43, vec(1, b"\x03\x04\x03"))]), "supported_versions length 3"),
    (build([ext(43, vec(1, b"\x03\x04") + b"x")]), "trailing bytes in extension 43"),
    (build([], session_id=bytes(33)), "session_id longer than 32"),
    (build([], suites=b""), "cipher_suites length 0"),
    (build([], suites=b"\x13\x01\x13"), "cipher_suites length 3"),
    (build([], compression=b""), "no compression methods"),
    (frame(handshake(hello_body([]) + b"\x00")), "trailing bytes in ClientHello"),
    (frame(handshake(hello_body([])[:-1] + b"\x05")), "extensions: needs 5 bytes"),
    (frame(handshake(hello_body()[:34])), "session_id length"),
    (frame(handshake(hello_body(), msg_type=2)), "handshake type 2 is not client_hello"),
    (frame(handshake(hello_body()) + handshake(b"")), "4 handshake bytes follow"),
]


@pytest.mark.parametrize(("data", "match"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed(data: bytes, match: str) -> None:
    malformed(data, match)


def test_non_handshake_record_in_the_middle(hello: bytes) -> None:
    hs = hello[5:]
    data = frame(hs[:50]) + frame(hs[50:], content_type=0x17)
    malformed(data, "record of type 0x17 inside the ClientHello")
    bad_version = frame(hs[:50]) + b"\x16\x02\x01" + vec(2, hs[50:])
    malformed(bad_version, "major byte 0x02")


def test_record_length_limits(hello: bytes) -> None:
    malformed(b"\x16\x03\x01" + (MAX_RECORD + 1).to_bytes(2, "big"), "record length 18433")
    malformed(frame(hello[5:60]) + b"\x16\x03\x01\x00\x00", "record length 0 ")


def test_max_size() -> None:
    data = build([sni_ext(b"a.test"), ext(21, bytes(1000))])
    body_len = len(data) - 9
    assert parse_ok(data).sni == "a.test"
    malformed(data, f"length {body_len} exceeds 500", max_size=500)
    assert isinstance(parse_client_hello(data, max_size=body_len), ClientHello)


def test_oversized_hello_in_many_records_is_accepted_up_to_the_limit() -> None:
    hs = handshake(hello_body([ext(21, bytes(MAX_CLIENT_HELLO - 200))]))
    data = frame(hs, [2**14] * 4)
    assert parse_ok(data).record_bytes == len(data)
    big_body = hello_body([ext(21, bytes(40_000))], suites=bytes(30_000))  # no 16-bit field
    too_big = frame(handshake(big_body), [2**14] * 4)
    malformed(too_big, "exceeds 65536")
    malformed(too_big[:9], "exceeds 65536")  # rejected as soon as the header is visible


def test_one_mib_of_junk_is_rejected_quickly() -> None:
    rng = random.Random(1)
    junk = rng.randbytes(1 << 20)
    start = time.monotonic()
    malformed(b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + junk, "16777215 exceeds")
    malformed(b"\x16\x03\x01\xff\xff" + junk, "record length 65535")
    assert time.monotonic() - start < 0.5


def test_tiny_records_are_not_quadratic(hello: bytes) -> None:
    data = frame(hello[5:], [1] * len(hello))
    start = time.monotonic()
    assert parse_ok(data).alpn == ("h2", "http/1.1")
    assert time.monotonic() - start < 0.5


# --- fuzzing ---------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        pos = rng.randrange(len(buf)) if buf else 0
        if kind == 0 and buf:  # flip bits
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:  # random byte
            buf[pos] = rng.randrange(256)
        elif kind == 2 and len(buf) > 1:  # shrink or grow a 16-bit length
            value = max(0, int.from_bytes(buf[pos : pos + 2], "big") + rng.randint(-8, 8))
            buf[pos : pos + 2] = min(value, 0xFFFF).to_bytes(2, "big")
        elif kind == 3:  # truncate
            del buf[pos:]
        else:  # insert or delete a few bytes
            if rng.random() < 0.5:
                buf[pos:pos] = rng.randbytes(rng.randint(1, 4))
            else:
                del buf[pos : pos + rng.randint(1, 4)]
    return bytes(buf)


def test_fuzz_only_raises_malformed(hello: bytes) -> None:
    rng = random.Random(20240601)
    seeds = [
        hello,
        reframe(hello, 3),
        real_hello(server_hostname=None),
        build([sni_ext(b"a.test"), alpn_ext(b"h2", b"http/1.1"), versions_ext(TLS13, 0x0303)]),
    ]
    counts: dict[str, int] = {}
    for _ in range(4000):
        data = mutate(rng, rng.choice(seeds))
        try:
            result = parse_client_hello(data)
        except MalformedClientHello as e:
            assert str(e) and "\n" not in str(e)
            result = None
        if isinstance(result, NeedMore):
            assert result.at_least > len(data)
        elif isinstance(result, ClientHello):
            assert 0 < result.record_bytes <= len(data)
        counts[type(result).__name__] = counts.get(type(result).__name__, 0) + 1
    # the mutations reach every outcome, so the parser's checks are actually exercised
    assert set(counts) == {"NoneType", "NeedMore", "NotTls", "ClientHello"}, counts
    assert counts["NoneType"] > 500, counts
