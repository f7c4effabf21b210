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
"""

from __future__ import annotations

from agent.l7.exchange import Exchange, Headers, HttpMessage
from agent.redact._headers import redact_header_values
from agent.redact.payload import mask_regexes
from agent.redact.rules import RedactionRules, RegexRule, header_rule_name, mask_query_values

REDACTED = "[REDACTED]"


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


def _redact_headers(headers: Headers, rules: RedactionRules, hits: set[str]) -> Headers:
    """`headers` with sensitive values redacted and regex matches masked: a new list
    when anything changed, else `headers` itself (most headers match no rule)."""
    names = rules.header_names
    if names:
        headers, found = redact_header_values(headers, names, REDACTED)
        for name in found:
            hits.add(header_rule_name(name))
    regexes = rules.regexes
    if not regexes:
        return headers
    out: Headers | None = None
    for i, (name, value) in enumerate(headers):
        # A sensitive value is "[REDACTED]" by now, and not masked further.
        if (name if name.islower() else name.lower()) in names:
            continue
        new = _mask_text(value, regexes, hits)
        if new is not value:
            if out is None:
                out = list(headers)
            out[i] = (name, new)
    return headers if out is None else out


def _redact_message(msg: HttpMessage, rules: RedactionRules, hits: set[str]) -> None:
    msg.headers = _redact_headers(msg.headers, rules, hits)
    if msg.trailers:
        msg.trailers = _redact_headers(msg.trailers, rules, hits)
    names = rules.header_names
    # Credential query values, same length ("=" first: most targets have no query).
    if msg.target and rules.query_params and "=" in msg.target:
        raw = msg.target.encode("latin-1", errors="replace")
        masked, found = mask_query_values(raw, rules.query_params)
        if found:
            hits |= found
            msg.target = "".join(
                "*" if a != b else c for a, b, c in zip(raw, masked, msg.target, strict=True)
            )
    if msg.target and ":path" in names:
        msg.target = REDACTED
        hits.add(header_rule_name(":path"))
    if msg.authority and (":authority" in names or "host" in names):
        msg.authority = REDACTED
        hits.add(header_rule_name(":authority" if ":authority" in names else "host"))
    regexes = rules.regexes
    if regexes:
        msg.target = _mask_text(msg.target, regexes, hits)
        msg.authority = _mask_text(msg.authority, regexes, hits)
        msg.reason = _mask_text(msg.reason, regexes, hits)
        if msg.body:
            msg.body, found = mask_regexes(msg.body, regexes)
            hits |= found


def redact_exchange(ex: Exchange, rules: RedactionRules) -> None:
    """Redact `ex` in place by `rules` and record which rules changed it."""
    if not rules.enabled:
        return
    hits: set[str] = set()
    for msg in (ex.request, ex.response):
        if msg is not None:
            _redact_message(msg, rules, hits)
    grpc = ex.grpc
    if grpc is not None:
        names = rules.header_names
        if grpc.message and "grpc-message" in names:
            grpc.message = REDACTED
            hits.add(header_rule_name("grpc-message"))
        if ":path" in names and (grpc.service or grpc.method):
            grpc.service = grpc.method = REDACTED
            hits.add(header_rule_name(":path"))
        grpc.message = _mask_text(grpc.message, rules.regexes, hits)
        if rules.regexes:
            for m in (*grpc.request_messages, *grpc.response_messages):
                m.data, found = mask_regexes(m.data, rules.regexes)
                hits |= found
    if rules.regexes and ex.notes:
        ex.notes = [_mask_text(note, rules.regexes, hits) for note in ex.notes]
    if hits:
        ex.redactions = sorted(set(ex.redactions) | hits)
