"""Parse a TLS ClientHello from the first bytes of a TCP stream (pure, no I/O).

The fallback proxy peeks (MSG_PEEK) at a new connection before it answers: the SNI
chooses the leaf certificate to mint and the ALPN list chooses the protocols to offer,
and anything that is not TLS (or not a ClientHello we understand) is relayed untouched.
`parse_client_hello` therefore takes whatever prefix has arrived so far and says either
"here is the hello", "I need at least N bytes of the stream", or "this is not TLS";
it raises `MalformedClientHello` for input that starts like TLS but is broken.

Choices: an SSLv2-format hello (first byte with the high bit set) is `NotTls`; the
handshake message may be split over several handshake records, but a ClientHello that
shares its last record with further handshake bytes is malformed (a client must wait for
the server before sending anything else at the handshake layer).  GREASE values are kept
as sent in `supported_versions` and `alpn`.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CLIENT_HELLO = 64 * 1024  # larger hellos are treated as malformed
MAX_RECORD = 2**14 + 2048  # TLSCiphertext bound; a plaintext hello record is smaller
_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SERVER_NAME, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS = 0, 16, 43


class MalformedClientHello(ValueError):
    """Starts like TLS but is not a ClientHello we can parse; str() says why in one line."""


@dataclass(frozen=True)
class NeedMore:
    at_least: int  # total bytes of the stream needed before parsing can progress


@dataclass(frozen=True)
class NotTls:
    reason: str


@dataclass(frozen=True)
class ClientHello:
    sni: str | None  # server_name host_name (lowercase, ascii); None if absent
    alpn: tuple[str, ...]  # ALPN protocol names in client order; () if absent
    legacy_version: int  # e.g. 0x0303
    supported_versions: tuple[int, ...]  # from the supported_versions extension; () if absent
    record_bytes: int  # how many bytes of the stream the hello's TLS records occupy


class _Reader:
    """Bounds-checked big-endian reader; every overrun is a MalformedClientHello."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise MalformedClientHello(
                f"{what}: needs {n} bytes but {self.what} has only {self.remaining} left"
            )
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, len_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.uint(len_size, f"{what} length"), what), what)

    def expect_end(self) -> None:
        if self.remaining:
            raise MalformedClientHello(f"{self.remaining} unexpected trailing bytes in {self.what}")


def parse_client_hello(
    data: bytes, max_size: int = MAX_CLIENT_HELLO
) -> ClientHello | NeedMore | NotTls:
    """Parse the ClientHello at the start of `data`; raises MalformedClientHello."""
    if data and data[0] != _HANDSHAKE:
        if data[0] & 0x80:
            return NotTls(f"first byte 0x{data[0]:02x}: SSLv2-format hello is not supported")
        return NotTls(f"first byte 0x{data[0]:02x} is not a TLS handshake record")
    if len(data) >= 2 and data[1] != 0x03:
        return NotTls(f"record version major byte 0x{data[1]:02x} is not 0x03")

    handshake = bytearray()  # reassembled handshake fragments
    offset = 0
    body_len: int | None = None  # known once the 4-byte handshake header is visible
    while True:
        if len(data) < offset + 5:
            return NeedMore(offset + 5)
        ctype, major = data[offset], data[offset + 1]
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if ctype != _HANDSHAKE:
            raise MalformedClientHello(f"record of type 0x{ctype:02x} inside the ClientHello")
        if major != 0x03:
            raise MalformedClientHello(f"record version major byte 0x{major:02x} is not 0x03")
        if length == 0 or length > MAX_RECORD:
            raise MalformedClientHello(f"handshake record length {length} out of range")
        end = offset + 5 + length
        handshake += data[offset + 5 : end]
        if len(handshake) >= 4:  # check the header as soon as it is visible
            if handshake[0] != _CLIENT_HELLO:
                raise MalformedClientHello(f"handshake type {handshake[0]} is not client_hello")
            body_len = int.from_bytes(handshake[1:4], "big")
            if body_len > max_size:
                raise MalformedClientHello(f"ClientHello length {body_len} exceeds {max_size}")
        if len(data) < end:
            return NeedMore(end)
        offset = end
        if body_len is not None and len(handshake) >= 4 + body_len:
            if len(handshake) > 4 + body_len:
                extra = len(handshake) - 4 - body_len
                raise MalformedClientHello(f"{extra} handshake bytes follow the ClientHello")
            return _parse_body(bytes(handshake[4:]), record_bytes=offset)


def _parse_body(body: bytes, record_bytes: int) -> ClientHello:
    r = _Reader(body, "ClientHello")
    legacy_version = r.uint(2, "legacy_version")
    r.take(32, "random")
    if r.vector(1, "session_id").remaining > 32:
        raise MalformedClientHello("session_id longer than 32 bytes")
    suites = r.vector(2, "cipher_suites")
    if suites.remaining == 0 or suites.remaining % 2:
        raise MalformedClientHello(f"cipher_suites length {suites.remaining} is zero or odd")
    if r.vector(1, "compression_methods").remaining == 0:
        raise MalformedClientHello("no compression methods")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if r.remaining:
        exts = r.vector(2, "extensions")
        r.expect_end()
        seen: set[int] = set()
        while exts.remaining:
            ext_type = exts.uint(2, "extension type")
            ext = exts.vector(2, f"extension {ext_type}")
            if ext_type in seen:
                raise MalformedClientHello(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                sni = _server_name(ext)
            elif ext_type == _EXT_ALPN:
                alpn = _alpn(ext)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(ext)
    return ClientHello(sni, alpn, legacy_version, versions, record_bytes)


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, "server_name_list")
    ext.expect_end()
    if not names.remaining:
        raise MalformedClientHello("empty server_name list")
    host: str | None = None
    while names.remaining:
        name_type = names.uint(1, "server name type")
        raw = names.take(names.uint(2, "server name length"), "server name")
        if name_type != 0:
            continue  # no other name types are defined; skip them
        if host is not None:
            raise MalformedClientHello("more than one host_name in server_name")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedClientHello("server name is not ASCII") from None
        if "\0" in text:
            raise MalformedClientHello("server name contains NUL")
        host = text.removesuffix(".").lower()
        if not host:
            raise MalformedClientHello("empty server name")
    return host


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2, "ALPN protocol_name_list")
    ext.expect_end()
    if not protocols.remaining:
        raise MalformedClientHello("empty ALPN protocol list")
    names: list[str] = []
    while protocols.remaining:
        raw = protocols.vector(1, "ALPN protocol name").data
        if not raw:
            raise MalformedClientHello("empty ALPN protocol name")
        try:
            names.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            raise MalformedClientHello("ALPN protocol name is not ASCII") from None
    return tuple(names)


def _supported_versions(ext: _Reader) -> tuple[int, ...]:
    versions = ext.vector(1, "supported_versions")
    ext.expect_end()
    if not versions.remaining or versions.remaining % 2:
        raise MalformedClientHello(f"supported_versions length {versions.remaining} is zero or odd")
    return tuple(versions.uint(2, "version") for _ in range(versions.remaining // 2))
