"""What the entry index (:mod:`ca.registry.entry_index`) reads from the datastore.

Three reads, kept apart from :class:`~ca.datastore.repository.Datastore` because
they serve one reader and are shaped for bulk: every entry at once (Core queries,
four round trips instead of one ORM load per relationship), entries by id, and
the change events after a known one. :class:`DatastoreFeed` implements
:class:`ca.registry.entry_index.EntryFeed`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca.datastore import models as m
from ca.datastore.records import EntryRecord
from ca.datastore.repository import Datastore
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

# Keeps every IN list under each database's bound-parameter limit.
CHUNK = 500
EVENT_PAGE = 5000
"""Change events one read returns at most (besides asked-for gaps)."""


def _chunks(values: list[Any]) -> Iterable[list[Any]]:
    for i in range(0, len(values), CHUNK):
        yield values[i:i + CHUNK]


class DatastoreFeed:
    """Bulk reads of entries and change events from one datastore.

    Args:
        datastore: the server's datastore.
    """

    def __init__(self, datastore: Datastore) -> None:
        self._datastore = datastore
        self._engine = datastore.read_engine  # reads only: no write lock on SQLite

    def on_local_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every commit of this process that wrote a change event.

        The index then catches up at its next sync instead of waiting for its poll
        interval, so an entry created through this server's admin API is seen by
        the very next agent sync.
        """

        def after_flush(session: Session, _ctx: object) -> None:
            if any(isinstance(obj, m.ChangeEvent) for obj in session.new):
                session.info["sigil_entry_change"] = True

        def after_commit(session: Session) -> None:
            if session.info.pop("sigil_entry_change", False):
                callback()

        def after_rollback(session: Session) -> None:
            session.info.pop("sigil_entry_change", None)

        self._datastore.listen_session_event("after_flush", after_flush)
        self._datastore.listen_session_event("after_commit", after_commit)
        self._datastore.listen_session_event("after_rollback", after_rollback)

    def last_event_id(self) -> int:
        """The highest change event id (0 when there is none)."""
        with self._engine.connect() as conn:
            return int(conn.scalar(select(func.coalesce(func.max(m.ChangeEvent.id), 0))) or 0)

    def events_after(self, after: int, also: Collection[int] = (), *,
                     limit: int = EVENT_PAGE) -> list[tuple[int, str]]:
        """``(event id, entry id)`` of events with id > ``after`` or in ``also``, by id.

        At most ``limit`` events with id > ``after`` (the first ones), plus those of
        ``also`` that exist (at most :data:`CHUNK`): one read stays bounded however
        large the backlog (a bulk import); the caller asks again from the last id.
        """
        ev = m.ChangeEvent
        newer = select(ev.id, ev.entry_id).where(ev.id > after).order_by(ev.id).limit(limit)
        with self._engine.connect() as conn:
            found = {int(i): str(e) for i, e in conn.execute(newer)}
            if also:
                wanted = sorted(also)[:CHUNK]
                found.update((int(i), str(e)) for i, e in conn.execute(
                    select(ev.id, ev.entry_id).where(ev.id.in_(wanted))))
        return sorted(found.items())

    def all_entries(self) -> list[EntryRecord]:
        """Every entry."""
        return self._load(None)

    def entries_by_id(self, ids: Collection[str]) -> list[EntryRecord]:
        """The entries with these ids that exist."""
        return self._load(sorted(set(ids))) if ids else []

    def _load(self, ids: list[str] | None) -> list[EntryRecord]:
        e = m.RegistrationEntry
        rows: list[Any] = []
        sels: dict[str, list[Selector]] = defaultdict(list)
        dns: dict[str, list[str]] = defaultdict(list)
        feds: dict[str, list[TrustDomain]] = defaultdict(list)
        with self._engine.connect() as conn:
            for chunk in ([None] if ids is None else _chunks(ids)):
                def where(col: Any, chunk: list[str] | None = chunk) -> Any:
                    return True if chunk is None else col.in_(chunk)
                rows.extend(conn.execute(select(
                    e.id, e.spiffe_id, e.parent_id, e.x509_svid_ttl, e.jwt_svid_ttl, e.hint,
                    e.admin, e.downstream, e.expires_at, e.revision, e.created_at,
                    e.updated_at,
                ).where(where(e.id))))
                s = m.EntrySelector
                for eid, typ, val in conn.execute(
                    select(s.entry_id, s.type, s.value).where(where(s.entry_id)).order_by(s.id)
                ):
                    sels[eid].append(Selector(typ, val))
                d = m.EntryDnsName
                for eid, name in conn.execute(
                    select(d.entry_id, d.name).where(where(d.entry_id)).order_by(d.id)
                ):
                    dns[eid].append(name)
                f = m.EntryFederatesWith
                for eid, td in conn.execute(
                    select(f.entry_id, f.trust_domain).where(where(f.entry_id)).order_by(f.id)
                ):
                    feds[eid].append(TrustDomain(td))
        # Many entries share a parent (and aliases their IDs): parse each string once.
        ids_cache: dict[str, SpiffeId] = {}

        def sid(text: str) -> SpiffeId:
            found = ids_cache.get(text)
            if found is None:
                found = ids_cache[text] = SpiffeId.parse(text)
            return found

        return [
            EntryRecord(
                id=r.id, spiffe_id=sid(r.spiffe_id), parent_id=sid(r.parent_id),
                selectors=tuple(sels.get(r.id, ())), x509_svid_ttl=r.x509_svid_ttl,
                jwt_svid_ttl=r.jwt_svid_ttl, dns_names=tuple(dns.get(r.id, ())),
                federates_with=tuple(feds.get(r.id, ())), hint=r.hint, admin=bool(r.admin),
                downstream=bool(r.downstream), expires_at=r.expires_at, revision=r.revision,
                created_at=r.created_at, updated_at=r.updated_at,
            )
            for r in rows
        ]
