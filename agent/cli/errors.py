"""How every subcommand reports a usage or environment error."""

from __future__ import annotations

import sys


def fail(message: str) -> int:
    """Print `tlscap: error: MESSAGE` to stderr; returns exit status 2 (as argparse does)."""
    print(f"tlscap: error: {message}", file=sys.stderr)
    return 2
