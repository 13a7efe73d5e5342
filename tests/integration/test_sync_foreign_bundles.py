"""Foreign bundles in syncs: read once per change, not once per sync.

Two datastores on one database stand for two servers sharing it: server A answers
syncs (its entry index and bundle cache), server B (or A's own admin API) writes
the foreign bundles.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ca.api.sync import SyncBundle, SyncBundles
from ca.datastore import Datastore
from ca.datastore.feed import DatastoreFeed
from ca.datastore.records import StoredBundle
from ca.registry.entry_index import EntryIndex
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.spiffeid import SpiffeId, TrustDomain
from tests.unit.test_agent_federated_bundles import bundle

OWN = TrustDomain("own.test")
ONE, TWO, ABSENT = TrustDomain("one.test"), TrustDomain("two.test"), TrustDomain("none.test")
FEDERATED = [ONE, TWO, ABSENT]


@dataclass
class FakeAuthority:
    """What SyncBundles asks of the authority: our own bundle and its taints."""

    trust_domain: TrustDomain = OWN
    own: Bundle = field(default_factory=lambda: bundle(OWN))

    def bundle(self) -> Bundle:
        return self.own

    def tainted_x509_authorities(self) -> tuple[()]:
        return ()

    def tainted_jwt_key_ids(self) -> tuple[()]:
        return ()


class CountingDatastore(Datastore):
    """Server A's datastore, counting the bundle reads syncs make."""

    reads = 0

    def get_bundle(self, trust_domain: TrustDomain) -> StoredBundle | None:
        self.reads += 1
        return super().get_bundle(trust_domain)


class ServerA:
    def __init__(self, url: str) -> None:
        self.ds = CountingDatastore(url)
        self.t = 0.0
        feed = DatastoreFeed(self.ds)
        self.index = EntryIndex(feed, server_id=SpiffeId.parse("spiffe://own.test/sigil/server"),
                                clock=FakeClock(), poll_interval=1.0, monotonic=lambda: self.t)
        feed.on_local_change(self.index.notify_local_change)
        self.index.build()
        self.bundles = SyncBundles(FakeAuthority(), self.ds,  # type: ignore[arg-type]
                                   version=lambda: self.index.bundles_version)

    def sync(self) -> dict[str, SyncBundle]:
        """What one agent sync does: catch up with the change log, then the bundles."""
        self.index.catch_up()
        return self.bundles(FEDERATED)


def _store(ds: Datastore, b: Bundle) -> None:
    ds.set_bundle(b.trust_domain, b.to_json().decode(), b.sequence_number or 0)


@pytest.fixture
def servers(database_url: str) -> Iterator[tuple[ServerA, Datastore]]:
    b = Datastore(database_url)
    _store(b, bundle(ONE))
    _store(b, bundle(TWO))
    a = ServerA(database_url)
    try:
        yield a, b
    finally:
        a.ds.close()
        b.close()


def test_syncs_with_nothing_new_read_no_foreign_bundle(
    servers: tuple[ServerA, Datastore],
) -> None:
    a, _ = servers
    first = a.sync()
    assert sorted(first) == [ONE.name, OWN.name, TWO.name]  # none.test has no bundle
    assert a.ds.reads == 3  # each federated trust domain read once, the absent one too
    for _ in range(50):
        a.t += 1.5  # every sync polls the change log (another server wrote nothing)
        assert a.sync() == first
    assert a.ds.reads == 3


def test_a_bundle_another_server_changes_is_delivered(
    servers: tuple[ServerA, Datastore],
) -> None:
    a, b = servers
    first = a.sync()
    reads = a.ds.reads
    newer = bundle(ONE, sequence=2)
    _store(b, newer)
    a.t += 1.5  # A's index polls and sees B's event
    after = a.sync()
    assert after[ONE.name].digest != first[ONE.name].digest
    assert after[ONE.name].message.sequence_number == 2
    assert after[TWO.name] is first[TWO.name]  # re-read, not rebuilt
    assert a.ds.reads == reads + 3  # once per federated trust domain for one change
    a.t += 1.5
    assert a.sync() == after
    assert a.ds.reads == reads + 3

    assert b.delete_bundle(TWO)
    a.t += 1.5
    assert sorted(a.sync()) == [ONE.name, OWN.name]


def test_a_bundle_this_server_writes_is_delivered_at_the_next_sync(
    servers: tuple[ServerA, Datastore],
) -> None:
    a, _ = servers
    a.sync()
    _store(a.ds, bundle(ABSENT))  # A's admin API: no poll interval to wait for
    assert ABSENT.name in a.sync()


def test_a_refresher_write_is_delivered(servers: tuple[ServerA, Datastore]) -> None:
    a, b = servers
    a.sync()
    held = b.get_bundle(TWO)
    newer = bundle(TWO, sequence=7)
    assert b.replace_bundle(TWO, held, newer.to_json().decode(), 7)
    assert not b.replace_bundle(TWO, held, newer.to_json().decode(), 8)  # lost: no event
    a.t += 1.5
    assert a.sync()[TWO.name].message.sequence_number == 7
