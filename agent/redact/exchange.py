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
from agent.redact._headers import redact_exchange_names
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


def redact_exchange(ex: Exchange, rules: RedactionRules) -> None:
    """Redact `ex` in place by `rules` and record which rules changed it."""
    if not rules.enabled:
        return
    names, regexes, params = rules.header_names, rules.regexes, rules.query_params
    hits: set[str] = set()
    request, response = ex.request, ex.response
    # Query values first ("=" first: most targets have no query), then sensitive
    # headers and trailers, and the target and authority when their header
    # (":path", ":authority", "host") is sensitive, in C; the regexes last.
    if params:
        if request is not None and "=" in request.target:
            _mask_query(request, params, hits)
        if response is not None and "=" in response.target:
            _mask_query(response, params, hits)
    if names:
        found = redact_exchange_names(ex, names, REDACTED)
        if found:
            hits.update(found)
    if regexes:
        for msg in (request, response):
            if msg is not None:
                _mask_message_regexes(msg, rules, hits)
    grpc = ex.grpc
    if grpc is not None:
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
    if regexes and ex.notes:
        ex.notes = [_mask_text(note, regexes, hits) for note in ex.notes]
    if hits:
        ex.redactions = sorted(set(ex.redactions) | hits)
