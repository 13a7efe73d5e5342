"""Datastore queries for SVID revocations (a part of :class:`Datastore`).

Revocations are append-only rows whose autoincrement id is the revision agents
sync by; pruning deletes those past ``expires_at`` (agents drop them on their own
by the same time, so a prune needs no event).
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from ca.datastore import models as m
from identity.revocation import KINDS, X509_SPIFFE_ID, Revocation


def _revocation(row: m.SvidRevocation) -> Revocation:
    return Revocation(id=row.id, kind=row.kind, value=row.value,
                      not_before_max=row.not_before_max, expires_at=row.expires_at,
                      created_at=row.created_at)


def _ts(value: dt.datetime) -> int:
    return int(value.timestamp())


class RevocationQueries:
    """Record, list and prune SVID revocations."""

    def _session(self) -> AbstractContextManager[Session]:
        raise NotImplementedError  # provided by Datastore

    def _reading(self) -> AbstractContextManager[Session]:
        raise NotImplementedError  # provided by Datastore

    def add_revocation(self, kind: str, value: str, *, now: dt.datetime,
                       expires_at: dt.datetime | None,
                       not_before_max: int | None = None) -> Revocation:
        """Record a revocation; an unexpired identical one is returned instead.

        For :data:`~identity.revocation.X509_SPIFFE_ID` every call adds a row (a
        later cutoff revokes more); for the others revoking twice is one row.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown revocation kind {kind!r}")
        r = m.SvidRevocation
        with self._session() as s:
            if kind != X509_SPIFFE_ID:
                held = s.scalars(select(r).where(
                    r.kind == kind, r.value == value,
                    or_(r.expires_at.is_(None), r.expires_at > _ts(now)),
                ).order_by(r.id).limit(1)).first()
                if held is not None:
                    return _revocation(held)
            row = r(kind=kind, value=value, not_before_max=not_before_max,
                    expires_at=None if expires_at is None else _ts(expires_at),
                    created_at=_ts(now))
            s.add(row)
            s.flush()
            return _revocation(row)

    def list_revocations(self, *, now: dt.datetime, after: int = 0) -> list[Revocation]:
        """Unexpired revocations with id > ``after``, by id."""
        r = m.SvidRevocation
        with self._reading() as s:
            rows = s.scalars(select(r).where(
                r.id > after, or_(r.expires_at.is_(None), r.expires_at > _ts(now)),
            ).order_by(r.id))
            return [_revocation(row) for row in rows]

    def last_revocation_id(self) -> int:
        """The highest revocation id ever kept (0 when there is none)."""
        with self._reading() as s:
            return int(s.scalar(select(func.coalesce(func.max(m.SvidRevocation.id), 0))) or 0)

    def prune_revocations(self, *, now: dt.datetime) -> int:
        """Delete revocations past their ``expires_at``; returns how many.

        The newest row is kept whatever its expiry, so the highest id (the list
        version agents sync by) never goes backwards.
        """
        r = m.SvidRevocation
        with self._session() as s:
            newest = s.scalar(select(func.max(r.id)))
            if newest is None:
                return 0
            result = s.execute(delete(r).where(r.expires_at.is_not(None),
                                               r.expires_at <= _ts(now), r.id != newest)
                               .execution_options(synchronize_session=False))
            return int(getattr(result, "rowcount", 0))

    def max_x509_svid_ttl_seconds(self) -> int:
        """The longest X.509-SVID TTL any entry sets (0: none sets one)."""
        with self._reading() as s:
            found = s.scalar(select(func.max(m.RegistrationEntry.x509_svid_ttl)))
            return int(found or 0)

    def max_jwt_svid_ttl_seconds(self) -> int:
        """The longest JWT-SVID TTL any entry sets (0: none sets one)."""
        with self._reading() as s:
            found = s.scalar(select(func.max(m.RegistrationEntry.jwt_svid_ttl)))
            return int(found or 0)
