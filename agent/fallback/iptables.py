"""Apply the rules from agent.fallback.rules with iptables-save / iptables-restore.

Each family is one atomic `iptables-restore --noflush` transaction computed from the
table as it is now, so a crash between families leaves each family either old or new,
never half-written.  IPv4 is required; IPv6 is used when ip6tables works and otherwise
skipped with a log line (a host without IPv6 has nothing to intercept there).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from functools import partial

from agent.fallback.rules import (
    CHAIN_PREFIX,
    InterceptRules,
    find_installed,
    render_install,
    render_remove,
)

log = logging.getLogger(__name__)

TIMEOUT = 10.0
# A concurrent change between our save and restore makes the restore fail (a -D line no
# longer matches) without applying anything; reading the table again and retrying fixes it.
_ATTEMPTS = 3
_TOOL_PREFIX = {4: "iptables", 6: "ip6tables"}


class IptablesError(RuntimeError):
    """An iptables tool is missing or failed; str() is one line with its stderr."""


def _binary(family: int, tool: str) -> str:
    name = f"{_TOOL_PREFIX[family]}-{tool}"
    path = shutil.which(name)
    if path is None:
        raise IptablesError(f"{name} not found in PATH (`make setup` installs iptables)")
    return path


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{' '.join(argv)}: timed out after {TIMEOUT:g}s") from None
    except OSError as exc:
        raise IptablesError(f"{' '.join(argv)}: {exc}") from None
    if proc.returncode != 0:
        detail = " | ".join(line for line in proc.stderr.strip().splitlines() if line)
        raise IptablesError(f"{' '.join(argv)} exited {proc.returncode}: {detail or '(no output)'}")
    return proc.stdout


def current_nat(family: int) -> str:
    """The nat table as `iptables-save -t nat` (or ip6tables-save) prints it."""
    return _run([_binary(family, "save"), "-t", "nat"])


def _restore(family: int, text: str) -> None:
    # --wait: under the legacy backend another iptables user may hold the xtables lock.
    _run([_binary(family, "restore"), "--noflush", "--wait=5"], stdin=text)


def _ipv6_usable() -> str | None:
    """None when ip6tables' nat table can be read, else why not."""
    try:
        current_nat(6)
    except IptablesError as exc:
        return str(exc)
    return None


def families(rules: InterceptRules) -> list[int]:
    """[4], plus 6 when ip6tables works here."""
    reason = _ipv6_usable()
    if reason is None:
        return [4, 6]
    wants_v6 = (
        rules.inbound_port is not None or not rules.cidrs or any(":" in c for c in rules.cidrs)
    )
    level = logging.WARNING if wants_v6 else logging.INFO
    log.log(level, "IPv6 interception unavailable, IPv4 only: %s", reason)
    return [4]


def _apply(family: int, render: Callable[[str], str]) -> bool:
    """Restore what `render` makes of the table as it is now; False if it made nothing.

    Retried from a fresh read when the restore fails (see _ATTEMPTS)."""
    for attempt in range(1, _ATTEMPTS + 1):
        text = render(current_nat(family))
        if not text:
            return False
        try:
            _restore(family, text)
            return True
        except IptablesError as exc:
            if attempt == _ATTEMPTS:
                raise
            log.debug("IPv%d restore failed (attempt %d), retrying: %s", family, attempt, exc)
    return False


def install(rules: InterceptRules) -> list[int]:
    """Install `rules` (replacing any earlier tlscap state) in every usable family; returns
    the families where a redirect is now in place."""
    rules.validate()
    installed = []
    for family in families(rules):
        _apply(family, partial(render_install, rules, family))
        if find_installed(current_nat(family), rules.chain_prefix):
            installed.append(family)
            log.info("IPv%d interception rules installed", family)
        else:
            log.info("IPv%d: nothing to intercept for this family", family)
    return installed


def remove(prefix: str = CHAIN_PREFIX) -> None:
    """Delete our jumps and chains from both families; every family is tried before an
    error is raised."""
    errors: list[str] = []
    for family in (4, 6):
        try:
            if _apply(family, partial(render_remove, prefix=prefix)):
                log.info("IPv%d interception rules removed", family)
        except IptablesError as exc:
            if family == 6 and _ipv6_usable() is not None:
                continue  # no usable ip6tables: there can be no rules of ours there
            log.error("removing IPv%d interception rules failed: %s", family, exc)
            errors.append(f"IPv{family}: {exc}")
    if errors:
        raise IptablesError("; ".join(errors))
