"""Authentication's node cache (ca.api.node_cache) and the reads under it
(ca.datastore.hot_reads) against real databases.

Every change that decides whether an agent's call is accepted (ban, eviction,
renewal, promotion, a new attestation) must show at the very next lookup, also
when another process made it: here "another process" is a second Datastore on
the same database (its own engine and connections), as a worker or the main
process's admin API would be. Across real worker processes: test_workers.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from cryptography import x509

from ca.api.node_cache import LeafIds, NodeCache
from ca.datastore import Datastore, NodeRecord
from ca.datastore.hot_reads import NodeState, NodeStateReader
from ca.registry.agents import AgentService
from identity.clock import FakeClock
from identity.errors import X509SvidError
from identity.keys import PrivateKey, generate_private_key
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import new_ca_certificate, new_svid_certificate

TD = TrustDomain("example.org")
AGENT = SpiffeId.parse("spiffe://example.org/sigil/agent/join_token/a1")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# Serials are up to 20 octets: stored as text, read back whole.
BIG_SERIAL = (1 << 159) + 12345


class _Counting:
    """Datastore.get_node, counting the full loads."""

    def __init__(self, ds: Datastore) -> None:
        self.ds = ds
        self.loads = 0

    def __call__(self, spiffe_id: SpiffeId) -> NodeRecord | None:
        self.loads += 1
        return self.ds.get_node(spiffe_id)


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[Datastore, Datastore]]:
    """The server's datastore and another process's, on one database."""
    ours, theirs = Datastore(database_url), Datastore(database_url)
    yield ours, theirs
    ours.close()
    theirs.close()


def _node(serial: int, *selectors: str) -> NodeRecord:
    return NodeRecord(spiffe_id=AGENT, attestor="join_token", serial=serial, expires_at=0,
                      selectors=tuple(Selector.parse(s) for s in selectors))


def _cache(ds: Datastore) -> tuple[NodeCache, _Counting]:
    load = _Counting(ds)
    return NodeCache(NodeStateReader(ds.read_engine).read, load), load


def test_state_reader_reads_the_row(stores: tuple[Datastore, Datastore]) -> None:
    ours, theirs = stores
    reader = NodeStateReader(ours.read_engine)
    assert reader.read(AGENT) is None
    theirs.put_node(_node(BIG_SERIAL, "join_token:a1"), now=NOW)
    stored = ours.get_node(AGENT)
    assert stored is not None
    state = reader.read(AGENT)
    assert state == NodeState(BIG_SERIAL, None, False, stored.created_at, stored.updated_at)
    assert state == NodeState.of(stored)
    theirs.set_node_new_serial(AGENT, serial=7, expires_at=1, now=NOW)
    theirs.set_node_banned(AGENT, True, now=NOW)
    assert reader.read(AGENT) == NodeState(BIG_SERIAL, 7, True, stored.created_at,
                                           stored.updated_at)


def test_kept_record_is_used_while_the_row_is_unchanged(
        stores: tuple[Datastore, Datastore]) -> None:
    ours, _ = stores
    ours.put_node(_node(5, "join_token:a1", "cluster:c1"), now=NOW)
    cache, load = _cache(ours)
    first = cache.get(AGENT)
    assert first is not None and first.selectors == (Selector("join_token", "a1"),
                                                      Selector("cluster", "c1"))
    for _ in range(3):
        assert cache.get(AGENT) is first
    assert load.loads == 1


def test_ban_shows_at_the_next_lookup(stores: tuple[Datastore, Datastore]) -> None:
    ours, theirs = stores
    ours.put_node(_node(5), now=NOW)
    cache, load = _cache(ours)
    assert cache.get(AGENT).banned is False  # type: ignore[union-attr]
    # Same second as the attestation: updated_at does not move, the flag does.
    AgentService(theirs, FakeClock(NOW)).ban(AGENT)
    node = cache.get(AGENT)
    assert node is not None and node.banned is True
    assert load.loads == 2


def test_eviction_shows_at_the_next_lookup(stores: tuple[Datastore, Datastore]) -> None:
    ours, theirs = stores
    ours.put_node(_node(5), now=NOW)
    cache, _ = _cache(ours)
    assert cache.get(AGENT) is not None
    AgentService(theirs, FakeClock(NOW)).evict(AGENT)
    assert cache.get(AGENT) is None
    assert len(cache) == 0


def test_renewal_and_promotion_show_at_the_next_lookup(
        stores: tuple[Datastore, Datastore]) -> None:
    ours, theirs = stores
    ours.put_node(_node(5), now=NOW)
    cache, _ = _cache(ours)
    assert cache.get(AGENT).new_serial is None  # type: ignore[union-attr]
    theirs.set_node_new_serial(AGENT, serial=6, expires_at=1, now=NOW)
    renewed = cache.get(AGENT)
    assert renewed is not None and (renewed.serial, renewed.new_serial) == (5, 6)
    theirs.promote_node_serial(AGENT, now=NOW)
    promoted = cache.get(AGENT)
    assert promoted is not None and (promoted.serial, promoted.new_serial) == (6, None)


def test_new_attestation_replaces_the_selectors(stores: tuple[Datastore, Datastore]) -> None:
    ours, theirs = stores
    ours.put_node(_node(5, "cluster:old"), now=NOW)
    cache, _ = _cache(ours)
    assert cache.get(AGENT).selectors == (Selector("cluster", "old"),)  # type: ignore[union-attr]
    # Evicted and attested again under the same ID, in the same second.
    theirs.delete_node(AGENT)
    theirs.put_node(_node(9, "cluster:new"), now=NOW)
    node = cache.get(AGENT)
    assert node is not None and node.serial == 9
    assert node.selectors == (Selector("cluster", "new"),)


def test_the_cache_is_bounded(stores: tuple[Datastore, Datastore]) -> None:
    ours, _ = stores
    ids = [SpiffeId.parse(f"spiffe://example.org/sigil/agent/join_token/n{i}") for i in range(5)]
    for i, sid in enumerate(ids):
        ours.put_node(NodeRecord(spiffe_id=sid, attestor="join_token", serial=i + 1,
                                 expires_at=0), now=NOW)
    cache = NodeCache(NodeStateReader(ours.read_engine).read, ours.get_node, max_nodes=3)
    for sid in ids:
        assert cache.get(sid) is not None
    assert len(cache) == 3


def _leaf(ca_key: PrivateKey, ca_cert: x509.Certificate,
          path: str) -> x509.Certificate:
    key = generate_private_key()
    return new_svid_certificate(spiffe_id=SpiffeId.parse(f"spiffe://example.org{path}"),
                                public_key=key.public_key(), ca_cert=ca_cert, ca_key=ca_key,
                                not_before=NOW, not_after=NOW + dt.timedelta(hours=1))


def test_leaf_ids_remember_valid_leaves_and_never_a_refusal() -> None:
    ca_key = generate_private_key()
    ca_cert = new_ca_certificate(trust_domain=TD, public_key=ca_key.public_key(),
                                 signer_key=ca_key, not_before=NOW,
                                 not_after=NOW + dt.timedelta(hours=2))
    ids = LeafIds(max_leaves=2)
    leaf = _leaf(ca_key, ca_cert, "/sigil/agent/join_token/a1")
    assert ids.validate(leaf) == AGENT
    assert ids.validate(leaf) == AGENT
    # A CA certificate is not a leaf: refused every time, never kept.
    for _ in range(2):
        with pytest.raises(X509SvidError):
            ids.validate(ca_cert)
    for i in range(3):
        other = _leaf(ca_key, ca_cert, f"/sigil/agent/join_token/b{i}")
        assert ids.validate(other).path == f"/sigil/agent/join_token/b{i}"
    assert len(ids._ids) == 2
