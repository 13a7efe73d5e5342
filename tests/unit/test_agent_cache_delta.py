"""Cache.apply_entry_changes: a sync delta applied to the agent's entries."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from agent.cache import Cache
from tests.unit.test_agent_cache import TD, entry, svid


def test_delta_adds_replaces_and_removes() -> None:
    async def go() -> None:
        cache = Cache(trust_domain=TD)
        a, b = entry("a", "spiffe://example.org/a"), entry("b", "spiffe://example.org/b")
        cache.set_entries([a, b])
        cache.set_x509_svid("a", svid("spiffe://example.org/a"))
        cache.set_x509_svid("b", svid("spiffe://example.org/b"))
        version = cache.version
        assert cache.apply_entry_changes([], []) is False
        assert cache.version == version
        c = entry("c", "spiffe://example.org/c")
        moved = replace(b, spiffe_id=c.spiffe_id)  # b now names another identity
        assert cache.apply_entry_changes([c, moved], ["a"]) is True
        snap = cache.snapshot()
        assert [(e.id, str(e.spiffe_id)) for e in snap.entries] == [
            ("b", "spiffe://example.org/c"), ("c", "spiffe://example.org/c")]
        # a is gone with its SVID; b's SVID would now lie about its identity.
        assert dict(snap.svids) == {}
        assert cache.apply_entry_changes([], ["not-held"]) is False

    asyncio.run(go())
