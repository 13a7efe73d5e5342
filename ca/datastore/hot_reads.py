"""The read every agent call makes: its node's state.

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

from collections.abc import Sequence
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


class _KeyedRead:
    """One compiled SELECT of one row by key, run on pooled DB-API connections.

    Args:
        engine: the datastore's read engine (on SQLite its reads take no write lock).
        statement: the SELECT, with one bound parameter named ``key``.
    """

    def __init__(self, engine: Engine, statement: Any) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self._engine = engine
        self._sql = str(compiled)
        # The dialect's own parameter style: positional (SQLite's "?") or named
        # (psycopg's and PyMySQL's "%(name)s").
        self._positional = bool(compiled.positional)
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error

    def rows(self, keys: Sequence[str]) -> list[Any]:
        """The row of each key (None where there is none), in one connection.

        Raises:
            DatastoreError: the database failed.
        """
        out: list[Any] = []
        try:
            # A pooled connection as the ORM would use (pre-pinged where the engine
            # says so, rolled back when returned).
            conn = self._engine.raw_connection()
            try:
                cursor = conn.cursor()
                try:
                    for key in keys:
                        cursor.execute(self._sql, (key,) if self._positional else {"key": key})
                        out.append(cursor.fetchone())
                finally:
                    cursor.close()
            finally:
                conn.close()
        except (self._dbapi_error, SQLAlchemyError) as exc:
            raise DatastoreError(f"datastore error: {type(exc).__name__}: {exc}") from exc
        return out


class NodeStateReader:
    """Reads :class:`NodeState` rows by agent ID, one statement each.

    Args:
        engine: the datastore's read engine.
    """

    def __init__(self, engine: Engine) -> None:
        n = m.AttestedNode
        self._read = _KeyedRead(engine, select(
            n.serial, n.new_serial, n.banned, n.created_at, n.updated_at,
        ).where(n.spiffe_id == bindparam("key")))

    def read(self, spiffe_id: SpiffeId) -> NodeState | None:
        """The node's state, or None when no node has that ID.

        Raises:
            DatastoreError: the database failed.
        """
        (row,) = self._read.rows([str(spiffe_id)])
        if row is None:
            return None
        serial, new_serial, banned, created_at, updated_at = row
        return NodeState(int(serial), int(new_serial) if new_serial else None, bool(banned),
                         int(created_at), int(updated_at))
