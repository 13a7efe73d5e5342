"""The agent cache's federated bundles: what a workload may see, and when streams wake."""

from __future__ import annotations

import dataclasses
import datetime as dt

from agent.cache import Cache
from identity.bundle import Bundle
from identity.keys import generate_private_key
from identity.spiffeid import TrustDomain
from identity.x509svid import new_ca_certificate
from tests.unit.test_agent_cache import T0, TD, entry, make_cache

PARTNER, STRANGER, ABSENT = (TrustDomain("partner.org"), TrustDomain("stranger.org"),
                             TrustDomain("absent.org"))


def bundle(td: TrustDomain, *, sequence: int = 1) -> Bundle:
    key = generate_private_key()
    cert = new_ca_certificate(trust_domain=td, public_key=key.public_key(), signer_key=key,
                              not_before=T0 - dt.timedelta(days=1),
                              not_after=T0 + dt.timedelta(days=30))
    return Bundle(td, (cert,), sequence_number=sequence)


OWN, FED, OTHER = bundle(TD), bundle(PARTNER), bundle(STRANGER)


def loaded() -> Cache:
    cache = make_cache()
    cache.set_entries([
        dataclasses.replace(entry("e-web", "spiffe://example.org/web"),
                            federates_with=(PARTNER, ABSENT)),
        entry("e-api", "spiffe://example.org/api"),
    ])
    assert cache.set_bundles({TD: OWN, PARTNER: FED, STRANGER: OTHER})
    return cache


def test_bundles_for_own_plus_federated_of_the_entries_only() -> None:
    snap = loaded().snapshot()
    api, web = sorted(snap.entries, key=lambda e: e.id)
    # Own always; partner.org only through the entry naming it; absent.org has no
    # bundle and stranger.org is named by no entry: neither is shown.
    assert snap.bundles_for([api]) == {TD: OWN}
    assert snap.bundles_for([web]) == {TD: OWN, PARTNER: FED}
    assert snap.bundles_for([web, api]) == {TD: OWN, PARTNER: FED}
    assert snap.bundles_for([]) == {TD: OWN}


def test_a_federated_bundle_change_wakes_streams_an_identical_one_does_not() -> None:
    cache = loaded()
    version = cache.version
    assert not cache.set_bundles({TD: OWN, PARTNER: FED, STRANGER: OTHER})
    assert cache.version == version
    rotated = bundle(PARTNER, sequence=2)
    assert cache.set_bundles({TD: OWN, PARTNER: rotated, STRANGER: OTHER})
    assert cache.version == version + 1
    assert cache.snapshot().bundles[PARTNER] == rotated
    # Deleted on the server (absent from the sync): gone from the cache.
    assert cache.set_bundles({TD: OWN, STRANGER: OTHER})
    web = next(e for e in cache.snapshot().entries if e.id == "e-web")
    assert cache.snapshot().bundles_for([web]) == {TD: OWN}
