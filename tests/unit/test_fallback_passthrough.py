"""agent.fallback.passthrough: destinations relayed untouched after a failed interception."""

from __future__ import annotations

from agent.fallback.passthrough import PassthroughMemory

A = ("198.18.0.2", 443, "pinned.test")
B = ("198.18.0.3", 443, None)
C = ("2001:2::2", 8443, "c.test")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_remember_first_time_only() -> None:
    memory = PassthroughMemory()
    assert memory.reason(A) is None
    assert memory.remember(A, "client rejected our certificate") is True
    assert memory.remember(A, "client rejected our certificate") is False
    assert memory.reason(A) == "client rejected our certificate"
    assert memory.reason(B) is None
    assert len(memory) == 1


def test_key_parts_all_count() -> None:
    memory = PassthroughMemory()
    memory.remember(A, "pinned")
    assert memory.reason(("198.18.0.2", 443, None)) is None
    assert memory.reason(("198.18.0.2", 8443, "pinned.test")) is None
    assert memory.reason(("198.18.0.9", 443, "pinned.test")) is None


def test_latest_reason_is_kept() -> None:
    memory = PassthroughMemory()
    memory.remember(B, "unparseable ClientHello")
    assert memory.remember(B, "client rejected our certificate") is False
    assert memory.reason(B) == "client rejected our certificate"


def test_ttl_expiry() -> None:
    clock = FakeClock()
    memory = PassthroughMemory(ttl_s=60, clock=clock)
    memory.remember(A, "pinned")
    clock.now += 60
    assert memory.reason(A) == "pinned"  # exactly at the TTL: still remembered
    clock.now += 0.5
    assert memory.reason(A) is None
    assert len(memory) == 0  # an expired entry is dropped when looked at
    assert memory.remember(A, "pinned") is True  # news again after expiry


def test_remembering_again_restarts_the_ttl() -> None:
    clock = FakeClock()
    memory = PassthroughMemory(ttl_s=60, clock=clock)
    memory.remember(A, "pinned")
    clock.now += 50
    assert memory.remember(A, "pinned") is False
    clock.now += 50
    assert memory.reason(A) == "pinned"


def test_no_ttl_never_expires() -> None:
    clock = FakeClock()
    memory = PassthroughMemory(clock=clock)
    memory.remember(A, "pinned")
    clock.now += 10**9
    assert memory.reason(A) == "pinned"


def test_eviction_drops_the_oldest() -> None:
    memory = PassthroughMemory(max_entries=2)
    memory.remember(A, "a")
    memory.remember(B, "b")
    assert memory.forgotten == 0
    assert memory.remember(C, "c") is True
    assert len(memory) == 2
    assert memory.forgotten == 1
    assert memory.reason(A) is None
    assert (memory.reason(B), memory.reason(C)) == ("b", "c")


def test_re_remembering_refreshes_lru_position() -> None:
    memory = PassthroughMemory(max_entries=2)
    memory.remember(A, "a")
    memory.remember(B, "b")
    assert memory.remember(A, "a") is False  # A is now the most recent
    memory.remember(C, "c")
    assert memory.forgotten == 1
    assert memory.reason(A) == "a"
    assert memory.reason(B) is None
    assert memory.reason(C) == "c"


def test_many_evictions_counted() -> None:
    memory = PassthroughMemory(max_entries=3)
    for i in range(10):
        assert memory.remember((f"10.0.0.{i}", 443, None), "x") is True
    assert len(memory) == 3
    assert memory.forgotten == 7
    assert [memory.reason((f"10.0.0.{i}", 443, None)) for i in (6, 7, 8, 9)] == [
        None,
        "x",
        "x",
        "x",
    ]
