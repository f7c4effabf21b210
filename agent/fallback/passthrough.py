"""Destinations the proxy stopped intercepting, and why (pure).

A client that pins its server's certificate (or simply does not trust our CA) rejects
the leaf we present; a ClientHello we cannot parse means we cannot terminate that TLS
at all.  The first such connection is lost either way, but it must be the only one:
from then on connections to that destination are relayed as opaque TCP.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# (original destination IP, port, SNI or None)
DestinationKey = tuple[str, int, str | None]


class PassthroughMemory:
    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[DestinationKey, tuple[float, str]] = OrderedDict()
        self.forgotten = 0  # evicted because the table was full

    def remember(self, key: DestinationKey, reason: str) -> bool:
        """Mark `key` for passthrough; False if it already was."""
        known = self.reason(key) is not None
        self._entries[key] = (self._clock(), reason)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.forgotten += 1
        return not known

    def reason(self, key: DestinationKey) -> str | None:
        """Why `key` is passed through, or None if it is intercepted."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.ttl_s is not None and self._clock() - entry[0] > self.ttl_s:
            del self._entries[key]
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)
