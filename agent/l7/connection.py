"""One connection's way through the L7 stage: detect, redact, parse, release.

Each data record of a connection passes, in order:

1. **Stream position.**  Its offset is checked against what its direction has
   delivered so far: a jump is a gap (lost events), a short capture (the payload
   cap) is a gap after it.  Gaps are told to the masker and the parser, which
   mark them rather than guess across them.
2. **Detection** (agent/l7/detect.py) from the first bytes, holding the first
   records back until the protocol is known (at most the 24-byte HTTP/2 preface).
3. **Parsing** of the original bytes into Exchanges (agent/l7/http1.py, http2.py).
4. **Redaction** of the bytes that leave: a streaming masker per direction (HTTP/2
   header blocks are held until complete, because a header's name can be in one
   TLS record and its value in the next) and the payload regex rules.  Masking
   keeps lengths, so offsets and lengths of every record stay true.

Records are released in the order they came (per connection), each once every
byte in it is decided.  Nothing is dropped here: at close or exit whatever is held
goes out, fail-closed where a header block never completed.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

from agent.l7.detect import (
    Verdict,
    classify_request_start,
    classify_response_start,
    looks_like_settings_frame,
)
from agent.l7.exchange import Exchange, Side
from agent.l7.header_blocks import HeaderBlockDecoder
from agent.l7.http1 import Http1Parser
from agent.l7.http2 import Http2Parser
from agent.l7.http2_frames import find_frame_run, starts_frame_run
from agent.records.record import Record
from agent.redact.exchange import redact_exchange
from agent.redact.http1_masker import Http1HeaderMasker
from agent.redact.http2_masker import Http2HeaderMasker
from agent.redact.payload import mask_regexes
from agent.redact.rules import DEFAULT_RULES, RedactionRules

# Records of a connection whose start we did not see are tried for an HTTP/1
# request line this many times before the connection is left raw.
MIDSTREAM_TRIES = 16
_NO_HITS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class L7Options:
    parse: bool = True  # parse HTTP/1.x, HTTP/2 and gRPC into exchange records
    body_limit: int = 4096  # body bytes kept per message in an exchange
    rules: RedactionRules = DEFAULT_RULES
    max_connections: int = 16384  # tracked at once; the least recently used go first


@dataclass
class L7Counters:
    exchanges: int = 0
    parse_failures: int = 0  # connections whose parser gave up (protocol error, gap in HTTP/2)
    redacted_records: int = 0  # data records with masked bytes
    redacted_exchanges: int = 0
    gaps: int = 0  # holes in a connection's byte stream (lost or truncated captures)
    connections_evicted: int = 0  # dropped from tracking past max_connections
    http1_connections: int = 0
    http2_connections: int = 0
    # HTTP/2 whose start was not seen (the agent started later, or its state was
    # evicted): framing picked up from a run of plausible frames, nothing parsed.
    midstream_http2_connections: int = 0
    # HEADERS/PUSH_PROMISE blocks masked whole: the HPACK state was unknown
    # (mid-stream, or framing picked up again after a gap or a bad frame).
    header_blocks_masked_unknown: int = 0
    # Connections first seen past their start (offset > 0, e.g. after an eviction)
    # whose protocol was unknown: each direction masked up to its first line end.
    midstream_unknown_connections: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f"l7_{k}": v for k, v in dataclasses.asdict(self).items()}


@dataclass
class _DirectionState:
    next_offset: int | None = None  # where the next byte of this direction belongs
    first: bytearray = field(default_factory=bytearray)  # first bytes, for detection
    first_offset: int | None = None
    masker: Http1HeaderMasker | Http2HeaderMasker | None = None
    # Masked bytes not yet in a record, in the pieces the masker returned them: mostly
    # one record's worth each, which a record then takes as it is, without a copy.
    decided: deque[bytes] = field(default_factory=deque)
    decided_len: int = 0
    hits: set[str] = field(default_factory=set)  # rules behind `decided`
    unknown_counted: int = 0  # the masker's unknown_blocks already counted

    def add(self, data: bytes, hits: set[str] | frozenset[str]) -> None:
        if data:
            self.decided.append(data)
            self.decided_len += len(data)
        if hits:
            self.hits |= hits

    def take(self, n: int) -> bytes | None:
        """The next `n` decided bytes, or None while fewer are decided."""
        if self.decided_len < n:
            return None
        if n == 0:
            return b""
        self.decided_len -= n
        pieces = self.decided
        data = pieces.popleft()
        if len(data) == n:
            return data
        parts = [data]
        have = len(data)
        while have < n:
            parts.append(pieces.popleft())
            have += len(parts[-1])
        data = b"".join(parts)
        if have > n:
            pieces.appendleft(data[n:])
        return data[:n]


def side_of(role: str, direction: str) -> Side | None:
    """Which stream a direction carries, when the process's role says it."""
    if role == "client":
        return "request" if direction == "egress" else "response"
    if role == "server":
        return "request" if direction == "ingress" else "response"
    return None


class ConnectionL7:
    def __init__(
        self, options: L7Options, counters: L7Counters, previous_protocol: str = ""
    ) -> None:
        """`previous_protocol`: what the connection was known to speak when the
        stage last let it go (evicted): its framing is picked up fail-closed."""
        self.options = options
        self.counters = counters
        self.protocol = ""  # "", "http1", "http2" once decided
        self.decided = False
        self.request_direction: str | None = None  # "egress" / "ingress"
        self.parser: Http1Parser | Http2Parser | None = None
        self.last: Record | None = None  # identity for exchange records
        self._dirs = {"egress": _DirectionState(), "ingress": _DirectionState()}
        self._queue: deque[Record] = deque()  # released in order, once decided
        self._undetected: list[Record] = []  # held while detection needs more bytes
        self._midstream_tries = 0
        self._parse_failed_counted = False
        if previous_protocol == "http2":
            self.decided = True
            self._start_midstream_http2()

    # -- input -------------------------------------------------------------

    def on_data(self, record: Record) -> list[Record]:
        self.last = record
        if not self.decided:
            self._undetected.append(record)
            self._note_first_bytes(record)
            if not self._try_detect(final=False):
                return []
            held, self._undetected = self._undetected, []
            out: list[Record] = []
            for r in held:
                out.extend(self._process(r))
            return out
        if self.protocol == "":
            searching = self._midstream_tries < MIDSTREAM_TRIES
            if self.options.rules.enabled and self._frames_in(record.data, searching):
                self._start_midstream_http2()
            elif searching:
                self._try_midstream_http1(record)
        return self._process(record)

    def on_close(self, record: Record | None) -> list[Record]:
        """Finish the connection: everything held goes out, then pending exchanges,
        then `record` (the close record; None when the stage itself lets go)."""
        out: list[Record] = []
        if not self.decided:
            self._try_detect(final=True)
            held, self._undetected = self._undetected, []
            for r in held:
                out.extend(self._process(r))
        for state in self._dirs.values():
            if state.masker is not None:
                state.add(*state.masker.flush())
        self._count_unknown_blocks()
        out.extend(self._release())
        if self._queue:  # cannot happen after flush(); never keep a record back
            out.extend(self._force_release())
        self._count_parse_failure()
        if self.parser is not None:
            ts = record.ts_ns if record is not None else (self.last.ts_ns if self.last else 0)
            out.extend(self._exchange_records(self.parser.close(ts)))
        if record is not None:
            record.protocol = self.protocol
            out.append(record)
        return out

    # -- detection ---------------------------------------------------------

    def _note_first_bytes(self, r: Record) -> None:
        state = self._dirs[r.direction or "egress"]
        if state.first_offset is None:
            state.first_offset = r.offset
        if len(state.first) < 64 and state.first_offset + len(state.first) == r.offset:
            state.first += r.data[: 64 - len(state.first)]

    def _try_detect(self, final: bool) -> bool:
        """Decide the protocol if the bytes so far allow it (or `final`): True if decided."""
        first = self._undetected[0] if self._undetected else None
        role = first.role if first is not None else "unknown"
        verdict = Verdict.UNKNOWN
        request_dir: str | None = None
        candidates = (
            [d for d in ("egress", "ingress") if side_of(role, d) == "request"]
            if role in ("client", "server")
            else ["egress", "ingress"]
        )
        for direction in candidates:
            state = self._dirs[direction]
            if not state.first:
                continue
            v = classify_request_start(bytes(state.first), state.first_offset == 0)
            if v is Verdict.NEED_MORE and not final:
                return False
            if v in (Verdict.HTTP1, Verdict.HTTP2):
                verdict, request_dir = v, direction
                break
        if request_dir is None and not final and self._server_spoke_http2_first(candidates):
            return False
        if request_dir is None and self.options.rules.enabled:
            # HTTP/2 frames that are not the connection's start: followed fail-closed.
            for r in self._undetected:
                if self._frames_in(r.data, search=True):
                    self._decided_midstream_http2(role)
                    return True
        if request_dir is None:
            # A status line first: the other direction carries the requests.
            for direction in ("egress", "ingress"):
                state = self._dirs[direction]
                status_line = (
                    state.first
                    and classify_response_start(bytes(state.first)) is Verdict.HTTP1
                    and (role == "unknown" or side_of(role, direction) == "response")
                )
                if status_line:
                    verdict = Verdict.HTTP1
                    request_dir = "ingress" if direction == "egress" else "egress"
                    break
        self._decide(verdict, request_dir, role)
        return True

    @staticmethod
    def _frames_in(data: bytes, search: bool) -> bool:
        """Whether `data` holds a run of HTTP/2 frames: anywhere in it while the
        connection's first records are searched (a record may start inside a large
        frame), later only from its first byte (a cheap test on every record)."""
        return find_frame_run(data) is not None if search else starts_frame_run(data)

    def _server_spoke_http2_first(self, request_dirs: list[str]) -> bool:
        """An HTTP/2 server may send its SETTINGS before the client's preface is read:
        wait (a few records at most) for the requests rather than call it unknown."""
        if any(self._dirs[d].first for d in request_dirs) or len(self._undetected) > 8:
            return False
        return any(looks_like_settings_frame(bytes(state.first)) for state in self._dirs.values())

    def _decided_midstream_http2(self, role: str) -> None:
        self.decided = True
        if role in ("client", "server"):
            self.request_direction = "egress" if role == "client" else "ingress"
        self._start_midstream_http2()

    def _start_midstream_http2(self) -> None:
        """HTTP/2 framing without its start: no parsing (the HPACK state is unknown),
        both directions masked by frames picked up at a record boundary."""
        self.protocol = "http2"
        self.counters.midstream_http2_connections += 1
        rules = self.options.rules
        for state in self._dirs.values():
            # The previous masker (HTTP/1, line-based) holds nothing back.
            state.unknown_counted = 0
            state.masker = Http2HeaderMasker(
                rules.header_names, preface=False, query_params=rules.query_params, midstream=True
            )

    def _count_unknown_blocks(self) -> None:
        for state in self._dirs.values():
            masker = state.masker
            if masker is not None and masker.unknown_blocks > state.unknown_counted:
                self.counters.header_blocks_masked_unknown += (
                    masker.unknown_blocks - state.unknown_counted
                )
                state.unknown_counted = masker.unknown_blocks

    def _decide(self, verdict: Verdict, request_dir: str | None, role: str) -> None:
        self.decided = True
        if request_dir is None and role in ("client", "server"):
            request_dir = "egress" if role == "client" else "ingress"
        self.request_direction = request_dir
        if verdict is Verdict.HTTP2:
            self.protocol = "http2"
            self.counters.http2_connections += 1
            names = self.options.rules.header_names
            # One HPACK decoding per direction, read by both the masker and the parser.
            blocks = {d: HeaderBlockDecoder() for d in self._dirs}
            for direction, state in self._dirs.items():
                state.masker = Http2HeaderMasker(
                    names,
                    preface=direction == request_dir,
                    blocks=blocks[direction],
                    query_params=self.options.rules.query_params,
                )
            if self.options.parse:
                response_dir = "ingress" if request_dir == "egress" else "egress"
                self.parser = Http2Parser(
                    self.options.body_limit, blocks=(blocks[request_dir], blocks[response_dir])
                )
            return
        if verdict is Verdict.HTTP1:
            self._start_http1()
        # Not HTTP/2: the HTTP/1 masker is framing-independent and cheap, so it runs on
        # every such connection -- a header line it finds is masked whatever the protocol.
        rules = self.options.rules
        midline = verdict is not Verdict.HTTP1 and any(
            (state.first_offset or 0) > 0 for state in self._dirs.values()
        )
        if midline:
            self.counters.midstream_unknown_connections += 1
        for state in self._dirs.values():
            if state.masker is None and (rules.header_names or rules.query_params):
                state.masker = Http1HeaderMasker(rules.header_names, rules.query_params)
                if midline and (state.first_offset or 0) > 0:
                    # Past the start: the first line may be the rest of a header value.
                    state.masker.start_midline()

    def _start_http1(self) -> None:
        self.protocol = "http1"
        self.counters.http1_connections += 1
        if self.options.parse:
            self.parser = Http1Parser(self.options.body_limit)

    def _try_midstream_http1(self, r: Record) -> None:
        self._midstream_tries += 1
        side = self._side(r)
        verdict = (
            classify_request_start(r.data, False)
            if side in ("request", None)
            else classify_response_start(r.data)
        )
        if verdict is Verdict.HTTP1 and side in ("request", None):
            if self.request_direction is None:
                self.request_direction = r.direction
            self._start_http1()
            self._midstream_tries = MIDSTREAM_TRIES

    # -- the record path ---------------------------------------------------

    def _side(self, r: Record) -> Side | None:
        if self.request_direction is None:
            return None
        return "request" if r.direction == self.request_direction else "response"

    def _process(self, r: Record) -> list[Record]:
        state = self._dirs[r.direction or "egress"]
        side = self._side(r)
        parser = self.parser if side is not None else None
        exchanges: list[Exchange] = []
        data = r.data
        if state.next_offset is not None and r.offset != state.next_offset:
            if r.offset > state.next_offset:
                exchanges += self._gap(state, side, r.offset - state.next_offset, r.ts_ns)
            else:
                # Bytes we already had (a re-read cannot happen at this layer; a reused
                # conn id could): parse only what is new.
                data = data[min(len(data), state.next_offset - r.offset) :]
        state.next_offset = r.offset + r.len
        if parser is not None and parser.failed is None:
            exchanges += parser.feed(side, data, r.ts_ns)
        masker = state.masker
        if masker is not None:
            masked, hits = masker.feed(r.data)
            if masker.unknown_blocks != state.unknown_counted:
                self._count_unknown_blocks()
        else:
            masked, hits = bytes(r.data), _NO_HITS  # a copy only if not bytes already
        if r.len > r.captured_len:
            exchanges += self._gap(state, side, r.len - r.captured_len, r.ts_ns)
        if not self._queue and not state.decided_len and len(masked) == r.captured_len:
            # Decided at once, nothing held before it (always so for HTTP/1, whose
            # masker holds nothing back): the record goes out now, past the queue.
            state.hits = hits
            self._finish(r, state, masked)
            out = [r]
        else:
            state.add(masked, hits)
            self._queue.append(r)
            out = self._release()
        if parser is not None and parser.failed:
            self._count_parse_failure()
        if exchanges:
            out += self._exchange_records(exchanges)
        return out

    def _count_parse_failure(self) -> None:
        if self.parser is not None and self.parser.failed and not self._parse_failed_counted:
            self._parse_failed_counted = True
            self.counters.parse_failures += 1

    def _gap(self, state: _DirectionState, side: Side | None, length: int, ts: int) -> list:
        self.counters.gaps += 1
        if state.masker is not None:
            state.masker.gap(length)
        if self.parser is not None and side is not None and self.parser.failed is None:
            return self.parser.gap(side, length, ts)
        return []

    def _release(self) -> list[Record]:
        out = []
        queue = self._queue
        dirs = self._dirs
        while queue:
            r = queue[0]
            state = dirs[r.direction or "egress"]
            masked = state.take(r.captured_len)
            if masked is None:
                break
            queue.popleft()
            self._finish(r, state, masked)
            out.append(r)
        return out

    def _finish(self, r: Record, state: _DirectionState, masked: bytes) -> None:
        """Give `r` its masked bytes, the payload regexes applied, and name the rules
        that changed any of them."""
        r.protocol = self.protocol
        regexes = self.options.rules.regexes
        if not (state.hits or regexes):  # nothing masked: the bytes that came in go out
            r.data = masked
            return
        redactions: set[str] = set()
        if state.hits:
            if masked != r.data:
                redactions |= state.hits
            if not state.decided_len:
                state.hits = set()
        if regexes:
            masked, hits = mask_regexes(masked, regexes)
            redactions |= hits
        if redactions:
            self.counters.redacted_records += 1
            r.redactions = sorted(redactions.union(r.redactions))
        r.data = masked

    def _force_release(self) -> list[Record]:
        """Fail closed: a record whose bytes were never decided leaves fully masked."""
        out = []
        while self._queue:
            r = self._queue.popleft()
            r.data = b"\x00" * r.captured_len
            r.redactions = sorted({*r.redactions, "undecided"})
            r.protocol = self.protocol
            self.counters.redacted_records += 1
            out.append(r)
        return out

    def _exchange_records(self, exchanges: list[Exchange]) -> list[Record]:
        # Exchanges only come from a parser, which exists once a data record came.
        last = self.last
        assert last is not None or not exchanges
        rules = self.options.rules
        counters = self.counters
        out = []
        for ex in exchanges:
            if rules.enabled:
                redact_exchange(ex, rules)
                if ex.redactions:
                    counters.redacted_exchanges += 1
            counters.exchanges += 1
            ts = 0
            for msg in (ex.response, ex.request):
                if msg is not None:
                    ts = msg.end_ts_ns or msg.ts_ns
                    if ts:
                        break
            out.append(Record.for_exchange(last, ts or last.ts_ns, ex))
        return out
