"""Bulk-insert registration entries for benchmarks and the large-sync test.

Creating 100,000 entries through the admin API takes one transaction each; this
writes the same rows (entries, selectors, federated trust domains, one
``entry_created`` change event each) in a few executemany statements, so a server
tailing the change log sees them exactly as it would see entries created one by one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, func, insert, select

from ca.datastore import models as m
from ca.datastore.records import selector_hash
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

BATCH = 5000


@dataclass(frozen=True, slots=True)
class NewEntry:
    """An entry to insert."""

    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    federates_with: tuple[TrustDomain, ...] = ()


def insert_entries(engine: Engine, entries: Sequence[NewEntry]) -> list[str]:
    """Insert the entries and their change events; return their ids in order."""
    now = int(time.time())
    ids = [str(uuid.uuid4()) for _ in entries]
    for start in range(0, len(entries), BATCH):
        # One transaction per batch: a server sharing the SQLite file must not
        # wait for the write lock longer than its busy timeout.
        with engine.begin() as conn:
            chunk = list(zip(ids[start:start + BATCH], entries[start:start + BATCH],
                             strict=True))
            conn.execute(insert(m.ChangeEvent), [
                {"kind": "entry_created", "entry_id": i, "at": now} for i, _ in chunk])
            revision = int(conn.scalar(select(func.max(m.ChangeEvent.id))) or 0)
            conn.execute(insert(m.RegistrationEntry), [
                {"id": i, "spiffe_id": str(e.spiffe_id), "parent_id": str(e.parent_id),
                 "selector_hash": selector_hash(e.spiffe_id, e.parent_id, e.selectors),
                 "x509_svid_ttl": 0, "jwt_svid_ttl": 0, "hint": "", "admin": False,
                 "downstream": False, "expires_at": 0, "revision": revision,
                 "created_at": now, "updated_at": now}
                for i, e in chunk])
            conn.execute(insert(m.EntrySelector), [
                {"entry_id": i, "type": s.type, "value": s.value}
                for i, e in chunk for s in sorted(set(e.selectors))])
            federated = [{"entry_id": i, "trust_domain": td.name}
                         for i, e in chunk for td in e.federates_with]
            if federated:
                conn.execute(insert(m.EntryFederatesWith), federated)
    return ids
