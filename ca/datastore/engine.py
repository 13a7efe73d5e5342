"""Engines for the three supported databases, with every per-dialect choice in one place.

``database_url`` selects the database:

- ``sqlite:///PATH`` (the default, under ``data_dir``): WAL journal, foreign keys
  on, a busy timeout, and write transactions that take the write lock up front;
- ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`` (psycopg 3);
- ``mysql+pymysql://USER:PASSWORD@HOST:PORT/DB`` (MariaDB or MySQL; utf8mb4).

Anything else is a :class:`~ca.errors.ConfigError` naming the URL's scheme (never
the whole URL: it may carry a password).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event

# The URL rules live in ca/config/dburl.py (no SQLAlchemy at import: the config uses them).
from ca.config.dburl import SUPPORTED_DRIVERS, dialect_of, parse_database_url

__all__ = [
    "MAX_OVERFLOW", "POOL_RECYCLE_SECONDS", "POOL_SIZE", "SQLITE_BUSY_TIMEOUT_MS",
    "SUPPORTED_DRIVERS", "dialect_of", "make_engine", "parse_database_url",
]

SQLITE_BUSY_TIMEOUT_MS = 10_000

# Server pools: one connection per concurrently running RPC handler thread is
# plenty; overflow absorbs bursts (batch signing, sync storms) without holding
# idle connections on a shared database server.
POOL_SIZE = 10
MAX_OVERFLOW = 20
# Below MariaDB's default wait_timeout (8h) and typical proxy idle limits, so a
# pooled connection is replaced before the server drops it.
POOL_RECYCLE_SECONDS = 1800


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run while one writer commits; foreign keys are off by default
    # in SQLite and the cascades depend on them; the busy timeout makes a second
    # writer wait instead of failing at once. synchronous=NORMAL under WAL loses at
    # most the last commits on power loss, never on a process crash, and never
    # corrupts the file.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
    # Let SQLAlchemy's "begin" event issue BEGIN itself (see _on_sqlite_begin).
    dbapi_conn.isolation_level = None


READ_ONLY = "sigil_read_only"
"""Execution option of connections that only read (see :func:`_on_sqlite_begin`)."""


def _on_sqlite_begin(conn: Any) -> None:
    # A deferred BEGIN takes the write lock only at the first write; if another
    # connection committed since this one first read, SQLite fails the write at
    # once with SQLITE_BUSY (the busy timeout does not apply to that case), so a
    # read-check-then-insert such as create_entry could fail spuriously under
    # concurrency. IMMEDIATE takes the write lock at BEGIN, waiting up to the busy
    # timeout; WAL readers are never blocked by it. A transaction that only reads
    # needs no write lock at all: it begins deferred and sees one snapshot, so
    # reads (every agent call authenticates, every sync polls) never queue
    # behind one another or behind writers.
    if conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Create the engine for ``database_url`` with this dialect's settings.

    Raises:
        ConfigError: an unsupported URL (see :func:`parse_database_url`).
    """
    parsed = parse_database_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(
            parsed,
            connect_args={
                "check_same_thread": False,
                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            },
        )
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    options: dict[str, Any] = {
        # A database restart or failover leaves dead connections in the pool.
        "pool_pre_ping": True,
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        "pool_recycle": POOL_RECYCLE_SECONDS,
        # PostgreSQL's default; MariaDB's is REPEATABLE READ, whose gap locks turn
        # concurrent inserts of the same unique key into deadlocks instead of a
        # clean duplicate-key error. The repository relies on conditional UPDATEs
        # and unique constraints, not on snapshot reads.
        "isolation_level": "READ COMMITTED",
    }
    if backend in ("mysql", "mariadb"):
        # utf8mb4: SPIFFE IDs and selectors are UTF-8; MySQL's "utf8" is 3 bytes.
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return create_engine(parsed, **options)
