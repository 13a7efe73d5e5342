"""Token buckets: per caller, shared across processes, bounded memory."""

from __future__ import annotations

import multiprocessing

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
    rl = limiter(Clock(), att=RateLimit(0, 1), sign=RateLimit(0, 1))
    for _ in range(100):
        rl.check_attestation("10.0.0.1")
        rl.check_signing("a", 50)


def test_idle_slots_are_reused_so_memory_stays_bounded() -> None:
    clock = Clock()
    rl = limiter(clock, slots=8)
    for i in range(1000):  # far more callers than slots, each well within its limit
        rl.check_attestation(f"10.0.{i // 256}.{i % 256}")
        clock.t += 5.0


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
