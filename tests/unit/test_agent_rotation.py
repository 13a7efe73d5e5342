"""Rotation timing with jitter, sync backoff, and the bounded (LRU) SVID cache."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.cache import Cache
from agent.rotation import Backoff, rotation_due, rotation_fraction, rotation_time
from identity.clock import FakeClock
from tests.unit.test_agent_cache import T0, TD, entry, run, svid


def test_rotation_fraction_stays_in_the_window_and_spreads() -> None:
    fractions = [rotation_fraction(serial) for serial in range(1, 2001)]
    assert min(fractions) >= 0.4
    assert max(fractions) < 0.6
    # Spread over the window, not bunched: each fifth of it gets a share.
    buckets = [0] * 5
    for f in fractions:
        buckets[int((f - 0.4) / 0.04)] += 1
    assert all(300 < b < 500 for b in buckets), buckets


def test_rotation_time_is_stable_for_one_svid() -> None:
    s = svid("spiffe://example.org/a")
    due = rotation_time(s)
    assert T0 + dt.timedelta(minutes=24) <= due < T0 + dt.timedelta(minutes=36)
    assert rotation_time(s) == due
    assert not rotation_due(s, due - dt.timedelta(microseconds=1))
    assert rotation_due(s, due)


def fixed(value: float):  # type: ignore[no-untyped-def]
    return lambda low, high: low + (high - low) * value


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(initial=dt.timedelta(seconds=1), maximum=dt.timedelta(seconds=10),
                uniform=fixed(1.0))
    assert [b.next_delay().total_seconds() for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    b.reset()
    assert b.next_delay() == dt.timedelta(seconds=1)


def test_backoff_jitter_takes_off_at_most_half() -> None:
    b = Backoff(initial=dt.timedelta(seconds=4), maximum=dt.timedelta(minutes=5),
                uniform=fixed(0.0))
    assert b.next_delay() == dt.timedelta(seconds=2)
    assert b.next_delay() == dt.timedelta(seconds=4)


def test_backoff_survives_many_failures() -> None:
    b = Backoff(initial=dt.timedelta(seconds=1), maximum=dt.timedelta(minutes=3),
                uniform=fixed(1.0))
    for _ in range(1000):
        delay = b.next_delay()
    assert delay == dt.timedelta(minutes=3)


@pytest.mark.parametrize(("initial", "maximum"), [(0, 10), (-1, 10), (10, 5)])
def test_backoff_rejects_bad_bounds(initial: int, maximum: int) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(initial=dt.timedelta(seconds=initial), maximum=dt.timedelta(seconds=maximum))


# The bounded cache ---------------------------------------------------------------


def small_cache(size: int) -> Cache:
    async def mk() -> Cache:
        return Cache(trust_domain=TD, clock=FakeClock(T0), svid_cache_size=size)
    return run(mk())  # type: ignore[no-any-return]


def ids(n: int) -> list[str]:
    return [f"e{i:02d}" for i in range(n)]


def fill(cache: Cache, entry_ids: list[str]) -> None:
    for i in entry_ids:
        cache.set_x509_svid(i, svid(f"spiffe://example.org/{i}"))


def test_only_cache_size_svids_are_signed_ahead() -> None:
    cache = small_cache(3)
    cache.set_entries([entry(i, f"spiffe://example.org/{i}") for i in ids(10)])
    plan = [e.id for e in cache.rotation_plan(T0)]
    assert plan == ["e00", "e01", "e02"]
    fill(cache, plan)
    assert cache.rotation_plan(T0) == []
    assert sorted(cache.snapshot().svids) == ["e00", "e01", "e02"]


def test_an_entry_in_use_is_signed_on_demand_and_the_lru_one_gives_way() -> None:
    cache = small_cache(3)
    demands: list[int] = []
    cache.set_demand_callback(lambda: demands.append(1))
    cache.set_entries([entry(i, f"spiffe://example.org/{i}") for i in ids(10)])
    fill(cache, ["e00", "e01", "e02"])
    cache.use("stream-1", ["e01"])  # e01 is now the most recently used
    assert demands == []  # it has an SVID already
    cache.use("stream-2", ["e07"])
    assert demands == [1]
    assert [e.id for e in cache.rotation_plan(T0)] == ["e07"]
    fill(cache, ["e07"])
    # e00 was least recently used and nobody holds it.
    assert sorted(cache.snapshot().svids) == ["e01", "e02", "e07"]


def test_svids_in_use_are_never_evicted_even_beyond_the_size() -> None:
    cache = small_cache(2)
    cache.set_entries([entry(i, f"spiffe://example.org/{i}") for i in ids(6)])
    cache.use("w", ["e00", "e01", "e02", "e03"])
    assert [e.id for e in cache.rotation_plan(T0)] == ["e00", "e01", "e02", "e03"]
    fill(cache, ["e00", "e01", "e02", "e03"])
    assert sorted(cache.snapshot().svids) == ["e00", "e01", "e02", "e03"]
    cache.release("w")
    # Released: back down to the size, the least recently used gone first.
    assert len(cache.snapshot().svids) == 2
    assert cache.rotation_plan(T0) == []


def test_drop_expired() -> None:
    cache = small_cache(10)
    cache.set_entries([entry(i, f"spiffe://example.org/{i}") for i in ids(2)])
    fill(cache, ids(2))
    assert cache.drop_expired(T0 + dt.timedelta(minutes=59)) == []
    version = cache.version
    assert sorted(cache.drop_expired(T0 + dt.timedelta(hours=1))) == ["e00", "e01"]
    assert cache.snapshot().svids == {}
    assert cache.version == version + 1


def test_cache_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="svid_cache_size must be at least 1"):
        small_cache(0)


def test_a_fake_agent_with_50000_entries_holds_only_the_cache_size() -> None:
    cache = small_cache(1000)
    many = [entry(f"x{i:05d}", f"spiffe://example.org/w/{i}") for i in range(50_000)]
    cache.set_entries(many)
    plan = cache.rotation_plan(T0)
    assert len(plan) == 1000
    assert plan[0].id == "x00000"
