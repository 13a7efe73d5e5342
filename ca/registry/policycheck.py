"""Stored entries against the issuance policy: the start-up report and ``entry check``.

An entry written before the policy (or before a rule changed) may break it. Such
an entry is not served: signing refuses its SVIDs with PermissionDenied naming
the rule (ca/api/agent.py, through :meth:`ca.config.policy.Policy.scope`). This module
finds them all at once, so an operator hears about them at start (one log line
each and a count) and can list them with ``sigil-server entry check``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from attestation.node import k8s_psat
from ca.config.policy import SERVER_PATH, Policy, Violation
from ca.datastore import Datastore, EntryRecord
from ca.datastore.records import EntryFilter
from ca.log import event
from identity.selectors import Selector
from identity.spiffeid import SpiffeId

PAGE = 1000


@dataclass(frozen=True, slots=True)
class EntryViolation:
    """A stored entry and the first rule it breaks."""

    entry: EntryRecord
    violation: Violation


def _entries(datastore: Datastore) -> Iterator[EntryRecord]:
    after: tuple[int, str] | None = None
    while True:
        rows = datastore.list_entries_page(EntryFilter(), limit=PAGE, after=after)
        yield from rows
        if len(rows) < PAGE:
            return
        after = (rows[-1].created_at, rows[-1].id)


def _node_selectors(datastore: Datastore) -> dict[SpiffeId, frozenset[Selector]]:
    out: dict[SpiffeId, frozenset[Selector]] = {}
    after: str | None = None
    while True:
        nodes = datastore.list_nodes_page(limit=PAGE, after=after)
        for node in nodes:
            out[node.spiffe_id] = frozenset(node.selectors)
        if len(nodes) < PAGE:
            return out
        after = str(nodes[-1].spiffe_id)


def find_violations(datastore: Datastore, policy: Policy) -> list[EntryViolation]:
    """Every stored entry that breaks the policy, in creation order.

    Parents are judged as at create time (:meth:`Policy.check_entry`): by their
    ID, and by what is known of the agents they reach (the attested agent's node
    selectors, the selectors of node aliases with that ID).
    """
    if not policy:
        return []
    entries = list(_entries(datastore))
    nodes = _node_selectors(datastore) if policy.has_selector_rules else {}
    aliases: dict[SpiffeId, list[frozenset[Selector]]] = {}
    if policy.has_selector_rules:
        for e in entries:
            if e.parent_id.path == SERVER_PATH and e.selectors:
                aliases.setdefault(e.spiffe_id, []).append(frozenset(e.selectors))
    found: list[EntryViolation] = []
    for e in entries:
        known = list(aliases.get(e.parent_id, ()))
        if e.parent_id in nodes:
            known.append(nodes[e.parent_id])
        elif policy.has_selector_rules:
            implied = k8s_psat.implied_selectors(e.parent_id)
            if implied:
                known.append(frozenset(implied))
        violation = policy.check_entry(e, parent_selectors=known)
        if violation is not None:
            found.append(EntryViolation(e, violation))
    return found


def report_at_start(datastore: Datastore, policy: Policy) -> int:
    """Log each stored entry that breaks the policy, then the count; the count."""
    if not policy:
        return 0
    found = find_violations(datastore, policy)
    for v in found:
        event("entry violates policy", level=logging.WARNING, entry_id=v.entry.id,
              spiffe_id=v.entry.spiffe_id, parent_id=v.entry.parent_id,
              rule=v.violation.rule, reason=v.violation.message)
    event("policy checked", level=logging.WARNING if found else logging.INFO,
          rules=len(policy.rules), violations=len(found))
    return len(found)
