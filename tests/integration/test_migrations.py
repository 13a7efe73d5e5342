"""migrations/ on SQLite, PostgreSQL and MariaDB: down to base and up to head, step by
step, with no drift between the migrated schema and the models."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

import migrations
from ca.datastore.models import Base

TABLES = {
    "registration_entries", "entry_selectors", "entry_dns_names", "entry_federates_with",
    "attested_nodes", "node_selectors", "join_tokens", "bundles", "ca_keys", "change_events",
    "datastore_info",
}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_down_to_base_then_up_to_head_without_drift(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")  # nothing may depend on the working directory
    assert _tables(database_url) >= TABLES | {"alembic_version"}
    migrations.downgrade(database_url, "base")
    assert _tables(database_url) <= {"alembic_version"}
    migrations.upgrade(database_url, "head")
    assert _tables(database_url) >= TABLES
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


@pytest.mark.slow
def test_every_revision_goes_down_and_up(database_url: str) -> None:
    script = ScriptDirectory.from_config(migrations.alembic_config(database_url))
    revisions = [r.revision for r in script.walk_revisions("base", "heads")]  # newest first
    for rev in revisions:
        migrations.downgrade(database_url, "-1")
        migrations.upgrade(database_url, rev)
        migrations.downgrade(database_url, "-1")
    assert _tables(database_url) <= {"alembic_version"}
    migrations.upgrade(database_url, "head")
    assert _tables(database_url) >= TABLES


def test_mariadb_tables_compare_byte_for_byte(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        if engine.dialect.name not in ("mysql", "mariadb"):
            pytest.skip("collations are a MariaDB/MySQL matter")
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT table_name, column_name, collation_name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND collation_name IS NOT NULL "
                "AND table_name <> 'alembic_version'"
            )).all()
            default = conn.execute(text("SELECT @@collation_database")).scalar_one()
    finally:
        engine.dispose()
    assert rows, "no string columns found"
    assert {r[2] for r in rows} == {"utf8mb4_bin"}, rows
    assert default == "utf8mb4_bin"  # tables that later revisions create inherit it


@pytest.mark.slow
def test_servers_starting_together_migrate_once(database_url: str) -> None:
    # Servers started at once on a fresh shared database each run "upgrade head"
    # (separate processes: Alembic's context is process-global); the migration lock
    # makes one do the work and the others find the schema at head.
    migrations.downgrade(database_url, "base")
    code = "import sys, migrations; migrations.upgrade(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, database_url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)
    assert _tables(database_url) >= TABLES
