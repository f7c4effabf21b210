"""Which namespaces each consumer may read: the collector's `--policy FILE` (TOML).

    # Every consumer identity tlscap://consumer/<name> is looked up by <name>.
    [consumers.oncall]               # no `namespaces`: everything, host processes too
    [consumers.shop-team]
    namespaces = ["shop", "payments"]
    [consumers."*"]                  # any consumer not listed (omit it: they are refused)
    namespaces = ["public"]

A consumer restricted to namespaces sees only records of processes in pods of those
namespaces: host processes and agents' stats records have no namespace and stay out
of sight. Without a policy file every consumer reads everything.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from agent.certs.identity import IdentityError, check_name
from agent.records.filter import RecordFilter

ANY_CONSUMER = "*"


class PolicyError(ValueError):
    """The policy file is unreadable or malformed (one-line message)."""


class PolicyDenied(Exception):
    """This consumer may not read what it asked for (message says why)."""


@dataclass(frozen=True)
class ConsumerRule:
    namespaces: frozenset[str] | None = None  # None: every namespace, and no namespace


@dataclass(frozen=True)
class Policy:
    consumers: dict[str, ConsumerRule]

    def rule_for(self, consumer: str) -> ConsumerRule | None:
        return self.consumers.get(consumer, self.consumers.get(ANY_CONSUMER))

    def restrict(self, consumer: str, flt: RecordFilter) -> RecordFilter:
        """`flt` narrowed to what `consumer` may see; PolicyDenied if it may see nothing
        or asked for namespaces outside its own."""
        rule = self.rule_for(consumer)
        if rule is None:
            raise PolicyDenied(f"consumer {consumer!r} is not in the collector's policy")
        if rule.namespaces is None:
            return flt
        if flt.namespaces:
            outside = flt.namespaces - rule.namespaces
            if outside:
                raise PolicyDenied(
                    f"consumer {consumer!r} may not read namespace(s) {', '.join(sorted(outside))}"
                )
            return flt
        return replace(flt, namespaces=rule.namespaces)


def parse_policy(text: str, source: str = "policy") -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    unknown = set(doc) - {"consumers"}
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    table = doc.get("consumers", {})
    if not isinstance(table, dict):
        raise PolicyError(f"{source}: `consumers` must be a table")
    consumers: dict[str, ConsumerRule] = {}
    for name, entry in table.items():
        where = f"{source}: consumers.{name}"
        if name != ANY_CONSUMER:
            try:
                check_name(name, "consumer")
            except IdentityError as exc:
                raise PolicyError(f"{where}: {exc}") from None
        if not isinstance(entry, dict):
            raise PolicyError(f"{where} must be a table")
        extra = set(entry) - {"namespaces"}
        if extra:
            raise PolicyError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        namespaces = entry.get("namespaces")
        if namespaces is None:
            consumers[name] = ConsumerRule()
            continue
        if (
            not isinstance(namespaces, list)
            or not namespaces
            or not all(isinstance(n, str) and n for n in namespaces)
        ):
            raise PolicyError(
                f"{where}.namespaces must be a non-empty list of names "
                "(leave it out to allow everything; leave the consumer out to refuse it)"
            )
        consumers[name] = ConsumerRule(frozenset(namespaces))
    return Policy(consumers)


def load_policy(path: str | Path) -> Policy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {path} is not UTF-8 text") from None
    return parse_policy(text, str(path))
