"""ca.registry.entry_index: the index against the naive computation (ca.registry.authorization).

The property tests apply random sequences of entry changes (aliases whose
selectors change, nested parents deleted, entries moved, cycles, expiry, node
re-attestation) and, at random points, let simulated agents sync from the revision
they hold, applying each delta the way the agent does. After every sync the
agent's entries must equal what ca.registry.authorization computes from scratch.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Collection, Set
from dataclasses import replace

import pytest

from ca.datastore import EntryRecord
from ca.datastore.records import FOREIGN_BUNDLES_CHANGED
from ca.registry.authorization import authorized_entries
from ca.registry.entry_index import EntryIndex, SyncDelta
from identity.clock import FakeClock
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

TD = "spiffe://example.org"
SERVER = SpiffeId.parse(f"{TD}/sigil/server")
AGENTS = {
    SpiffeId.parse(f"{TD}/sigil/agent/join_token/a"): (Selector("n", "1"), Selector("n", "2")),
    SpiffeId.parse(f"{TD}/sigil/agent/join_token/b"): (Selector("n", "2"), Selector("n", "3")),
    SpiffeId.parse(f"{TD}/sigil/agent/join_token/c"): (),
}
PATHS = [SpiffeId.parse(f"{TD}/{p}") for p in "abcdef"]
PARENTS = [*AGENTS, SERVER, SERVER, *PATHS]
SELECTORS = [Selector("n", str(i)) for i in range(1, 5)]
FEDS = [TrustDomain("one.org"), TrustDomain("two.org")]


class FakeFeed:
    """An in-memory datastore: entries and a change-event log."""

    def __init__(self) -> None:
        self.entries: dict[str, EntryRecord] = {}
        self.events: list[tuple[int, str]] = []
        self.hidden: set[int] = set()  # event ids whose transaction is "not committed yet"

    def change(self, entry_id: str, entry: EntryRecord | None) -> int:
        event_id = len(self.events) + 1
        self.events.append((event_id, entry_id))
        if entry is None:
            self.entries.pop(entry_id, None)
        else:
            self.entries[entry_id] = replace(entry, revision=event_id)
        return event_id

    def last_event_id(self) -> int:
        return max((i for i, _ in self.events if i not in self.hidden), default=0)

    def events_after(self, after: int, also: Collection[int] = (), *,
                     limit: int) -> list[tuple[int, str]]:
        newer = [(i, e) for i, e in self.events if i > after and i not in self.hidden]
        return sorted(newer[:limit] + [(i, e) for i, e in self.events
                                       if i in also and i <= after and i not in self.hidden])

    def all_entries(self) -> list[EntryRecord]:
        return list(self.entries.values())

    def entries_by_id(self, ids: Collection[str]) -> list[EntryRecord]:
        return [self.entries[i] for i in ids if i in self.entries]


def naive(feed: FakeFeed, agent: SpiffeId, selectors: tuple[Selector, ...], now: int
          ) -> dict[str, EntryRecord]:
    def by_parent(parents: Set[SpiffeId]) -> list[EntryRecord]:
        return [e for e in feed.entries.values() if e.parent_id in parents]

    return {e.id: e for e in authorized_entries(
        agent_id=agent, node_selectors=selectors, server_id=SERVER,
        entries_by_parent=by_parent, now=now)}


class SimAgent:
    """What an agent holds, updated only through sync deltas."""

    def __init__(self, spiffe_id: SpiffeId, selectors: tuple[Selector, ...]) -> None:
        self.id = spiffe_id
        self.selectors = selectors
        self.entries: dict[str, EntryRecord] = {}
        self.generation = ""
        self.revision = 0
        self.sent: list[str] = []

    def sync(self, index: EntryIndex) -> SyncDelta:
        d = index.sync(agent_id=self.id, node_selectors=self.selectors,
                       known_generation=self.generation, known_revision=self.revision)
        if d.full:
            self.entries = {}
        for entry_id in d.removed:
            assert entry_id in self.entries, "removed an entry the agent does not hold"
            del self.entries[entry_id]
        for e in d.entries:
            # An entry is sent again only when it changed.
            assert d.full or self.entries.get(e.id) != e, f"{e.id} sent unchanged"
            self.entries[e.id] = e
        self.generation, self.revision = d.generation, d.revision
        return d


def random_entry(rng: random.Random, entry_id: str, now: int) -> EntryRecord:
    parent = rng.choice(PARENTS)
    k = rng.choice([0, 1, 1, 1, 2]) if parent == SERVER else rng.choice([1, 2])
    sels = tuple(sorted(rng.sample(SELECTORS, k))) or ((SELECTORS[3],)
                                                        if parent != SERVER else ())
    return EntryRecord(
        id=entry_id, spiffe_id=rng.choice(PATHS), parent_id=parent, selectors=sels,
        dns_names=tuple(rng.sample(["x.org", "y.org"], rng.randint(0, 1))),
        federates_with=tuple(rng.sample(FEDS, rng.randint(0, 1))),
        expires_at=now + rng.randint(1, 30) if rng.random() < 0.15 else 0,
    )


def run_sequence(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    feed = FakeFeed()
    next_id = 0

    def now() -> int:
        return int(clock.now().timestamp())

    def new_id() -> str:
        nonlocal next_id
        next_id += 1
        return f"e{next_id:04d}"

    for _ in range(rng.randint(0, 15)):
        entry_id = new_id()
        feed.change(entry_id, random_entry(rng, entry_id, now()))
    index = EntryIndex(feed, server_id=SERVER, clock=clock, poll_interval=0.0)
    index.build()
    agents = [SimAgent(a, s) for a, s in AGENTS.items()]
    for _ in range(steps):
        op = rng.random()
        ids = sorted(feed.entries)
        if op < 0.25 or not ids:
            entry_id = new_id()
            feed.change(entry_id, random_entry(rng, entry_id, now()))
        elif op < 0.35:
            feed.change(rng.choice(ids), None)
        elif op < 0.6:
            entry_id = rng.choice(ids)
            e = feed.entries[entry_id]
            fresh = random_entry(rng, entry_id, now())
            field_name = rng.choice(["parent_id", "spiffe_id", "selectors", "dns_names",
                                     "federates_with", "expires_at"])
            feed.change(entry_id, replace(e, **{field_name: getattr(fresh, field_name)}))
        elif op < 0.65:
            clock.advance(dt.timedelta(seconds=rng.randint(1, 10)))
        elif op < 0.68:
            # The node attests again with other selectors.
            agent = rng.choice(agents)
            agent.selectors = tuple(rng.sample(SELECTORS, rng.randint(0, 3)))
        elif op < 0.7:
            # A lost response: the agent still holds an older revision.
            agent = rng.choice(agents)
            if agent.revision:
                agent.revision -= 1
                agent.entries = {k: v for k, v in agent.entries.items() if rng.random() < .5}
        else:
            agent = rng.choice(agents)
            before = agent.revision
            d = agent.sync(index)
            assert d.full or before == d.revision or before <= d.revision
            want = naive(feed, agent.id, agent.selectors, now())
            assert agent.entries == want, f"seed {seed}: {agent.id} differs"
            assert d.federates_with == {td for e in want.values() for td in e.federates_with}
            for entry_id in feed.entries:
                got = index.is_authorized(entry_id, agent_id=agent.id,
                                          node_selectors=agent.selectors)
                assert (got is not None) == (entry_id in want), (seed, entry_id)
            assert {e.id for e in index.authorized_entries(
                agent_id=agent.id, node_selectors=agent.selectors)} == set(want)


@pytest.mark.parametrize("seed", range(40))
def test_random_changes_match_the_naive_computation(seed: int) -> None:
    run_sequence(seed, steps=300)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1004))
def test_long_random_sequences(seed: int) -> None:
    run_sequence(seed, steps=1500)


def make(eid: str, spiffe: str, parent: SpiffeId | str, *sels: str) -> EntryRecord:
    return EntryRecord(
        id=eid, spiffe_id=SpiffeId.parse(f"{TD}{spiffe}"),
        parent_id=parent if isinstance(parent, SpiffeId) else SpiffeId.parse(f"{TD}{parent}"),
        selectors=tuple(Selector.parse(s) for s in (sels or ("unix:uid:1",))),
    )


AGENT_A = next(iter(AGENTS))


def setup(*entries: EntryRecord) -> tuple[FakeFeed, EntryIndex, SimAgent]:
    feed = FakeFeed()
    for e in entries:
        feed.change(e.id, e)
    index = EntryIndex(feed, server_id=SERVER, clock=FakeClock(), poll_interval=0.0)
    index.build()
    agent = SimAgent(AGENT_A, AGENTS[AGENT_A])
    return feed, index, agent


def test_first_sync_is_full_then_only_changes() -> None:
    feed, index, agent = setup(make("1", "/web", AGENT_A), make("2", "/db", AGENT_A))
    d = agent.sync(index)
    assert d.full and [e.id for e in d.entries] == ["1", "2"] and d.removed == ()
    d = agent.sync(index)
    assert (d.full, d.entries, d.removed, d.revision) == (False, (), (), agent.revision)
    feed.change("2", replace(feed.entries["2"], dns_names=("db.example.org",)))
    d = agent.sync(index)
    assert not d.full and [e.id for e in d.entries] == ["2"] and d.removed == ()
    assert d.entries[0].dns_names == ("db.example.org",)


def test_alias_selectors_change_moves_its_children() -> None:
    feed, index, agent = setup(
        make("alias", "/node", SERVER, "n:1"), make("1", "/web", "/node"),
        make("2", "/nested", "/web"),
    )
    assert [e.id for e in agent.sync(index).entries] == ["1", "2"]
    feed.change("alias", replace(feed.entries["alias"], selectors=(Selector("n", "9"),)))
    d = agent.sync(index)
    assert (d.full, d.entries, d.removed) == (False, (), ("1", "2"))
    feed.change("alias", replace(feed.entries["alias"], selectors=(Selector("n", "2"),)))
    d = agent.sync(index)
    assert [e.id for e in d.entries] == ["1", "2"] and d.removed == ()


def test_deleting_a_nested_parent_removes_its_subtree() -> None:
    feed, index, agent = setup(make("1", "/web", AGENT_A), make("2", "/sidecar", "/web"),
                               make("3", "/deeper", "/sidecar"))
    agent.sync(index)
    feed.change("1", None)
    d = agent.sync(index)
    assert (d.entries, d.removed) == ((), ("1", "2", "3"))


def test_entry_moved_to_another_agent_is_removed() -> None:
    other = SpiffeId.parse(f"{TD}/sigil/agent/join_token/b")
    feed, index, agent = setup(make("1", "/web", AGENT_A))
    agent.sync(index)
    feed.change("1", replace(feed.entries["1"], parent_id=other))
    d = agent.sync(index)
    assert (d.entries, d.removed) == ((), ("1",))


def test_cycle_of_entries_ends() -> None:
    _feed, index, agent = setup(make("1", "/a", AGENT_A), make("2", "/b", "/a"),
                               make("3", "/a", "/b"))
    assert [e.id for e in agent.sync(index).entries] == ["1", "2", "3"]


def test_unknown_generation_or_revision_gets_a_full_resync() -> None:
    _feed, index, agent = setup(make("1", "/web", AGENT_A))
    agent.sync(index)
    d = index.sync(agent_id=AGENT_A, node_selectors=agent.selectors,
                   known_generation="another-server", known_revision=agent.revision)
    assert d.full and [e.id for e in d.entries] == ["1"]
    d = index.sync(agent_id=AGENT_A, node_selectors=agent.selectors,
                   known_generation=index.generation, known_revision=d.revision + 5)
    assert d.full


def test_restarted_index_has_a_new_generation() -> None:
    feed, index, agent = setup(make("1", "/web", AGENT_A))
    agent.sync(index)
    again = EntryIndex(feed, server_id=SERVER, clock=FakeClock(), poll_interval=0.0)
    again.build()
    assert again.generation != index.generation
    d = agent.sync(again)
    assert d.full and [e.id for e in d.entries] == ["1"]


def test_event_committed_out_of_order_is_not_missed() -> None:
    # PostgreSQL: event 2 (entry "a") commits after event 3 has been read.
    feed, index, agent = setup()
    agent.sync(index)
    feed.change("a", make("a", "/a", AGENT_A))
    feed.hidden.add(1)
    feed.change("b", make("b", "/b", AGENT_A))
    assert [e.id for e in agent.sync(index).entries] == ["b"]
    assert index.stats()["gaps"] == 1
    feed.hidden.clear()
    assert [e.id for e in agent.sync(index).entries] == ["a"]
    assert index.stats()["gaps"] == 0


def test_poll_waits_for_the_interval_unless_this_process_wrote() -> None:
    feed = FakeFeed()
    t = [0.0]
    index = EntryIndex(feed, server_id=SERVER, clock=FakeClock(), poll_interval=1.0,
                       monotonic=lambda: t[0])
    index.build()
    agent = SimAgent(AGENT_A, AGENTS[AGENT_A])
    agent.sync(index)
    feed.change("1", make("1", "/web", AGENT_A))
    assert agent.sync(index).entries == ()  # another server's write: not polled yet
    index.notify_local_change()
    assert [e.id for e in agent.sync(index).entries] == ["1"]
    feed.change("2", make("2", "/db", AGENT_A))
    t[0] = 1.0
    assert [e.id for e in agent.sync(index).entries] == ["2"]


def test_expired_entry_is_removed_when_the_clock_passes_it() -> None:
    clock = FakeClock()
    feed = FakeFeed()
    soon = int(clock.now().timestamp()) + 60
    feed.change("1", replace(make("1", "/web", AGENT_A), expires_at=soon))
    index = EntryIndex(feed, server_id=SERVER, clock=clock, poll_interval=0.0)
    index.build()
    agent = SimAgent(AGENT_A, AGENTS[AGENT_A])
    assert [e.id for e in agent.sync(index).entries] == ["1"]
    clock.advance(dt.timedelta(seconds=60))
    d = agent.sync(index)
    assert (d.entries, d.removed) == ((), ("1",))


class _YieldingInt(int):
    """An int whose ``+`` gives the GIL away between the read and the write of ``+=``.

    Under CPython 3.11 the eval loop switches threads only at calls and backward
    jumps, so ``self.n += 1`` on a plain int practically never interleaves; this
    forces the interleaving a free-threaded build or an unlucky switch would cause.
    """

    def __add__(self, other: object) -> _YieldingInt:
        time.sleep(0.001)
        assert isinstance(other, int)
        return _YieldingInt(int(self) + other)


def test_local_change_notifications_from_many_threads_are_all_counted() -> None:
    # Commits of several gRPC threads notify at once; a lost increment can make the
    # counter equal the last one polled, and the next sync would not see the commit.
    _, index, _ = setup()
    index._local_changes = _YieldingInt(index._local_changes)
    threads, each = 8, 25

    def commit_many() -> None:
        for _ in range(each):
            index.notify_local_change()

    workers = [threading.Thread(target=commit_many) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert index._local_changes == threads * each


def test_a_foreign_bundle_event_bumps_the_bundles_version_only() -> None:
    feed, index, agent = setup(make("1", "/web", AGENT_A))
    agent.sync(index)
    asked: list[Collection[str]] = []
    by_id = feed.entries_by_id

    def entries_by_id(ids: Collection[str]) -> list[EntryRecord]:
        asked.append(set(ids))
        return by_id(ids)

    feed.entries_by_id = entries_by_id  # type: ignore[method-assign]
    revision, version = index.revision, index.bundles_version
    feed.change(FOREIGN_BUNDLES_CHANGED, None)
    d = agent.sync(index)
    assert (d.entries, d.removed, d.full) == ((), (), False)
    assert (index.revision, index.bundles_version) == (revision, version + 1)
    assert asked == []  # names no entry: nothing to read
    agent.sync(index)
    assert index.bundles_version == version + 1  # counted once
