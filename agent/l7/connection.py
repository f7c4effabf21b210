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

Detection is here, in Python (a few records per connection).  Everything else a
record goes through -- the stream position, the parser's and the masker's feeds,
holding and releasing, the payload regexes, the counters -- is one record path in
C (agent/l7/_record_path.c, ConnectionL7's base), taken by every protocol: once a
connection is decided, each of its data records costs one call from the stage.
The exchanges the parser finishes become records there too (_exchange_records:
redacted by agent/redact/exchange.py's redact_exchange, counted, given the
connection's identity), per exchange.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from agent.l7._record_path import Connection
from agent.l7.detect import (
    Verdict,
    classify_request_start,
    classify_response_start,
    looks_like_settings_frame,
)
from agent.l7.exchange import Side
from agent.l7.header_blocks import HeaderBlockDecoder
from agent.l7.http1 import Http1Parser
from agent.l7.http2 import Http2Parser
from agent.l7.http2_frames import find_frame_run
from agent.records.record import Record
from agent.redact.http1_masker import Http1HeaderMasker
from agent.redact.http2_masker import Http2HeaderMasker
from agent.redact.rules import DEFAULT_RULES, RedactionRules

# Records of a connection whose start we did not see are tried for an HTTP/1
# request line this many times before the connection is left raw.
MIDSTREAM_TRIES = 16


@dataclass(frozen=True)
class L7Options:
    parse: bool = True  # parse HTTP/1.x, HTTP/2 and gRPC into exchange records
    body_limit: int = 4096  # body bytes kept per message in an exchange
    rules: RedactionRules = DEFAULT_RULES
    max_connections: int = 16384  # tracked at once; the least recently used go first


@dataclass(slots=True)  # the record path (C) counts into these: slots are read and set fastest
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
class _Opening:
    """A direction's first bytes, for detection."""

    first: bytearray = field(default_factory=bytearray)
    first_offset: int | None = None


def side_of(role: str, direction: str) -> Side | None:
    """Which stream a direction carries, when the process's role says it."""
    if role == "client":
        return "request" if direction == "egress" else "response"
    if role == "server":
        return "request" if direction == "ingress" else "response"
    return None


class ConnectionL7(Connection):
    """One connection: detection here, the record path in its C base (the offset
    check, parser and masker feeds, holding and releasing, the payload regexes,
    the exchange records, the counters): a data record of a decided connection is
    one call, on_data()."""

    def __init__(
        self, options: L7Options, counters: L7Counters, previous_protocol: str = ""
    ) -> None:
        """`previous_protocol`: what the connection was known to speak when the
        stage last let it go (evicted): its framing is picked up fail-closed."""
        super().__init__(counters, options.rules)
        self.options = options
        self.decided = False
        # The C base's: protocol ("", "http1", "http2" once decided), parser,
        # request_direction ("egress" / "ingress"), last (identity for exchange
        # records), the maskers (masker(), set_masker()) and the held records.
        self._dirs = {"egress": _Opening(), "ingress": _Opening()}
        self._undetected: list[Record] = []  # held while detection needs more bytes
        self._midstream_tries = 0
        if previous_protocol == "http2":
            self.decided = True
            self._start_midstream_http2()
        self._update_detecting()

    # -- input -------------------------------------------------------------

    # on_data(record) is the C base's: records of a decided connection go down the
    # record path (process()) at once, the others come here first.

    def _detect_data(self, record: Record) -> list[Record]:
        """A data record while the protocol is not decided, or is unknown and the
        first records are still searched for a start (C's on_data calls this)."""
        if not self.decided:
            self._undetected.append(record)
            self._note_first_bytes(record)
            if not self._try_detect(final=False):
                return []
            held, self._undetected = self._undetected, []
            self._update_detecting()
            out: list[Record] = []
            for r in held:
                out.extend(self.process(r))
            return out
        if self.options.rules.enabled and self._frames_in(record.data):
            self._start_midstream_http2()
        else:
            self._try_midstream_http1(record)
        self._update_detecting()
        return self.process(record)

    def _update_detecting(self) -> None:
        """Whether records must come to _detect_data: past it, an unknown protocol
        is only checked for HTTP/2 frames at each record's start (in C)."""
        self.detecting = not self.decided or (
            self.protocol == "" and self._midstream_tries < MIDSTREAM_TRIES
        )

    def on_close(self, record: Record | None) -> list[Record]:
        """Finish the connection: everything held goes out, then pending exchanges,
        then `record` (the close record; None when the stage itself lets go)."""
        out: list[Record] = []
        if not self.decided:
            self._try_detect(final=True)
            held, self._undetected = self._undetected, []
            for r in held:
                out.extend(self.process(r))
        out.extend(self.drain())
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
                if self._frames_in(r.data):
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
    def _frames_in(data: bytes) -> bool:
        """Whether `data` holds a run of HTTP/2 frames anywhere in it (a record may
        start inside a large frame): the test while a connection's first records are
        searched.  Past them the C record path tests each record of a connection of
        unknown protocol from its first byte only (starts_frame_run, cheap)."""
        return find_frame_run(data) is not None

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
        for direction in self._dirs:
            # The previous masker (HTTP/1, line-based) holds nothing back.
            self.set_masker(
                direction,
                Http2HeaderMasker(
                    rules.header_names,
                    preface=False,
                    query_params=rules.query_params,
                    midstream=True,
                ),
            )

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
            for direction in self._dirs:
                self.set_masker(
                    direction,
                    Http2HeaderMasker(
                        names,
                        preface=direction == request_dir,
                        blocks=blocks[direction],
                        query_params=self.options.rules.query_params,
                    ),
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
        for direction, state in self._dirs.items():
            if self.masker(direction) is None and (rules.header_names or rules.query_params):
                masker = Http1HeaderMasker(rules.header_names, rules.query_params)
                if midline and (state.first_offset or 0) > 0:
                    # Past the start: the first line may be the rest of a header value.
                    masker.start_midline()
                self.set_masker(direction, masker)

    def _start_http1(self) -> None:
        self.protocol = "http1"
        self.counters.http1_connections += 1
        if self.options.parse:
            self.parser = Http1Parser(self.options.body_limit)

    def _try_midstream_http1(self, r: Record) -> None:
        self._midstream_tries += 1
        side = self.side(r.direction)
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
