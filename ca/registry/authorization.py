"""Which registration entries an agent may receive (DESIGN flow 3, plus nesting).

An entry is authorized for an agent when its parent is:
- the agent's ID;
- the SPIFFE ID of a node-alias entry (an entry whose parent is the server's ID)
  whose selectors are all among the agent's node selectors; or
- the SPIFFE ID of an entry already authorized for the agent (nesting), followed
  breadth-first with a visited set, so a cycle of entries ends.

Node-alias entries themselves are not handed out: they name the node, not a
workload on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Set

from ca.datastore.records import EntryRecord
from identity.selectors import Selector, selectors_match
from identity.spiffeid import SpiffeId

EntriesByParent = Callable[[Set[SpiffeId]], Iterable[EntryRecord]]


def node_aliases(
    alias_candidates: Iterable[EntryRecord], node_selectors: Iterable[Selector]
) -> list[EntryRecord]:
    """The node-alias entries (parent = server) that select this node."""
    available = set(node_selectors)
    return [e for e in alias_candidates if selectors_match(e.selectors, available)]


def authorized_entries(
    *,
    agent_id: SpiffeId,
    node_selectors: Iterable[Selector],
    server_id: SpiffeId,
    entries_by_parent: EntriesByParent,
    now: int,
) -> list[EntryRecord]:
    """Every entry authorized for the agent, each once, in discovery order.

    Args:
        agent_id: the calling agent's ID.
        node_selectors: the agent's node selectors, from its attestation.
        server_id: the server's ID; entries parented to it are node aliases.
        entries_by_parent: returns the entries whose parent is any of the given IDs.
        now: unix seconds; entries past their ``expires_at`` are left out.
    """
    live_aliases = (a for a in entries_by_parent({server_id})
                    if not (a.expires_at and a.expires_at <= now))
    aliases = node_aliases(live_aliases, node_selectors)
    frontier: set[SpiffeId] = {agent_id, *(a.spiffe_id for a in aliases)}
    # The server's ID is never a parent to follow from here: its children are aliases,
    # which must pass the selector test above, not be inherited by nesting.
    visited: set[SpiffeId] = {server_id}
    found: dict[str, EntryRecord] = {}
    while frontier:
        parents = frontier - visited
        if not parents:
            break
        visited |= parents
        frontier = set()
        for entry in entries_by_parent(parents):
            if entry.id in found or (entry.expires_at and entry.expires_at <= now):
                continue
            found[entry.id] = entry
            frontier.add(entry.spiffe_id)
    return list(found.values())


def is_authorized(entry_id: str, entries: Iterable[EntryRecord]) -> EntryRecord | None:
    """The entry with ``entry_id`` among ``entries``, or None."""
    return next((e for e in entries if e.id == entry_id), None)
