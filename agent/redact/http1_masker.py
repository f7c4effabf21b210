"""Masking sensitive HTTP/1.x header values in a byte stream, chunk by chunk.

Data records are whatever one TLS library call wrote or read: a header line can
be split anywhere between two records (its name in one, the colon or the value
in the next, CR and LF apart), and records must leave the agent masked one by
one, in order, at their original length.  So this masker does not parse HTTP
messages: it is a small line-oriented state machine over the raw stream that
recognises, at every line start, "<sensitive name>[SP/HT]*:" and replaces the
value after it with b"*" up to the end of the line -- including obs-fold
continuation lines (lines starting with SP or HT right after such a value).

Why framing-independent: a parser that knows where the header section ends would
have to be as lenient as every server it watches, and any disagreement (a bare
LF, a smuggling attempt, a pipelined request it lost track of) would leak a
token.  Matching every line instead errs the other way: a body line that
happens to start like "Authorization:" is masked too.  That over-redaction is
accepted; under-redaction is not.

Masking rules, precisely:
- the value starts after the colon and the SP/HT that follow it;
- it ends at the LF ending the line; CR bytes are kept (so a bare CR inside a
  value does not end the masking early), every other byte becomes b"*";
- after gap() (bytes lost) the line position is unknown, so nothing matches until
  the next LF -- except that a value being masked when the gap came, or one whose
  line had just ended (a fold line may have started in the gap), goes on being
  masked until the next LF (fail closed).  A sensitive header whose *name* was
  lost in a gap cannot be recognised: that is the one thing a stream masker
  cannot do.

Query parameters (rules.DEFAULT_QUERY_PARAMS: access_token, X-Amz-Signature, ...)
are masked the same way, on every line (request lines, Referer/Location values,
form bodies): "[?&;]name=" followed by the value up to the next separator, also
when the name and the value fall in two records.

The byte work is C (agent/redact/_stream_masker.c, built by `make setup`): every
record of every connection that is not HTTP/2 passes here, and the same state
machine in Python cost 4-6 us per HTTP head and ~25 us per 4 KiB binary record
(bench/README.md, "The stream masker in C").
"""

from __future__ import annotations

import functools

from agent.redact.rules import header_rule_name, query_rule_name

try:
    from agent.redact._stream_masker import StreamMasker
except ImportError as exc:  # a source tree nobody ran `make setup` in
    raise ImportError(
        f"agent/redact/_stream_masker is not built ({exc}): run `make setup`"
    ) from exc

RULE_MIDSTREAM_LINE = "http1:midstream-line"


@functools.lru_cache(maxsize=16)
def _spec(
    names: frozenset[str], query_params: frozenset[str]
) -> tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[str, ...]]:
    """The StreamMasker arguments for a set of names: built once per set, since a
    masker is made for each direction of every connection."""
    headers = sorted({n.lower() for n in names})
    query = sorted({q.lower() for q in query_params})
    rules = (
        *(header_rule_name(n) for n in headers),
        RULE_MIDSTREAM_LINE,  # start_midline()'s rule, right after the header rules
        *(query_rule_name(q) for q in query),
    )
    return (
        tuple(n.encode("latin-1") for n in headers),
        tuple(q.encode("latin-1") for q in query),
        rules,
    )


class Http1HeaderMasker(StreamMasker):
    """One direction of one connection.  feed(data) returns the chunk masked (same
    length) at once, and the rule names that masked bytes of it; state carries
    across chunks at every byte position.  gap(length=0) says bytes were lost (same
    signature as Http2HeaderMasker.gap); start_midline() says the stream is picked
    up past its start, maybe inside a header value: the first line is masked
    (fail closed), reported as "http1:midstream-line"."""

    __slots__ = ()
    # Header blocks wiped unread: an HTTP/2 masker's count, never any here.
    unknown_blocks = 0

    def __init__(self, names: frozenset[str], query_params: frozenset[str] = frozenset()) -> None:
        super().__init__(*_spec(frozenset(names), frozenset(query_params)))

    def flush(self) -> tuple[bytes, set[str]]:
        """Nothing is ever held here (Http2HeaderMasker holds header blocks)."""
        return b"", set()
