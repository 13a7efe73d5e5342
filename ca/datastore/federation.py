"""Datastore queries for federation relationships (a part of :class:`Datastore`).

Kept in their own module so the federation code and the rest of the repository
change independently; :class:`~ca.datastore.repository.Datastore` inherits them.
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ca.config.relationship import Relationship
from ca.datastore import models as m
from ca.errors import AlreadyExistsError, NotFoundError
from identity.spiffeid import SpiffeId, TrustDomain


def _relationship(row: m.FederationRelationshipRow) -> Relationship:
    return Relationship(
        trust_domain=TrustDomain(row.trust_domain),
        bundle_endpoint_url=row.bundle_endpoint_url,
        profile=row.profile,
        endpoint_spiffe_id=(SpiffeId.parse(row.endpoint_spiffe_id)
                            if row.endpoint_spiffe_id else None),
        created_at=row.created_at, updated_at=row.updated_at,
    )


class FederationQueries:
    """Create, read, update and delete federation relationships."""

    def _session(self) -> AbstractContextManager[Session]:
        raise NotImplementedError  # provided by Datastore

    def create_relationship(self, rel: Relationship, *, now: dt.datetime) -> Relationship:
        """Store a new relationship.

        Raises:
            AlreadyExistsError: one exists for that trust domain.
        """
        ts = int(now.timestamp())
        with self._session() as s:
            if s.get(m.FederationRelationshipRow, rel.trust_domain.name) is not None:
                raise AlreadyExistsError(
                    f"a federation relationship with {rel.trust_domain} already exists")
            row = m.FederationRelationshipRow(
                trust_domain=rel.trust_domain.name, bundle_endpoint_url=rel.bundle_endpoint_url,
                profile=rel.profile,
                endpoint_spiffe_id=str(rel.endpoint_spiffe_id or ""),
                created_at=ts, updated_at=ts)
            s.add(row)
            s.flush()
            return _relationship(row)

    def put_relationship(self, rel: Relationship, *, now: dt.datetime) -> Relationship:
        """Create or replace a relationship (configured ones are applied this way)."""
        ts = int(now.timestamp())
        with self._session() as s:
            row = s.get(m.FederationRelationshipRow, rel.trust_domain.name,
                        with_for_update=True)
            if row is None:
                row = m.FederationRelationshipRow(trust_domain=rel.trust_domain.name,
                                                  created_at=ts)
                s.add(row)
            row.bundle_endpoint_url = rel.bundle_endpoint_url
            row.profile = rel.profile
            row.endpoint_spiffe_id = str(rel.endpoint_spiffe_id or "")
            row.updated_at = ts
            s.flush()
            return _relationship(row)

    def update_relationship(self, rel: Relationship, *, now: dt.datetime) -> Relationship:
        """Replace an existing relationship's fields.

        Raises:
            NotFoundError: there is none for that trust domain.
        """
        with self._session() as s:
            row = s.get(m.FederationRelationshipRow, rel.trust_domain.name,
                        with_for_update=True)
            if row is None:
                raise NotFoundError(f"no federation relationship with {rel.trust_domain}")
            row.bundle_endpoint_url = rel.bundle_endpoint_url
            row.profile = rel.profile
            row.endpoint_spiffe_id = str(rel.endpoint_spiffe_id or "")
            row.updated_at = int(now.timestamp())
            s.flush()
            return _relationship(row)

    def get_relationship(self, trust_domain: TrustDomain) -> Relationship | None:
        """The relationship with ``trust_domain``, or None."""
        with self._session() as s:
            row = s.get(m.FederationRelationshipRow, trust_domain.name)
            return None if row is None else _relationship(row)

    def list_relationships(self) -> list[Relationship]:
        """Every relationship, ordered by trust domain."""
        with self._session() as s:
            rows = s.scalars(select(m.FederationRelationshipRow)
                             .order_by(m.FederationRelationshipRow.trust_domain))
            return [_relationship(r) for r in rows]

    def delete_relationship(self, trust_domain: TrustDomain) -> Relationship:
        """Remove a relationship (its bundle stays: ``bundle delete`` removes it).

        Raises:
            NotFoundError: there is none.
        """
        with self._session() as s:
            row = s.get(m.FederationRelationshipRow, trust_domain.name)
            if row is None:
                raise NotFoundError(f"no federation relationship with {trust_domain}")
            rel = _relationship(row)
            s.execute(delete(m.FederationRelationshipRow)
                      .where(m.FederationRelationshipRow.trust_domain == trust_domain.name))
            return rel


__all__ = ["FederationQueries"]
