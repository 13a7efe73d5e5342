"""The in-memory index of which entries each agent may have (DESIGN flow 3).

The authorization rules are those of :mod:`ca.registry.authorization` (SPIRE's): an entry is
authorized for an agent when its parent is the agent's ID, the SPIFFE ID of a
node-alias entry (parent = the server's ID) whose selectors are all among the
agent's node selectors, or the SPIFFE ID of an entry already authorized (nesting,
cycles included). Expired entries count as absent.

The index holds every entry, by parent, by SPIFFE ID and (aliases) by their
smallest selector. It is built from the datastore once, then follows the
change-event log: every entry event names an entry, whose current row is read again, so
the event kind does not matter and replaying an event changes nothing. Each
change that alters the index gets the next *index revision*; the change log maps
revisions to entry ids (and to the entry as it was before).

Foreign bundle writes are in the same log (entry id
:data:`~ca.datastore.records.FOREIGN_BUNDLES_CHANGED`): they name no entry, and
only bump :attr:`EntryIndex.bundles_version`, which tells the sync's bundle cache
to read the stored bundles again.

Revisions are local to one index: a restarted server, or another server on the
same database, has another *generation*, and an agent presenting a foreign or
too old revision gets a full resync.

For each agent the index keeps a :class:`_View`: the revision it last answered,
the node selectors, the aliases that matched and the authorized entry ids. A sync
from that revision looks only at the entries changed since: a change that cannot
touch the agent costs a set lookup; a change of an entry's content, or one added
or removed without children, is applied to the view directly; only a change that
alters what is reachable (an alias, an entry whose SPIFFE ID parents others)
recomputes the agent's closure, in proportion to the agent's own entries.

Event ids are not commit order on PostgreSQL and MariaDB: a transaction may
commit an id below one already read. Ids skipped while tailing are remembered as
gaps and asked for again until :data:`GAP_TIMEOUT` passes.

Thread-safe: one lock guards the index; datastore reads run outside it.
"""

from __future__ import annotations

import heapq
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ca.datastore.records import FOREIGN_BUNDLES_CHANGED, EntryRecord
from ca.log import event
from identity.clock import Clock
from identity.selectors import Selector, selectors_match
from identity.spiffeid import SpiffeId, TrustDomain

GAP_TIMEOUT = 300.0
"""Seconds a skipped event id is asked for again (longer than any transaction)."""
GAP_LOOKBACK = 1000
"""At build, event ids this far below the newest are checked for gaps."""
MAX_GAP = 10_000
"""A jump in event ids larger than this is not tracked id by id (a sequence reset)."""
MAX_CHANGE_LOG = 1_000_000
"""Changes remembered; an agent whose revision is older gets a full resync."""
DEFAULT_POLL_INTERVAL = 1.0
EVENT_PAGE = 5000
"""Change events read at once: a large backlog is applied page by page."""


class EntryFeed(Protocol):
    """Where the index reads entries and change events (``ca.datastore.feed``)."""

    def last_event_id(self) -> int:
        """The highest change event id, 0 when none."""

    def events_after(self, after: int, also: Collection[int] = (), *,
                     limit: int) -> list[tuple[int, str]]:
        """``(event id, entry id)`` of events with id > ``after`` or in ``also``, by id.

        At most ``limit`` of those with id > ``after``: the first ones.
        """

    def all_entries(self) -> list[EntryRecord]:
        """Every entry."""

    def entries_by_id(self, ids: Collection[str]) -> list[EntryRecord]:
        """The entries with these ids that exist."""


@dataclass(frozen=True, slots=True)
class SyncDelta:
    """What one agent must change to be current.

    Attributes:
        generation: the index generation ``revision`` belongs to.
        revision: the index revision the agent holds after applying this.
        full: the agent's known revision was unusable: ``entries`` is the complete
            set and everything else it holds must go.
        entries: entries new to the agent or changed since its revision.
        removed: ids of entries no longer authorized (deleted, moved, expired).
        federates_with: every trust domain the agent's entries federate with.
    """

    generation: str
    revision: int
    full: bool
    entries: tuple[EntryRecord, ...]
    removed: tuple[str, ...]
    federates_with: frozenset[TrustDomain]


@dataclass(slots=True)
class _View:
    revision: int
    selectors: frozenset[Selector]
    aliases: set[str]
    authorized: set[str]
    # SPIFFE ID -> how many roots and authorized entries provide it: the parents
    # whose children are authorized. Counted so a removal knows when one goes.
    reach: Counter[SpiffeId] = field(default_factory=Counter)
    federates: Counter[TrustDomain] = field(default_factory=Counter)


def _expired(entry: EntryRecord, now: int) -> bool:
    return bool(entry.expires_at) and entry.expires_at <= now


K = TypeVar("K")


def _discard(index: dict[K, set[str]], key: K, entry_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(entry_id)
        if not ids:
            del index[key]  # an empty set would read as "has children"


def _decrement(counter: Counter[K], key: K) -> None:
    left = counter[key] - 1
    if left > 0:
        counter[key] = left
    else:
        del counter[key]  # no zero counts: a key present is a key in use


class EntryIndex:
    """Authorized entries per agent, current with the change-event log.

    Args:
        feed: the datastore reads.
        server_id: the server's SPIFFE ID (parent of node aliases).
        clock: injectable time, for entry expiry and gap timeouts.
        poll_interval: seconds between polls of the event log when this process
            wrote nothing (other servers' changes arrive within it).
        monotonic: the poll timer (tests replace it).
    """

    def __init__(
        self, feed: EntryFeed, *, server_id: SpiffeId, clock: Clock,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._feed = feed
        self._server_id = server_id
        self._clock = clock
        self._poll_interval = poll_interval
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self.generation = secrets.token_hex(8)
        self._entries: dict[str, EntryRecord] = {}
        self._expired: set[str] = set()
        self._children: dict[SpiffeId, set[str]] = {}
        self._by_spiffe: dict[SpiffeId, set[str]] = {}
        self._aliases: set[str] = set()
        self._alias_by_min: dict[Selector, set[str]] = {}
        self._expiry: list[tuple[int, str]] = []
        # Revision r (log_floor < r <= revision) changed entry log_ids[r-floor-1],
        # which was log_old[...] before (None: absent or expired).
        self.revision = 0
        self._log_floor = 0
        self._log_ids: list[str] = []
        self._log_old: list[EntryRecord | None] = []
        self._views: dict[SpiffeId, _View] = {}
        self._last_event = 0
        self._gaps: dict[int, float] = {}
        # Commits of any thread notify: the increment must not lose one (a lost one
        # can leave the counter equal to the last polled, and the commit unseen).
        self._changes_lock = threading.Lock()
        self._local_changes = 0
        self._seen_local_changes = 0
        self._last_poll = float("-inf")
        # Foreign bundle change events seen (a version, compared for equality only).
        self.bundles_version = 0

    # ---- building and tailing ----------------------------------------------------

    def build(self) -> None:
        """Load every entry, then catch up with the events written meanwhile."""
        last = self._feed.last_event_id()
        entries = self._feed.all_entries()
        now = self._now()
        with self._lock:
            for entry in entries:
                self._put(entry, now)
            # Building is not a change any agent must hear about.
            self._log_ids.clear()
            self._log_old.clear()
            self._log_floor = self.revision
            # Events up to GAP_LOOKBACK below `last` are read again: one whose
            # transaction was still open while we loaded shows up as a gap.
            self._last_event = max(0, last - GAP_LOOKBACK)
        self.poll()
        event("entry index built", entries=len(entries), generation=self.generation)

    def notify_local_change(self) -> None:
        """This process committed an entry change: poll before the next sync.

        Called from whichever thread committed (gRPC, controllers): thread-safe.
        """
        with self._changes_lock:
            self._local_changes += 1

    def catch_up(self) -> None:
        """Poll the event log if this process wrote or the poll interval passed."""
        if (self._local_changes != self._seen_local_changes
                or self._monotonic() - self._last_poll >= self._poll_interval):
            self.poll()

    def poll(self) -> None:
        """Read new change events and apply the entries they name.

        Page by page: each read and each entry load is bounded, and the index lock
        (which syncs take) is held for one page at a time, not the whole backlog.
        """
        with self._poll_lock:
            seen = self._local_changes
            self._last_poll = self._monotonic()
            also: Collection[int] = self._gaps.keys()
            while True:
                after = self._last_event
                events = self._feed.events_after(after, also, limit=EVENT_PAGE)
                also = ()  # gaps are asked for once per poll
                self._apply_events(events)
                if sum(1 for event_id, _ in events if event_id > after) < EVENT_PAGE:
                    break
            self._seen_local_changes = seen

    def _apply_events(self, events: list[tuple[int, str]]) -> None:
        ids = {entry_id for _, entry_id in events}
        bundle_changes = FOREIGN_BUNDLES_CHANGED in ids
        ids.discard(FOREIGN_BUNDLES_CHANGED)
        records = {e.id: e for e in self._feed.entries_by_id(ids)} if ids else {}
        now = self._now()
        with self._lock:
            for event_id, _ in events:
                self._gaps.pop(event_id, None)
                if event_id > self._last_event:
                    if event_id - self._last_event <= MAX_GAP:
                        for missing in range(self._last_event + 1, event_id):
                            self._gaps[missing] = now
                    self._last_event = event_id
            for entry_id in sorted(ids):
                self._apply(entry_id, records.get(entry_id), now)
            self._expire(now)
            self._gaps = {i: t for i, t in self._gaps.items() if now - t < GAP_TIMEOUT}
            if bundle_changes:
                self.bundles_version += 1

    def _now(self) -> int:
        return int(self._clock.now().timestamp())

    # ---- the index itself ----------------------------------------------------------

    def _live(self, entry_id: str) -> EntryRecord | None:
        if entry_id in self._expired:
            return None
        return self._entries.get(entry_id)

    def _link(self, e: EntryRecord) -> None:
        self._by_spiffe.setdefault(e.spiffe_id, set()).add(e.id)
        if e.parent_id == self._server_id:
            self._aliases.add(e.id)
            # An alias without selectors matches no node (selectors_match).
            if e.selectors:
                self._alias_by_min.setdefault(min(e.selectors), set()).add(e.id)
        else:
            self._children.setdefault(e.parent_id, set()).add(e.id)

    def _unlink(self, e: EntryRecord) -> None:
        _discard(self._by_spiffe, e.spiffe_id, e.id)
        if e.parent_id == self._server_id:
            self._aliases.discard(e.id)
            if e.selectors:
                _discard(self._alias_by_min, min(e.selectors), e.id)
        else:
            _discard(self._children, e.parent_id, e.id)

    def _put(self, e: EntryRecord, now: int) -> None:
        self._entries[e.id] = e
        if _expired(e, now):
            self._expired.add(e.id)
            return
        self._link(e)
        if e.expires_at:
            heapq.heappush(self._expiry, (e.expires_at, e.id))

    def _log(self, entry_id: str, old: EntryRecord | None) -> None:
        self.revision += 1
        self._log_ids.append(entry_id)
        self._log_old.append(old)
        if len(self._log_ids) > MAX_CHANGE_LOG:
            cut = len(self._log_ids) // 2
            del self._log_ids[:cut]
            del self._log_old[:cut]
            self._log_floor += cut

    def _apply(self, entry_id: str, new: EntryRecord | None, now: int) -> None:
        old = self._entries.get(entry_id)
        if old == new:
            return
        old_live = self._live(entry_id)
        if old is not None:
            if old_live is not None:
                self._unlink(old)
            self._expired.discard(entry_id)
            del self._entries[entry_id]
        if new is not None:
            self._put(new, now)
        if old_live is not None or self._live(entry_id) is not None:
            self._log(entry_id, old_live)

    def _expire(self, now: int) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            at, entry_id = heapq.heappop(self._expiry)
            e = self._live(entry_id)
            if e is None or e.expires_at != at:
                continue  # changed or removed since it was queued
            self._unlink(e)
            self._expired.add(entry_id)
            self._log(entry_id, e)

    # ---- authorization -------------------------------------------------------------

    def _alias_matches(self, e: EntryRecord, selectors: frozenset[Selector]) -> bool:
        return e.parent_id == self._server_id and selectors_match(e.selectors, selectors)

    def _matching_aliases(self, selectors: frozenset[Selector]) -> set[str]:
        found: set[str] = set()
        for sel in selectors:
            for alias_id in self._alias_by_min.get(sel, ()):
                if selectors_match(self._entries[alias_id].selectors, selectors):
                    found.add(alias_id)
        return found

    def _closure(self, agent_id: SpiffeId, view: _View) -> None:
        """Fill ``view.authorized``, ``reach`` and ``federates`` from its aliases."""
        reach: Counter[SpiffeId] = Counter([agent_id])
        for alias_id in view.aliases:
            reach[self._entries[alias_id].spiffe_id] += 1
        # The server's ID is never followed: its children are aliases, which
        # must pass the selector test, not be inherited by nesting.
        frontier = [p for p in reach if p != self._server_id]
        authorized: set[str] = set()
        federates: Counter[TrustDomain] = Counter()
        while frontier:
            parent = frontier.pop()
            for entry_id in self._children.get(parent, ()):
                if entry_id in authorized:
                    continue
                authorized.add(entry_id)
                e = self._entries[entry_id]
                federates.update(e.federates_with)
                if e.spiffe_id not in reach and e.spiffe_id != self._server_id:
                    frontier.append(e.spiffe_id)
                reach[e.spiffe_id] += 1
        view.authorized, view.reach, view.federates = authorized, reach, federates

    def is_authorized(
        self, entry_id: str, *, agent_id: SpiffeId, node_selectors: Iterable[Selector]
    ) -> EntryRecord | None:
        """The entry if it is authorized for the agent now, else None.

        Walks up from the entry's parent, so it costs the depth of the nesting,
        not the number of entries; it leaves the agent's sync view alone.
        """
        selectors = frozenset(node_selectors)
        with self._lock:
            e = self._live(entry_id)
            if e is None or e.parent_id == self._server_id:
                return None
            visited: set[SpiffeId] = set()
            pending = [e.parent_id]
            while pending:
                parent = pending.pop()
                if parent in visited or parent == self._server_id:
                    continue
                if parent == agent_id:
                    return e
                visited.add(parent)
                for provider_id in self._by_spiffe.get(parent, ()):
                    provider = self._entries[provider_id]
                    if provider.parent_id == self._server_id:
                        if selectors_match(provider.selectors, selectors):
                            return e
                    else:
                        pending.append(provider.parent_id)
            return None

    def authorized_entries(
        self, *, agent_id: SpiffeId, node_selectors: Iterable[Selector]
    ) -> list[EntryRecord]:
        """Every entry authorized for the agent now (leaves its sync view alone)."""
        view = _View(0, frozenset(node_selectors), set(), set())
        with self._lock:
            view.aliases = self._matching_aliases(view.selectors)
            self._closure(agent_id, view)
            return [self._entries[i] for i in sorted(view.authorized)]

    # ---- sync ------------------------------------------------------------------------

    def sync(
        self, *, agent_id: SpiffeId, node_selectors: Iterable[Selector],
        known_generation: str, known_revision: int,
    ) -> SyncDelta:
        """What the agent must change, given the revision it holds.

        Catches up with the event log first (see :meth:`catch_up`). The answer
        becomes the agent's view: a sync is relative to the last one answered, so
        an agent must present the revision of its last complete sync.
        """
        self.catch_up()
        selectors = frozenset(node_selectors)
        with self._lock:
            self._expire(self._now())
            view = self._views.get(agent_id)
            if (view is None or known_generation != self.generation
                    or known_revision != view.revision or known_revision < self._log_floor):
                return self._full(agent_id, selectors)
            return self._incremental(agent_id, view, selectors)

    def forget(self, agent_id: SpiffeId) -> None:
        """Drop an agent's view (evicted): its next sync is a full one."""
        with self._lock:
            self._views.pop(agent_id, None)

    def _delta(self, view: _View, *, full: bool, send: Iterable[str],
               removed: Iterable[str] = ()) -> SyncDelta:
        return SyncDelta(
            generation=self.generation, revision=view.revision, full=full,
            entries=tuple(self._entries[i] for i in sorted(send)),
            removed=tuple(sorted(removed)), federates_with=frozenset(view.federates),
        )

    def _full(self, agent_id: SpiffeId, selectors: frozenset[Selector]) -> SyncDelta:
        view = _View(self.revision, selectors, self._matching_aliases(selectors), set())
        self._closure(agent_id, view)
        self._views[agent_id] = view
        return self._delta(view, full=True, send=view.authorized)

    def _recompute(self, agent_id: SpiffeId, view: _View, selectors: frozenset[Selector],
                   before: set[str], changed: set[str]) -> SyncDelta:
        view.selectors = selectors
        view.aliases = self._matching_aliases(selectors)
        self._closure(agent_id, view)
        view.revision = self.revision
        after = view.authorized
        send = (after - before) | (after & changed)
        return self._delta(view, full=False, send=send, removed=before - after)

    def _incremental(
        self, agent_id: SpiffeId, view: _View, selectors: frozenset[Selector]
    ) -> SyncDelta:
        start = view.revision - self._log_floor
        # The state of each changed entry when the agent last synced: its first
        # "before" in the log since then.
        old: dict[str, EntryRecord | None] = {}
        for entry_id, before in zip(self._log_ids[start:], self._log_old[start:], strict=True):
            old.setdefault(entry_id, before)

        def recompute() -> SyncDelta:
            return self._recompute(agent_id, view, selectors, set(view.authorized), set(old))

        if selectors != view.selectors:
            return recompute()  # the node re-attested with other selectors
        adds: list[EntryRecord] = []
        drops: list[EntryRecord] = []
        for entry_id, o in old.items():
            n = self._live(entry_id)
            if entry_id in view.aliases or (n is not None and self._alias_matches(n, selectors)):
                return recompute()  # the roots change
            if n is not None and n.parent_id == self._server_id:
                n = None  # an alias of other nodes: not in this agent's graph
            was_in = entry_id in view.authorized
            now_in = n is not None and view.reach[n.parent_id] > 0
            if was_in:
                assert o is not None
                moved = (n is None or not now_in or n.spiffe_id != o.spiffe_id
                         or n.parent_id != o.parent_id)
                if moved and o.spiffe_id in self._children:
                    # Its SPIFFE ID may stop parenting others, and its new parent
                    # may be reachable only through its own descendants (a cycle).
                    return recompute()
                drops.append(o)
            if now_in:
                assert n is not None
                if n.spiffe_id not in view.reach and n.spiffe_id in self._children:
                    return recompute()  # it starts parenting others
                adds.append(n)
        for o in drops:
            view.authorized.discard(o.id)
            _decrement(view.reach, o.spiffe_id)
            for td in o.federates_with:
                _decrement(view.federates, td)
        for n in adds:
            view.authorized.add(n.id)
            view.reach[n.spiffe_id] += 1
            if n.federates_with:
                view.federates.update(n.federates_with)
        view.revision = self.revision
        added = {n.id for n in adds}
        return self._delta(view, full=False, send=added,
                           removed={o.id for o in drops} - added)

    # ---- introspection (tests, benchmarks) -------------------------------------------

    def stats(self) -> Mapping[str, int]:
        """Sizes: entries, aliases, agents with a view, change log length, gaps."""
        with self._lock:
            return {"entries": len(self._entries), "aliases": len(self._aliases),
                    "views": len(self._views), "change_log": len(self._log_ids),
                    "gaps": len(self._gaps), "revision": self.revision}
