"""Token buckets: per caller, shared across processes, bounded memory."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import tracemalloc
from typing import Any

import pytest

from ca.ratelimit import BucketTable, RateLimit, RateLimitedError, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


ATT = RateLimit(1, 3)
SIGN = RateLimit(10, 20)


def limiter(clock: Clock, *, att: RateLimit = ATT, sign: RateLimit = SIGN,
            slots: int = 64) -> RateLimiter:
    return RateLimiter(attestation=att, signing=sign, table=BucketTable(slots),
                       monotonic=clock)


def test_attestation_burst_then_refused_then_refilled() -> None:
    clock = Clock()
    rl = limiter(clock)
    for _ in range(3):
        rl.check_attestation("10.0.0.1")
    with pytest.raises(RateLimitedError) as err:
        rl.check_attestation("10.0.0.1")
    assert str(err.value) == ("too many attestations from 10.0.0.1: the limit is 1/s "
                              "(burst 3); retry in 1.0s")
    rl.check_attestation("10.0.0.2")  # another caller has its own bucket
    clock.t += 1.0
    rl.check_attestation("10.0.0.1")
    with pytest.raises(RateLimitedError):
        rl.check_attestation("10.0.0.1")


def test_signing_counts_csrs_and_refuses_without_taking() -> None:
    clock = Clock()
    rl = limiter(clock)
    rl.check_signing("spiffe://td/sigil/agent/a", 15)
    with pytest.raises(RateLimitedError) as err:
        rl.check_signing("spiffe://td/sigil/agent/a", 10)
    assert "retry in 0.5s" in str(err.value)
    rl.check_signing("spiffe://td/sigil/agent/a", 5)  # the refused 10 took nothing
    with pytest.raises(RateLimitedError):
        rl.check_signing("spiffe://td/sigil/agent/a", 1)


def test_batch_larger_than_burst_is_refused_outright() -> None:
    rl = limiter(Clock())
    with pytest.raises(RateLimitedError, match="a batch of 21 CSRs exceeds the signing burst "
                                                "of 20; send smaller batches"):
        rl.check_signing("spiffe://td/sigil/agent/a", 21)


def test_refusals_are_counted() -> None:
    from ca.metrics import RATE_LIMITED

    before = RATE_LIMITED.labels(limit="signing")._value.get()
    rl = limiter(Clock())
    with pytest.raises(RateLimitedError):
        rl.check_signing("a", 21)
    assert RATE_LIMITED.labels(limit="signing")._value.get() == before + 1


def test_zero_rate_disables() -> None:
    table = BucketTable(8)
    rl = RateLimiter(attestation=RateLimit(0, 1), signing=RateLimit(0, 1), table=table,
                     monotonic=Clock())
    passed = 0
    for _ in range(100):  # far past a burst of 1, at one instant
        rl.check_attestation("10.0.0.1")
        rl.check_signing("a", 50)
        passed += 1
    assert passed == 100
    assert not any(table._keys)  # a disabled limit keeps no bucket at all


def test_idle_slots_are_reused_so_memory_stays_bounded() -> None:
    clock = Clock()
    rl = limiter(clock, slots=8)
    passed = 0
    tracemalloc.start()
    try:
        for i in range(200):  # warm up: interned strings, caches
            rl.check_attestation(f"10.1.{i // 256}.{i % 256}")
            clock.t += 5.0
        before, _ = tracemalloc.get_traced_memory()
        for i in range(20_000):  # far more callers than slots, each well within its limit
            rl.check_attestation(f"10.{2 + i // 65536}.{i // 256 % 256}.{i % 256}")
            passed += 1
            clock.t += 5.0
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert passed == 20_000  # idle slots were reused, not shared
    # 20,000 callers kept in a dict would take megabytes; the fixed table takes nothing.
    assert after - before < 16 * 1024
    assert sum(1 for k in rl.table._keys if k) <= 8


def test_a_busy_bucket_is_never_given_to_a_newcomer() -> None:
    clock = Clock()
    rl = limiter(clock, slots=8)
    for _ in range(3):
        rl.check_attestation("192.0.2.1")
    for i in range(100):  # newcomers at the same instant: every slot fills up
        with contextlib.suppress(RateLimitedError):  # sharing a busy slot: stricter
            rl.check_attestation(f"10.0.0.{i}")
    with pytest.raises(RateLimitedError):  # still empty: never looser
        rl.check_attestation("192.0.2.1")


def _drain(table: BucketTable, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    rl = RateLimiter(attestation=RateLimit(0.001, 10), signing=RateLimit(0, 1), table=table,
                     monotonic=lambda: 5000.0)
    ok = 0
    for _ in range(n):
        try:
            rl.check_attestation("192.0.2.1")
            ok += 1
        except RateLimitedError:
            pass
    out.put(ok)


def test_buckets_are_shared_between_processes() -> None:
    ctx = multiprocessing.get_context("spawn")
    table = BucketTable(64)
    out = ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(table, 10, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sum(out.get(timeout=10) for _ in procs) == 10  # one burst in all, not one each


def _stuck_inside_take(table: BucketTable, inside: Any) -> None:
    """A worker that takes the table's lock and stops there, to be killed."""

    def stop_here(*_args: object) -> int:
        inside.set()
        threading.Event().wait()
        raise AssertionError("unreachable")

    BucketTable._find = stop_here  # type: ignore[method-assign,assignment]  # this child only
    RateLimiter(attestation=RateLimit(1, 10), signing=RateLimit(0, 1), table=table,
                monotonic=lambda: 5000.0).check_attestation("192.0.2.9")


def test_a_worker_killed_inside_take_does_not_freeze_the_others() -> None:
    ctx = multiprocessing.get_context("spawn")
    table = BucketTable(64)
    inside = ctx.Event()
    victim = ctx.Process(target=_stuck_inside_take, args=(table, inside))
    victim.start()
    assert inside.wait(60), "the victim never reached take()"
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(60)
    assert victim.exitcode == -signal.SIGKILL

    # Another worker, started before or after, still takes tokens: one burst of 10.
    out = ctx.Queue()
    other = ctx.Process(target=_drain, args=(table, 12, out))
    other.start()
    other.join(60)
    assert out.get(timeout=60) == 10  # a hang here (no answer) is the frozen lock

    # And so does this process (in a thread: a frozen lock must fail, not hang the run).
    refused: list[bool] = []

    def take() -> None:
        rl = RateLimiter(attestation=RateLimit(0.001, 10), signing=RateLimit(0, 1),
                         table=table, monotonic=lambda: 5000.0)
        try:
            rl.check_attestation("192.0.2.1")
        except RateLimitedError:
            refused.append(True)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(60)
    assert refused == [True]  # answered, from the bucket the other worker drained


def test_a_bucket_stamped_later_by_another_process_is_not_drained() -> None:
    # Each process reads the clock before it takes the shared lock, so a bucket may
    # carry a stamp later than the ``now`` of the next taker. At a high rate the
    # negative refill drained the bucket and refused a caller within its limit.
    table = BucketTable(8)
    fast = RateLimit(1_000_000_000, 2)
    assert table.take("agent", 1, fast, now=100.0) == 0.0
    assert table.take("agent", 1, fast, now=100.001) == 0.0  # another process, later
    assert table.take("agent", 1, fast, now=100.0005) == 0.0  # read before that one
    # The bucket's clock did not run backwards: the next taker still refills from
    # the later stamp, not from the earlier reading.
    assert table.take("agent", 2, fast, now=100.001) > 0.0


def test_colliding_attestations_never_clamp_an_agents_signing_bucket() -> None:
    # One slot: every caller collides. Attestations (burst 3) judged a signing
    # bucket with 19 of 20 tokens "full" by their own burst, took it over, and the
    # agent then shared a slot of attestation tokens.
    clock = Clock()
    rl = limiter(clock, slots=1)
    rl.check_signing("spiffe://td/agent", 1)
    for i in range(50):
        with contextlib.suppress(RateLimitedError):
            rl.check_attestation(f"10.9.0.{i}")
    rl.check_signing("spiffe://td/agent", 19)  # the agent's own 19 tokens


def test_signing_probes_never_refresh_a_drained_attestation_bucket() -> None:
    # A drained attestation bucket (1/s) looked "full" to a signing probe (10/s)
    # after 2 s, which evicted it: the attacker got a fresh burst early.
    clock = Clock()
    rl = limiter(clock, slots=1)
    for _ in range(3):
        rl.check_attestation("198.51.100.7")
    clock.t += 2.0
    rl.check_signing("spiffe://td/agent", 1)
    rl.check_attestation("198.51.100.7")
    rl.check_attestation("198.51.100.7")
    with pytest.raises(RateLimitedError):  # 2 s at 1/s: two tokens, not three
        rl.check_attestation("198.51.100.7")
