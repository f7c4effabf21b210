"""Reconnect delays: exponential growth, a ceiling, and jitter.

Jitter matters because every agent of a DaemonSet loses the same collector at
the same moment; without it they would all knock again in lock-step.
"""

from __future__ import annotations

import random


class Backoff:
    """Delay before the next attempt: initial * multiplier**n, capped at maximum, +/- jitter.

    `jitter` is a fraction: 0.2 spreads each delay uniformly over [0.8 d, 1.2 d]
    (still never above `maximum`).  Pure: no clock, no sleeping.
    """

    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 10.0,
        multiplier: float = 2.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"need 0 < initial <= maximum, got {initial}, {maximum}")
        if multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {multiplier}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._current = initial
        self.attempts = 0

    def next_delay(self) -> float:
        base = self._current
        self._current = min(self.maximum, self._current * self.multiplier)
        self.attempts += 1
        if self.jitter:
            base *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return min(self.maximum, base)

    def reset(self) -> None:
        """After a success: the next failure starts again from `initial`."""
        self._current = self.initial
        self.attempts = 0
