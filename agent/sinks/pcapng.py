"""pcapng sink: captured plaintext as TCP/IP packets Wireshark dissects as HTTP/HTTP2/gRPC.

Data, open and close records become synthesized packets over the connections'
real addresses and ports (agent/pcap/packets.py); exchange and stats records
have no packets and are skipped.  The file is flushed at most every
`flush_interval` seconds (the text sinks' PeriodicFlusher policy), so Wireshark
or tshark can open it while the capture still runs, and always at close.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import BinaryIO

from agent.pcap.packets import MAX_SEGMENT, PacketBuilder
from agent.pcap.writer import PcapngWriter
from agent.records.record import Record
from agent.sinks.base import OutputError, PeriodicFlusher

_BUFFER = 256 * 1024


def open_private(path: str, buffering: int = -1) -> BinaryIO:
    """`path` opened for writing (truncated), mode 0600 whatever the umask; an
    existing regular file with looser permissions is tightened to 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)
        return open(fd, "wb", buffering=buffering)  # the caller closes it
    except BaseException:
        os.close(fd)
        raise


class PcapngSink:
    """Writes Records as packets to the pcapng file at `path` ("-": stdout, e.g. a pipe
    into `wireshark -k -i -`).  Truncates an existing file.  The file holds captured
    plaintext: it is created 0600 whatever the umask, and an existing regular file
    is tightened to 0600 (a device or FIFO is left as it is)."""

    def __init__(
        self, path: str, flush_interval: float = 0.1, max_segment: int = MAX_SEGMENT
    ) -> None:
        self.path = path
        self._owns_stream = path != "-"
        stream: BinaryIO = open_private(path, _BUFFER) if self._owns_stream else sys.stdout.buffer
        self._stream = stream
        self._builder = PacketBuilder(max_segment)
        # PeriodicFlusher only calls write() and flush(): bytes go through it unchanged.
        self._out = PeriodicFlusher(stream, flush_interval)  # type: ignore[arg-type]
        try:
            self._writer = PcapngWriter(self._out)  # type: ignore[arg-type]
        except BaseException:
            self._close_stream()
            raise

    @classmethod
    def open(
        cls, path: str, flush_interval: float = 0.1, max_segment: int = MAX_SEGMENT
    ) -> PcapngSink:
        """A sink writing to `path`; raises OutputError (an OSError) with a one-line
        message if the file cannot be created, e.g. its directory does not exist."""
        try:
            return cls(path, flush_interval, max_segment)
        except OSError as e:
            err = OutputError(f"cannot write pcapng to {path!r}: {e.strerror or e}")
            err.errno = e.errno  # not .filename: OSError.__str__ would reformat the message
            raise err from e

    def write(self, record: Record) -> None:
        if record.type in ("data", "open", "close"):
            self._writer.write_packets(self._builder.feed(record))

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        try:
            self._out.close()
        finally:
            self._close_stream()

    def stats(self) -> dict[str, int]:
        return {
            "pcapng_packets": self._writer.packets,
            "pcapng_connections": self._builder.connections,
        }

    @property
    def connections(self) -> int:
        """Connections given packets so far (each starts with a synthesized handshake)."""
        return self._builder.connections

    @property
    def packets(self) -> int:
        return self._writer.packets

    @property
    def http2_ports(self) -> list[int]:
        """Server ports that carried HTTP/2: tshark dissects those only when told
        (`-d tcp.port==PORT,http2`); HTTP/1 it recognises on any port."""
        return sorted(self._builder.http2_ports)

    def _close_stream(self) -> None:
        if self._owns_stream and not self._stream.closed:
            self._stream.close()

    def __enter__(self) -> PcapngSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
