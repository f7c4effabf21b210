"""One HPACK decode per HTTP/2 header block, shared by the parser and the masker.

HPACK is stateful per direction: every header block must be decoded, in order,
by one decoder that has seen all the blocks before it.  Two components of a
connection need the decoded fields: the parser (agent/l7/http2.py), for the
exchange, and the redaction masker (agent/redact/http2_masker.py), to know each
field's name and where its value is in the block (to mask it in place).
Decoding is the costliest step of the HTTP/2 path, so each direction has one
`HeaderBlockDecoder` and each component reads from it through its own
`BlockReader`: the first reader to reach block k decodes it, a reader that
reaches it later gets the same result.

Readers reach the same blocks in the same order (they see the same bytes), but
not in lockstep: the connection feeds the parser first; the masker may give a
block up early (`skip`: wiped, never decoded) and either may stop for good
(`close`).  A block nobody decoded breaks the chain: a reader asking for a later
one gets `HeaderBlockLost`, as its own decoder would have been out of step.

The decoder (`HpackDecoder`, C: agent/l7/_hpack.c) is RFC 7541 written for
this job rather than hpack's general one: one pass that yields the fields as
bytes and, for the masker, where each literal's value string lies (a
`HeaderBlock`: `fields`, `literals` as (position in fields, name index (0: a
literal name), position of the byte holding the value string's H bit, start,
end), `emptied`: a table size update to 0).  It follows hpack's checks
(indices, table size updates only before the first field, integer length,
truncation, the header list size), raises hpack's exception types and decodes
Huffman strings by hpack's own state table (the unit tests hold it to hpack's
decoder, block for block).
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

from hpack.exceptions import HPACKError

try:
    from agent.l7._hpack import HeaderBlock, HpackDecoder, text_fields
except ImportError as exc:  # a source tree nobody ran `make setup` in
    raise ImportError(f"agent/l7/_hpack is not built ({exc}): run `make setup`") from exc

# Limits on what the peers may make us hold: a decoded header list (hpack's
# accounting) and the dynamic table size a table size update may ask for.  The
# table is the peer's SETTINGS_HEADER_TABLE_SIZE: 4096 by default, 64 KiB is
# already generous (nginx, Go, h2, gRPC keep 4 KiB; Envoy allows 64 KiB), so a
# larger update fails the block (the parser stops, the masker wipes it) instead
# of letting one connection make us hold 16 MiB per direction.
MAX_HEADER_LIST = 1 << 24
MAX_TABLE_SIZE = 1 << 16

__all__ = [
    "MAX_HEADER_LIST",
    "MAX_TABLE_SIZE",
    "BlockReader",
    "HeaderBlock",
    "HeaderBlockDecoder",
    "HeaderBlockLost",
    "HpackDecoder",
    "text_fields",
]

_next_of = attrgetter("next")


class HeaderBlockLost(HPACKError):
    """The block cannot be decoded here: an earlier one was never decoded, or this
    reader's bytes differ from what the block decoded for another reader was."""


class HeaderBlockDecoder:
    """One direction's HPACK decoder and the decoded blocks some reader still needs."""

    def __init__(self) -> None:
        self.decoder = HpackDecoder(MAX_HEADER_LIST, MAX_TABLE_SIZE)
        self.decoded = 0  # blocks decoded so far
        # (index, raw block, the block or the error) of blocks a reader has yet to reach
        self._kept: deque[tuple[int, bytes, HeaderBlock | HPACKError]] = deque()
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

    def _trim(self) -> None:
        """Drop kept blocks every open reader is past."""
        kept = self._kept
        if kept:
            low = min(map(_next_of, self._readers), default=self.decoded)
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

    def decode(self, raw: bytes) -> HeaderBlock:
        """The next header block, whose bytes are `raw`, decoded.

        Raises an HPACKError (HeaderBlockLost included) when it does not decode.
        """
        # One method for both cases (no call per block into the source): this runs for
        # every header block, twice.
        source = self._source
        index = self.next
        self.next = index + 1
        kept = source._kept
        if index == source.decoded:  # the first reader here decodes it
            source.decoded = index + 1
            try:
                result: HeaderBlock | HPACKError = source.decoder.decode(raw)
            except HPACKError as exc:
                result = exc
            for other in source._readers:
                if other.next <= index and other is not self:
                    kept.append((index, raw, result))
                    break
            if result.__class__ is HeaderBlock:  # (the usual case: no isinstance walk)
                return result  # type: ignore[return-value]
            raise result  # type: ignore[misc]
        if index > source.decoded:
            raise HeaderBlockLost("an earlier header block was never decoded")
        # Another reader decoded it: the usual case is the oldest kept one.
        if kept and kept[0][0] == index:
            entry = kept[0]
        else:
            for entry in kept:
                if entry[0] == index:
                    break
            else:
                raise HeaderBlockLost("header block was decoded and dropped")
        low = min(map(_next_of, source._readers), default=source.decoded)  # source._trim()
        while kept and kept[0][0] < low:
            kept.popleft()
        _, first_raw, result = entry
        if first_raw != raw:
            raise HeaderBlockLost("header block differs between readers")
        if isinstance(result, HPACKError):
            raise result
        return result

    def skip(self) -> None:
        """The next header block will not be asked for (given up before it ended)."""
        self.next += 1
        self._source._trim()

    def close(self) -> None:
        """No more blocks will be asked for: nothing is kept for this reader."""
        self._source._close(self)
