"""User regex rules on raw payload bytes, masked without changing lengths.

Records carry offsets into their direction's byte stream and pcapng output
carries TCP sequence numbers derived from them, so a redaction may change bytes
but never their count: every byte of a match becomes b"*".

A match is searched within one record's bytes only; a secret split across two
records is found only if each part matches on its own (the rules are meant for
self-contained tokens such as card numbers or keys).
"""

from __future__ import annotations

from agent.redact.rules import RegexRule


def mask_regexes(data: bytes, rules: tuple[RegexRule, ...]) -> tuple[bytes, set[str]]:
    """`data` with every match of every rule replaced by as many b"*", and the
    names ("regex:NAME") of the rules that matched.  Zero-length matches are
    ignored.  Rules apply in order, each to the output of the previous one."""
    hits: set[str] = set()
    out: bytearray | None = None
    for rule in rules:
        target = data if out is None else bytes(out)
        spans = [m.span() for m in rule.pattern.finditer(target)]
        for start, end in spans:
            if end <= start:
                continue
            if out is None:
                out = bytearray(data)
            out[start:end] = b"*" * (end - start)
            hits.add(rule.rule_name)
    if out is None:
        return data, hits
    return bytes(out), hits
