"""One HPACK decode per HTTP/2 header block, shared by the parser and the masker.

HPACK is stateful per direction: every header block must be decoded, in order,
by one decoder that has seen all the blocks before it.  Two components of a
connection need the decoded fields: the parser (agent/l7/http2.py), for the
exchange, and the redaction masker (agent/redact/http2_masker.py), to know each
field's name.  Decoding is pure Python and the costliest step of the HTTP/2 path,
so each direction has one `HeaderBlockDecoder` and each component reads from it
through its own `BlockReader`: the first reader to reach block k decodes it, a
reader that reaches it later gets the same result.

Readers reach the same blocks in the same order (they see the same bytes), but
not in lockstep: the connection feeds the parser first; the masker may give a
block up early (`skip`: wiped, never decoded) and either may stop for good
(`close`).  A block nobody decoded breaks the chain: a reader asking for a later
one gets `HeaderBlockLost`, as its own decoder would have been out of step.
"""

from __future__ import annotations

from collections import deque

import hpack
from hpack.exceptions import HPACKError

# Limits on what the peers may make us hold: a decoded header list (hpack's
# accounting) and the dynamic table size a table size update may ask for.  The
# table is the peer's SETTINGS_HEADER_TABLE_SIZE: 4096 by default, 64 KiB is
# already generous (nginx, Go, h2, gRPC keep 4 KiB; Envoy allows 64 KiB), so a
# larger update fails the block (the parser stops, the masker wipes it) instead
# of letting one connection make us hold 16 MiB per direction.
MAX_HEADER_LIST = 1 << 24
MAX_TABLE_SIZE = 1 << 16

RawHeaders = list[tuple[bytes, bytes]]


class HeaderBlockLost(HPACKError):
    """The block cannot be decoded here: an earlier one was never decoded, or this
    reader's bytes differ from what the block decoded for another reader was."""


class HeaderBlockDecoder:
    """One direction's HPACK decoder and the decoded blocks some reader still needs."""

    def __init__(self) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.decoder.max_allowed_table_size = MAX_TABLE_SIZE
        self.decoded = 0  # blocks decoded so far
        # (index, raw block, fields or the error) of blocks a reader has yet to reach
        self._kept: deque[tuple[int, bytes, RawHeaders | HPACKError]] = deque()
        self._readers: list[BlockReader] = []

    def reader(self) -> BlockReader:
        """A new reader, starting at the next block."""
        r = BlockReader(self, self.decoded)
        self._readers.append(r)
        return r

    @property
    def kept(self) -> int:
        """Decoded blocks held for a reader that has not reached them."""
        return len(self._kept)

    def _read(self, r: BlockReader, raw: bytes) -> RawHeaders:
        index = r.next
        r.next = index + 1
        if index == self.decoded:  # the first reader here decodes it
            self.decoded += 1
            try:
                result = self.decoder.decode(raw, raw=True)
            except HPACKError as exc:
                result = exc
            for other in self._readers:
                if other is not r and other.next <= index:
                    self._kept.append((index, raw, result))
                    break
        elif index < self.decoded:  # another reader decoded it
            for entry in self._kept:
                if entry[0] == index:
                    break
            else:
                raise HeaderBlockLost("header block was decoded and dropped")
            self._trim()
            _, first_raw, result = entry
            if first_raw != raw:
                raise HeaderBlockLost("header block differs between readers")
        else:
            raise HeaderBlockLost("an earlier header block was never decoded")
        if isinstance(result, HPACKError):
            raise result
        return result

    def _trim(self) -> None:
        """Drop kept blocks every open reader is past."""
        kept = self._kept
        if kept:
            low = min(o.next for o in self._readers) if self._readers else self.decoded
            while kept and kept[0][0] < low:
                kept.popleft()

    def _close(self, r: BlockReader) -> None:
        if r in self._readers:
            self._readers.remove(r)
            self._trim()


class BlockReader:
    """One component's way through a direction's header blocks, in order."""

    __slots__ = ("_source", "next")

    def __init__(self, source: HeaderBlockDecoder, start: int) -> None:
        self._source = source
        self.next = start  # index of the next block this reader will reach

    def decode(self, raw: bytes) -> RawHeaders:
        """The fields of the next header block, whose bytes are `raw`.

        Raises an HPACKError (HeaderBlockLost included) when it does not decode.
        """
        return self._source._read(self, raw)

    def skip(self) -> None:
        """The next header block will not be asked for (given up before it ended)."""
        self.next += 1
        self._source._trim()

    def close(self) -> None:
        """No more blocks will be asked for: nothing is kept for this reader."""
        self._source._close(self)
