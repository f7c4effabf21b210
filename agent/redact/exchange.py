"""Redacting a parsed Exchange before it leaves the agent as an "exchange" record.

The parsers work on the original bytes (they must, to decode HPACK and frame
messages), so the Exchanges they produce carry every secret in clear: header
values, bodies, gRPC messages, and fields derived from headers (the request
target from ":path", the authority from ":authority"/Host, the gRPC message
from "grpc-message").  Everything here is redacted in place:

- values of sensitive headers and trailers (names compared lower-case, HTTP/2
  pseudo-headers included) become "[REDACTED]" -- an exchange is structured
  data, so unlike raw records it need not keep lengths there; a derived field
  whose source header is sensitive is redacted too;
- the regex rules mask matches in header values (as latin-1 bytes), the
  derived text fields, bodies, gRPC message data and the parser's notes, byte
  for byte with "*", so lengths (body_len vs. body) stay consistent;
- the names of the rules that changed anything are added to `ex.redactions`
  (sorted, no duplicates).

`redact_exchange(ex, rules)` is C (agent/redact/_headers.c; the L7 record path
calls it per exchange): the sensitive names, the derived fields and
`ex.redactions`.  What needs `re`, and the gRPC fields, are the helpers below,
which it calls only when they apply: `_mask_query` (query params configured and a
"=" in the target), `_mask_message_regexes` and `_mask_notes` (regex rules),
`_redact_grpc` (a gRPC exchange).  Each adds the rules it applied to `hits`.
"""

from __future__ import annotations

from agent.l7.exchange import Exchange, GrpcCall, Headers, HttpMessage
from agent.redact._headers import REDACTED, redact_exchange
from agent.redact.payload import mask_regexes
from agent.redact.rules import RedactionRules, RegexRule, header_rule_name, mask_query_values

__all__ = ["REDACTED", "redact_exchange"]


def _mask_text(text: str, regexes: tuple[RegexRule, ...], hits: set[str]) -> str:
    """`text` with regex matches masked: one byte per character (latin-1, with
    "?" standing in for characters beyond it), so spans map back to characters."""
    if not regexes or not text:
        return text
    raw = text.encode("latin-1", errors="replace")
    masked, found = mask_regexes(raw, regexes)
    if not found:
        return text
    hits |= found
    chars = list(text)
    for i, (before, after) in enumerate(zip(raw, masked, strict=True)):
        if before != after:
            chars[i] = "*"
    return "".join(chars)


def _mask_header_regexes(headers: Headers, rules: RedactionRules, hits: set[str]) -> Headers:
    """`headers` with regex matches masked in the values of headers that are not
    sensitive (those are "[REDACTED]" already): a new list when anything changed."""
    names = rules.header_names
    out: Headers | None = None
    for i, (name, value) in enumerate(headers):
        if (name if name.islower() else name.lower()) in names:
            continue
        new = _mask_text(value, rules.regexes, hits)
        if new is not value:
            if out is None:
                out = list(headers)
            out[i] = (name, new)
    return headers if out is None else out


def _mask_query(msg: HttpMessage, params: frozenset[str], hits: set[str]) -> None:
    """Credential query values in the target, same length."""
    raw = msg.target.encode("latin-1", errors="replace")
    masked, found = mask_query_values(raw, params)
    if found:
        hits |= found
        msg.target = "".join(
            "*" if a != b else c for a, b, c in zip(raw, masked, msg.target, strict=True)
        )


def _mask_message_regexes(msg: HttpMessage, rules: RedactionRules, hits: set[str]) -> None:
    regexes = rules.regexes
    msg.headers = _mask_header_regexes(msg.headers, rules, hits)
    if msg.trailers:
        msg.trailers = _mask_header_regexes(msg.trailers, rules, hits)
    msg.target = _mask_text(msg.target, regexes, hits)
    msg.authority = _mask_text(msg.authority, regexes, hits)
    msg.reason = _mask_text(msg.reason, regexes, hits)
    if msg.body:
        msg.body, found = mask_regexes(msg.body, regexes)
        hits |= found


def _redact_grpc(grpc: GrpcCall, rules: RedactionRules, hits: set[str]) -> None:
    """The gRPC fields derived from sensitive headers ("grpc-message", ":path"), and
    the regexes in the gRPC message and the messages' data."""
    names, regexes = rules.header_names, rules.regexes
    if grpc.message and "grpc-message" in names:
        grpc.message = REDACTED
        hits.add(header_rule_name("grpc-message"))
    if ":path" in names and (grpc.service or grpc.method):
        grpc.service = grpc.method = REDACTED
        hits.add(header_rule_name(":path"))
    grpc.message = _mask_text(grpc.message, regexes, hits)
    if regexes:
        for m in (*grpc.request_messages, *grpc.response_messages):
            m.data, found = mask_regexes(m.data, regexes)
            hits |= found


def _mask_notes(ex: Exchange, rules: RedactionRules, hits: set[str]) -> None:
    """The regexes in the parser's notes."""
    ex.notes = [_mask_text(note, rules.regexes, hits) for note in ex.notes]
