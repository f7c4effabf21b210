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

The decoder (`HpackDecoder`) is RFC 7541 written for this job rather than
hpack's general one (about 4x cheaper per block): one pass that yields the
fields as bytes and, for the masker, where each literal's value string lies,
without per-field objects or logging.  It follows hpack's checks (indices, table
size updates only before the first field, integer length, truncation, the
header list size) and raises hpack's exception types; Huffman strings are
decoded by hpack's own table.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

from hpack.exceptions import (
    HPACKDecodingError,
    HPACKError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

# Limits on what the peers may make us hold: a decoded header list (hpack's
# accounting) and the dynamic table size a table size update may ask for.  The
# table is the peer's SETTINGS_HEADER_TABLE_SIZE: 4096 by default, 64 KiB is
# already generous (nginx, Go, h2, gRPC keep 4 KiB; Envoy allows 64 KiB), so a
# larger update fails the block (the parser stops, the masker wipes it) instead
# of letting one connection make us hold 16 MiB per direction.
MAX_HEADER_LIST = 1 << 24
MAX_TABLE_SIZE = 1 << 16
DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value

RawHeaders = list[tuple[bytes, bytes]]
# A literal field and where its value string is in the block: (its position in the
# fields, name index (0: a literal name), position of the byte holding the string's
# H bit, start, end).  Indexed fields have no bytes of their own to mask.
Literal = tuple[int, int, int, int, int]

_STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)
_STATIC_LEN = len(_STATIC)  # 61
_ENTRY_OVERHEAD = 32  # RFC 7541 4.1
_MAX_INTEGER_BYTES = 6  # the prefix and 5 continuation bytes at most, as hpack allows
# Short Huffman-coded strings decoded per direction, kept: the same literal comes in
# every request of a connection (a never-indexed credential, a client's :path).  Few
# and short, so a connection holds no more than its dynamic table does.
_HUFFMAN_CACHE = 32
_HUFFMAN_CACHED_LEN = 128  # coded bytes


_next_of = attrgetter("next")


class HeaderBlockLost(HPACKError):
    """The block cannot be decoded here: an earlier one was never decoded, or this
    reader's bytes differ from what the block decoded for another reader was."""


class HeaderBlock:
    """One decoded header block: its fields (raw bytes, in order) and its literal
    fields' value strings (the masker's business)."""

    __slots__ = ("emptied", "fields", "literals")

    def __init__(self, fields: RawHeaders, literals: list[Literal], emptied: bool) -> None:
        self.fields = fields
        self.literals = literals
        self.emptied = emptied  # a dynamic table size update to 0: the table is empty


def _integer(data: bytes, i: int, limit: int) -> tuple[int, int]:
    """RFC 7541 5.1, past the prefix: the integer whose prefix at data[i] is all ones
    (`limit`), and the index after it."""
    value = limit
    shift = 0
    end = min(len(data), i + _MAX_INTEGER_BYTES)
    i += 1
    while i < end:
        byte = data[i]
        i += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    raise HPACKDecodingError("truncated or oversized HPACK integer")


class HpackDecoder:
    """One direction's HPACK decoding context: the dynamic table and its limits."""

    def __init__(
        self, max_header_list: int = MAX_HEADER_LIST, max_table_size: int = MAX_TABLE_SIZE
    ) -> None:
        self.max_header_list = max_header_list
        self.max_allowed_table_size = max_table_size
        self._table: deque[tuple[bytes, bytes]] = deque()  # newest first
        self._size = 0  # RFC 7541 4.1 size of the entries
        self._max_size = DEFAULT_TABLE_SIZE
        self._huffman: dict[bytes, bytes] = {}

    def decode(self, data: bytes) -> HeaderBlock:
        """The fields of one complete header block; raises an HPACKDecodingError."""
        fields: RawHeaders = []
        literals: list[Literal] = []
        emptied = False
        listed = 0  # the header list's size, hpack's accounting
        n = len(data)
        i = 0
        while i < n:
            first = data[i]
            if first & 0x80:  # indexed field
                index = first & 0x7F
                if index == 0x7F:
                    index, i = _integer(data, i, 0x7F)
                else:
                    i += 1
                field = _STATIC[index - 1] if 0 < index <= _STATIC_LEN else self._entry(index)
            elif first & 0x40 or not first & 0x20:  # a literal
                if first & 0x40:  # with incremental indexing
                    index, limit = first & 0x3F, 0x3F
                else:  # without indexing / never indexed
                    index, limit = first & 0x0F, 0x0F
                if index == limit:
                    index, i = _integer(data, i, limit)
                else:
                    i += 1
                if index:
                    name = self._entry(index)[0]
                else:
                    name, _, _, i = self._string(data, i)
                value, h_pos, start, i = self._string(data, i)
                field = (name, value)
                literals.append((len(fields), index, h_pos, start, i))
                if first & 0x40:
                    self._add(field)
            else:  # dynamic table size update: before the first field only
                if fields:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size = first & 0x1F
                if size == 0x1F:
                    size, i = _integer(data, i, 0x1F)
                else:
                    i += 1
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self._resize(size)
                emptied = emptied or size == 0
                continue
            fields.append(field)
            listed += _ENTRY_OVERHEAD + len(field[0]) + len(field[1])
            if listed > self.max_header_list:
                raise OversizedHeaderListError("header list larger than allowed")
        return HeaderBlock(fields, literals, emptied)

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        """The field at `index` of the static table followed by the dynamic one."""
        if 0 < index <= _STATIC_LEN:
            return _STATIC[index - 1]
        try:
            if index > _STATIC_LEN:
                return self._table[index - _STATIC_LEN - 1]
        except IndexError:
            pass
        raise InvalidTableIndexError("invalid HPACK table index")

    def _string(self, data: bytes, i: int) -> tuple[bytes, int, int, int]:
        """RFC 7541 5.2: (the string, position of its H bit's byte, start, end)."""
        if i >= len(data):
            raise HPACKDecodingError("truncated header block")
        h_pos = i
        length = data[i] & 0x7F
        if length == 0x7F:
            length, start = _integer(data, i, 0x7F)
        else:
            start = i + 1
        end = start + length
        if end > len(data):
            raise HPACKDecodingError("truncated header block")
        raw = data[start:end]
        if data[h_pos] & 0x80 and raw:
            if length > _HUFFMAN_CACHED_LEN:
                return decode_huffman(raw), h_pos, start, end
            cached = self._huffman.get(raw)
            if cached is None:
                cached = decode_huffman(raw)
                if len(self._huffman) >= _HUFFMAN_CACHE:
                    self._huffman.clear()
                self._huffman[raw] = cached
            raw = cached
        return raw, h_pos, start, end

    def _add(self, field: tuple[bytes, bytes]) -> None:
        size = _ENTRY_OVERHEAD + len(field[0]) + len(field[1])
        if size > self._max_size:  # larger than the table: it empties it (RFC 7541 4.4)
            self._table.clear()
            self._size = 0
            return
        self._table.appendleft(field)
        self._size += size
        self._shrink()

    def _resize(self, size: int) -> None:
        self._max_size = size
        self._shrink()

    def _shrink(self) -> None:
        table = self._table
        while self._size > self._max_size:
            name, value = table.pop()
            self._size -= _ENTRY_OVERHEAD + len(name) + len(value)


class HeaderBlockDecoder:
    """One direction's HPACK decoder and the decoded blocks some reader still needs."""

    def __init__(self) -> None:
        self.decoder = HpackDecoder()
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

    def _read(self, r: BlockReader, raw: bytes) -> HeaderBlock:
        index = r.next
        r.next = index + 1
        if index == self.decoded:  # the first reader here decodes it
            self.decoded += 1
            try:
                result: HeaderBlock | HPACKError = self.decoder.decode(raw)
            except HPACKError as exc:
                result = exc
            for other in self._readers:
                if other is not r and other.next <= index:
                    self._kept.append((index, raw, result))
                    break
        elif index < self.decoded:  # another reader decoded it
            kept = self._kept
            if kept and kept[0][0] == index:  # the usual case: the oldest kept one
                entry = kept[0]
            else:
                for entry in kept:
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
        return self._source._read(self, raw)

    def skip(self) -> None:
        """The next header block will not be asked for (given up before it ended)."""
        self.next += 1
        self._source._trim()

    def close(self) -> None:
        """No more blocks will be asked for: nothing is kept for this reader."""
        self._source._close(self)
