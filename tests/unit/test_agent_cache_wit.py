"""The agent cache's WIT-SVIDs: reuse, jittered half-life rotation, shared calls."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from agent.cache import Cache, CachedEntry
from agent.errors import NotReadyError, ServerCallError
from agent.rotation import ROTATION_JITTER, wit_rotation_time
from identity.clock import FakeClock
from identity.keys import PrivateKey, generate_private_key, key_id, public_keys_equal
from identity.spiffeid import SpiffeId, TrustDomain
from identity.witsvid import WitSvid, parse_wit_svid_insecure, sign_wit_svid

TD = TrustDomain.parse("example.org")
AGENT = SpiffeId.parse("spiffe://example.org/sigil/agent/x")
ISSUER = generate_private_key()
TTL = dt.timedelta(minutes=10)


def entry(spiffe_id: str = "spiffe://example.org/web", entry_id: str = "e1") -> CachedEntry:
    return CachedEntry(id=entry_id, spiffe_id=SpiffeId.parse(spiffe_id), parent_id=AGENT,
                       selectors=frozenset())


class Signer:
    """Stands in for the manager: makes a key, signs like the server, counts calls."""

    def __init__(self, clock: FakeClock, *, delay: float = 0, fail: bool = False) -> None:
        self.clock = clock
        self.calls = 0
        self.delay = delay
        self.fail = fail

    async def __call__(self, e: CachedEntry) -> tuple[WitSvid, PrivateKey]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ServerCallError("NewWITSVID failed: UNAVAILABLE: down")
        key = generate_private_key()
        now = self.clock.now()
        token = sign_wit_svid(spiffe_id=e.spiffe_id, workload_key=key.public_key(), key=ISSUER,
                              key_id=key_id(ISSUER.public_key()), issued_at=now,
                              expires_at=now + TTL)
        return parse_wit_svid_insecure(token), key


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_kept_until_jittered_half_life_then_replaced_with_a_new_key() -> None:
    async def go() -> None:
        clock = FakeClock()
        signer = Signer(clock)
        cache = Cache(trust_domain=TD, clock=clock)
        cache.set_wit_signer(signer)
        first = await cache.wit_svid(entry())
        assert public_keys_equal(first.key.public_key(), first.svid.confirmation_key)
        lo = 0.5 - ROTATION_JITTER
        hi = 0.5 + ROTATION_JITTER
        issued = first.svid.issued_at
        assert issued is not None
        assert issued + TTL * lo <= first.refresh_at <= issued + TTL * hi
        clock.advance(first.refresh_at - clock.now() - dt.timedelta(seconds=1))
        assert (await cache.wit_svid(entry())) is first
        assert signer.calls == 1
        clock.advance(dt.timedelta(seconds=1))
        second = await cache.wit_svid(entry())
        assert signer.calls == 2
        assert second.svid.token != first.svid.token
        assert not public_keys_equal(second.key.public_key(), first.key.public_key())

    run(go())


def test_concurrent_requests_share_one_server_call() -> None:
    async def go() -> None:
        clock = FakeClock()
        signer = Signer(clock, delay=0.05)
        cache = Cache(trust_domain=TD, clock=clock)
        cache.set_wit_signer(signer)
        got = await asyncio.gather(*(cache.wit_svid(entry()) for _ in range(5)))
        assert signer.calls == 1
        assert len({g.svid.token for g in got}) == 1

    run(go())


def test_a_changed_spiffe_id_never_gets_the_old_token() -> None:
    async def go() -> None:
        clock = FakeClock()
        signer = Signer(clock)
        cache = Cache(trust_domain=TD, clock=clock)
        cache.set_wit_signer(signer)
        web = await cache.wit_svid(entry("spiffe://example.org/web"))
        moved = await cache.wit_svid(entry("spiffe://example.org/db"))
        assert str(web.svid.spiffe_id) == "spiffe://example.org/web"
        assert str(moved.svid.spiffe_id) == "spiffe://example.org/db"
        assert signer.calls == 2

    run(go())


def test_no_signer_and_server_failure() -> None:
    async def go() -> None:
        clock = FakeClock()
        cache = Cache(trust_domain=TD, clock=clock)
        with pytest.raises(NotReadyError):
            await cache.wit_svid(entry())
        failing = Signer(clock, fail=True)
        cache.set_wit_signer(failing)
        with pytest.raises(ServerCallError, match="UNAVAILABLE"):
            await cache.wit_svid(entry())
        with pytest.raises(ServerCallError):  # not cached: asked again
            await cache.wit_svid(entry())
        assert failing.calls == 2

    run(go())


def test_rotation_time_is_spread_and_stable() -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    end = start + TTL
    points = {wit_rotation_time(start, end, f"token-{i}") for i in range(200)}
    assert len(points) > 150  # spread, not one instant for a fleet
    assert all(start + TTL * 0.4 <= p <= start + TTL * 0.6 for p in points)
    assert wit_rotation_time(start, end, "t") == wit_rotation_time(start, end, "t")
