"""Alembic environment: migrates the URL that ca.datastore.migrate.alembic_config sets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alembic import context
from sqlalchemy import Connection, text

from ca.datastore.engine import make_engine
from ca.datastore.models import Base

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """Emit SQL without a database connection (``alembic upgrade --sql``)."""
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


# Any constant: the advisory lock's name on PostgreSQL, GET_LOCK's on MariaDB.
MIGRATION_LOCK_ID = 0x5167_11_00
MIGRATION_LOCK_NAME = "sigil_migrations"
MIGRATION_LOCK_TIMEOUT_S = 300


@contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    """Serialize migrations of servers that start together on one shared database.

    Without it two servers starting on an empty PostgreSQL or MariaDB database both
    run CREATE TABLE and one fails. SQLite needs nothing: the migration transaction
    begins IMMEDIATE, which already excludes other writers.
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    elif dialect in ("mysql", "mariadb"):
        got = connection.execute(
            text("SELECT GET_LOCK(:name, :timeout)"),
            {"name": MIGRATION_LOCK_NAME, "timeout": MIGRATION_LOCK_TIMEOUT_S},
        ).scalar()
        if got != 1:
            raise RuntimeError(f"another server held the migration lock for "
                               f"{MIGRATION_LOCK_TIMEOUT_S}s")
    else:
        yield
        return
    # Session-level locks outlive this autobegun transaction; end it so Alembic
    # starts its own.
    connection.commit()
    try:
        yield
    finally:
        if dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
        else:
            connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": MIGRATION_LOCK_NAME})
        connection.commit()


def run_migrations_online() -> None:
    """Run migrations over a connection made with the datastore's engine settings."""
    url = context.config.get_main_option("sqlalchemy.url") or ""
    engine = make_engine(url)
    try:
        with engine.connect() as connection, _migration_lock(connection):
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
                render_as_batch=url.startswith("sqlite"),
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
