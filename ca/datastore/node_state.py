"""The one read every agent call makes: the state of the caller's node record.

Every agent API call but AttestAgent checks that the caller's SVID is its node's
current one and that the node is not banned, and it must see a ban, an eviction
or a renewal written by any process (the main process's admin API, a worker,
another server on the same database) at once. So each call reads the node's row;
this module makes that read cheap. Loading the whole record through the ORM (a
session, an identity map, a second query for the selectors) cost about 0.5 ms of
CPU a call, more than signing one SVID; this is one statement on a pooled
DB-API connection, compiled once by SQLAlchemy for the engine's dialect.

The row's columns read here change whenever what authentication depends on
changes: ``serial`` and ``new_serial`` (renewal, promotion, a new attestation,
which also replaces the selectors), ``banned``, ``created_at`` (an eviction and a
new attestation under the same ID) and ``updated_at``. So a caller may keep the
rest of a record (its selectors) for as long as this state is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, select
from sqlalchemy.exc import SQLAlchemyError

from ca.datastore import models as m
from ca.datastore.records import NodeRecord
from ca.errors import DatastoreError
from identity.spiffeid import SpiffeId


@dataclass(frozen=True, slots=True)
class NodeState:
    """The columns of a node's row that authentication depends on, as stored."""

    serial: int
    new_serial: int | None
    banned: bool
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, node: NodeRecord) -> NodeState:
        """The state of a record read in full."""
        return cls(node.serial, node.new_serial, node.banned, node.created_at, node.updated_at)


class NodeStateReader:
    """Reads :class:`NodeState` rows by agent ID, one statement each.

    Args:
        engine: the datastore's read engine (on SQLite its reads take no write lock).
    """

    def __init__(self, engine: Engine) -> None:
        n = m.AttestedNode
        statement = select(n.serial, n.new_serial, n.banned, n.created_at, n.updated_at).where(
            n.spiffe_id == bindparam("spiffe_id"))
        compiled = statement.compile(dialect=engine.dialect)
        self._engine = engine
        self._sql = str(compiled)
        # The dialect's own parameter style: positional (SQLite's "?") or named
        # (psycopg's and PyMySQL's "%(name)s").
        self._positional = bool(compiled.positional)
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error

    def read(self, spiffe_id: SpiffeId) -> NodeState | None:
        """The node's state, or None when no node has that ID.

        Raises:
            DatastoreError: the database failed.
        """
        params: Any = (str(spiffe_id),) if self._positional else {"spiffe_id": str(spiffe_id)}
        try:
            # A pooled connection as the ORM would use (pre-pinged where the engine
            # says so, rolled back when returned): one statement, one snapshot.
            conn = self._engine.raw_connection()
            try:
                cursor = conn.cursor()
                try:
                    cursor.execute(self._sql, params)
                    row = cursor.fetchone()
                finally:
                    cursor.close()
            finally:
                conn.close()
        except (self._dbapi_error, SQLAlchemyError) as exc:
            raise DatastoreError(f"datastore error: {type(exc).__name__}: {exc}") from exc
        if row is None:
            return None
        serial, new_serial, banned, created_at, updated_at = row
        return NodeState(int(serial), int(new_serial) if new_serial else None, bool(banned),
                         int(created_at), int(updated_at))
