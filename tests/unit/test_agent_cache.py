"""Cache decisions: what to rotate and when (half-life), what to drop, notifications."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

import pytest

from agent.cache import Cache, CachedEntry, past_half_life
from agent.rotation import rotation_time
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.jwtsvid import JwtSvid, parse_insecure, sign_jwt_svid
from identity.keys import generate_private_key, key_id
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate

TD = TrustDomain("example.org")
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
AGENT = SpiffeId.parse("spiffe://example.org/sigil/agent/join_token/t")
CA_KEY = generate_private_key()
CA = new_ca_certificate(
    trust_domain=TD, public_key=CA_KEY.public_key(), signer_key=CA_KEY,
    not_before=T0 - dt.timedelta(days=1), not_after=T0 + dt.timedelta(days=30),
)


def svid(
    spiffe_id: str, *, start: dt.datetime = T0, ttl: dt.timedelta = dt.timedelta(hours=1)
) -> X509Svid:
    key = generate_private_key()
    sid = SpiffeId.parse(spiffe_id)
    cert = new_svid_certificate(
        spiffe_id=sid, public_key=key.public_key(), ca_cert=CA, ca_key=CA_KEY,
        not_before=start, not_after=start + ttl,
    )
    return X509Svid(sid, (cert,), key)


def entry(entry_id: str, spiffe_id: str, **kw: object) -> CachedEntry:
    return CachedEntry(
        id=entry_id, spiffe_id=SpiffeId.parse(spiffe_id), parent_id=AGENT,
        selectors=frozenset({Selector("unix", "uid:1000")}), **kw,  # type: ignore[arg-type]
    )


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def make_cache(clock: FakeClock | None = None) -> Cache:
    async def mk() -> Cache:
        return Cache(trust_domain=TD, clock=clock or FakeClock(T0))
    return run(mk())  # type: ignore[no-any-return]


def plan_ids(cache: Cache, now: dt.datetime) -> list[str]:
    return [e.id for e in cache.rotation_plan(now)]


def test_half_life_boundary() -> None:
    start, end = T0, T0 + dt.timedelta(hours=1)
    assert not past_half_life(start, end, T0 + dt.timedelta(minutes=29, seconds=59))
    assert past_half_life(start, end, T0 + dt.timedelta(minutes=30))


def test_missing_svid_is_planned_then_rotated_in_the_half_life_window() -> None:
    # A 1 h SVID rotates between 24 and 36 minutes (50 % +/- 10 % of its life).
    cache = make_cache()
    cache.set_entries([entry("a", "spiffe://example.org/a"), entry("b", "spiffe://example.org/b")])
    assert plan_ids(cache, T0) == ["a", "b"]
    a = svid("spiffe://example.org/a")
    cache.set_x509_svid("a", a)
    assert plan_ids(cache, T0) == ["b"]
    cache.set_x509_svid("b", svid("spiffe://example.org/b", start=T0 + dt.timedelta(minutes=13)))
    assert plan_ids(cache, T0 + dt.timedelta(minutes=23, seconds=59)) == []
    assert plan_ids(cache, T0 + dt.timedelta(minutes=36)) == ["a"]
    assert plan_ids(cache, T0 + dt.timedelta(minutes=49)) == ["a", "b"]
    due = rotation_time(a)
    assert plan_ids(cache, due - dt.timedelta(microseconds=1)) == []
    assert plan_ids(cache, due) == ["a"]


def test_rotation_plan_uses_the_injected_clock() -> None:
    clock = FakeClock(T0)
    cache = make_cache(clock)
    cache.set_entries([entry("a", "spiffe://example.org/a")])
    cache.set_x509_svid("a", svid("spiffe://example.org/a"))
    assert cache.rotation_plan() == []
    clock.advance(dt.timedelta(minutes=36))
    assert [e.id for e in cache.rotation_plan()] == ["a"]


def test_changed_entry_is_reissued_but_selector_change_is_not() -> None:
    cache = make_cache()
    e = entry("a", "spiffe://example.org/a")
    cache.set_entries([e])
    cache.set_x509_svid("a", svid("spiffe://example.org/a"))
    cache.set_entries([dataclasses.replace(e, selectors=frozenset({Selector("unix", "uid:2")}))])
    assert plan_ids(cache, T0) == []
    cache.set_entries([dataclasses.replace(e, dns_names=("a.example",))])
    assert plan_ids(cache, T0) == ["a"]
    # Still served meanwhile: same SPIFFE ID, so the old SVID stays valid.
    assert "a" in cache.snapshot().svids


def test_spiffe_id_change_drops_the_svid_at_once() -> None:
    cache = make_cache()
    cache.set_entries([entry("a", "spiffe://example.org/a")])
    cache.set_x509_svid("a", svid("spiffe://example.org/a"))
    cache.set_entries([entry("a", "spiffe://example.org/renamed")])
    assert "a" not in cache.snapshot().svids
    assert plan_ids(cache, T0) == ["a"]


def test_removed_entry_drops_its_svid_and_late_results_are_ignored() -> None:
    cache = make_cache()
    cache.set_entries([entry("a", "spiffe://example.org/a")])
    cache.set_x509_svid("a", svid("spiffe://example.org/a"))
    cache.set_entries([])
    assert cache.snapshot().svids == {}
    cache.set_x509_svid("a", svid("spiffe://example.org/a"))
    assert cache.snapshot().svids == {}


def test_entitlement_requires_all_selectors() -> None:
    cache = make_cache()
    both = dataclasses.replace(
        entry("b", "spiffe://example.org/b"),
        selectors=frozenset({Selector("unix", "uid:1000"), Selector("unix", "gid:5")}),
    )
    cache.set_entries([entry("a", "spiffe://example.org/a"), both])
    snap = cache.snapshot()
    assert [e.id for e in snap.entitled([Selector("unix", "uid:1000")])] == ["a"]
    assert [e.id for e in snap.entitled(
        [Selector("unix", "uid:1000"), Selector("unix", "gid:5")])] == ["a", "b"]
    assert snap.entitled([]) == []


def test_changes_notify_waiters_and_no_ops_do_not() -> None:
    async def scenario() -> None:
        cache = Cache(trust_domain=TD, clock=FakeClock(T0))
        bundle = Bundle(TD, (CA,))
        v0 = cache.version
        waiter = asyncio.create_task(cache.wait_for_change(v0))
        await asyncio.sleep(0)
        assert cache.set_bundles({TD: bundle})
        assert await asyncio.wait_for(waiter, 1) == v0 + 1
        assert not cache.set_bundles({TD: Bundle(TD, (CA,))})
        assert not cache.set_entries([])
        assert cache.version == v0 + 1

    run(scenario())


def test_jwt_svids_are_cached_until_half_life() -> None:
    clock = FakeClock(T0)
    key = generate_private_key()
    calls: list[tuple[str, tuple[str, ...]]] = []

    async def signer(e: CachedEntry, audience: object) -> JwtSvid:
        aud = list(audience)  # type: ignore[call-overload]
        calls.append((e.id, tuple(aud)))
        now = clock.now()
        token = sign_jwt_svid(spiffe_id=e.spiffe_id, audience=aud, key=key,
                              key_id=key_id(key.public_key()), issued_at=now,
                              expires_at=now + dt.timedelta(minutes=10))
        return parse_insecure(token, audience=aud, now=now)

    async def scenario() -> None:
        cache = Cache(trust_domain=TD, clock=clock, jwt_signer=signer)
        e = entry("a", "spiffe://example.org/a")
        cache.set_entries([e])
        first = await cache.jwt_svid(e, ["y", "x"])
        assert await cache.jwt_svid(e, ["x", "y", "x"]) is first
        assert calls == [("a", ("x", "y"))]
        await cache.jwt_svid(e, ["z"])
        assert len(calls) == 2
        clock.advance(dt.timedelta(minutes=5))
        assert await cache.jwt_svid(e, ["x", "y"]) is not first
        assert len(calls) == 3

    run(scenario())


def test_jwt_without_signer_is_not_ready() -> None:
    from agent.errors import NotReadyError

    async def scenario() -> None:
        cache = Cache(trust_domain=TD, clock=FakeClock(T0))
        with pytest.raises(NotReadyError):
            await cache.jwt_svid(entry("a", "spiffe://example.org/a"), ["x"])

    run(scenario())


def _brute_force_entitled(entries: list[CachedEntry], available: set[Selector]) -> list[str]:
    # The definition, entry by entry, in the stable order.
    ordered = sorted(entries, key=CachedEntry.sort_key)
    return [e.id for e in ordered if e.selectors and e.selectors <= available]


@pytest.mark.parametrize("seed", range(40))
def test_entitled_by_index_equals_the_scan_of_every_entry(seed: int) -> None:
    import random

    rng = random.Random(seed)
    # A small pool, so entries share selectors and callers hit many of them.
    pool = [Selector(t, f"{k}:{rng.randrange(6)}") for t in ("unix", "k8s")
            for k in ("uid", "gid", "ns", "sa")]
    pool = sorted(set(pool))
    entries = []
    for i in range(rng.randrange(1, 120)):
        selectors = frozenset(rng.sample(pool, rng.randrange(0, 4)))
        # Duplicate SPIFFE IDs on purpose: the order then falls back to the entry id.
        entries.append(CachedEntry(
            id=f"id{rng.randrange(1000):03d}-{i}",
            spiffe_id=SpiffeId.parse(f"spiffe://example.org/w{rng.randrange(30)}"),
            parent_id=AGENT, selectors=selectors))
    cache = make_cache()
    cache.set_entries(entries)
    snap = cache.snapshot()
    for _ in range(60):
        available = set(rng.sample(pool, rng.randrange(0, len(pool) + 1)))
        # Selectors no entry has change nothing.
        caller = [*available, Selector("unix", "pid:1")]
        rng.shuffle(caller)
        assert [e.id for e in snap.entitled(caller)] == _brute_force_entitled(
            entries, available)


def test_entitled_follows_entry_changes() -> None:
    cache = make_cache()
    uid, ns = Selector("unix", "uid:1000"), Selector("k8s", "ns:a")
    cache.set_entries([entry("a", "spiffe://example.org/a")])
    assert [e.id for e in cache.snapshot().entitled([uid])] == ["a"]
    cache.apply_entry_changes(
        [dataclasses.replace(entry("a", "spiffe://example.org/a"), selectors=frozenset({uid, ns})),
         entry("b", "spiffe://example.org/b")], [])
    snap = cache.snapshot()
    assert [e.id for e in snap.entitled([uid])] == ["b"]
    assert [e.id for e in snap.entitled([uid, ns])] == ["a", "b"]
    cache.apply_entry_changes([], ["b"])
    assert cache.snapshot().entitled([uid]) == []
