"""Subjects and message ids of records in the JetStream stream (pure; docs/nats.md).

    <prefix>.<node>.<namespace>.<type>        prefix "tlscap.v1" by default

- node: the record's node name; namespace: the Kubernetes namespace of the process's
  pod, `_` when it has none (host processes, agents' stats records); type: data, open,
  close, stats or exchange.
- A name becomes one subject token by percent-encoding (UTF-8) every byte outside
  `A-Z a-z 0-9 - _ ~`, so dots, `*`, `>`, spaces and non-ASCII cannot break a subject
  and two different names never share a token. An empty name is `_`; a name that is
  exactly `_` is `%5F`.
- Message id (the `Nats-Msg-Id` header JetStream de-duplicates on):
  `<agent_id>:<seq>`, with control characters and `%` of agent_id percent-encoded
  (a header value cannot carry them). seq is decimal digits, so the id splits
  unambiguously at its last `:`.

A consumer filter is built per dimension: the tokens of the filter's nodes,
namespaces and types, or `*` for a dimension the filter leaves open. Filters name at
most MAX_FILTER_SUBJECTS subjects; beyond that the largest dimension is widened to
`*` (the collector still applies the whole RecordFilter to what arrives).
"""

from __future__ import annotations

import itertools
import re

from agent.records.filter import RecordFilter
from agent.records.record import Record

DEFAULT_PREFIX = "tlscap.v1"
NO_NAMESPACE = "_"
# JetStream takes a list of non-overlapping filter subjects; keep it short.
MAX_FILTER_SUBJECTS = 64
RECORD_TYPES = ("data", "open", "close", "stats", "exchange")

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")
_PREFIX = re.compile(r"^[A-Za-z0-9_~-]+(\.[A-Za-z0-9_~-]+)*$")


def check_prefix(prefix: str) -> str:
    """The prefix itself, or ValueError: literal tokens only (no wildcards, no spaces)."""
    if not _PREFIX.match(prefix):
        raise ValueError(
            f"subject prefix {prefix!r}: dot-separated tokens of A-Z a-z 0-9 - _ ~ only"
        )
    return prefix


def token(name: str) -> str:
    """One subject token for a node or namespace name (see the module notes)."""
    if not name:
        return NO_NAMESPACE
    if name == NO_NAMESPACE:
        return "%5F"
    raw = name.encode("utf-8")
    if all(b in _SAFE for b in raw):
        return name
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def untoken(tok: str) -> str:
    """The name a token stands for (token() reversed); `_` is the empty name."""
    if tok == NO_NAMESPACE:
        return ""
    if "%" not in tok:
        return tok
    out = bytearray()
    i = 0
    while i < len(tok):
        if tok[i] == "%":
            out.append(int(tok[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(tok[i]))
            i += 1
    return out.decode("utf-8", errors="replace")


def namespace_of(record: Record) -> str:
    return record.pod.namespace if record.pod is not None else ""


def subject_for(record: Record, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.{token(record.node)}.{token(namespace_of(record))}.{record.type}"


def msg_id(agent_id: str, seq: int) -> str:
    """The Nats-Msg-Id of a record: `<agent_id>:<seq>`."""
    if any(c == "%" or ord(c) < 0x20 or ord(c) == 0x7F for c in agent_id):
        agent_id = "".join(
            f"%{ord(c):02X}" if c == "%" or ord(c) < 0x20 or ord(c) == 0x7F else c for c in agent_id
        )
    return f"{agent_id}:{seq}"


def filter_subjects(flt: RecordFilter, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Non-overlapping subjects covering every record `flt` can match (maybe more)."""
    dims: list[list[str] | None] = [
        sorted({token(n) for n in flt.nodes}) or None,
        # A namespace filter never matches records without a pod, so `_` is not needed.
        sorted({token(n) for n in flt.namespaces}) or None,
        [t for t in RECORD_TYPES if t in flt.types] or None,
    ]
    if dims[2] is not None and len(dims[2]) == len(RECORD_TYPES):
        dims[2] = None

    def size() -> int:
        n = 1
        for d in dims:
            n *= len(d) if d else 1
        return n

    while size() > MAX_FILTER_SUBJECTS:
        widest = max(range(3), key=lambda i: len(dims[i] or ()))
        dims[widest] = None
    if all(d is None for d in dims):
        return [f"{prefix}.>"]
    return [
        f"{prefix}.{node}.{ns}.{kind}"
        for node, ns, kind in itertools.product(*(d or ["*"] for d in dims))
    ]
