"""Reconnect backoff: growth, ceiling, jitter bounds, reset."""

from __future__ import annotations

import random

import pytest

from agent.export.backoff import Backoff


def test_grows_exponentially_up_to_the_maximum_without_jitter() -> None:
    b = Backoff(initial=0.2, maximum=2.0, multiplier=2, jitter=0)
    assert [b.next_delay() for _ in range(6)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert b.attempts == 6


def test_reset_starts_again_from_initial() -> None:
    b = Backoff(initial=0.5, maximum=10, jitter=0)
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert b.next_delay() == pytest.approx(0.5)
    assert b.attempts == 1


def test_jitter_stays_within_its_fraction_and_under_the_maximum() -> None:
    b = Backoff(initial=1.0, maximum=4.0, multiplier=2, jitter=0.2, rng=random.Random(7))
    bases = [1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [b.next_delay() for _ in bases]
    for base, delay in zip(bases, delays, strict=True):
        assert base * 0.8 <= delay <= min(base * 1.2, 4.0)
    # Jitter really varies the delays (agents must not retry in lock-step).
    at_max = [b.next_delay() for _ in range(20)]
    assert len(set(at_max)) > 1


def test_same_seed_same_delays() -> None:
    a = Backoff(rng=random.Random(1))
    b = Backoff(rng=random.Random(1))
    assert [a.next_delay() for _ in range(8)] == [b.next_delay() for _ in range(8)]


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0}, {"initial": 5, "maximum": 1}, {"multiplier": 0.5}, {"jitter": 1.0}],
)
def test_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
