"""Drive agent.fallback.iptables inside a network namespace (run via `ip netns exec`).

    iptables_ctl.py install '{"outbound_port": 15443, "ports": [443]}'
    iptables_ctl.py remove [PREFIX]
    iptables_ctl.py families '{...}'

Prints one JSON line: {"ok": true, "result": ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import logging
import sys

from agent.fallback import iptables
from agent.fallback.rules import InterceptRules

_TUPLES = ("ports", "cidrs", "exclude_cidrs", "inbound_ports")


def _rules(text: str) -> InterceptRules:
    kwargs = json.loads(text)
    for key in _TUPLES:
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return InterceptRules(**kwargs)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    command, *args = argv
    try:
        if command == "install":
            result = iptables.install(_rules(args[0]))
        elif command == "remove":
            iptables.remove(*args[:1])
            result = None
        elif command == "families":
            result = iptables.families(_rules(args[0]))
        else:
            raise SystemExit(f"unknown command {command!r}")
    except (iptables.IptablesError, ValueError) as exc:
        print(json.dumps({"ok": False, "error": str(exc), "type": type(exc).__name__}))
        return 1
    print(json.dumps({"ok": True, "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
